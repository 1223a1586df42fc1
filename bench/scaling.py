#!/usr/bin/env python3
"""How many remote cores one client core keeps busy: securecc and distcc with client and server on separate cores.

Not a test: `.venv/bin/python bench/scaling.py [--package lua5.4] [--slots 1,2,3,4] [--reps 2]`.
The client (make, the wrappers, the preprocessor, securecc's agent) runs on CPU 0 and the server
(distccd or securecc-server, and every compiler and sandbox it starts) on CPU 1, by CPU affinity,
which children inherit. For each number of server slots S the package is built with `make -jS`
against a distccd with `--jobs S` and a securecc-server with `slots: S` (result cache off): jobs/s,
client CPU per job and server CPU per job (the server's cgroup). One server core is all a 2-core box
has, so the measured jobs/s levels off once that core is full; what one client core could feed on a
larger farm follows from the per-job figures: server CPU per job over client CPU per job is the number
of server cores one client core keeps busy. Writes JSON and, with matplotlib installed
(`.venv/bin/pip install -e '.[bench]'`), a PNG of both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchrealm import REPO, Realm, timed_make
from vs_distcc import ACL, TARGETS, CpuGroup, Tool, build, check_remote, machine, prepare, start_distcc, start_securecc, tear_down

CLIENT_CPU, SERVER_CPU = 0, 1


def pin_group(group: CpuGroup, cpu: int) -> None:
    """Every process of a server's cgroup on ``cpu``: what they start later inherits it."""
    for pid in (group.path / "cgroup.procs").read_text().split():
        try:
            os.sched_setaffinity(int(pid), {cpu})
        except OSError:
            pass  # gone meanwhile


def measure(project: Any, tool: Tool, slots: int, reps: int) -> dict[str, Any]:
    """Builds of ``project`` with ``tool`` at ``make -jS``: medians of wall, jobs/s and CPU per job.
    (Not more: securecc-server answers BUSY beyond its slots and the job compiles on the client.)"""
    project.make = [f"-j{slots}", *project.make[1:]]
    jobs = len(project.commands)
    timed_make(project.tree, [*project.make, f"CC={tool.cc}"], tool.env)  # warm-up (starts the agent, on CPU 0)
    runs = []
    for _ in range(reps):
        result = build(project, tool)
        check_remote(f"{tool.name} with {slots} slots", tool, result["remote_jobs"], jobs)
        runs.append(result)
    wall = statistics.median(r["wall_s"] for r in runs)
    client = statistics.median(r["client_cpu_s"] for r in runs) / jobs * 1000
    server = statistics.median(r["server_cpu_s"] for r in runs) / jobs * 1000
    print(f"{tool.name:9} {slots} slots: {jobs / wall:5.2f} jobs/s, client {client:5.1f} ms/job, server {server:6.1f} ms/job",
          file=sys.stderr)
    return {"slots": slots, "wall_s": wall, "jobs_per_s": jobs / wall, "client_cpu_ms_per_job": client,
            "server_cpu_ms_per_job": server, "server_cores_per_client_core": server / client, "runs": runs}


def plot(result: dict[str, Any], path: Path) -> bool:
    """Jobs/s against slots as measured, and the jobs/s one client core could feed a farm large enough;
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in result["tools"].items():
        slots = [p["slots"] for p in points]
        left.plot(slots, [p["jobs_per_s"] for p in points], marker="o", label=name)
        right.plot(slots, [1000 / p["client_cpu_ms_per_job"] for p in points], marker="o", label=name)
    left.set(xlabel="server slots (all on one server core)", ylabel="jobs/s",
             title=f"{result['tree']}: measured, client on 1 core")
    right.set(xlabel="server slots", ylabel="jobs/s (1000 / client CPU ms per job)",
              title="what one client core could feed")
    for axes in (left, right):
        axes.set_xticks([p["slots"] for p in next(iter(result["tools"].values()))])
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="lua5.4")
    parser.add_argument("--slots", default="1,2,3,4", help="server slots to measure, comma-separated")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "scaling.json")
    options = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: one for the client, one for the server")
    top = Path(tempfile.mkdtemp(prefix="scc-scaling-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm = Realm(top / "realm", ACL)
    daemons: list[subprocess.Popen] = []
    groups: list[CpuGroup] = []
    started = time.monotonic()
    try:
        project = prepare(options.package, top, argparse.Namespace(j=4), TARGETS)
        result: dict[str, Any] = {"machine": machine(), "package": options.package, "tree": project.tree.name,
                                  "jobs": len(project.commands), "tools": {"distcc": [], "securecc": []}}
        for slots in (int(s) for s in options.slots.split(",")):
            os.sched_setaffinity(0, {CLIENT_CPU, SERVER_CPU})  # servers start anywhere, then are pinned
            tools = [start_distcc(top, f"distccd-{slots}", slots, daemons, groups),
                     start_securecc(realm, top, f"server-{slots}", slots, groups)]
            for tool in tools:
                pin_group(tool.group, SERVER_CPU)
            os.sched_setaffinity(0, {CLIENT_CPU})  # make and everything under it, the agent included
            for tool in tools:
                result["tools"][tool.name].append(measure(project, tool, slots, options.reps))
        result["seconds"] = time.monotonic() - started
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(result, indent=1) + "\n")
        picture = options.json.with_suffix(".png")
        print(f"{options.json}" + (f", {picture}" if plot(result, picture) else " (no matplotlib: no picture)"))
    finally:
        os.sched_setaffinity(0, {CLIENT_CPU, SERVER_CPU})
        tear_down(top, daemons, realm, groups)


if __name__ == "__main__":
    main()
