"""securecc's client side: one compile, from argv to the outputs.

Direct mode runs this in the ``securecc`` process itself (``bin/securecc``
falls back to it); the agent (:mod:`securecc.client.agent`) runs it for the shim
with sessions kept open.  Either way it imports only what the path taken
needs: no Twisted, no cryptography, gssapi only when a job really goes
remote.

Flow: anything not distributable runs the local compiler (exec, same
arguments).  Otherwise preprocess here, authenticate to a server (mutual
GSS-API), send the sealed job, write the outputs atomically, print the
compiler's messages and exit with its status; a sampled job is compiled here
too, to check the server (:mod:`securecc.client.verify`).  Infrastructure failures
(no ticket, refused, unreachable, server gone mid-job) print one
``securecc:`` line and compile locally; a compile error is returned as is
and never retried.

Why one file of ~600 lines: it is the one path a compile takes, read top to
bottom in the order it runs; the connection is :mod:`securecc.client.channel`.
"""

from __future__ import annotations

import signal

# ^C kills us the way it kills gcc (make expects a signal death), even while
# the imports below run; never a KeyboardInterrupt traceback.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol  # noqa: E402

from securecc import args as argpolicy  # noqa: E402
from securecc.client.channel import (  # noqa: E402
    Channel,
    FailedRemotely,
    HostFailure,
    KdcUnavailable,
    RemoteFailure,
    Timeouts,
)
from securecc.files import cache_path, write_atomically  # noqa: E402

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

    from securecc import protocol as wire
    from securecc.client.hosts import Host, HostState
    from securecc.toolchain import HeaderDigests

MASQUERADE_NAMES = frozenset({"gcc", "cc", "g++", "c++", "clang", "clang++"})


@dataclass
class Invocation:
    """One ``securecc`` run as its caller saw it: this process's in direct mode, the shim's in the agent."""

    argv: list[str]
    env: Mapping[str, str]
    cwd: str  # the caller's os.getcwd()
    stderr_tty: bool
    out: BinaryIO
    err: BinaryIO
    umask: int = 0o022
    watch: FileDescriptorLike | None = None  # a socket that turns readable when the caller has gone (the agent's shim)

    @classmethod
    def here(cls) -> Invocation:
        mask = os.umask(0o022)
        os.umask(mask)
        return cls(sys.argv, os.environ, os.getcwd(), sys.stderr.isatty(), sys.stdout.buffer, sys.stderr.buffer, mask)

    def say(self, message: str) -> None:
        self.err.write(f"securecc: {message}\n".encode())
        self.err.flush()

    def verbose(self, message: str) -> None:
        if self.env.get("SECURECC_VERBOSE"):
            self.say(message)

    def path(self, name: str) -> str:
        return os.path.join(self.cwd, name)


@dataclass
class LocalCompile:
    """Run the local compiler instead: ``exec(path, argv)`` in the caller's process."""

    path: str
    argv: list[str]
    reason: str = ""  # why not remotely: the NotDistributable or RemoteFailure text (the agent counts it)
    failure: bool = False  # a RemoteFailure: the job was meant to go remote


def timeouts_of(inv: Invocation) -> Timeouts:
    """The timeouts, with SECURECC_*_TIMEOUT from the environment."""
    default = Timeouts()
    io = _seconds(inv, "SECURECC_IO_TIMEOUT", default.io)
    return Timeouts(_seconds(inv, "SECURECC_CONNECT_TIMEOUT", default.connect), io,
                    min(io, _seconds(inv, "SECURECC_HANDSHAKE_TIMEOUT", default.handshake)),
                    _seconds(inv, "SECURECC_KDC_TIMEOUT", default.kdc))


CACHED_TICKET_WAIT = 0.25  # seconds a job waits for a ticket during a KDC outage: a cached one takes ~1 ms


def _seconds(inv: Invocation, name: str, default: float) -> float:
    """A timeout from the environment; a value that is not a positive number is named and ignored."""
    text = inv.env.get(name)
    try:
        value = float(text) if text else default
        if value > 0:
            return value
    except ValueError:
        pass
    inv.say(f"{name}={text!r} is not a number of seconds; using {default:g}")
    return default


def find_compiler(inv: Invocation, name: str) -> str | None:
    """The real compiler: ``name`` if it is a path, else the first one in PATH that is not us."""
    if "/" in name:
        path = inv.path(name)
        return path if os.access(path, os.X_OK) else None
    argv0 = inv.argv[0]
    me = os.path.realpath(inv.path(argv0) if "/" in argv0 else (_which(inv, argv0) or argv0))
    return _which(inv, name, skip=me)


def _which(inv: Invocation, name: str, skip: str | None = None) -> str | None:
    """The first executable ``name`` in the caller's PATH, passing over the one that resolves to ``skip``."""
    for directory in inv.env.get("PATH", os.defpath).split(os.pathsep):
        candidate = inv.path(os.path.join(directory or ".", name))
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK) and (skip is None or os.path.realpath(candidate) != skip):
            return candidate
    return None


def exec_local(local: LocalCompile) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(local.path, local.argv)
    except OSError as e:
        sys.stderr.write(f"securecc: cannot run {local.path}: {e.strerror or e}\n")
        sys.exit(127)


def working_directory(env: Mapping[str, str] = os.environ, cwd: str | None = None) -> str:
    """The directory gcc would record: $PWD when it is this directory (as getpwd() does)."""
    cwd = cwd or os.getcwd()
    pwd = env.get("PWD")
    if pwd and os.path.isabs(pwd):
        try:
            if os.path.samestat(os.stat(pwd), os.stat(cwd)):
                return pwd
        except OSError:
            pass
    return cwd


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Sessions(Protocol):
    """Where a job's connection comes from: a fresh one per job (:class:`OneShot`), or the agent's kept ones."""

    def call(self, inv: Invocation, host: Host, job: wire.Job, timeouts: Timeouts) -> wire.Message: ...


class OneShot:
    """Direct mode's sessions: a fresh connection and handshake per job."""

    def call(self, inv: Invocation, host: Host, job: wire.Job, timeouts: Timeouts) -> wire.Message:
        channel = Channel(host, timeouts=timeouts)
        try:
            channel.authenticate()
            return channel.call(job, inv.watch)
        finally:
            channel.close()


def compiler_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What in the caller's environment changes gcc's output: message locale, build date, time zone."""
    environment = {"LC_ALL": "C"}
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        if env.get(name):
            environment["LC_ALL"] = env[name]
            break
    if env.get("SOURCE_DATE_EPOCH"):
        environment["SOURCE_DATE_EPOCH"] = env["SOURCE_DATE_EPOCH"]
    zone = env.get("TZ")
    if zone is None:
        try:
            zone = read_file("/etc/timezone").decode().strip()  # __TIME__ is local time
        except (OSError, UnicodeDecodeError):
            pass
    if zone:
        environment["TZ"] = zone
    return {k: v for k, v in environment.items() if argpolicy.check_environment({k: v}) is None}


def prepare_job(inv: Invocation, compiler: str, compiler_path: str, plan: argpolicy.Plan) -> tuple[wire.Job, bytes] | int:
    """Preprocess here; return (job, the preprocessor's messages) or its failing status.

    The job carries the main file and the project headers it read, at their
    own paths, and names the system headers (under ``/usr``) with their
    digest; the server preprocesses and compiles exactly as ``gcc`` does here,
    from its own ``/usr``, after checking that those headers are the same.
    Only that reproduces a local object in every case: text preprocessed with
    ``-fdirectives-only`` differs under ``-O3 -g`` (extra line-table rows),
    with ``__COUNTER__`` in an ``#if``, ``#pragma push_macro``, ``-pedantic``
    and ``-g3``.  Local preprocessing still finds the files to send, writes
    the ``-MD`` dependency file and catches the user's preprocessing errors.

    Exceptions, kept here: ``.i``/``.ii`` input is sent as it is; a
    preprocessing-only option the server may not run (``-Wp,``, ``-H``,
    ``--sysroot``...) sends the ``-fdirectives-only`` text instead, which is
    exact without debug info, and is kept local with it; ``__TIMESTAMP__``
    (the file's mtime) is kept local.

    The messages are held back until the reply: a local fallback compile
    prints its own, and a server that preprocesses prints them itself.
    """
    from securecc import protocol as wire
    from securecc.toolchain import ProbeError, cached_identity, family

    cwd = working_directory(inv.env, inv.cwd)
    original = read_file(inv.path(plan.source))
    try:
        identity = cached_identity(compiler_path, identity_cache(inv.env))
    except (ProbeError, OSError) as e:
        raise RemoteFailure(str(e)) from None
    kind = family(identity)  # gcc or clang: how to preprocess here (securecc.args)
    argpolicy.check_family(plan, kind)

    def job(language: str, text: bytes, args: list[str], **fields: Any) -> wire.Job:
        if inv.stderr_tty and not any("diagnostics-color" in a for a in args):
            args = [*args, "-fdiagnostics-color=always"]  # gcc would colour a terminal
        return wire.Job(
            compiler=os.path.basename(compiler), args=args, language=language, mode=plan.mode, cwd=cwd,
            source_path=plan.source, source=text, original=b"" if plan.preprocessed else original,
            environment=compiler_environment(inv.env), compiler_identity=identity,
            output_path=plan.output if plan.split_dwarf else "", **fields,
        )

    def server_preprocesses(names: list[str], text: bytes = b"") -> tuple[wire.Job, bytes]:
        """The job for a server that preprocesses; ``names``: the files read, as the preprocessor wrote them."""
        main = os.path.normpath(os.path.join(cwd, plan.source))
        included = [p for p in argpolicy.included_files(names, cwd) if p != main]  # -M names it: sent as the original
        project = argpolicy.project_files(included)
        pch = next((p for p in project if os.path.exists(p + ".gch")), None)
        if pch:  # gcc here reads the .gch instead (CMake's cmake_pch.h), which no server can have
            raise argpolicy.NotDistributable(f"precompiled header {pch}.gch")
        files = {p: read_file(p) for p in project}
        if any(b"__TIMESTAMP__" in data for data in (text, original, *files.values())):
            raise argpolicy.NotDistributable("uses __TIMESTAMP__")
        system = argpolicy.system_files(included)
        return job(f"{plan.language}-source", b"", plan.source_args or [], include_paths=list(files),
                   includes=list(files.values()), system_headers=system, system_digest=system_headers().of(system),
                   directories=argpolicy.lookup_directories(plan, names, cwd)), b""

    if plan.preprocessed:
        return job(plan.language, original, plan.remote_args), b""
    if plan.language == "assembler":  # nothing to preprocess: as reads the file itself
        if argpolicy.assembler_reads_files(original):
            raise argpolicy.NotDistributable("assembler .include or .incbin")
        return job("assembler-source", b"", plan.remote_args, system_digest=system_headers().of([])), b""
    import subprocess

    def run(command: list[str]) -> subprocess.CompletedProcess[bytes]:
        """Run the preprocessor with its output in memory files: one read each instead of a pipe's ~60 wake-ups."""
        out, err = os.memfd_create("securecc-cpp-out"), os.memfd_create("securecc-cpp-err")
        try:
            status = subprocess.run(command, stdout=out, stderr=err, cwd=inv.cwd, env=inv.env).returncode
            return subprocess.CompletedProcess(command, status, os.pread(out, os.fstat(out).st_size, 0),
                                               os.pread(err, os.fstat(err).st_size, 0))
        finally:
            os.close(out)
            os.close(err)

    listing = argpolicy.dependency_command(compiler_path, plan, kind)
    if listing is not None:  # gcc -M: the names without the text; anything unexpected takes the text instead
        rule, target, names = run(listing), argpolicy.dependency_target(plan), None
        if rule.returncode == 0:
            try:
                names = argpolicy.dependency_names(read_file(inv.path(target)) if target else rule.stdout, plan.source)
            except OSError:
                pass
        if names is not None:
            return server_preprocesses(names)
    directives = run(argpolicy.preprocess_command(compiler_path, plan, kind))
    if directives.returncode != 0:  # __COUNTER__ in an #if, say: plain -E reads it, and names the same files
        directives = run(argpolicy.full_preprocess_command(compiler_path, plan))
        if directives.returncode != 0:
            inv.err.write(directives.stderr)
            return directives.returncode
        if plan.source_args is None:
            raise argpolicy.NotDistributable("gcc -fdirectives-only cannot preprocess it")
    if plan.language in argpolicy.ASSEMBLER and (plan.source_args is None or argpolicy.assembler_reads_files(directives.stdout)):
        raise argpolicy.NotDistributable("assembler .include or .incbin, or a preprocessing option")
    if plan.source_args is not None:
        return server_preprocesses(argpolicy.include_markers(directives.stdout), directives.stdout)
    if plan.debug:
        raise argpolicy.NotDistributable("a preprocessing option with -g")
    if argpolicy.uses_push_macro([original, *(read_file(p) for p in argpolicy.included_files(argpolicy.include_markers(directives.stdout), cwd))]):
        raise argpolicy.NotDistributable("#pragma push_macro with a preprocessing option")
    return job(argpolicy.remote_language(plan), argpolicy.remote_text(plan, directives.stdout), plan.remote_args), \
        directives.stderr


_SYSTEM_HEADERS: list[HeaderDigests] = []


def system_headers() -> HeaderDigests:
    """The system headers' digests, kept for the agent's lifetime (a header is re-read only when it changes)."""
    if not _SYSTEM_HEADERS:
        from securecc.toolchain import HeaderDigests

        _SYSTEM_HEADERS.append(HeaderDigests())
    return _SYSTEM_HEADERS[0]


def unrepeated(local: bytes, remote: bytes) -> bytes:
    """The local preprocessor's messages that the server's compile did not print again.

    Macro definitions travel in the text, so their diagnostics ("X redefined")
    come back from the server; #warning and #include messages do not.
    A message is a line that starts a diagnostic plus its indented lines.
    """
    blocks: list[list[bytes]] = []
    for line in local.splitlines(keepends=True):
        if blocks and (line[:1].isspace() or blocks[-1][-1].rstrip().endswith((b",", b":"))):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    return b"".join(b"".join(block) for block in blocks if b"".join(block) not in remote)


def compile_remotely(inv: Invocation, compiler: str, compiler_path: str, plan: argpolicy.Plan, sessions: Sessions | None = None) -> int:
    """Returns the remote compiler's status; raises RemoteFailure to fall back.

    Hosts are tried in the order HostState gives; a BUSY one, or one that
    fails (unreachable, silent, gone mid-job, another compiler version),
    passes the job to the next; a failing one is also backed off.  A
    refusal for who we are (ticket, ACL) ends the attempt: every server
    would say the same.  ``sessions`` makes the connections: OneShot here,
    the agent's pool there.
    """
    from securecc import protocol as wire
    from securecc.client import verify
    from securecc.client.hosts import HostsError, HostState, configured_hosts

    state = HostState(env=inv.env)
    try:
        hosts, source = configured_hosts(state, inv.env)
    except HostsError as e:
        raise RemoteFailure(f"cannot parse the host list ({e}); fix SECURECC_HOSTS") from None
    hosts = [h for h in hosts if not h.is_local]
    if not hosts:
        raise RemoteFailure(f"no compile servers found in {source}; list them in SECURECC_HOSTS")
    candidates = state.order(hosts)
    if not candidates:
        raise RemoteFailure("every compile server is backed off after failures, or quarantined (see securecc --show-hosts)")
    timeouts = timeouts_of(inv)
    need_a_cached_ticket(state, candidates)
    prepared = prepare_job(inv, compiler, compiler_path, plan)
    if isinstance(prepared, int):
        return prepared  # a preprocessing error is the user's, already printed
    job, messages = prepared
    from securecc.cachekey import cache_key

    troubles: list[str] = []
    kdc_trouble: KdcUnavailable | None = None
    if len(candidates) > 1:  # the key's owner first: it may hold the result (hashing 300 KB costs 0.3 ms)
        candidates = state.with_affinity(candidates, cache_key(job.compiler_identity, job))
    for host in candidates:
        started = time.monotonic()
        realm = host.realm
        outage = state.kdc_backed_off(realm)
        try:
            reply = (sessions or OneShot()).call(inv, host, job, timeouts._replace(kdc=CACHED_TICKET_WAIT) if outage else timeouts)
        except HostFailure as e:
            state.failed(host, str(e))
            troubles.append(str(e))
            continue
        except KdcUnavailable as e:  # not the server's fault: the next one may have a cached ticket
            e.quiet = e.pending or outage or not state.kdc_failed(realm, str(e))
            if kdc_trouble is None or not e.quiet:
                kdc_trouble = e
            continue
        if not outage:
            state.kdc_answered(realm)
        if isinstance(reply, wire.Busy):
            troubles.append(f"{host.name} busy ({reply.load}/{reply.slots})")
            continue
        if isinstance(reply, wire.Refused) and reply.reason in wire.ANOTHER_HOST_MAY:
            troubles.append(f"{host.name} refused the job: {reply.message}")
            continue
        if isinstance(reply, wire.Refused):
            raise RemoteFailure(f"{host.name} refused the job: {reply.message}")
        if not isinstance(reply, wire.Result):
            raise RemoteFailure(f"unexpected reply from {host.name}")
        from securecc import attest  # imported by the Channel's check already: cryptography costs 35 ms a start

        if not state.pin(*attest.signer(reply)):  # its attestation holds (Channel checked it): is its key the one we know?
            state.failed(host, "another result signing key")
            raise RemoteFailure(f"{host.name} signed its result with another key than the one pinned for {attest.signer(reply)[0]} "
                                f"in {state.path}: if its admin rotated the key, delete that entry under \"keys\"")
        state.succeeded(host, time.monotonic() - started)
        if reply.exit_status != 0:
            raise FailedRemotely(f"the compile failed on {host.name} (job {reply.job_id}, exit {reply.exit_status})")
        if reply.output is None or (reply.dwo is None) == plan.split_dwarf:
            raise RemoteFailure(f"{host.name} returned no output file, or not the ones asked for")
        outputs = {plan.output: reply.output, **({argpolicy.dwo_path(plan.output): reply.dwo} if reply.dwo else {})}
        if verify.sampled(inv):  # a signature says who made it; compiling it here too says whether it is right
            verify.check(inv, compiler, compiler_path, plan, job, host, reply, state, timeouts)
        if inv.env.get("SECURECC_PROVENANCE"):
            write_provenance(inv, inv.env["SECURECC_PROVENANCE"], outputs, reply)
        for name, data in outputs.items():
            try:
                write_atomically(inv.path(name), data, 0o666 & ~inv.umask)  # the caller's umask, not the agent's
            except OSError as e:
                raise RemoteFailure(f"cannot write {name}: {e.strerror or e}") from None
        inv.out.write(reply.stdout)
        inv.out.flush()
        inv.err.write(unrepeated(messages, reply.stderr) + reply.stderr)
        inv.err.flush()
        inv.verbose(f"compiled {plan.source} on {host.name}:{host.port} (job {reply.job_id})")
        return 0
    if kdc_trouble is not None and not troubles:
        raise kdc_outage(kdc_trouble)
    raise RemoteFailure("; ".join(troubles + ([str(kdc_trouble)] if kdc_trouble else [])))


def write_provenance(inv: Invocation, directory: str, outputs: dict[str, bytes], reply: wire.Result) -> None:
    """SECURECC_PROVENANCE=DIR: one in-toto statement per output received (securecc.attest.provenance), named by
    the output's sha256, written before the output itself: an object that has none was compiled here."""
    import hashlib
    import json

    from securecc import attest

    for name, data in outputs.items():
        statement = attest.provenance(os.path.normpath(inv.path(name)), data, reply)
        path = os.path.join(inv.path(directory), hashlib.sha256(data).hexdigest() + ".json")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomically(path, json.dumps(statement, indent=1).encode() + b"\n", 0o666 & ~inv.umask)
        except OSError as e:
            raise RemoteFailure(f"cannot write the provenance of {name} in {directory}: {e.strerror or e}") from None


def need_a_cached_ticket(state: HostState, candidates: list[Host]) -> None:
    """While every candidate's KDC is backed off, go on only with a ticket cached for one of them (asked
    before preprocessing: a job that cannot go remote does not pay for it); quietly fall back otherwise."""
    if all(state.kdc_backed_off(h.realm) for h in candidates):
        from securecc.client import tickets

        if not any(tickets.obtainable(h.target, CACHED_TICKET_WAIT) for h in candidates):
            failure = KdcUnavailable("the Kerberos KDC is not answering and no ticket is cached")
            failure.quiet = True  # the first job of the outage said so
            raise failure


def kdc_outage(trouble: KdcUnavailable) -> KdcUnavailable:
    """What a job that got no ticket says: the first job of an outage says it once for the build, the
    others fall back quietly (the back-off file remembers the outage; ``securecc --show-hosts``)."""
    if trouble.quiet:
        return trouble
    return KdcUnavailable(f"{trouble}: compiles that need a new ticket stay local until it answers"
                          " (tickets already cached still work)")


def identity_cache(env: Mapping[str, str]) -> str:
    return cache_path("compilers.json", env)


def show_hosts(inv: Invocation) -> int:
    """``securecc --show-hosts``: the hosts, where they came from, and their back-off state."""
    from securecc.client.hosts import HostsError, HostState, configured_hosts, host_key

    state = HostState(env=inv.env)
    try:
        hosts, source = configured_hosts(state, inv.env)
    except HostsError as e:
        inv.say(f"cannot parse the host list ({e}); fix SECURECC_HOSTS")
        return 2
    lines = [f"hosts from {source}:"]
    for host in hosts:
        if host.is_local:
            lines.append(f"  localhost (compile here) /{host.limit}")
            continue
        entry = state.hosts.get(host_key(host), {})
        wait, quarantine = state.backed_off(host), state.quarantined(host)
        status = f"backed off {wait:.0f} s more ({entry.get('why', '')})" if wait else "ok"
        if quarantine:
            since = time.strftime('%Y-%m-%d %H:%M', time.localtime(quarantine["since"])) if quarantine["since"] else "?"
            status = (f"QUARANTINED since {since}, job {quarantine['job_id']}: {quarantine['why']} "
                      f"(securecc-hosts --clear {host.name}:{host.port})")
        latency = f", latency {entry['latency'] * 1000:.0f} ms" if "latency" in entry else ""
        lines.append(f"  {host.name}:{host.port}/{host.limit} principal {host.target}: {status}{latency}")
    for key, entry in sorted(state.hosts.items()):
        wait = entry.get("until", 0) - time.time() if key.startswith("kdc") else 0
        if wait > 0:
            realm = key.partition(" ")[2] or "the default realm"
            lines.append(f"  Kerberos KDC of {realm}: not answering, only cached tickets tried for {wait:.0f} s more"
                         f" ({entry.get('why', '')})")
    lines.append(f"state: {state.path}")
    inv.out.write("\n".join(lines).encode() + b"\n")
    return 0


NOT_FALLEN_BACK = 1
"""The status of a job that should have gone remote and could not, with SECURECC_FALLBACK=0: CI that must
know its farm works fails instead of building everything here.  A compile that failed on the server still
compiles here (that is the user's error, not the farm's), and jobs kept local by nature or policy (links,
``-E``, an option the servers may not run) stay local."""

USAGE = "usage: securecc COMPILER [ARGS...]   (or call it through a symlink named gcc, cc, g++, c++, clang or clang++)"


def run(inv: Invocation, sessions: Sessions | None = None) -> int | LocalCompile:
    """Do one ``securecc`` run: its exit status, or the local compile to exec in the caller."""
    argv = inv.argv
    name = os.path.basename(argv[0])
    if name in MASQUERADE_NAMES:
        compiler, args = name, argv[1:]
    elif len(argv) < 2 or argv[1] in ("-h", "--help"):
        inv.say(USAGE)
        return 2 if len(argv) < 2 else 0
    elif argv[1] == "--show-hosts":
        return show_hosts(inv)
    else:
        compiler, args = argv[1], argv[2:]
    path = find_compiler(inv, compiler)
    if path is None:
        inv.say(f"compiler {compiler!r} not found in PATH; install it or give its full path")
        return 127
    parts = argpolicy.each_source(args)
    if parts:
        return compile_each(inv, compiler, path, args, parts, sessions)
    return compile_one(inv, compiler, path, args, sessions)


def compile_one(inv: Invocation, compiler: str, path: str, args: list[str], sessions: Sessions | None = None) -> int | LocalCompile:
    """One source: remotely, or the local compile to run (with why)."""
    local = LocalCompile(path, [compiler, *args])
    try:
        plan = argpolicy.plan(without_native(path, args))
    except argpolicy.NotDistributable as e:
        inv.verbose(f"compiling locally: {e}")
        local.reason = str(e)
        return local
    try:
        return compile_remotely(inv, compiler, path, plan, sessions)
    except argpolicy.NotDistributable as e:
        inv.verbose(f"compiling locally: {e}")
        local.reason = str(e)
    except RemoteFailure as e:
        if inv.env.get("SECURECC_FALLBACK") == "0" and not isinstance(e, FailedRemotely):
            inv.say(f"{plan.source}: {e}; not compiling locally (SECURECC_FALLBACK=0)")
            return NOT_FALLEN_BACK
        (inv.verbose if e.quiet else inv.say)(f"{plan.source}: {e}; compiling locally")
        local.reason, local.failure = str(e), True
    return local


def without_native(compiler: str, args: list[str]) -> list[str]:
    """``args`` with ``-m...=native`` expanded into what it means here (:mod:`securecc.client.native`, imported
    only then); NotDistributable where the expansion cannot give the local object."""
    if not any(a.endswith("=native") for a in args):
        return args
    from securecc.client import native

    try:
        expanded = native.expand(compiler, args)
    except native.NotExpanded as e:
        raise argpolicy.NotDistributable(str(e)) from None
    if argpolicy.plan(expanded).debug and native.records_switches(args):
        raise argpolicy.NotDistributable("-march=native with -g (gcc would record its switches in another order)")
    return expanded


def compile_each(inv: Invocation, compiler: str, path: str, args: list[str], parts: list[tuple[int, list[str]]],
                 sessions: Sessions | None = None) -> int | LocalCompile:
    """``gcc -c a.c b.c``: one job per source, one after another as gcc does them; the sources that stay
    local are compiled here by one gcc with the other sources taken out."""
    done: set[int] = set()
    kept: LocalCompile | None = None
    for source, part in parts:
        outcome = compile_one(inv, compiler, path, part, sessions)
        if isinstance(outcome, LocalCompile):
            kept = kept or outcome
        elif outcome == 0:
            done.add(source)
        else:
            return outcome  # a preprocessing error, already printed: gcc would stop there too
    if kept is None:
        return 0
    remaining = [a for k, a in enumerate(args) if k not in done]
    return LocalCompile(path, [compiler, *remaining], kept.reason, kept.failure)


def main() -> None:
    """Direct mode: the whole job in this process."""
    outcome = run(Invocation.here())
    if isinstance(outcome, LocalCompile):
        exec_local(outcome)
    sys.exit(outcome)
