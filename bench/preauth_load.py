#!/usr/bin/env python3
"""Server memory with 1,000 idle unauthenticated connections, and what a real handshake costs meanwhile.

Not a test: `.venv/bin/python bench/preauth_load.py [--idle 1000] [--handshakes 50]`.

Starts a throwaway realm and one server; measures its RSS (front and job
handler) and the latency of authenticated tiny jobs on fresh connections
(handshake included), first alone, then with ``--idle`` connections that
connect and say nothing (or send a half handshake frame) spread over
loopback addresses 127.0.0.2.. so the per-source cap does not stop them,
then with twice the total cap, to show the cap holding.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from benchrealm import Realm, shutil_rm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from securecc import protocol as wire  # noqa: E402
from securecc.client.channel import Channel  # noqa: E402
from securecc.client.hosts import parse_host  # noqa: E402
from securecc.server.admission import PREAUTH_PER_SOURCE  # noqa: E402
from securecc.toolchain import probe  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def family_rss(pid: int) -> float:
    """The server and its job handler (its child)."""
    total = rss_mib(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    total += rss_mib(int(entry.name))
            except (OSError, ValueError):
                pass
    return total


def handshakes(host: str, count: int) -> list[float]:
    job = wire.Job("gcc", ["-O2"], "c", "-c", "/tmp", "tiny.c", b"int t;\n", compiler_identity=probe("/usr/bin/gcc"))
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        channel = Channel(parse_host(host))
        channel.authenticate()
        reply = channel.call(job)
        channel.close()
        if not isinstance(reply, wire.Result):
            raise SystemExit(f"unexpected reply {reply!r}")
        latencies.append(time.monotonic() - started)
    return latencies


def idle(port: int, count: int) -> list[socket.socket]:
    """``count`` peers that connect and send a header announcing a full handshake frame, then nothing."""
    sockets = []
    for n in range(count):
        sock = socket.socket()
        sock.bind((f"127.0.0.{2 + n // (PREAUTH_PER_SOURCE - 8)}", 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(wire.hello() + struct.pack(">IB", wire.MAX_HANDSHAKE_FRAME, wire.Kind.TOKEN) + bytes(8000))
        sockets.append(sock)
    return sockets


def alive(sockets: list[socket.socket]) -> int:
    count = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            count += sock.recv(65536) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def report(label: str, pid: int, latencies: list[float]) -> None:
    q = statistics.quantiles(latencies, n=20)
    print(f"{label:38s} RSS {family_rss(pid):6.1f} MiB   handshake+job p50 {statistics.median(latencies) * 1000:6.1f} ms"
          f"  p95 {q[18] * 1000:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--handshakes", type=int, default=50)
    options = parser.parse_args()
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    top = Path(tempfile.mkdtemp(prefix="scc-preauth-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm")
    try:
        process, host = realm.server("server", slots=4)
        port = parse_host(host).port
        os.environ.update(realm.user_env("alice", top))
        handshakes(host, 3)  # warm
        report("alone", process.pid, handshakes(host, options.handshakes))
        held = idle(port, options.idle)
        time.sleep(1)
        report(f"{options.idle} idle unauthenticated peers", process.pid, handshakes(host, options.handshakes))
        print(f"{'':38s} of them still connected: {alive(held)}")
        more = idle(port, options.idle)
        time.sleep(1)
        print(f"{'':38s} {options.idle} more: still connected {alive(more)} (the total cap is 2048); RSS "
              f"{family_rss(process.pid):.1f} MiB")
        for sock in held + more:
            sock.close()
    finally:
        realm.close()
        shutil_rm(top)


if __name__ == "__main__":
    main()
