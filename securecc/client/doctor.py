"""``securecc doctor``: the preflight a new user or a CI job runs first.

One line per check, ``OK``, ``WARN`` or ``FAIL``, with the fix; the exit
status is 1 when any check fails.  It looks at what a compile would meet,
in the order a compile meets it: the user's ticket (and client keytab), the
agent's socket directory, where the hosts come from, and then each host:
its service ticket, an authenticated connection (and the clock skew the
server's status shows), and a trivial compile through the real job path
(ACL, compiler identity, sandbox) with its latency.

A farm that is down still lets a build succeed: every compile falls back
to local, which is why this says so in a line of its own.  ``--strict``
makes "compiles would stay local" a failure, for CI that must never fall
back silently (``SECURECC_FALLBACK=0`` does the same for the build itself).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from securecc import attest
from securecc import protocol as wire
from securecc.client.channel import HostFailure, KdcUnavailable, RemoteFailure, Timeouts, Unattested
from securecc.client.hosts import Host

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SHORT_TICKET = 3600.0  # seconds: a ticket ending within the hour may end during a build
SKEW_WARN, SKEW_FAIL = 60.0, 300.0  # seconds; MIT krb5 refuses authenticators beyond 300 s by default


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.what}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


def ticket_checks(env: Mapping[str, str], kdc_deadline: float) -> list[Check]:
    """The user's ticket (its lifetime, whether it renews) and the client keytab, if one is set."""
    import gssapi
    from gssapi.raw.misc import GSSError

    from securecc.client import tickets
    from securecc.gss import explain

    checks = keytab_checks(env)
    try:
        credentials = tickets.bounded("an initial ticket", lambda: gssapi.Credentials(usage="initiate"), kdc_deadline)
        principal, lifetime = str(credentials.name), float(credentials.lifetime or 0)
    except tickets.NoAnswer as e:
        return [*checks, Check(FAIL, "ticket", str(e), "check the network and krb5.conf, then run kinit")]
    except GSSError as e:  # the explanation says what to do
        return [*checks, Check(FAIL, "ticket", explain(e))]
    renews = renewable(env)
    left = f"{principal}, {duration(lifetime)} left" + (f", {renews}" if renews else "")
    if lifetime < SHORT_TICKET and not (renews or "").startswith("renewable"):
        return [*checks, Check(WARN, "ticket", left, "run kinit before a long build: a ticket that ends mid-build sends the rest local")]
    return [*checks, Check(OK, "ticket", left)]


def renewable(env: Mapping[str, str]) -> str | None:
    """"renewable until ..." or "not renewable", as ``klist -f`` shows the ticket-granting ticket; None if it cannot tell."""
    klist = shutil.which("klist", path=env.get("PATH", os.defpath)) or shutil.which("klist", path="/usr/bin:/usr/sbin")
    if klist is None:
        return None
    try:
        return renewal(subprocess.run([klist, "-f"], capture_output=True, text=True, env=dict(env), timeout=5).stdout)
    except (OSError, subprocess.SubprocessError):
        return None


def renewal(shown: str) -> str | None:
    """What MIT ``klist -f`` output says of the ticket-granting ticket's renewal."""
    block = re.search(r"krbtgt/\S+(?P<rest>(?:\n\s+.*)*)", shown)
    if block is None:
        return None
    until = re.search(r"renew until ([^,\n]+)", block["rest"])
    flags = re.search(r"Flags: (\w+)", block["rest"])
    if flags and "R" in flags[1]:
        return f"renewable until {until[1].strip()}" if until else "renewable"
    return "not renewable" if flags else None


def keytab_checks(env: Mapping[str, str]) -> list[Check]:
    name = env.get("KRB5_CLIENT_KTNAME")
    if not name:
        return []
    path = name.removeprefix("FILE:")
    try:
        st = os.stat(path)
    except OSError as e:
        return [Check(FAIL, "client keytab", f"{path}: {e.strerror}", "fix KRB5_CLIENT_KTNAME or create the keytab")]
    if st.st_mode & 0o077:
        return [Check(FAIL, "client keytab", f"{path} is readable by others (mode {st.st_mode & 0o777:04o})", f"chmod 600 {path}")]
    if not os.access(path, os.R_OK):
        return [Check(FAIL, "client keytab", f"{path} is not readable by you", "chown it to yourself, mode 600")]
    return [Check(OK, "client keytab", path)]


def agent_directory(env: Mapping[str, str]) -> str:
    """Where the shim looks for the agent's socket (as bin/securecc_shim.py and bin/securecc.c decide)."""
    if env.get("SECURECC_AGENT_DIR"):
        return env["SECURECC_AGENT_DIR"]
    runtime = env.get("XDG_RUNTIME_DIR")
    return f"{runtime}/securecc" if runtime else f"/tmp/securecc-{os.getuid()}"


def agent_check(env: Mapping[str, str]) -> Check:
    """The shims hand jobs to an agent only through a directory that is the user's alone."""
    if env.get("SECURECC_AGENT") == "off":
        return Check(OK, "agent", "off (SECURECC_AGENT=off): every compile does its job itself")
    directory = agent_directory(env)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return Check(OK, "agent directory", f"{directory} does not exist yet: the first compile makes it, mode 0700")
    except OSError as e:
        return Check(FAIL, "agent directory", f"{directory}: {e.strerror}", "set SECURECC_AGENT_DIR to a directory of yours")
    if not stat.S_ISDIR(st.st_mode):
        return Check(FAIL, "agent directory", f"{directory} is not a directory", "remove it, or set SECURECC_AGENT_DIR")
    if st.st_uid != os.getuid():
        return Check(FAIL, "agent directory", f"{directory} belongs to uid {st.st_uid}, not you",
                     "set SECURECC_AGENT_DIR to a directory of yours; every compile runs without the agent meanwhile")
    if st.st_mode & 0o077:
        return Check(FAIL, "agent directory", f"{directory} is open to others (mode {st.st_mode & 0o777:04o})",
                     f"chmod 700 {directory}; every compile runs without the agent meanwhile")
    return Check(OK, "agent directory", f"{directory}, yours, mode 0700")


def host_checks(host: Host, identity: str, timeouts: Timeouts, backed_off: float, pins: dict[str, str]) -> tuple[list[Check], bool]:
    """One host: its service ticket, an authenticated connection and its clock, a trivial compile and the key that
    signed its result against the one pinned (``pins``: the client's, by principal; never written here).
    Returns the checks and whether the host would take a job now."""
    from securecc.client import tickets
    from securecc.client.channel import Channel
    from securecc.client.job import working_directory
    from securecc.gss import GSSFailure, Initiator

    name = f"host {host.name}:{host.port}"
    checks = [Check(WARN, name, f"backed off for {backed_off:.0f} s more after failing: compiles skip it meanwhile")] if backed_off else []
    try:
        tickets.first_token(Initiator(host.target), timeouts.kdc)
        checks.append(Check(OK, f"{name} principal", f"{host.target}: service ticket obtained"))
    except tickets.NoAnswer as e:
        return [*checks, Check(FAIL, f"{name} principal", str(e), "check the KDC")], False
    except GSSFailure as e:  # the explanation says what to do
        return [*checks, Check(FAIL, f"{name} principal", str(e))], False
    channel = Channel(host, timeouts=timeouts)
    started = time.monotonic()
    try:
        channel.authenticate()
        handshake = time.monotonic() - started
        asked = time.time()
        status = channel.call(wire.StatusRequest())
        answered = time.time()
        job = wire.Job("gcc", ["-O2"], "c", "-c", working_directory(), "securecc-doctor.c", b"int securecc_doctor;\n",
                       compiler_identity=identity)
        compile_started = time.monotonic()
        reply = channel.call(job)
        latency = time.monotonic() - compile_started
    except Unattested as e:
        return [*checks, Check(FAIL, name, str(e), "tell its admin: compiles refuse its results")], False
    except (HostFailure, KdcUnavailable) as e:
        return [*checks, Check(WARN, name, str(e), "start the server, or take it out of the host list")], False
    except RemoteFailure as e:
        return [*checks, Check(FAIL, name, str(e), "see the message; the server's log says more")], False
    finally:
        channel.close()
    checks.append(Check(OK, f"{name} authentication", f"mutual, sealed session, {handshake * 1000:.0f} ms"))
    if isinstance(status, wire.Status):
        shown = json.loads(status.json)
        skew = shown.get("time", (asked + answered) / 2) - (asked + answered) / 2
        level = OK if abs(skew) <= SKEW_WARN else WARN if abs(skew) <= SKEW_FAIL else FAIL
        checks.append(Check(level, f"{name} clock", f"{skew:+.1f} s from this machine",
                            "" if level == OK else "run NTP on both: beyond 300 s Kerberos refuses the handshake"))
        if shown.get("divergences"):
            checks.append(Check(WARN, f"{name} results", f"clients reported {shown['divergences']} of its results wrong since it started",
                                "its admin: see the divergence records in its audit log"))
    if isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output:
        checks.append(Check(OK, f"{name} compile", f"a trivial compile took {latency * 1000:.0f} ms, same compiler ({identity})"))
        server, key = attest.signer(reply)
        pinned = pins.get(server)
        if pinned is not None and pinned != key:
            checks.append(Check(FAIL, f"{name} result key", f"{server} signs with another key than the one pinned for it: compiles "
                                "refuse its results", 'if its admin rotated the key, delete its entry under "keys" in hosts.json'))
            return checks, False
        checks.append(Check(OK, f"{name} result key", "the one pinned for it" if pinned else "not pinned yet: the next compile pins it"))
        return checks, True
    if isinstance(reply, wire.Busy):
        checks.append(Check(OK, f"{name} compile", f"busy now ({reply.load}/{reply.slots} slots): compiles go to others meanwhile"))
        return checks, True
    if isinstance(reply, wire.Refused) and reply.reason == wire.Reason.COMPILER_MISMATCH:
        checks.append(Check(WARN, f"{name} compile", reply.message, "install the same gcc on both, or gcc jobs stay off this host"))
    elif isinstance(reply, wire.Refused):
        checks.append(Check(FAIL, f"{name} compile", f"refused ({reply.reason}): {reply.message}",
                            "ask the securecc admin for access" if reply.reason.startswith("denied:not") else "see the reason"))
    else:
        checks.append(Check(FAIL, f"{name} compile", "the trivial compile failed", "see the server's log"))
    return checks, False


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 60)} min"


def run(env: Mapping[str, str], strict: bool) -> list[Check]:
    from securecc.client.hosts import HostsError, HostState, configured_hosts
    from securecc.client.job import Invocation, identity_cache, timeouts_of
    from securecc.toolchain import ProbeError, cached_identity

    timeouts = timeouts_of(Invocation([], env, os.getcwd(), False, sys.stdout.buffer, sys.stderr.buffer))
    checks = ticket_checks(env, timeouts.kdc)
    checks.append(agent_check(env))
    state = HostState(env=env)
    try:
        hosts, source = configured_hosts(state, env)
    except HostsError as e:
        return [*checks, Check(FAIL, "hosts", f"cannot parse the host list: {e}", "fix SECURECC_HOSTS or the hosts file")]
    remote = [h for h in hosts if not h.is_local]
    if not remote:
        checks.append(Check(FAIL if strict else WARN, "hosts", f"none from {source}: every compile stays local",
                            "set SECURECC_HOSTS, write ~/.config/securecc/hosts, or publish _securecc._tcp SRV records"))
        return checks
    checks.append(Check(OK, "hosts", f"{len(remote)} from {source}: {', '.join(f'{h.name}:{h.port}' for h in remote)}"))
    if any(c.what == "ticket" and c.status == FAIL for c in checks):
        checks.append(Check(FAIL if strict else WARN, "remote compiles", "none without a ticket: compiles stay local", "see the ticket line"))
        return checks
    gcc = shutil.which("gcc", path=env.get("PATH", os.defpath))
    try:
        identity = cached_identity(gcc, identity_cache(env)) if gcc else ""
    except (ProbeError, OSError):
        identity = ""
    if not identity:
        checks.append(Check(WARN, "compiler", "no gcc in PATH to compare with the servers'", "install gcc or fix PATH"))
    pins = state.data.get("keys") if isinstance(state.data.get("keys"), dict) else {}
    takers = 0
    for host in remote:
        quarantine = state.quarantined(host)
        if quarantine:
            checks.append(Check(WARN, f"host {host.name}:{host.port}", f"quarantined after job {quarantine.get('job_id', '?')}: "
                                f"{quarantine.get('why', '')}; compiles skip it",
                                f"once its admin has fixed it: securecc-hosts --clear {host.name}:{host.port}"))
            continue
        found, takes = host_checks(host, identity, timeouts, state.backed_off(host), pins)
        checks += found
        takers += takes
    if not takers:
        checks.append(Check(FAIL if strict else WARN, "remote compiles", f"none of {len(remote)} hosts takes a job now: compiles stay local",
                            "fix what the lines above say"))
    else:
        checks.append(Check(OK, "remote compiles", f"{takers} of {len(remote)} hosts take jobs"))
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="securecc doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="fail when compiles would stay local (for CI)")
    options = parser.parse_args(argv)
    checks = run(os.environ, options.strict)
    for check in checks:
        print(check.line())
    sys.exit(1 if any(c.status == FAIL for c in checks) else 0)
