#!/usr/bin/env python3
"""Audit log costs: server time per job record (chain + periodic signed checkpoint) and verify throughput.

Not a test: `.venv/bin/python bench/audit_cost.py [-n 50000]`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from twisted.internet.task import Clock

from securecc.audit import Decision, JobRecord, generate_key, load_private_key, load_public_key, verify
from securecc.server.auditlog import AuditLog

JOB = JobRecord(
    job_id="0123456789abcdef", principal="alice@EXAMPLE.ORG", peer="10.0.0.7:51234", compiler="gcc",
    compiler_path="/usr/bin/gcc", compiler_identity="gcc version 12.2.0 (Debian 12.2.0-14+deb12u1); target x86_64-linux-gnu",
    args=["-g", "-O2", "-Wall", "-Wextra", "-fPIC"], source="src/lib/parser.c", cwd="/home/alice/src/project/build",
    headers=0, input_sha256="a" * 64, output_sha256="b" * 64, exit_status=0, ended_by=None, duration=0.8123,
    bytes_in=183412, bytes_out=23110, decision=Decision.ALLOWED, reason="group:committers",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=50000)
    n = parser.parse_args().n
    directory = Path(tempfile.mkdtemp(prefix="scc-audit-bench-"))
    try:
        public = generate_key(directory / "key")
        log = AuditLog(directory / "audit.jsonl", load_private_key(directory / "key"), "bench", clock=Clock())
        start = time.perf_counter()
        for _ in range(n):
            log.write(**JOB.to_fields())  # as the server writes it
        log.close()
        written = time.perf_counter() - start
        start = time.perf_counter()
        report = verify([directory / "audit.jsonl"], load_public_key(public))
        checked = time.perf_counter() - start
        assert report.ok, report.problem
        size = (directory / "audit.jsonl").stat().st_size
        print(f"{n} job records ({size / n:.0f} bytes each, a checkpoint every 100): "
              f"{written / n * 1e6:.1f} µs per record on the server, verify {report.records / checked:,.0f} records/s")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
