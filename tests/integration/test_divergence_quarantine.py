"""Divergence quarantine end to end: a server whose compiler is wrong is caught by a sampled check, the user gets
this machine's object and one line, the server audits and counts the report, and the host gets no job until cleared.

Real KDC, server, sandbox and gcc.  The wrong compiler is a test-only gcc, offered under a compiler root, that
flips one byte of every object it writes; it says of itself what gcc says, so nothing but the objects tells it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, local, securecc

FLIPPER = """#!/usr/bin/python3
# A test-only gcc: the real one, then one byte of its object flipped.
import os, subprocess, sys
args = sys.argv[1:]
if "-o" not in args:
    os.execv("/usr/bin/gcc", ["gcc", *args])
status = subprocess.call(["gcc", *args], executable="/usr/bin/gcc")
out = args[args.index("-o") + 1]
if status == 0 and os.path.exists(out):
    data = bytearray(open(out, "rb").read())
    data[len(data) // 2] ^= 1
    open(out, "wb").write(bytes(data))
sys.exit(status)
"""

SOURCE = "int twice(int x) { return 2 * x; }\nint thrice(int x) { return 3 * x; }\n"


@pytest.fixture
def flipping_server(realm, own_server):
    """A server whose gcc flips a byte of every object."""
    root = Path(tempfile.mkdtemp(prefix="flipper-", dir=realm.dir))
    os.chmod(root, 0o755)
    (root / "bin").mkdir(mode=0o755)
    gcc = root / "bin" / "gcc"
    gcc.write_text(FLIPPER)
    gcc.chmod(0o755)
    return own_server(compilers={"gcc": {"path": str(gcc), "root": str(root)}})


def tool(realm, server, workdir: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": server.hosts, "XDG_CACHE_HOME": str(workdir / ".cache")}
    return subprocess.run([*command], env=env, cwd=workdir, capture_output=True, text=True, timeout=60)


def divergences_metric(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/metrics", timeout=5).read().decode()
    return float(re.search(r"^securecc_divergences_total (\S+)$", text, re.MULTILINE).group(1))


def test_a_server_that_returns_wrong_objects_is_caught_reported_and_quarantined(realm, flipping_server, workdir):
    server = flipping_server
    (workdir / "x.c").write_text(SOURCE)
    assert local(workdir, "gcc", "-O2", "-c", "x.c", "-o", "l.o").returncode == 0
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-MD", "-c", "x.c", "-o", "x.o", SECURECC_VERIFY_RATE="1")
    assert done.returncode == 0, done.stderr
    assert (workdir / "x.o").read_bytes() == (workdir / "l.o").read_bytes(), "the user gets this machine's object"
    [job] = server.jobs(cwd=str(workdir))
    assert job["decision"] == "allowed" and job["exit_status"] == 0
    port = server.port
    assert done.stderr.decode() == (
        f"securecc: x.c: the object from 127.0.0.1 (job {job['job_id']}) is not the one compiled here: its "
        f"{(workdir / 'l.o').stat().st_size}-byte object differs from the {(workdir / 'l.o').stat().st_size}-byte one compiled "
        f"here; 127.0.0.1 is quarantined until 'securecc-hosts --clear 127.0.0.1:{port}' (reported to its audit log); "
        "compiling locally\n")
    assert (workdir / "x.d").read_text().startswith("x.o: x.c"), "the check does not write the dependency file again"

    [record] = server.records("divergence")
    local_sha = hashlib.sha256((workdir / "l.o").read_bytes()).hexdigest()
    assert record["principal"] == "alice@TEST.REALM" and record["job_id"] == job["job_id"]
    assert record["local_sha256"] == local_sha and record["object_sha256"] == job["output_sha256"] != local_sha
    assert divergences_metric(server) == 1

    shown = tool(realm, server, workdir, str(BIN / "securecc"), "--show-hosts")
    assert "QUARANTINED since" in shown.stdout and f"job {job['job_id']}" in shown.stdout, shown.stdout
    monitor = tool(realm, server, workdir, str(BIN / "securecc-monitor"), "--once")
    assert "diverged 1  QUARANTINED" in monitor.stdout, monitor.stdout
    checked = tool(realm, server, workdir, str(BIN / "securecc-hosts"), "--check")
    assert checked.returncode == 1 and "left out: quarantined after job" in checked.stderr, checked.stderr
    doctor = securecc(realm, server, "alice", workdir, "doctor")
    assert b"WARN  host 127.0.0.1:" in doctor.stdout and b"quarantined after job" in doctor.stdout, doctor.stdout

    again = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", "x.c", "-o", "y.o", SECURECC_VERIFY_RATE="0")
    assert again.returncode == 0 and b"quarantined (see securecc --show-hosts); compiling locally" in again.stderr, again.stderr
    assert len(server.jobs(cwd=str(workdir))) == 1, "no job goes to a quarantined host"

    cleared = tool(realm, server, workdir, str(BIN / "securecc-hosts"), "--clear", f"127.0.0.1:{port}")
    assert cleared.returncode == 0 and "cleared" in cleared.stdout, cleared.stdout + cleared.stderr
    sent = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", "x.c", "-o", "z.o", SECURECC_VERIFY_RATE="0")
    assert sent.returncode == 0 and len(server.jobs(cwd=str(workdir))) == 2, sent.stderr


def test_without_fallback_a_divergence_fails_the_compile(realm, flipping_server, workdir):
    (workdir / "x.c").write_text(SOURCE)
    done = securecc(realm, flipping_server, "alice", workdir, "gcc", "-c", "x.c", SECURECC_VERIFY_RATE="1", SECURECC_FALLBACK="0")
    assert done.returncode == 1 and not (workdir / "x.o").exists()
    assert b"is not the one compiled here" in done.stderr and b"not compiling locally (SECURECC_FALLBACK=0)" in done.stderr


@pytest.mark.parametrize("flags", [["-O2"], ["-g", "-O2", "-MD"], ["-O2", "-flto"]], ids=["O2", "g-MD", "flto"])
def test_a_healthy_server_passes_every_check_and_stays_trusted(realm, server, workdir, flags):
    """No false alarm: a sound server's objects are this machine's (-flto's differ between any two compiles, here
    too: that is said, not held against the server)."""
    (workdir / "x.c").write_text(SOURCE)
    reported = len(server.records("divergence"))
    done = securecc(realm, server, "alice", workdir, "gcc", *flags, "-c", "x.c", "-o", "x.o", SECURECC_VERIFY_RATE="1",
                    SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled x.c on 127.0.0.1" in done.stderr, done.stderr
    said = b"two compiles here give two objects" if "-flto" in flags else b"object is the one compiled here"
    assert said in done.stderr, done.stderr
    assert b"quarantine" not in done.stderr
    assert len(server.records("divergence")) == reported
    shown = tool(realm, server, workdir, str(BIN / "securecc"), "--show-hosts")
    assert "QUARANTINED" not in shown.stdout
    if "-MD" in flags:
        assert (workdir / "x.d").read_text().startswith("x.o: x.c")
