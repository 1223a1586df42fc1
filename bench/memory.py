#!/usr/bin/env python3
"""Memory: server RSS at idle, under 64 concurrent compiles, and after 10,000 jobs; agent RSS after 1,000 jobs.

Not a test: `.venv/bin/python bench/memory.py [--jobs 10000] [--agent-jobs 1000]`.

A throwaway realm and one securecc-server (64 slots).  The server's RSS
is its front's plus its job handler's (the process that runs the
sandboxes).  Phases:

1. idle, after start;
2. 64 clients each sending one compile of a source of its own at once
   (real compiles in 64 sandboxes), sampled every 50 ms for the peak;
3. JOBS tiny jobs over 16 kept sessions, most of them result-cache hits
   (one source in 50 is new, so the sandbox path keeps running too):
   RSS after the first 1,000 and after all of them, to show growth;
4. the agent: AGENT_JOBS compiles through `securecc gcc` (8 at a time),
   the agent's RSS after its first 20 jobs and after all of them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchrealm import BIN, Realm, shutil_rm

from securecc import protocol as wire
from securecc.client.channel import Channel
from securecc.client.hosts import parse_host
from securecc.toolchain import probe

IDENTITY = probe("/usr/bin/gcc")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def server_rss(front: int) -> int:
    """Front plus job handler (its python child), in KiB."""
    handlers = [p for p in children(front) if b"securecc.server.handler" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return rss_kib(front) + sum(rss_kib(p) for p in handlers)


def job(n: int) -> wire.Job:
    source = f"int f{n}(int x) {{ return x * {n} + 1; }}\n".encode()
    return wire.Job("gcc", ["-O2"], "c", "-c", "/tmp", f"f{n}.c", source, compiler_identity=IDENTITY)


def concurrent_compiles(host: str, front: int, clients: int) -> int:
    """Peak server RSS while ``clients`` compiles of sources of their own run at once."""
    peak, stop = [server_rss(front)], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(server_rss(front))
            time.sleep(0.05)

    def one(n: int) -> None:
        channel = Channel(parse_host(host))
        channel.authenticate()
        reply = channel.call(job(1_000_000 + n))
        channel.close()
        if not isinstance(reply, wire.Result):
            raise SystemExit(f"unexpected reply {reply!r}")

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    stop.set()
    sampler.join()
    return max(peak)


def many_jobs(host: str, front: int, total: int, connections: int = 16) -> list[tuple[int, int]]:
    """(jobs done, server RSS) after 1,000 jobs and after ``total``."""
    done, lock, marks = [0], threading.Lock(), []

    def client(k: int) -> None:
        channel = Channel(parse_host(host))
        channel.authenticate()
        while True:
            with lock:
                if done[0] >= total:
                    break
                done[0] += 1
                n = done[0]
                if n == 1000:
                    marks.append((n, server_rss(front)))
            reply = channel.call(job(n if n % 50 == 0 else k))  # one in 50 new: a compile, the rest cache hits
            if not isinstance(reply, wire.Result):
                raise SystemExit(f"unexpected reply {reply!r}")
        channel.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    marks.append((total, server_rss(front)))
    return marks


def agent_build(realm: Realm, top: Path, host: str, total: int) -> list[tuple[int, int]]:
    """(jobs done, agent RSS) after 20 jobs and after ``total`` compiles through the shim."""
    work = top / "agent-build"
    work.mkdir()
    os.chmod(work, 0o755)
    for n in range(40):
        (work / f"s{n}.c").write_text(f"int s{n}(int x) {{ return x + {n}; }}\n")
    env = {**realm.user_env("alice", top), "SECURECC_HOSTS": host, "SECURECC_AGENT_DIR": str(top / "agent")}

    def compile_one(n: int) -> None:
        done = subprocess.run([BIN / "securecc", "gcc", "-O2", "-c", f"s{n % 40}.c", "-o", f"o{n}.o"], cwd=work,
                              env=env, capture_output=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr.decode())

    for n in range(20):
        compile_one(n)
    agent = next(int(p.read_text()) for p in (top / "agent").glob("*.pid"))
    marks = [(20, rss_kib(agent))]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(compile_one, range(20, total)))
    marks.append((total, rss_kib(agent)))
    os.kill(agent, 15)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--agent-jobs", type=int, default=1_000)
    options = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="scc-memory-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm")
    try:
        process, host = realm.server("server", slots=64)
        os.environ.update(realm.user_env("alice", top))
        time.sleep(1)
        print(f"server idle:                      {server_rss(process.pid) / 1024:6.1f} MiB (front + job handler)")
        peak = concurrent_compiles(host, process.pid, 64)
        print(f"server, 64 concurrent compiles:   {peak / 1024:6.1f} MiB at the peak")
        for n, rss in many_jobs(host, process.pid, options.jobs):
            print(f"server after {n:6d} jobs:         {rss / 1024:6.1f} MiB")
        for n, rss in agent_build(realm, top, host, options.agent_jobs):
            print(f"agent after {n:5d} compiles:       {rss / 1024:6.1f} MiB")
    finally:
        realm.close()
        shutil_rm(top)


if __name__ == "__main__":
    sys.exit(main())
