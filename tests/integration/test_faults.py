"""The fault campaign's fast slice: ``bench/faults.py`` at small scale, so its regressions cannot come back silently.

kill -9 of a server, slapd stopped once the servers' answers expired, the KDC
stopped with a fresh ccache, and an audit log whose disk fills, each in its
own build of a generated project through four real servers; every check of
the campaign must hold (objects as gcc makes them here, each remote job in
exactly one audit log with its object's sha256, every log verifying, nothing
left running).  The wall-time targets are the full campaign's business.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

FAULTS = ("kill -9 of a server", "slapd down 8 s", "KDC down, fresh ccache", "audit log's tmpfs fills")


def test_the_fast_slice_of_the_fault_campaign_holds():
    done = subprocess.run([sys.executable, REPO / "bench" / "faults.py", "--files", "200", "--ldap-outage", "8",
                           "--only", "kill-9", "slapd", "kdc-fresh", "full-disk"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    for fault in FAULTS:
        row = next((r for r in rows if r.startswith(f"| {fault}")), None)
        assert row is not None and row.endswith("| ok |"), (fault, rows)
    assert rows[-1].startswith("| every server stopped: each log verifies whole") and rows[-1].endswith("| ok |")
