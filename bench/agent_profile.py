#!/usr/bin/env python3
"""Where the client's CPU goes per job: the agent profiled over a real build, and make's side beside it.

Not a test: `.venv/bin/python bench/agent_profile.py [--package lua5.4] [-j 4] [--top 25] [--tiny 100]`.
Builds the package once (untimed warm-up: the agent's imports, tickets and compiler identities), then
twice through `CC="securecc gcc"` against one securecc-server of a throwaway testrealm (its result
cache on, each build new to it): once plain, for the CPU per job of the agent, of make's process tree
(make, the shim, the preprocessor) and of the server's front and job handler (their own), once with
every agent job thread under cProfile timed by its own thread's CPU clock, for the functions that CPU
is spent in. The agent runs in this process (securecc.agent.Agent, as the
shim would start it), so its threads can be profiled; the shim finds it by the same name. Then tiny
compiles end to end, through securecc and through distcc (against a distccd started here): each
one's wall and its server's part of it, and bare gcc's compile and preprocessing.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchrealm import BIN, Realm, debian_source, timed_make
from vs_distcc import CpuGroup, start_distcc

ACL = "realms: [TEST.REALM]\nallow:\n  - principal: alice\n"
SOURCES = Path("/tmp/securecc-bench-src")  # debian_source's cache, shared with vs_distcc.py
TARGETS = {"lua5.4": "posix"}


class Profiles:
    """One cProfile per agent job while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.taken: list[cProfile.Profile] = []


def start_agent(directory: Path, env: dict[str, str], profiles: Profiles) -> None:
    """The agent in this process, named as the shim names the agent of ``env``, its jobs profiled into
    ``profiles`` while that is on."""
    for key in [k for k in os.environ if k.startswith("KRB5")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("KRB5")})  # the agent's own, compared per job
    from securecc.client import agent, agent_wire

    name = agent_wire.agent_name(agent.kerberos_environment())
    directory.mkdir(mode=0o700)
    served = agent.Agent(str(directory), name)
    handle = agent.Agent.handle

    def profiled(self: agent.Agent, conn: object) -> None:
        if not profiles.on:
            return handle(self, conn)
        profile = cProfile.Profile(time.thread_time_ns, 1e-9)  # CPU, not wall: the threads wait on cpp and servers
        profile.enable()
        try:
            return handle(self, conn)
        finally:
            profile.disable()
            profiles.taken.append(profile)

    agent.Agent.handle = profiled
    threading.Thread(target=served.serve, args=(os.pipe()[1],), daemon=True).start()
    while not (directory / f"{name}.sock").exists():
        time.sleep(0.01)


def cpu() -> tuple[float, float]:
    """(this process's CPU: the agent; CPU of reaped children: make and everything under it), in seconds."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def own_cpu(pid: int) -> float:
    """A process's own CPU (utime + stime, none of its children's), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(front: int) -> dict[str, int]:
    """The server's front and its job handler (the front's one Python child), by pid."""
    children = Path(f"/proc/{front}/task/{front}/children").read_text().split()
    handler = [int(c) for c in children if b"securecc.server.handler" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return {"front": front, **({"job handler": handler[0]} if handler else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="lua5.4")
    parser.add_argument("-j", type=int, default=4)
    parser.add_argument("--top", type=int, default=25, help="functions to list, by their own CPU")
    parser.add_argument("--tiny", type=int, default=100, help="tiny compiles timed end to end")
    options = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="scc-agent-profile-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm", ACL)
    try:
        daemon, host = realm.server("server", slots=options.j, monitor=None)
        tree = debian_source(options.package, SOURCES)
        if (tree / "configure").exists() and not (tree / "Makefile").exists():
            subprocess.run(["sh", "./configure"], cwd=tree, env={**os.environ, "CC": "gcc"}, check=True,
                           capture_output=True)
        env = {**realm.user_env("alice", top), "SECURECC_HOSTS": host, "SECURECC_AGENT_DIR": str(top / "agent")}
        profiles = Profiles()
        start_agent(top / "agent", env, profiles)
        make = [f"-j{options.j}", *filter(None, [TARGETS.get(options.package)])]

        servers = server_processes(daemon.pid)
        server_s: dict[str, float] = {}

        def build(n: int) -> tuple[float, float, int]:
            cc = f"{BIN}/securecc gcc -DBENCH_BUILD={n}"  # each build new to the server's result cache
            before, serving = cpu(), {name: own_cpu(pid) for name, pid in servers.items()}
            timed_make(tree, [*make, f"CC={cc}"], env)
            after = cpu()
            server_s.update({name: own_cpu(pid) - serving[name] for name, pid in servers.items()})
            jobs = sum(1 for _ in tree.rglob("*.o"))
            return after[0] - before[0], after[1] - before[1], jobs

        build(0)
        agent_s, make_s, jobs = build(1)
        serving = ", ".join(f"{name} {seconds / jobs * 1e3:.1f}" for name, seconds in server_s.items())
        profiles.on = True
        build(2)
        profiles.on = False  # the tiny timeline below is timed, not profiled
        taken = profiles.taken
        print(f"{options.package}: {jobs} jobs, -j{options.j}, one server on this machine")
        print(f"agent CPU   {agent_s / jobs * 1e3:6.1f} ms/job (unprofiled)")
        print(f"make's tree {make_s / jobs * 1e3:6.1f} ms/job (make, the shim, the preprocessor)")
        print(f"server's own CPU, ms/job (unprofiled; its sandboxes apart): {serving}")
        stats = pstats.Stats(taken[0])
        for profile in taken[1:]:
            stats.add(profile)
        total = sum(row[2] for row in stats.stats.values())
        print(f"profiled agent CPU {total / len(taken) * 1e3:.1f} ms/job over {len(taken)} jobs "
              "(cProfile's own cost included), ms/job:")
        for title, column in (("by own CPU", 2), ("securecc's functions by cumulative CPU", 3)):
            print(f" {title}:")
            rows = sorted(stats.stats.items(), key=lambda item: -item[1][column])
            if column == 3:
                rows = [row for row in rows if "/securecc/" in row[0][0]]
            for (path, line, function), (_, calls, own, cumulative, _) in rows[: options.top]:
                where = f"{Path(path).name}:{line}" if line else path
                print(f"  {own / len(taken) * 1e3:6.2f} own {cumulative / len(taken) * 1e3:6.2f} cum"
                      f"  {calls / len(taken):6.1f} calls  {function}  ({where})")
        tiny_timeline(top, env, realm.dir / "server" / "audit.jsonl", options.tiny)
    finally:
        realm.close()


def tiny_timeline(top: Path, env: dict[str, str], audit: Path, n: int) -> None:
    """A tiny job end to end through securecc and through distcc, the server's part of each (securecc's
    audit record's duration, from the job's arrival to its record; distccd's logged job time), and bare
    gcc's compile and each tool's preprocessing."""
    from securecc.client import agent, channel
    from securecc.client import job as client

    work = top / "tiny"
    work.mkdir()
    whole, prepare, call = "the whole job (Agent.handle)", "preprocessing (prepare_job)", "the server call (Channel.call)"
    stages: dict[str, list[float]] = {whole: [], prepare: [], call: []}
    unpatched = agent.Agent.handle, client.prepare_job, channel.Channel.call

    def timed(stage: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                stages[stage].append(time.monotonic() - started)

        return wrapper

    agent.Agent.handle = timed(whole, agent.Agent.handle)
    client.prepare_job = timed(prepare, client.prepare_job)
    channel.Channel.call = timed(call, channel.Channel.call)
    daemons: list[subprocess.Popen] = []
    groups: list[CpuGroup] = []
    try:
        distcc = start_distcc(top, "distccd", 4, daemons, groups)
        commands = {"securecc": ([str(BIN / "securecc"), "gcc"], env), "distcc": (distcc.cc.split(), distcc.env),
                    "gcc": (["gcc"], env)}
        bare = {"gcc -E -fdirectives-only (securecc's client)": ["-E", "-fdirectives-only"],
                "gcc -E (distcc's client)": ["-E"]}
        walls: dict[str, list[float]] = {name: [] for name in [*commands, *bare]}
        before = len(audit.read_text().splitlines())
        log = top / "distccd.log"
        logged = len(log.read_bytes().splitlines())
        for i in range(n + 3):
            runs = [(name, [*cc, "-c", "tiny.c", "-o", "tiny.o"], e) for name, (cc, e) in commands.items()]
            runs += [(name, ["gcc", *flags, "tiny.c", "-o", "/dev/null"], env) for name, flags in bare.items()]
            for name, command, run_env in runs:
                (work / "tiny.c").write_text(f"int f_{time.time_ns()}(void) {{ return {i}; }}\n")
                started = time.monotonic()
                subprocess.run(command, cwd=work, env={**run_env, "PWD": str(work)}, check=True)
                if i >= 3:  # warm-up
                    walls[name].append(time.monotonic() - started)
        records = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
        server = [r["duration"] * 1e3 for r in records if r.get("event") == "job" and r.get("decision") == "allowed"][3:]
        distccd = [int(m) for m in re.findall(rb" COMPILE_OK .* time:(\d+)ms", b"\n".join(log.read_bytes().splitlines()[logged:]))][3:]
    finally:
        agent.Agent.handle, client.prepare_job, channel.Channel.call = unpatched
        for process in daemons:
            process.terminate()
            process.wait()
        for group in groups:
            group.remove()
    print(f"\n{n} tiny compiles, median wall ms:")
    for name, values in walls.items():
        print(f"  {statistics.median(values) * 1e3:6.1f}  {name}")
    for stage, values in stages.items():
        print(f"  {statistics.median(values[3:]) * 1e3:6.1f}  of securecc's, in the agent: {stage}")
    print(f"  {statistics.median(server):6.1f}  of securecc's: the server's (audit duration, {len(server)} jobs)")
    print(f"  {statistics.median(distccd):6.1f}  of distcc's: distccd's (its log's job time, {len(distccd)} jobs)")


if __name__ == "__main__":
    main()
