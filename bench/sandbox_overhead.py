#!/usr/bin/env python3
"""Per-job cost of the sandbox: the same tiny compile bare and through sandbox.command().

Not a test: run it with `.venv/bin/python bench/sandbox_overhead.py [-n 50]`.
Prints the median wall time of each and their difference (the overhead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from securecc import sandbox

SOURCE = b"int tiny(int x) { return x * 2; }\n"


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=50, help="compiles of each kind (interleaved)")
    options = parser.parse_args()
    root = os.geteuid() == 0
    settings = sandbox.Settings(sandbox.Limits(), 65534 if root else None, 65534 if root else None)
    scratch = Path(tempfile.mkdtemp(prefix="scc-bench-", dir="/tmp"))
    os.chmod(scratch, 0o711)
    bare, boxed = [], []
    try:
        for n in range(options.n):
            job_dir = sandbox.make_job_dir(scratch, f"j{n}", {"input": SOURCE}, settings.uid, settings.gid)
            spec = sandbox.Spec("/usr/bin/gcc", ["-x", "c", "-O2", "-c"], job_dir, "/build", "tiny.c", {})
            boxed.append(timed(sandbox.command(spec, settings, info_fd=None), job_dir))
            bare.append(timed(["/usr/bin/gcc", "-x", "c", "-O2", "-c", "-o", "bare.o", "input"], job_dir))
            sandbox.remove_job_dir(job_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    b, s = statistics.median(bare) * 1000, statistics.median(boxed) * 1000
    mode = "setpriv+prlimit+bwrap" if root else "prlimit+bwrap"
    print(f"tiny compile, median of {options.n}: bare gcc {b:.1f} ms, sandboxed ({mode}) {s:.1f} ms, "
          f"overhead {s - b:.1f} ms ({s / b:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
