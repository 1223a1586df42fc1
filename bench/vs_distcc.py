#!/usr/bin/env python3
"""securecc against distcc and local gcc: the same real C projects, the same -j, on one machine.

Not a test: `.venv/bin/python bench/vs_distcc.py [--packages lua5.4,zlib] [-j 4] [--reps 3]`.
Fetches Debian source packages (apt-get source), configures each once if it has a configure script,
then builds it, interleaved per repetition, with local gcc, with distcc against a distccd on 127.0.0.1
and with securecc against a securecc-server of a throwaway testrealm (result cache off, so every job
compiles). Per build: wall time, client CPU per job (make, preprocessing, wrapper, agent), server CPU per
job raw, beyond gcc's own work on the same jobs, and beyond the gcc run each server is given (distccd
compiles preprocessed text, securecc's server the sources: it preprocesses again), bytes on the wire per
job (an untimed build through a counting relay). Then the latency of sequential tiny compiles, and jobs/s
with p50/p99 latency for many concurrent clients. Writes JSON (raw numbers, medians, ratios, machine) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from benchrealm import BIN, REPO, Realm, debian_source, ensure_tools, free_port, shutil_rm, timed_make

ACL = "realms: [TEST.REALM]\nallow:\n  - principal: alice\n"
SOURCES = Path("/tmp/securecc-bench-src")  # debian_source's cache, shared with cache_reuse.py
TARGETS = {"lua5.4": "posix"}  # make targets of upstream trees whose default target does not build
TICK = os.sysconf("SC_CLK_TCK")
# A recording CC: one file per compiler run (safe under make -j) holding its cwd and argv, NUL-separated.
RECORDER = '#!/bin/sh\nprintf \'%s\\0\' "$(pwd)" "$@" > "$(mktemp "{dir}/cmd.XXXXXX")"\nexec gcc "$@"\n'
CPP_WITH_VALUE = {"-I", "-D", "-U", "-include", "-imacros", "-isystem", "-iquote", "-idirafter"}
DEPS_WITH_VALUE = {"-MF", "-MT", "-MQ"}
DEPS = {"-M", "-MM", "-MD", "-MMD", "-MP", "-MG"}
NAMES = ["local", "distcc", "securecc"]
BUILD_METRICS = ["wall_s", "client_cpu_ms_per_job", "server_cpu_ms_per_job", "server_cpu_beyond_cc_ms_per_job",
                 "server_cpu_beyond_given_cc_ms_per_job", "bytes_to_server_per_job", "bytes_from_server_per_job", "bytes_per_job"]
PREPROCESSED = {".c": ".i", ".S": ".s", ".cc": ".ii", ".cpp": ".ii", ".cxx": ".ii", ".C": ".ii"}


class CpuGroup:
    """A cgroup (v2) that a server joins before it execs: the CPU time of everything it ever runs, however
    that is reaped. A process tree would not do: bwrap exits without reaping its sandbox, so the compilers
    of securecc-server end up children of init, in nobody's cutime."""

    def __init__(self, name: str) -> None:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        roots = [fields[1] for fields in mounts if fields[2] == "cgroup2"]
        if not roots:
            raise SystemExit("no cgroup2 hierarchy mounted: the servers' CPU time cannot be measured")
        self.path = Path(roots[0]) / f"securecc-bench-{os.getpid()}-{name}"
        self.path.mkdir()

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the group: a shell joins it, then execs (same pid)."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def cpu(self) -> float:
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["usage_usec"]) / 1e6

    def remove(self) -> None:
        for _ in range(50):  # its last processes may take a moment to go
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


@dataclass
class Tool:
    """One way to compile: the CC to give make, its environment, and for a remote tool the server to watch."""

    name: str
    cc: str
    env: dict[str, str]
    group: CpuGroup | None = None  # the server's, for a remote tool
    port: int = 0
    remote_jobs: Callable[[], int] = lambda: 0  # jobs the server has compiled so far
    turned_away: Callable[[], int] = lambda: 0  # jobs the server answered BUSY (they compile locally)
    via: Callable[[int], dict[str, str]] = lambda port: {}  # environment that sends jobs to another port
    agent_dir: Path | None = None  # where securecc's client agent keeps its pid file(s)


@dataclass
class Project:
    """An upstream tree, its make arguments and the compile commands of one build."""

    package: str
    tree: Path
    make: list[str]
    commands: list[list[str]] = field(default_factory=list)  # [cwd, *args] of each -c run


def run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one command, its reaped children included (wait4's rusage, so nothing
    else this process runs is counted); its output shown if it fails."""
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, env={**env, "PWD": str(cwd)}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            out.seek(0)
            sys.stderr.write(out.read().decode(errors="replace")[-3000:])
            raise SystemExit(f"exit {process.returncode}: {' '.join(command)} (in {cwd})")
    return wall, usage.ru_utime + usage.ru_stime


def tree_cpu(root: int) -> float:
    """CPU seconds a process tree has used so far: utime+stime+cutime+cstime of its root and of each live
    descendant (a reaped child is in its parent's cutime/cstime; a live one is not yet)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on: ppid is 4, utime..cstime 14-17
            stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo += children[pid]
    return total / TICK


def agent_cpu(directory: Path | None) -> dict[int, float]:
    """CPU seconds of each running securecc agent (a daemon, so no build's rusage holds it), by pid."""
    if directory is None:
        return {}
    pids = []
    for path in directory.glob("*.pid"):
        try:
            pids.append(int(path.read_text()))
        except (OSError, ValueError):
            continue
    return {pid: tree_cpu(pid) for pid in pids if Path(f"/proc/{pid}").exists()}


def agent_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def settle() -> None:
    """Let the servers finish a job's bookkeeping after their reply (audit record, distccd's log line,
    the last CPU time) before anything is counted."""
    time.sleep(0.3)


def wait_port(port: int, what: str) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def start_distcc(top: Path, name: str, jobs: int, daemons: list[subprocess.Popen], groups: list[CpuGroup],
                 scratch: Path | None = None) -> Tool:
    """distccd on 127.0.0.1, plain TCP, no fallback: a job that cannot go remote fails instead of quietly
    compiling here. --nice 0: securecc-server does not renice its compilers either. ``scratch``: its
    TMPDIR (where it writes each job's files), else /tmp."""
    port, log = free_port(), top / f"{name}.log"
    log.touch()
    if os.geteuid() == 0:
        os.chown(log, pwd.getpwnam("distccd").pw_uid, -1)  # it drops to that user before opening its log
    groups.append(CpuGroup(name))
    daemon = ["distccd", "--no-detach", "--daemon", "--listen", "127.0.0.1", "--port", str(port),
              "--allow", "127.0.0.1", "--jobs", str(jobs), "--nice", "0",
              "--log-level", "info", "--log-file", str(log)]
    process = subprocess.Popen(groups[-1].command(daemon), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **({"TMPDIR": str(scratch)} if scratch else {})})
    daemons.append(process)
    for _ in range(200):
        if b"listening on" in log.read_bytes():
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"distccd did not start: {log.read_text()[-1000:]}")
    state = top / "distcc"
    state.mkdir(exist_ok=True)  # without DISTCC_DIR existing, distcc silently compiles locally

    def via(to: int) -> dict[str, str]:
        return {"DISTCC_HOSTS": f"127.0.0.1:{to}/{jobs}"}

    env = {**os.environ, "DISTCC_DIR": str(state), "DISTCC_FALLBACK": "0", "DISTCC_SKIP_LOCAL_RETRY": "1",
           **via(port)}
    return Tool("distcc", f"{shutil.which('distcc')} gcc", env, groups[-1], port,
                remote_jobs=lambda: log.read_bytes().count(b" COMPILE_OK "), via=via)


def start_securecc(realm: Realm, top: Path, name: str, slots: int, groups: list[CpuGroup],
                   scratch: Path | None = None) -> Tool:
    """A securecc-server as Realm.server starts it, restarted without the result cache (which Realm.server
    always configures) and the monitoring listener, in its CPU group: every job compiles, as with distccd.
    ``scratch``: the directory its job handler's scratch goes in, else the server's own."""
    first, host = realm.server(name, slots=slots, monitor=None)
    first.terminate()
    first.wait()
    realm.servers.remove(first)
    path = realm.dir / name / "securecc.yaml"
    config = yaml.safe_load(path.read_text())
    del config["cache"]
    if scratch:
        config["sandbox"]["scratch"] = str(scratch / name)
    path.write_text(yaml.safe_dump(config))
    groups.append(CpuGroup(name))
    process = subprocess.Popen(groups[-1].command([str(a) for a in first.args]), env={**os.environ, **realm.env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    realm.servers.append(process)
    port = int(host.split(":")[1].split("/")[0])
    wait_port(port, "securecc-server")
    audit = realm.dir / name / "audit.jsonl"

    def decisions(decision: str) -> int:
        if not audit.exists():
            return 0
        lines = audit.read_text().splitlines()
        return sum(1 for r in map(json.loads, lines) if r.get("event") == "job" and r.get("decision") == decision)

    def via(to: int) -> dict[str, str]:
        return {"SECURECC_HOSTS": host.replace(f":{port}/", f":{to}/", 1)}

    env = {**realm.user_env("alice", top), "SECURECC_AGENT_DIR": str(top / "agent"), **via(port)}
    return Tool("securecc", f"{BIN}/securecc gcc", env, groups[-1], port, lambda: decisions("allowed"),
                lambda: decisions("busy"), via, top / "agent")


class Relay:
    """127.0.0.1:port forwarding to the server's port, counting payload bytes each way."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = self.down = 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                with self.lock:
                    if upstream:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:  # pooled connections (securecc's agent keeps some) end here
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def prepare(package: str, top: Path, options: argparse.Namespace, targets: dict[str, str]) -> Project:
    """The tree configured once (untimed, CC=gcc) and one untimed build through a recording CC: the jobs."""
    tree = debian_source(package, SOURCES)
    if not (tree / "configure").exists() and any((tree / name).exists() for name in ("configure.ac", "configure.in")):
        ensure_tools({"autoreconf": "autoconf", "automake": "automake", "libtoolize": "libtool", "autopoint": "autopoint"})
        done = subprocess.run(["autoreconf", "-fi"], cwd=tree, capture_output=True)  # a git snapshot: expat's, say
        if done.returncode:
            sys.stderr.write(done.stderr.decode(errors="replace")[-3000:])
            raise SystemExit(f"{package}: autoreconf -fi failed")
    if (tree / "configure").exists():
        done = subprocess.run(["sh", "./configure"], cwd=tree, env={**os.environ, "CC": "gcc"}, capture_output=True)
        if done.returncode:
            sys.stderr.write((done.stdout + done.stderr).decode(errors="replace")[-3000:])
            raise SystemExit(f"{package}: ./configure failed")
    if not any((tree / name).exists() for name in ("Makefile", "makefile", "GNUmakefile")):
        raise SystemExit(f"{package}: no configure script and no Makefile in {tree} (CMake and Meson trees: coverage.py)")
    # MAKEINFO=true: a tree whose manuals are older than their .texi rebuilds them, and Debian has no makeinfo
    # by default (bc); the manuals are not what is measured, and every tool gets the same make line.
    project = Project(package, tree, [f"-j{options.j}", "MAKEINFO=true", *filter(None, [targets.get(package)])])
    records = top / f"record-{package}"
    records.mkdir()
    recorder = records / "cc.sh"
    recorder.write_text(RECORDER.format(dir=records))
    recorder.chmod(0o755)
    timed_make(tree, [*project.make, f"CC={recorder}"])
    for path in sorted(records.glob("cmd.*")):
        record = path.read_bytes().decode(errors="surrogateescape").split("\0")[:-1]
        if "-c" in record[1:]:
            project.commands.append(record)
    if not project.commands:
        raise SystemExit(f"{package}: the build ran no compile (-c) jobs")
    return project


def split_command(args: list[str]) -> tuple[list[str], list[str], str | None]:
    """A recorded ``gcc ... -c SRC -o OBJ`` as (flags to preprocess SRC, flags to compile its output, SRC)."""
    cpp: list[str] = []
    cc: list[str] = []
    source = None
    words = iter(args)
    for arg in words:
        if arg in ("-o", *DEPS_WITH_VALUE):
            next(words, None)
        elif arg == "-c" or arg in DEPS or arg.startswith(("-MF", "-MT", "-MQ", "-Wp,-M")):
            pass
        elif arg in CPP_WITH_VALUE:
            cpp += [arg, next(words, "")]
        elif arg.startswith(("-I", "-D", "-U")):
            cpp.append(arg)
        elif not arg.startswith("-") and Path(arg).suffix in PREPROCESSED:
            source = arg
        else:
            cpp.append(arg)
            cc.append(arg)
    return cpp, cc, source


def compiler_own(project: Project, top: Path) -> tuple[float, float, int]:
    """CPU seconds gcc itself needs for the build's jobs given preprocessed text (what distccd is handed) and
    given their sources (what securecc's server compiles: it preprocesses again, for objects identical to local
    ones), and how many jobs that covers: each job preprocessed (untimed), then compiled from the text and from
    the source (rusage).  Run on the tree the recording build left, so generated headers are there."""
    scratch = top / f"own-{project.package}"
    scratch.mkdir()
    total = from_source = 0.0
    counted = 0
    for k, (cwd, *args) in enumerate(project.commands):
        cpp, cc, source = split_command(args)
        if source is None:
            continue
        text = scratch / f"{k}{PREPROCESSED[Path(source).suffix]}"
        if subprocess.run(["gcc", *cpp, "-E", source, "-o", text], cwd=cwd, capture_output=True).returncode:
            continue
        # Expanded text warns where its source does not (indent's -Werror stops there): warnings cost no CPU to speak of.
        cc, cpp = [a for a in cc if not a.startswith("-Werror")], [a for a in cpp if not a.startswith("-Werror")]
        try:
            given = run(["gcc", *cc, "-c", str(text), "-o", "/dev/null"], Path(cwd), dict(os.environ))[1]
            own = run(["gcc", *cpp, "-c", source, "-o", "/dev/null"], Path(cwd), dict(os.environ))[1]
        except SystemExit as e:  # a job gcc will not compile this way is left out of the figure, said
            print(f"{project.package}: gcc's own CPU leaves out {source}: {e}", file=sys.stderr)
            continue
        total, from_source, counted = total + given, from_source + own, counted + 1
    if not counted:
        raise SystemExit(f"{project.package}: none of the recorded compiles could be preprocessed again")
    return total, from_source, counted


def build(project: Project, tool: Tool) -> dict[str, Any]:
    """One timed build after an untimed ``make clean``: wall, client and server CPU, remote jobs."""
    subprocess.run(["make", "-s", "clean"], cwd=project.tree, capture_output=True)
    remote, agents = tool.remote_jobs(), agent_cpu(tool.agent_dir)
    server = tool.group.cpu() if tool.group else 0.0
    wall, make_cpu = run(["make", "-s", *project.make, f"CC={tool.cc}"], project.tree, tool.env)
    settle()
    agent = agent_delta(agents, agent_cpu(tool.agent_dir))
    return {"wall_s": wall, "make_cpu_s": make_cpu, "agent_cpu_s": agent, "client_cpu_s": make_cpu + agent,
            "server_cpu_s": tool.group.cpu() - server if tool.group else None,
            "remote_jobs": tool.remote_jobs() - remote}


def wire_bytes(project: Project, tool: Tool) -> dict[str, int]:
    """Bytes each way of one untimed build through a counting relay."""
    relay = Relay(tool.port)
    remote = tool.remote_jobs()
    try:
        timed_make(project.tree, [*project.make, f"CC={tool.cc}"], {**tool.env, **tool.via(relay.port)})
        settle()
    finally:
        relay.close()
    return {"to_server": relay.up, "from_server": relay.down, "remote_jobs": tool.remote_jobs() - remote}


def check_remote(what: str, tool: Tool, remote: int, jobs: int) -> None:
    """A benchmark where the remote tool silently compiled here would be worthless."""
    if tool.group and remote == 0:
        raise SystemExit(f"{what}: no {tool.name} job ran remotely")
    if tool.group and remote < jobs:
        print(f"WARNING: {what}: only {remote} of {jobs} {tool.name} jobs ran remotely", file=sys.stderr)


def bench_project(package: str, tools: list[Tool], options: argparse.Namespace, top: Path,
                  targets: dict[str, str]) -> dict[str, Any] | None:
    """The package's figures, or None when its tree does not build here with plain gcc (said, and skipped)."""
    try:
        project = prepare(package, top, options, targets)
    except SystemExit as e:  # with plain gcc: no tool of the comparison is hidden by this (cpio 2.13 and gcc 12)
        print(f"{package}: skipped, its tree does not build here with gcc: {e}", file=sys.stderr)
        return None
    jobs = len(project.commands)
    own, own_source, own_jobs = compiler_own(project, top)
    print(f"{package}: {project.tree.name}, {jobs} jobs, gcc's own CPU {own / own_jobs * 1000:.1f} ms/job from "
          f"preprocessed text, {own_source / own_jobs * 1000:.1f} from source", file=sys.stderr)
    failed = []
    for tool in tools:  # warm-up: page cache, distcc's state, securecc's agent
        try:
            timed_make(project.tree, [*project.make, f"CC={tool.cc}"], tool.env)
        except SystemExit:  # distcc on indent: -E text loses the /* fall through */ comments that -Werror needs
            failed.append(tool.name)
    if failed:
        built = [tool.name for tool in tools if tool.name not in failed]
        print(f"{package}: skipped, {' and '.join(failed)} could not build it (its output is above); "
              f"{', '.join(built) or 'nothing'} could", file=sys.stderr)
        return None
    settle()
    builds: dict[str, list[dict[str, Any]]] = {tool.name: [] for tool in tools}
    for rep in range(options.reps):
        for tool in tools:
            result = build(project, tool)
            check_remote(f"{package} rep {rep + 1}", tool, result["remote_jobs"], jobs)
            builds[tool.name].append(result)
            print(f"{package} rep {rep + 1}/{options.reps} {tool.name}: {result['wall_s']:.2f} s", file=sys.stderr)
    wire = {tool.name: wire_bytes(project, tool) for tool in tools if tool.group}
    for tool in tools:
        if tool.group:
            check_remote(f"{package} relay build", tool, wire[tool.name]["remote_jobs"], jobs)
    own_per_job, source_per_job = own / own_jobs, own_source / own_jobs
    medians: dict[str, dict[str, Any]] = {}
    for tool in tools:
        runs = builds[tool.name]
        server = statistics.median(r["server_cpu_s"] for r in runs) / jobs if tool.group else None
        wired = wire.get(tool.name, {})
        medians[tool.name] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "client_cpu_ms_per_job": statistics.median(r["client_cpu_s"] for r in runs) / jobs * 1000,
            "server_cpu_ms_per_job": server * 1000 if server is not None else None,
            "server_cpu_beyond_cc_ms_per_job": (server - own_per_job) * 1000 if server is not None else None,
            # beyond the gcc run each server is given: distccd compiles text, securecc's server the sources
            "server_cpu_beyond_given_cc_ms_per_job": (server - (source_per_job if tool.name == "securecc" else own_per_job)) * 1000
            if server is not None else None,
            "bytes_to_server_per_job": wired["to_server"] / jobs if wired else None,
            "bytes_from_server_per_job": wired["from_server"] / jobs if wired else None,
            "bytes_per_job": (wired["to_server"] + wired["from_server"]) / jobs if wired else None,
            "remote_jobs": min(r["remote_jobs"] for r in runs),
        }
    return {"package": package, "tree": project.tree.name, "make": ["make", *project.make], "jobs": jobs,
            "compiler_own_cpu_ms_per_job": own_per_job * 1000, "compiler_own_source_cpu_ms_per_job": source_per_job * 1000,
            "compiler_own_jobs_measured": own_jobs,
            "builds": builds, "wire": wire, "median": medians, "ratios": ratios(medians, BUILD_METRICS)}


def ratios(medians: dict[str, dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float | None]]:
    """securecc's figures over distcc's and over local gcc's (None where one has none)."""
    out: dict[str, dict[str, float | None]] = {}
    for other in ("distcc", "local"):
        sc, base = medians["securecc"], medians[other]
        out[f"securecc/{other}"] = {k: sc[k] / base[k] if sc[k] is not None and base[k] else None for k in keys}
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def tiny_source(directory: Path, tool: Tool, i: int) -> None:
    """A one-function file no cache has seen (name and value unique per tool, run and iteration)."""
    (directory / "tiny.c").write_text(f"int f_{tool.name}_{time.time_ns()}(void) {{ return {i}; }}\n")


def tiny(tools: list[Tool], n: int, top: Path) -> dict[str, dict[str, Any]]:
    """``CC -c tiny.c`` n times per tool, interleaved, each timed: per-job latency and client CPU."""
    dirs = {tool.name: top / "tiny" / tool.name for tool in tools}
    for tool in tools:
        dirs[tool.name].mkdir(parents=True)
        for i in range(3):  # warm-up
            tiny_source(dirs[tool.name], tool, i)
            run([*tool.cc.split(), "-c", "tiny.c", "-o", "tiny.o"], dirs[tool.name], tool.env)
    settle()
    walls: dict[str, list[float]] = {tool.name: [] for tool in tools}
    cpus: dict[str, float] = {tool.name: 0.0 for tool in tools}
    remote = {tool.name: tool.remote_jobs() for tool in tools}
    agents = {tool.name: agent_cpu(tool.agent_dir) for tool in tools}
    for i in range(n):
        for tool in tools:
            tiny_source(dirs[tool.name], tool, i)
            wall, cpu = run([*tool.cc.split(), "-c", "tiny.c", "-o", "tiny.o"], dirs[tool.name], tool.env)
            walls[tool.name].append(wall)
            cpus[tool.name] += cpu
    settle()
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        agent = agent_delta(agents[tool.name], agent_cpu(tool.agent_dir))
        done = tool.remote_jobs() - remote[tool.name]
        check_remote("tiny compiles", tool, done, n)
        out[tool.name] = {"jobs": n, "p50_ms": statistics.median(walls[tool.name]) * 1000,
                          "p99_ms": percentile(walls[tool.name], 0.99) * 1000,
                          "client_cpu_ms_per_job": (cpus[tool.name] + agent) / n * 1000, "remote_jobs": done,
                          "latencies_ms": [w * 1000 for w in walls[tool.name]]}
    return out


def concurrent(tool: Tool, clients: int, each: int, top: Path) -> dict[str, Any]:
    """``clients`` threads, each running ``each`` tiny compiles one after another in its own directory."""
    barrier = threading.Barrier(clients + 1)
    walls: list[float] = []
    failures: list[BaseException] = []

    def client(directory: Path) -> None:
        try:
            barrier.wait()
            for i in range(each):
                (directory / f"t{i}.c").write_text(f"int f_{directory.name}_{time.time_ns()}(void) {{ return {i}; }}\n")
                walls.append(run([*tool.cc.split(), "-c", f"t{i}.c", "-o", f"t{i}.o"], directory, tool.env)[0])
        except BaseException as e:  # SystemExit from a failed compile included
            failures.append(e)

    base = top / "many" / tool.name
    base.mkdir(parents=True)
    (base / "warm.c").write_text(f"int warm_{time.time_ns()}(void) {{ return 0; }}\n")
    run([*tool.cc.split(), "-c", "warm.c", "-o", "warm.o"], base, tool.env)  # the agent meets this server
    settle()
    remote, busy = tool.remote_jobs(), tool.turned_away()
    threads = []
    for k in range(clients):
        (base / f"c{k}").mkdir()
        threads.append(threading.Thread(target=client, args=(base / f"c{k}",)))
        threads[-1].start()
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if failures:
        raise SystemExit(f"{tool.name}: {len(failures)} concurrent client(s) failed: {failures[0]}")
    settle()
    jobs = clients * each
    done = tool.remote_jobs() - remote
    check_remote(f"{clients} concurrent clients", tool, done, jobs)
    return {"clients": clients, "jobs": jobs, "wall_s": elapsed, "jobs_per_s": jobs / elapsed,
            "p50_ms": statistics.median(walls) * 1000, "p99_ms": percentile(walls, 0.99) * 1000,
            "remote_jobs": done if tool.group else 0, "turned_away": tool.turned_away() - busy}


def machine() -> dict[str, Any]:
    def first_line(command: list[str]) -> str:
        return subprocess.run(command, capture_output=True, text=True).stdout.splitlines()[0]

    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    return {"nproc": os.cpu_count(), "cpu": models[0] if models else "?",
            "kernel": platform.release(), "os": release.get("PRETTY_NAME", "?").strip('"'),
            "gcc": first_line(["gcc", "--version"]), "distcc": first_line(["distcc", "--version"]),
            "python": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def table(result: dict[str, Any]) -> str:
    """The medians of each tool side by side, then securecc's ratios to distcc and to local gcc."""
    head = "".join(f"{h:>10}" for h in [*NAMES, "sc/distcc", "sc/local"])
    lines: list[str] = []

    def cells(values: list[float | None], digits: int) -> str:
        return "".join(f"{'-' if v is None else f'{v:.{digits}f}':>10}" for v in values)

    def metric(label: str, figures: dict[str, Any], ratios: dict[str, Any], key: str, digits: int) -> None:
        lines.append(f"{label:34}" + cells([figures[n][key] for n in NAMES], digits)
                     + cells([ratios[f"securecc/{o}"][key] for o in ("distcc", "local")], 2))

    for p in result["projects"]:
        m, r = p["median"], p["ratios"]
        lines.append(f"{p['tree'] + ' (' + str(p['jobs']) + ' jobs, ' + ' '.join(p['make'][1:]) + ')':34}{head}")
        metric("wall s", m, r, "wall_s", 2)
        metric("client CPU ms/job", m, r, "client_cpu_ms_per_job", 1)
        metric("server CPU ms/job (raw)", m, r, "server_cpu_ms_per_job", 1)
        metric(f"  beyond gcc's own {p['compiler_own_cpu_ms_per_job']:.1f}", m, r, "server_cpu_beyond_cc_ms_per_job", 1)
        metric(f"  beyond gcc it runs (sc: {p['compiler_own_source_cpu_ms_per_job']:.1f})", m, r,
               "server_cpu_beyond_given_cc_ms_per_job", 1)
        metric("bytes/job to server", m, r, "bytes_to_server_per_job", 0)
        metric("bytes/job from server", m, r, "bytes_from_server_per_job", 0)
        metric("bytes/job total", m, r, "bytes_per_job", 0)
        lines.append(f"{'remote jobs (fewest in a rep)':34}" + cells([m[n]["remote_jobs"] for n in NAMES], 0) + "\n")
    if "tiny" in result:
        t, r = result["tiny"], result["tiny_ratios"]
        lines.append(f"{str(t['local']['jobs']) + ' sequential tiny compiles':34}{head}")
        metric("latency ms p50", t, r, "p50_ms", 1)
        metric("latency ms p99", t, r, "p99_ms", 1)
        metric("client CPU ms/job", t, r, "client_cpu_ms_per_job", 1)
        lines.append(f"{'remote jobs':34}" + cells([t[n]["remote_jobs"] for n in NAMES], 0) + "\n")
        c, r = result["concurrent"], result["concurrent_ratios"]
        each = c["local"]["jobs"] // c["local"]["clients"]
        lines.append(f"{str(c['local']['clients']) + f' clients x {each} tiny compiles':34}{head}")
        metric("jobs/s", c, r, "jobs_per_s", 1)
        metric("latency ms p50", c, r, "p50_ms", 1)
        metric("latency ms p99", c, r, "p99_ms", 1)
        lines.append(f"{'remote jobs':34}" + cells([c[n]["remote_jobs"] for n in NAMES], 0))
        lines.append(f"{'turned away (BUSY, compiled here)':34}" + cells([c[n]["turned_away"] for n in NAMES], 0))
    return "\n".join(lines)


def stop_agents(directory: Path) -> None:
    for path in directory.glob("*.pid"):
        try:
            os.kill(int(path.read_text()), 15)
        except (OSError, ValueError):
            pass


def tear_down(top: Path, daemons: list, realm, groups: list, keep: bool = False) -> None:
    """Stop what a benchmark started (agents, daemons, the realm, CPU groups) and remove its directory."""
    stop_agents(top / "agent")
    for process in daemons:
        process.terminate()
        process.wait()
    realm.close()
    for group in groups:
        group.remove()
    if not keep:
        shutil_rm(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", default="lua5.4,zlib", help="Debian source packages, comma-separated")
    parser.add_argument("--target", action="append", default=[], metavar="PACKAGE=TARGET",
                        help=f"make target of a package (built in: {TARGETS}; others: the default target)")
    parser.add_argument("-j", type=int, default=4, help="make -j, distccd --jobs, securecc-server slots")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tiny", type=int, default=200, help="sequential tiny compiles per tool")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--each", type=int, default=4, help="tiny compiles per concurrent client")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "vs_distcc.json")
    parser.add_argument("--skip-builds", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the sequential and the concurrent tiny compiles")
    parser.add_argument("--scratch", choices=("disk", "tmpfs"), default="disk",
                        help="where both servers write their jobs' files: this disk's /tmp, or a tmpfs (as root)")
    options = parser.parse_args()
    targets = {**TARGETS, **dict(t.split("=", 1) for t in options.target)}
    started = time.monotonic()
    top = Path(tempfile.mkdtemp(prefix="scc-vs-distcc-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm", ACL)
    daemons: list[subprocess.Popen] = []
    groups: list[CpuGroup] = []
    scratch = top / "scratch" if options.scratch == "tmpfs" else None
    try:
        if scratch:
            scratch.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,mode=1777", "tmpfs", scratch], check=True)
        tools = [Tool("local", "gcc", dict(os.environ)), start_distcc(top, "distccd", options.j, daemons, groups, scratch),
                 start_securecc(realm, top, "server", options.j, groups, scratch)]
        result: dict[str, Any] = {"machine": machine(), "j": options.j, "reps": options.reps, "scratch": options.scratch,
                                  "projects": []}
        if not options.skip_builds:
            built = [bench_project(p, tools, options, top, targets) for p in options.packages.split(",")]
            result["projects"] = [p for p in built if p is not None]
        if not options.skip_tiny:
            result["tiny"] = tiny(tools, options.tiny, top)
            many = [tools[0], start_distcc(top, "distccd-many", options.clients, daemons, groups, scratch),
                    start_securecc(realm, top, "many", options.clients, groups, scratch)]
            result["concurrent"] = {tool.name: concurrent(tool, options.clients, options.each, top) for tool in many}
            result["tiny_ratios"] = ratios(result["tiny"], ["p50_ms", "p99_ms", "client_cpu_ms_per_job"])
            result["concurrent_ratios"] = ratios(result["concurrent"], ["jobs_per_s", "p50_ms", "p99_ms"])
        result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        result["seconds"] = time.monotonic() - started
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(result, indent=1) + "\n")
        info = result["machine"]
        print(f"{info['nproc']} x {info['cpu']}, {info['os']}, {info['gcc']}; load {' '.join(info['loadavg'])} at the "
              f"start, {' '.join(info['loadavg_end'])} at the end; medians of {options.reps} reps; "
              f"servers' scratch on {options.scratch}\n")
        print(table(result))
        print(f"\n{options.json} ({result['seconds']:.0f} s)")
        if os.environ.get("KEEP"):
            print(f"kept {top}")
    finally:
        tear_down(top, daemons, realm, groups, keep=bool(os.environ.get("KEEP")) or bool(scratch))
        if scratch:
            subprocess.run(["umount", scratch], check=False)
            if not os.environ.get("KEEP"):
                shutil_rm(top)


if __name__ == "__main__":
    main()
