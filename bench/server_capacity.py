#!/usr/bin/env python3
"""How many authenticated tiny jobs one server core answers per second (target: >= 300).

Not a test: `.venv/bin/python bench/server_capacity.py [--seconds 10] [--connections 16]`.

Starts a throwaway realm and one securecc-server pinned to CPU 0; a load
generator pinned to CPU 1 sends the same tiny job over and over from many
connections, the way agents do.  Every job is unsealed, authorized (ACL and
LDAP group, from the server's positive cache), looked up in the result
cache (a hit after the first: the compiler's own time is not what this
measures), written to the audit log and answered, sealed.  Two rounds:
sessions kept (the agent), and a new connection and GSS handshake per job
(the direct-mode client).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchrealm import Realm, shutil_rm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from securecc import protocol as wire  # noqa: E402
from securecc.client.channel import Channel  # noqa: E402
from securecc.client.hosts import parse_host  # noqa: E402
from securecc.toolchain import probe  # noqa: E402

TINY = b"int tiny(int x) { return x * 3 + 1; }\n"


def load(host: str, connections: int, seconds: float, reuse: bool) -> list[float]:
    """Latencies of every job answered within ``seconds`` by ``connections`` concurrent clients."""
    job = wire.Job("gcc", ["-O2"], "c", "-c", "/tmp", "tiny.c", TINY, compiler_identity=probe("/usr/bin/gcc"))
    target = parse_host(host)
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        channel = None
        mine = []
        while time.monotonic() < deadline:
            started = time.monotonic()
            if channel is None:
                channel = Channel(target)
                channel.authenticate()
            reply = channel.call(job)
            if not reuse:
                channel.close()
                channel = None
            if not isinstance(reply, wire.Result) or reply.exit_status != 0:
                raise SystemExit(f"unexpected reply {reply!r}")
            mine.append(time.monotonic() - started)
        if channel is not None:
            channel.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    options = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="scc-capacity-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm")
    try:
        process, host = realm.server("server", slots=options.connections)
        os.sched_setaffinity(process.pid, {0})
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})
        os.environ.update(realm.user_env("alice", top))
        load(host, 1, 0.5, True)  # warm: LDAP cache, result cache
        for reuse in (True, False):
            before = cpu_seconds(process.pid)
            latencies = load(host, options.connections, options.seconds, reuse)
            cpu = cpu_seconds(process.pid) - before
            rate = len(latencies) / options.seconds
            quantiles = statistics.quantiles(latencies, n=100)
            print(f"{'sessions kept' if reuse else 'handshake per job':18s}: {rate:7.0f} jobs/s, "
                  f"server CPU {cpu / len(latencies) * 1000:.2f} ms/job ({cpu / options.seconds * 100:.0f}% of its core), "
                  f"latency p50 {quantiles[49] * 1000:.1f} ms p99 {quantiles[98] * 1000:.1f} ms "
                  f"({options.connections} connections)")
    finally:
        realm.close()
        shutil_rm(top)


if __name__ == "__main__":
    main()
