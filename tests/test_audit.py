"""The audit log: every tamper case found at the right line; crashes, rotation, full disks, the tools."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, securecc
from securecc.audit import AuditLog, generate_key, load_private_key, load_public_key, verify
from securecc.audit import key_id as load_key_id


@pytest.fixture
def keys(tmp_path):
    public = generate_key(tmp_path / "audit.key")
    return load_private_key(tmp_path / "audit.key"), load_public_key(public), public


def write_log(path: Path, private, records: int = 30, every: int = 10, rotate_bytes: int | None = None) -> Path:
    log = AuditLog(path, private, "build1", rotate_bytes, checkpoint_every=every)
    log.write(event="server-start")
    for n in range(records):
        log.write(event="job", job_id=f"j{n}", principal="alice@TEST.REALM", decision="allowed", reason="group:x",
                  source=f"f{n}.c", exit_status=0)  # fmt: skip
    log.write(event="server-stop")
    log.close()
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def check(path: Path, public, live: bool = False) -> str | None:
    return verify([path], public, live).problem


def test_clean_log_verifies(tmp_path, keys):
    """A log written and closed by the server verifies, with counts."""
    private, public, _ = keys
    report = verify([write_log(tmp_path / "a.jsonl", private)], public)
    assert report.ok and report.records == 32 and report.checkpoints == 4 and report.unsigned_tail == 0


def tampered(tmp_path: Path, private, change) -> Path:  # type: ignore[no-untyped-def]
    path = write_log(tmp_path / "a.jsonl", private)
    lines = lines_of(path)
    change(lines)
    path.write_bytes(b"".join(lines))
    return path


def reencode(line: bytes, **changes: object) -> bytes:
    record = json.loads(line)
    record.update(changes)
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("edit a field", lambda ls: ls.__setitem__(5, reencode(ls[5], principal="mallory@TEST.REALM")),
         r"a\.jsonl:6: edited or replaced \(the next record, .*a\.jsonl:7, chains to other bytes\)"),
        ("edit by hand", lambda ls: ls.__setitem__(5, ls[5].replace(b'"decision":', b'"decision": ')),
         r"a\.jsonl:6: edited \(the line is not its record's canonical form\)"),
        ("delete a record", lambda ls: ls.pop(5), r"a\.jsonl:6: seq jumps from 4 to 6"),
        ("insert a record", lambda ls: ls.insert(5, ls[2]), r"a\.jsonl:6: out of order \(seq 2 after 4\)"),
        ("swap two records", lambda ls: ls.__setitem__(slice(5, 7), [ls[6], ls[5]]), r"a\.jsonl:6: seq jumps from 4 to 6"),
        ("cut the tail", lambda ls: ls.__delitem__(slice(-2, None)), r"a\.jsonl:34: the log ends 1 record\(s\) after"),
        ("drop the last checkpoint", lambda ls: ls.pop(), r"a\.jsonl:35: the log ends 2 record\(s\) after its last checkpoint"),
        ("garbage line", lambda ls: ls.insert(8, b"hello auditor\n"), r"a\.jsonl:9: not a record"),
    ],
)
def test_tampering_is_found_at_its_line(tmp_path, keys, name, change, expected):
    """Edit, delete, insert, swap, cut, garbage: verify names the file and line."""
    private, public, _ = keys
    problem = check(tampered(tmp_path, private, change), public)
    assert problem is not None and re.search(expected, problem), problem


def test_forged_or_foreign_signatures_are_found(tmp_path, keys):
    """A checkpoint whose signature is flipped, or comes from another key (a re-signed chain), is refused."""
    private, public, _ = keys
    path = write_log(tmp_path / "a.jsonl", private)
    lines = lines_of(path)
    checkpoint = next(i for i, line in enumerate(lines) if b'"event":"checkpoint"' in line)
    record = json.loads(lines[checkpoint])
    record["sig"] = ("A" if record["sig"][0] != "A" else "B") + record["sig"][1:]
    lines[checkpoint] = reencode(lines[checkpoint], sig=record["sig"])
    path.write_bytes(b"".join(lines))
    assert check(path, public) == f"{path}:{checkpoint + 1}: checkpoint signature invalid (forged, or signed by another key)"
    generate_key(tmp_path / "other.key")
    resigned = write_log(tmp_path / "b.jsonl", load_private_key(tmp_path / "other.key"))  # a chain rebuilt without our key
    assert "which was not given" in check(resigned, public)
    lines = lines_of(resigned)
    checkpoint = next(i for i, line in enumerate(lines) if b'"event":"checkpoint"' in line)
    lines[checkpoint] = reencode(lines[checkpoint], key=load_key_id(public))  # claims our key: the signature says no
    resigned.write_bytes(b"".join(lines))
    assert check(resigned, public) == f"{resigned}:{checkpoint + 1}: checkpoint signature invalid (forged, or signed by another key)"


def test_key_rotation_is_recorded_and_verifiable(tmp_path, keys):
    """A log continued under a new key verifies given both keys, and says which key it lacks otherwise."""
    private, public, _ = keys
    path = write_log(tmp_path / "a.jsonl", private)
    new_public = generate_key(tmp_path / "new.key")
    log = AuditLog(path, load_private_key(tmp_path / "new.key"), "build1")
    assert log.previous_key == load_key_id(public) != log.key_id
    log.write(event="key-rotation", old_key=log.previous_key, new_key=log.key_id)
    log.close()
    assert verify([path], [public, load_public_key(new_public)]).ok
    assert "which was not given" in verify([path], public).problem


def test_splicing_two_logs_is_found(tmp_path, keys):
    """Half of one log and half of another (same key, same shape) break the chain at the seam."""
    private, public, _ = keys
    a = lines_of(write_log(tmp_path / "a.jsonl", private))
    b = lines_of(write_log(tmp_path / "b.jsonl", private))
    spliced = tmp_path / "s.jsonl"
    spliced.write_bytes(b"".join(a[:12] + b[12:]))
    assert check(spliced, public) == (f"{spliced}:12: edited or replaced (the next record, {spliced}:13, "
                                      "chains to other bytes)")  # fmt: skip


def test_torn_last_line_is_explained_and_the_chain_continues(tmp_path, keys):
    """A crash mid-write leaves a torn line: verify says so; the next start ends it and declares it."""
    private, public, _ = keys
    path = write_log(tmp_path / "a.jsonl", private)
    with open(path, "ab") as f:
        f.write(b'{"decision":"allowed","event":"job","job_id":"j9')
    assert "a.jsonl:37: torn last line" in check(path, public)
    log = AuditLog(path, private, "build1", checkpoint_every=10)
    assert log.torn_line == 37
    log.write(event="server-start", torn_line=log.torn_line)
    log.write(event="job", job_id="after", decision="allowed")
    log.close()
    assert verify([path], public).ok
    assert lines_of(path)[36] == b'{"decision":"allowed","event":"job","job_id":"j9\n'  # never glued to a record


def test_rotation_keeps_one_chain(tmp_path, keys):
    """Rotated files verify together in any order; a missing middle file is reported."""
    private, public, _ = keys
    write_log(tmp_path / "a.jsonl", private, records=200, rotate_bytes=8000)
    files = sorted(tmp_path.glob("a.jsonl*"))
    assert len(files) >= 4
    report = verify(list(reversed(files)), public)
    assert report.ok and report.records == 202 + len(files) - 1  # + one rotation record per new file
    rotated = sorted(tmp_path.glob("a.jsonl.*"))
    missing = verify([f for f in files if f != rotated[1]], public)
    assert "seq jumps from" in missing.problem


def test_server_chain_survives_concurrency_kill_and_restart(realm, own_server, workdir):
    """64 concurrent jobs, then kill -9, then a restart with a torn tail: one valid chain, every job recorded."""
    s = own_server(slots=64)
    (workdir / "c.c").write_text("int c(void) { return 3; }\n")
    results = []

    def build(n: int) -> None:
        results.append(securecc(realm, s, "alice" if n % 4 else "bob", workdir, "gcc", "-c", "c.c", "-o", f"c{n}.o"))

    threads = [threading.Thread(target=build, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results)
    assert len(s.jobs(principal="alice@TEST.REALM", decision="allowed")) == 48
    assert len(s.jobs(principal="bob@TEST.REALM", decision="refused")) == 16
    s.process.kill()
    s.process.wait()
    public = realm.dir / "audit.key.pub"
    after_kill = verify([s.audit_path], load_public_key(public))
    assert after_kill.problem is None or "after its last checkpoint" in after_kill.problem
    with open(s.audit_path, "ab") as f:
        f.write(b'{"v":1,"seq":')  # as if the kill had landed mid-write
    torn_line = s.audit_path.read_bytes().count(b"\n") + 1
    restarted = own_server(audit={"path": str(s.audit_path)})
    done = securecc(realm, restarted, "alice", workdir, "gcc", "-c", "c.c", "-o", "after.o")
    assert done.returncode == 0
    restarted.stop()
    report = verify([s.audit_path], load_public_key(public))
    assert report.ok, report.problem
    starts = [r for r in restarted.audit() if r.get("event") == "server-start"]
    assert starts[-1]["torn_line"] == torn_line


def test_full_disk_refuses_jobs_and_recovers(realm, own_server, workdir):
    """When the log cannot grow, jobs are refused (never run unrecorded); when it can, the log says what was lost.

    The disk fills by RLIMIT_FSIZE set on the running server just above the log's size: a log grown to a few
    MB first, so the limit bites the log and not the smaller files the server also writes (its replay cache).
    """
    log_path = workdir / "big-audit.jsonl"
    log = AuditLog(log_path, load_private_key(realm.dir / "audit.key"), "before")
    for n in range(12000):
        log.write(event="job", job_id=f"old{n}", principal="alice@TEST.REALM", decision="allowed", args=["-O2"] * 8)
    log.close()
    s = own_server(audit={"path": str(log_path)})
    (workdir / "d.c").write_text("int d(void) { return 4; }\n")
    assert securecc(realm, s, "alice", workdir, "gcc", "-c", "d.c", "-o", "d0.o").returncode == 0
    size = s.audit_path.stat().st_size
    subprocess.run(["prlimit", f"--pid={s.process.pid}", f"--fsize={size + 10}:unlimited"], check=True)
    done = securecc(realm, s, "alice", workdir, "gcc", "-c", "d.c", "-o", "d1.o")
    assert done.returncode == 0 and (workdir / "d1.o").exists()  # built locally
    assert "cannot write its audit log" in done.stderr.decode() and "compiling locally" in done.stderr.decode()
    assert "refusing jobs until it can be written" in s.log_path.read_text()
    subprocess.run(["prlimit", f"--pid={s.process.pid}", "--fsize=unlimited:unlimited"], check=True)
    done = securecc(realm, s, "alice", workdir, "gcc", "-c", "d.c", "-o", "d2.o", SECURECC_VERBOSE="1")
    assert b"compiled d.c" in done.stderr
    recovered = [r for r in s.audit() if r.get("event") == "audit-recovered"]
    assert recovered and recovered[0]["lost"] >= 1
    s.stop()
    assert verify([s.audit_path], load_public_key(realm.dir / "audit.key.pub")).ok


def test_checkpoints_are_forwarded_to_syslog(realm, own_server, workdir):
    """With audit.syslog, each signed checkpoint also goes off the box."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        s = own_server(audit={"syslog": f"127.0.0.1:{listener.getsockname()[1]}", "checkpoint_seconds": 1})
        (workdir / "e.c").write_text("int e;\n")
        securecc(realm, s, "alice", workdir, "gcc", "-c", "e.c", "-o", "e.o")
        message = listener.recv(65536)
    assert message.startswith(b"<110>securecc-audit: {") and b'"event":"checkpoint"' in message and b'"sig":' in message


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / args[0], *args[1:]], capture_output=True, text=True, timeout=60)


def test_auditor_tools(tmp_path, keys):
    """keygen, verify (exit status and message), show with filters and --json, stats."""
    key = tmp_path / "server.key"
    made = run_tool("securecc-admin", "audit", "keygen", "--out", str(key))
    assert made.returncode == 0 and oct(key.stat().st_mode & 0o777) == "0o600"
    assert run_tool("securecc-admin", "audit", "keygen", "--out", str(key)).returncode == 1  # never overwritten
    log = AuditLog(tmp_path / "a.jsonl", load_private_key(key), "build1")
    log.write(event="job", principal="alice@TEST.REALM", decision="allowed", reason="group:committers", source="a.c",
              compiler="gcc", exit_status=0, bytes_in=100, bytes_out=10, duration=0.5)  # fmt: skip
    log.write(event="job", principal="bob@TEST.REALM", decision="refused", reason="not-in-allowed-group", source="b.c",
              compiler="gcc", bytes_in=50, duration=0.01)  # fmt: skip
    log.close()
    ok = run_tool("securecc-audit", "verify", "--key", f"{key}.pub", str(tmp_path / "a.jsonl"))
    assert ok.returncode == 0 and ok.stdout == "OK: 2 records, 1 signed checkpoints, 1 file(s)\n"
    lines = lines_of(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_bytes(lines[1] + lines[0] + lines[2])
    bad = run_tool("securecc-audit", "verify", "--key", f"{key}.pub", str(tmp_path / "a.jsonl"))
    assert bad.returncode == 1 and bad.stdout.startswith("securecc-audit: FAILED: ")
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    shown = run_tool("securecc-audit", "show", "--decision", "refused", str(tmp_path / "a.jsonl"))
    assert shown.returncode == 0 and "bob@TEST.REALM" in shown.stdout and "alice" not in shown.stdout
    as_json = run_tool("securecc-audit", "show", "--json", "--principal", "alice@TEST.REALM", str(tmp_path / "a.jsonl"))
    assert [json.loads(line)["source"] for line in as_json.stdout.splitlines()] == ["a.c"]
    stats = run_tool("securecc-audit", "stats", str(tmp_path / "a.jsonl"))
    assert "jobs: 2  allowed: 1  refused: 1" in stats.stdout and "not-in-allowed-group 1" in stats.stdout
    assert "bytes in: 150  out: 10" in stats.stdout


def test_follow_prints_new_records(tmp_path, keys):
    """show --follow prints records as they are appended."""
    private, _, _ = keys
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, private, "build1")
    watcher = subprocess.Popen([BIN / "securecc-audit", "show", "--follow", "--json", str(path)], stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
    try:
        time.sleep(1)
        log.write(event="job", principal="carol@TEST.REALM", decision="allowed", source="live.c")
        line = watcher.stdout.readline()
        assert json.loads(line)["source"] == "live.c"
    finally:
        watcher.kill()
        log.close()
