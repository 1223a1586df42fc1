#!/usr/bin/env python3
"""Per-job cost of the sandbox: the same tiny compile bare and through sandbox.command().

Not a test: run it with `.venv/bin/python bench/sandbox_overhead.py [-n 50] [--breakdown]`.
Prints the median wall time of each and their difference (the overhead).

``--breakdown``: what each layer adds, as the job handler runs it (as
root: under uid 65534, so bwrap makes a user namespace as it does for the
handler): bare gcc; under prlimit; bwrap with only the user and mount
namespaces and / bound read-only; with the other namespaces (pid, IPC,
UTS, cgroup: not the network's, as the handler) and the system call filter;
with the real system binds, /dev and a /tmp tmpfs instead of /;
and the complete sandbox.command() line (job binds, read-only remounts,
--die-with-parent, --new-session, --info-fd).  Each layer's wall and CPU (a
cgroup holding all it ran), and the whole machine's CPU per run over runs
in a row (/proc/stat): the kernel tears namespaces down partly in threads of
its own, which no cgroup of ours holds.

``--runner``: the complete compile as the job handler runs it, through
``sandbox.RunningJob`` in a reactor (as root: after dropping to uid 65534),
in batches, interleaved: with a network namespace per job (as before
2026-12-08), and with the system call filter in the host's network
namespace; wall, and the whole machine's CPU (a namespace's teardown runs in
kernel threads).

``--tree N``: a compile whose source includes N project headers, as the handler runs a job the server
preprocesses, with the job's tree on the scratch disk and from memory files (``sandbox.memory_files``),
interleaved: wall and CPU (a cgroup), the job directory's making and removal included.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vs_distcc import CpuGroup

from securecc import sandbox

SOURCE = b"int tiny(int x) { return x * 2; }\n"


@functools.cache
def seccomp_filter() -> int:
    """The handler's system call filter, as a descriptor every sandboxed run here is given (rewound before each)."""
    return sandbox.seccomp_file()


def filtered(spec: sandbox.Spec, settings: sandbox.Settings) -> list[str]:
    """``sandbox.command()`` as the handler has it, the filter included (``--seccomp``), run by subprocess here."""
    return sandbox.command(spec, settings, info_fd=None, seccomp_fd=seccomp_filter())


def _run(argv: list[str], cwd: Path, preexec_fn: Callable[[], None] | None = None) -> None:
    os.lseek(seccomp_filter(), 0, os.SEEK_SET)  # bwrap reads it to the end
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, preexec_fn=preexec_fn, pass_fds=(seccomp_filter(),))


def timed(argv: list[str], cwd: Path) -> float:
    return measured(argv, cwd)[0]


def measured(argv: list[str], cwd: Path, group: CpuGroup | None = None) -> tuple[float, float]:
    """(wall, CPU), in seconds; the CPU of everything the command ran when ``group`` holds it (a cgroup:
    bwrap does not reap its sandbox, so the compile's CPU is in no rusage of ours), else 0."""
    join = (lambda: (group.path / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    before, start = group.cpu() if group else 0.0, time.perf_counter()
    _run(argv, cwd, join)
    wall = time.perf_counter() - start
    return wall, (group.cpu() - before) if group else 0.0


def job_directory(scratch: Path, name: str, settings: sandbox.Settings) -> Path:
    """A job directory as the handler makes it: owned by the sandbox uid when there is one."""
    job_dir = sandbox.make_job_dir(scratch, name, {"input": SOURCE})
    if settings.uid is not None:
        for path in (job_dir, *job_dir.rglob("*")):
            os.chown(path, settings.uid, settings.gid if settings.gid is not None else -1)
    return job_dir


def layers(full: list[str]) -> dict[str, list[str]]:
    """The full command line, and the lighter ones that each drop a layer of it (see ``--breakdown``)."""
    gcc = full.index("/usr/bin/gcc")
    compile_args = full[gcc:]
    bare = [a.replace("/job/input", "input").replace("/job/output", "output") for a in compile_args]
    prlimit = full[: full.index("--") + 1]
    system = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
              "--symlink", "usr/lib64", "/lib64", *sandbox.DEVICES, "--tmpfs", "/tmp"]
    over_root = ["--ro-bind", "/", "/", "--bind", ".", "/tmp", "--chdir", "/tmp"]  # the job dir where / has a mount point
    at = full.index("--seccomp")
    others = ["--unshare-all", "--share-net", *full[at : at + 2]]  # as the handler's: no network namespace, the filter
    return {
        "bare gcc": bare,
        "+ prlimit": [*prlimit, *bare],
        "+ bwrap: user and mount namespaces, / read-only": [*prlimit, "bwrap", "--unshare-user", *over_root, "--", *bare],
        "+ pid, ipc, uts, cgroup namespaces; the filter": [*prlimit, "bwrap", *others, *over_root, "--", *bare],
        "+ system binds, /dev, /tmp tmpfs": [*prlimit, "bwrap", *others, *system, "--bind", ".", "/job",
                                            "--chdir", "/job", "--", *compile_args],
        "the whole sandbox.command()": full,
    }


# As root, run as the job handler does: under the sandbox uid (bwrap then makes a user namespace).
AS_HANDLER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if os.geteuid() == 0 else []


def machine_cpu() -> float:
    """Seconds of CPU the whole machine has used (/proc/stat, idle and iowait apart): the kernel's own threads
    included, which do part of a namespace's teardown after its last process has gone, in no cgroup of ours."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def machine_wide(argv: list[str], cwd: Path, n: int) -> float:
    """The whole machine's CPU per run of ``argv``, over ``n`` runs in a row (its deferred work given time to end)."""
    time.sleep(0.3)
    before = machine_cpu()
    for _ in range(n):
        _run(argv, cwd)
    time.sleep(0.3)
    return (machine_cpu() - before) / n


def breakdown(options: argparse.Namespace, settings: sandbox.Settings, scratch: Path) -> None:
    times: dict[str, list[tuple[float, float]]] = {}
    group = CpuGroup("sandbox-overhead")
    try:
        sample(options, settings, scratch, group, times)
    finally:
        group.remove()
    job_dir = job_directory(scratch, "machine-wide", settings)
    spec = sandbox.Spec("/usr/bin/gcc", ["-x", "c", "-O2", "-c"], job_dir, "/build", "tiny.c", {})
    machine = {name: machine_wide([*AS_HANDLER, *argv], job_dir, options.n)
               for name, argv in layers(filtered(spec, settings)).items()}
    previous = None
    print(f"{'':50s} {'wall (median)':>20s} {'CPU (median)':>20s} {'machine CPU (mean)':>20s}")
    for name, samples in times.items():
        wall, cpu = (statistics.median(s[k] for s in samples) * 1000 for k in (0, 1))
        whole = machine[name] * 1000
        steps = [f"(+{now - then:.1f})" for now, then in zip((wall, cpu, whole), previous)] if previous else ["", "", ""]
        print(f"{name:50s} {wall:6.1f} ms {steps[0]:>9s} {cpu:6.1f} ms {steps[1]:>9s} {whole:6.1f} ms {steps[2]:>9s}")
        previous = wall, cpu, whole


def sample(options: argparse.Namespace, settings: sandbox.Settings, scratch: Path, group: CpuGroup,
           times: dict[str, list[tuple[float, float]]]) -> None:
    for n in range(options.n):
        job_dir = job_directory(scratch, f"b{n}", settings)
        spec = sandbox.Spec("/usr/bin/gcc", ["-x", "c", "-O2", "-c"], job_dir, "/build", "tiny.c", {})
        for name, argv in layers(filtered(spec, settings)).items():
            wall = measured([*AS_HANDLER, *argv], job_dir)[0]  # joining a cgroup slows the start: timed apart
            times.setdefault(name, []).append((wall, measured([*AS_HANDLER, *argv], job_dir, group)[1]))
        sandbox.remove_job_dir(job_dir)


def runner(options: argparse.Namespace, settings: sandbox.Settings, scratch: Path) -> None:
    """RunningJob's wall and the whole machine's CPU per compile, as the handler runs it, with a network namespace
    per job and with the system call filter in the host's network namespace (see ``--runner``)."""
    if os.geteuid() == 0:
        os.chown(scratch, 65534, 65534)
        child = os.fork()
        if child:
            os.waitpid(child, 0)
            return
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
    from twisted.internet import defer, reactor, task

    ways = {"a network namespace per job": False, "the syscall filter, no network namespace": True}
    walls: dict[str, list[float]] = {name: [] for name in ways}
    machine: dict[str, list[float]] = {name: [] for name in ways}
    batch = 10

    @defer.inlineCallbacks
    def run_all():  # type: ignore[no-untyped-def]
        try:
            for n in range(options.n // batch + 1):
                for name, filtered in ways.items():
                    yield task.deferLater(reactor, 0.2, lambda: None)  # the last batch's deferred teardown
                    before = machine_cpu()
                    for k in range(batch):
                        job_dir = sandbox.make_job_dir(scratch, f"r{n}-{k}{int(filtered)}", {"input": SOURCE})
                        spec = sandbox.Spec("/usr/bin/gcc", ["-x", "c", "-O2", "-c"], job_dir, "/build", "tiny.c", {})
                        argv = sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD,
                                               seccomp_fd=sandbox.SECCOMP_FD if filtered else None)
                        started = time.perf_counter()
                        outcome = yield sandbox.RunningJob(reactor, reactor, argv, job_dir, 60, limits=sandbox.rlimits(settings),
                                                           seccomp=filtered).result
                        if outcome.exit_status != 0:
                            raise SystemExit(f"{name}: {outcome.stderr.decode(errors='replace')}")
                        if n:  # the first batch warms up
                            walls[name].append(time.perf_counter() - started)
                        sandbox.remove_job_dir(job_dir)
                    yield task.deferLater(reactor, 0.2, lambda: None)
                    if n:
                        machine[name].append((machine_cpu() - before) / batch)
        finally:
            reactor.stop()

    reactor.callWhenRunning(run_all)
    reactor.run()
    for name in ways:
        print(f"{name:42s} wall median {statistics.median(walls[name]) * 1000:6.2f} ms, the machine's CPU "
              f"{statistics.mean(machine[name]) * 1000:6.2f} ms a compile ({len(walls[name])}, batches of {batch} interleaved)")
    if os.geteuid() == 65534:
        os._exit(0)


def tree_cost(options: argparse.Namespace, settings: sandbox.Settings, scratch: Path) -> None:
    """A compile of a source that includes ``--tree`` project headers, as the handler runs a job the server
    preprocesses (see ``--tree``), its files on the scratch disk and from memory files, interleaved; the wall of
    each and the CPU of everything it ran, the making and removal of its directory included (a cgroup)."""
    group = CpuGroup("tree")
    (group.path / "cgroup.procs").write_text(str(os.getpid()))
    if os.geteuid() == 0:
        os.chown(scratch, 65534, 65534)
        child = os.fork()
        if child:
            os.waitpid(child, 0)
            (Path(group.path.parent) / "cgroup.procs").write_text(str(os.getpid()))
            group.remove()
            return
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
    from twisted.internet import defer, reactor

    headers = {f"h{k}": b"/* a project header of 3 KB, as gnulib's are */\n" * 60 + b"static const int h%d = %d;\n" % (k, k)
               for k in range(options.tree)}
    files = {"main": b"".join(b'#include "inc/h%d.h"\n' % k for k in range(options.tree)) + b"int f(void) { return 0; }\n", **headers}
    mounts = (("main", "/home/u/p/main.c"), *((name, f"/home/u/p/inc/{name}.h") for name in headers))
    measured_: dict[str, list[tuple[float, float]]] = {"disk": [], "memory": []}

    @defer.inlineCallbacks
    def run_all():  # type: ignore[no-untyped-def]
        try:
            for n in range(options.n + 2):
                for name in measured_:
                    in_memory = name == "memory"
                    started, cpu = time.perf_counter(), group.cpu()
                    spec = sandbox.Spec("/usr/bin/gcc", ["-O2", "-c"], scratch / f"t{n}{name}", "/home/u/p", "main.c", {},
                                        mounts, preprocessed=False)
                    job_dir = sandbox.make_job_dir(scratch, f"t{n}{name}", files, spec, in_memory)
                    memory = sandbox.memory_files(spec, files) if in_memory else None
                    argv = sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD, seccomp_fd=sandbox.SECCOMP_FD,
                                           memory=[len(files[k]) for k, _ in sandbox.tree_files(spec)] if in_memory else None)
                    try:
                        job = sandbox.RunningJob(reactor, reactor, argv, job_dir, 60, limits=sandbox.rlimits(settings), files=memory,
                                                 seccomp=True)
                    finally:
                        for fd in memory or []:
                            os.close(fd)
                    outcome = yield job.result
                    sandbox.remove_job_dir(job_dir)
                    if outcome.exit_status != 0:
                        raise SystemExit(f"{name}: {outcome.stderr.decode(errors='replace')}")
                    if n >= 2:  # warm-up
                        measured_[name].append((time.perf_counter() - started, group.cpu() - cpu))
        finally:
            reactor.stop()

    reactor.callWhenRunning(run_all)
    reactor.run()
    for name, values in measured_.items():
        print(f"{options.tree} headers, tree on {name:6s}: median wall {statistics.median(v[0] for v in values) * 1000:6.2f} ms, "
              f"CPU {statistics.median(v[1] for v in values) * 1000:6.2f} ms over {len(values)} (interleaved)")
    if os.geteuid() == 65534:
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=50, help="compiles of each kind (interleaved)")
    parser.add_argument("--breakdown", action="store_true", help="what each layer of the sandbox costs")
    parser.add_argument("--runner", action="store_true", help="RunningJob with a network namespace per job against the syscall filter")
    parser.add_argument("--tree", type=int, default=0, metavar="N",
                        help="a compile that includes N project headers: its tree on the scratch disk against memory files")
    options = parser.parse_args()
    root = os.geteuid() == 0
    settings = sandbox.Settings(sandbox.Limits(), 65534 if root else None, 65534 if root else None)
    scratch = Path(tempfile.mkdtemp(prefix="scc-bench-", dir="/tmp"))
    os.chmod(scratch, 0o711)
    bare, boxed = [], []
    mode = tree_cost if options.tree else runner if options.runner else breakdown if options.breakdown else None
    if mode is not None:
        try:
            mode(options, settings, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    try:
        for n in range(options.n):
            job_dir = job_directory(scratch, f"j{n}", settings)
            spec = sandbox.Spec("/usr/bin/gcc", ["-x", "c", "-O2", "-c"], job_dir, "/build", "tiny.c", {})
            boxed.append(timed([*AS_HANDLER, *filtered(spec, settings)], job_dir))
            bare.append(timed(["/usr/bin/gcc", "-x", "c", "-O2", "-c", "-o", "bare.o", "input"], job_dir))
            sandbox.remove_job_dir(job_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    b, s = statistics.median(bare) * 1000, statistics.median(boxed) * 1000
    mode = "setpriv+prlimit+bwrap" if root else "prlimit+bwrap"
    print(f"tiny compile, median of {options.n}: bare gcc {b:.1f} ms, sandboxed ({mode}) {s:.1f} ms, "
          f"overhead {s - b:.1f} ms ({s / b:.2f}x)")


if __name__ == "__main__":
    main()
