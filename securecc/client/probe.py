"""Client-side views of the farm: ``securecc-hosts --check`` (prequalify) and ``securecc-monitor``.

Every candidate host (the client's own list, or the ones given) is asked at
once to compile ``int securecc_probe;`` through the real job path: connect,
mutual GSS-API, ACL, sandbox, compiler.  Those that answer correctly within
the deadline are printed in ``SECURECC_HOSTS`` form with their latency as a
comment, fastest first, so a build can say
``SECURECC_HOSTS=$(securecc-hosts --check)``.  Exit status 1 when none
qualifies.  The cron health check (``etc/cron/``) uses ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from securecc import protocol as wire
from securecc.client.channel import Channel, RemoteFailure
from securecc.client.hosts import Host, HostsError, HostState, configured_hosts, parse_hosts
from securecc.client.job import working_directory
from securecc.toolchain import ProbeError, cached_identity

PROBE_SOURCE = b"int securecc_probe;\n"


def check_host(host: Host, identity: str, deadline: float) -> dict[str, Any]:
    """One trivial compile on ``host``: its latency, or why it does not qualify."""
    started = time.monotonic()
    spec = f"{host.name}:{host.port}/{host.limit}" + (f",principal={host.principal}" if host.principal else "")
    result: dict[str, Any] = {"host": spec, "ok": False}
    try:
        channel = Channel(host, io_timeout=deadline)
        try:
            channel.authenticate()
            job = wire.Job("gcc", ["-O2"], "c", "-c", working_directory(), "securecc-probe.c", PROBE_SOURCE,
                           compiler_identity=identity)
            reply = channel.call(job)
        finally:
            channel.close()
    except RemoteFailure as e:
        result["error"] = str(e)
        return result
    latency = time.monotonic() - started
    result["latency_ms"] = round(latency * 1000, 1)
    if isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output:
        result["ok"] = latency <= deadline
        if not result["ok"]:
            result["error"] = f"answered after the {deadline:g} s deadline"
    elif isinstance(reply, wire.Busy):
        result["error"] = f"busy ({reply.load}/{reply.slots})"
    elif isinstance(reply, wire.Refused):
        result["error"] = f"refused: {reply.message}"
    else:
        result["error"] = f"compile failed: {getattr(reply, 'stderr', b'').decode(errors='replace').strip()}"
    return result


def check(hosts: list[Host], deadline: float) -> list[dict[str, Any]]:
    """Every host at once; results fastest first, failures last."""
    try:
        identity = cached_identity("/usr/bin/gcc")
    except (ProbeError, OSError):
        identity = ""
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda h=h: results.append(check_host(h, identity, deadline)), daemon=True)
               for h in hosts if not h.is_local]
    ends = time.monotonic() + deadline + 0.5
    for thread in threads:
        thread.start()
    for thread in threads:  # a hung host's thread is left behind (daemon): we answer by the deadline
        thread.join(max(0.0, ends - time.monotonic()))
    results = list(results)
    checked = {r["host"] for r in results}
    for host in hosts:
        spec = f"{host.name}:{host.port}/{host.limit}" + (f",principal={host.principal}" if host.principal else "")
        if not host.is_local and spec not in checked:
            results.append({"host": spec, "ok": False, "error": f"no answer within {deadline:g} s"})
    return sorted(results, key=lambda r: (not r["ok"], r.get("latency_ms", 1e9)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="securecc-hosts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compile a trivial file on every host")
    parser.add_argument("--clear", action="store_true", help="send jobs again to the hosts given: lift their quarantine and back-off")
    parser.add_argument("--deadline", default="1s", help="how long a host may take, e.g. 500ms, 2s (default 1s)")
    parser.add_argument("--json", action="store_true", help="every host's result as JSON")
    parser.add_argument("hosts", nargs="*", help="hosts to check (default: the client's list)")
    options = parser.parse_args(argv)
    if options.clear:
        sys.exit(clear(options.hosts))
    if not options.check:
        parser.error("say --check or --clear")
    text = options.deadline.strip()
    try:
        deadline = float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))
        hosts = parse_hosts(" ".join(options.hosts)) if options.hosts else configured_hosts(HostState())[0]
    except (ValueError, HostsError) as e:
        sys.exit(f"securecc-hosts: {e}")
    if not hosts:
        sys.exit("securecc-hosts: no hosts to check (set SECURECC_HOSTS or give them)")
    state = HostState()
    results = check([h for h in hosts if not state.quarantined(h)], deadline)
    results += [{"host": h.name + f":{h.port}/{h.limit}", "ok": False, "quarantined": q,
                 "error": f"quarantined after job {q.get('job_id', '?')}: {q.get('why', '')} (securecc-hosts --clear {h.name}:{h.port})"}
                for h in hosts if (q := state.quarantined(h))]
    if options.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            if r["ok"]:
                print(f"{r['host']}  # {r['latency_ms']} ms")
            else:
                print(f"securecc-hosts: {r['host']} left out: {r['error']}", file=sys.stderr)
    sys.exit(0 if any(r["ok"] for r in results) else 1)

def clear(specs: list[str]) -> int:
    """``securecc-hosts --clear HOST...``: this user's compiles send jobs to them again."""
    if not specs:
        print("securecc-hosts: name the hosts to clear, as host[:port]", file=sys.stderr)
        return 2
    try:
        hosts = parse_hosts(" ".join(specs))
    except HostsError as e:
        print(f"securecc-hosts: {e}", file=sys.stderr)
        return 2
    state = HostState()
    for host in hosts:
        done = state.clear(host)
        print(f"{host.name}:{host.port}: " + ("cleared; compiles send it jobs again" if done else "was neither quarantined nor backed off"))
    return 0


def server_status(host: Host, timeout: float) -> dict[str, Any]:
    """One server's status over its authenticated compile port (principals shown to admins only)."""
    spec = f"{host.name}:{host.port}"
    try:
        channel = Channel(host, io_timeout=timeout)
        try:
            channel.authenticate()
            reply = channel.call(wire.StatusRequest())
        finally:
            channel.close()
    except RemoteFailure as e:
        return {"host": spec, "ok": False, "error": str(e)}
    if not isinstance(reply, wire.Status):
        return {"host": spec, "ok": False, "error": f"unexpected {type(reply).__name__}"}
    return {"host": spec, "ok": True, **json.loads(reply.json)}


def render(statuses: list[dict[str, Any]]) -> str:
    """A distccmon-text-like screen: one line per server, one per job it runs."""
    lines = [time.strftime("securecc-monitor  %H:%M:%S"), ""]
    for s in statuses:
        quarantined = "  QUARANTINED" if s.get("quarantined") else ""
        if not s["ok"]:
            lines.append(f"{s['host']:28} DOWN  {s['error']}{quarantined}")
            continue
        running, totals = s["running"], s.get("totals", {})
        diverged = f"  diverged {s['divergences']}" if s.get("divergences") else ""
        lines.append(f"{s['host']:28} {len(running)}/{s['slots']} slots  allowed {totals.get('allowed', 0):.0f}  "
                     f"refused {totals.get('refused', 0):.0f}  busy {totals.get('busy', 0):.0f}{diverged}{quarantined}")
        for job in running:
            lines.append(f"    {job['principal']:24} {job['compiler']:6} {job['source']:36} {s['time'] - job['started']:5.1f} s")
    return "\n".join(lines)


def monitor_main(argv: list[str] | None = None) -> None:
    """securecc-monitor: what every server the client knows is doing, refreshed in place."""
    parser = argparse.ArgumentParser(prog="securecc-monitor", description=monitor_main.__doc__)
    parser.add_argument("--once", action="store_true", help="print once and exit")
    parser.add_argument("--json", action="store_true", help="with --once: JSON for scripts")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--web", action="store_true", help="serve a live page (and /metrics) to this user instead")
    parser.add_argument("--listen", default="127.0.0.1:0", help="with --web: HOST:PORT, loopback unless --keytab (default: a free port)")
    parser.add_argument("--keytab", help="with --web: an HTTP/<host> keytab; lets you log in by Kerberos, also beyond loopback")
    parser.add_argument("--principal", help="with --keytab: the page's principal (default: HTTP/<this host's name>)")
    parser.add_argument("--probe-interval", type=float, default=15.0, help="with --web: seconds between trivial compiles")
    options = parser.parse_args(argv)
    try:
        hosts = [h for h in configured_hosts(HostState())[0] if not h.is_local]
    except HostsError as e:
        sys.exit(f"securecc-monitor: {e}")
    if not hosts:
        sys.exit("securecc-monitor: no servers (set SECURECC_HOSTS)")
    if options.web:
        from securecc.client import farmweb  # Twisted, for the page alone

        farmweb.serve(hosts, server_status, check_host, options.listen, options.interval, options.probe_interval, options.keytab,
                      options.principal)
        return
    try:
        while True:
            statuses: list[dict[str, Any]] = [{} for _ in hosts]
            threads = [threading.Thread(target=lambda i=i, h=h, into=statuses: into.__setitem__(i, server_status(h, 3.0)), daemon=True)
                       for i, h in enumerate(hosts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(4)
            statuses = [s or {"host": f"{h.name}:{h.port}", "ok": False, "error": "no answer"} for s, h in zip(statuses, hosts)]
            state = HostState()
            for s, h in zip(statuses, hosts):
                s["quarantined"] = state.quarantined(h)
            if options.once:
                print(json.dumps(statuses, indent=1) if options.json else render(statuses))
                sys.exit(0 if any(s["ok"] for s in statuses) else 1)
            sys.stdout.write("\x1b[H\x1b[2J" + render(statuses) + "\n")
            sys.stdout.flush()
            time.sleep(options.interval)
    except KeyboardInterrupt:
        sys.exit(0)
