"""The audit log: every tamper case found at the right line; crashes, rotation, full disks, the tools."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, securecc
from twisted.internet.task import Clock

from securecc.audit import AuditError, generate_key, load_private_key, load_public_key, records, verify
from securecc.audit import key_id as load_key_id
from securecc.server.auditlog import AuditLog


@pytest.fixture
def keys(tmp_path):
    public = generate_key(tmp_path / "audit.key")
    return load_private_key(tmp_path / "audit.key"), load_public_key(public), public


def write_log(path: Path, private, records: int = 30, every: int = 10, rotate_bytes: int | None = None) -> Path:
    log = AuditLog(path, private, "build1", rotate_bytes, checkpoint_every=every, clock=Clock())
    log.write(event="server-start")
    for n in range(records):
        log.write(event="job", job_id=f"j{n}", principal="alice@TEST.REALM", decision="allowed", reason="group:x",
                  source=f"f{n}.c", exit_status=0)
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


def tampered(tmp_path: Path, private, change) -> Path:
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
    log = AuditLog(path, load_private_key(tmp_path / "new.key"), "build1", clock=Clock())
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
                                      "chains to other bytes)")


def test_torn_last_line_is_explained_and_the_chain_continues(tmp_path, keys):
    """A crash mid-write leaves a torn line: verify says so; the next start ends it and declares it."""
    private, public, _ = keys
    path = write_log(tmp_path / "a.jsonl", private)
    with open(path, "ab") as f:
        f.write(b'{"decision":"allowed","event":"job","job_id":"j9')
    assert "a.jsonl:37: torn last line" in check(path, public)
    log = AuditLog(path, private, "build1", checkpoint_every=10, clock=Clock())
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

    def build(n: int) -> None:  # bob, whom the server refuses (and whose sessions it revokes), keeps his own host state
        user, state = ("alice", ".cache") if n % 4 else ("bob", ".cache-bob")
        results.append(securecc(realm, s, user, workdir, "gcc", "-c", "c.c", "-o", f"c{n}.o", XDG_CACHE_HOME=str(workdir / state)))

    threads = [threading.Thread(target=build, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results)
    assert len(s.jobs(principal="alice@TEST.REALM", decision="allowed")) == 48
    # each job of bob's that reached the server was refused; one whose session was revoked (bob may compile nothing)
    # between its handshake and its job never arrived, and compiled on his machine
    assert 0 < len(s.jobs(principal="bob@TEST.REALM", decision="refused")) <= 16
    assert not s.jobs(principal="bob@TEST.REALM", decision="allowed")
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
    log = AuditLog(log_path, load_private_key(realm.dir / "audit.key"), "before", clock=Clock())
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


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills: a 1 MiB tmpfs (the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Write a file until the disk refuses another byte."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError:
                continue


START = {"event": "job-start", "job_id": "0123456789abcdef", "principal": "alice@TEST.REALM", "compiler": "gcc",
         "args": ["-O2", "-Wall", "-c"] * 20, "source": "src/" + "deep/" * 40 + "a.c", "headers": 3}


def test_every_reserved_job_gets_its_record_on_a_full_disk_and_the_stop_signs(small_disk, keys):
    """Reservations are refused once the disk is full; every job that got one still writes its final record
    (a long detail too), an unreserved record is refused rather than eat into them, and the stop signs."""
    private, public, _ = keys
    log = AuditLog(small_disk / "audit.jsonl", private, "full", checkpoint_every=7, clock=Clock())
    log.write(event="server-start")
    fill(small_disk)
    rooms = []
    with pytest.raises(AuditError, match="no room in the audit log"):
        for n in range(10000):
            room = log.reserve(START)
            log.write(room, **{**START, "n": n})
            rooms.append(room)
    assert len(rooms) > 10 and not log.healthy
    with pytest.raises(AuditError):
        log.write(event="auth", peer="127.0.0.1:1", decision="refused", reason="denied:authentication-failed")
    for n, room in enumerate(rooms):
        log.write(room, **{**START, "event": "job", "n": n, "decision": "allowed", "exit_status": 0,
                           "output_sha256": "f" * 64, "detail": "\u202e" * 500, "duration": 1.5})
        log.release(room)
    log.close(event="server-stop", killed=0)
    report = verify([small_disk / "audit.jsonl"], public)
    assert report.ok and report.unsigned_tail == 0, report.problem
    assert report.full_disk_stops == 1 and report.lost == 1
    written = [r for r in records([small_disk / "audit.jsonl"]) if r["event"] == "job"]
    assert [r["n"] for r in written] == list(range(len(rooms)))


def test_a_full_disk_runs_no_compile_unrecorded(realm, own_server, workdir, small_disk):
    """A server whose log's disk fills: each job either runs with both its records or is refused before it runs;
    the client compiles the refused ones here; a clean stop signs the log and verify says it stopped full."""
    s = own_server(audit={"path": str(small_disk / "audit.jsonl")})
    (workdir / "d.c").write_text("int d(void) { return 4; }\n")
    assert securecc(realm, s, "alice", workdir, "gcc", "-c", "d.c", "-o", "d0.o").returncode == 0
    fill(small_disk)
    said: list[str] = []
    for freed in range(5):  # the disk fills at a different point of a record each round
        if freed:
            filler = small_disk / "filler"
            os.truncate(filler, filler.stat().st_size - 3 * 4096)
        for _ in range(200):
            (workdir / "d.c").write_text(f"int d(void) {{ return {len(said)}; }}\n")  # a compile, not a cache hit
            done = securecc(realm, s, "alice", workdir, "gcc", "-c", "d.c", "-o", f"d{len(said)}.o", SECURECC_VERBOSE="1")
            assert done.returncode == 0 and (workdir / f"d{len(said)}.o").exists(), done.stderr
            said.append(done.stderr.decode())
            if "cannot write its audit log" in said[-1]:
                break
        assert "cannot write its audit log" in said[-1] and "compiling locally" in said[-1], said[-1]
    remote = [re.search(r"\(job (\w+)\)", line).group(1) for line in said if "compiled d.c on" in line]
    s.stop()
    log = list(records([s.audit_path]))
    started = {r["job_id"] for r in log if r["event"] == "job-start"}
    ended = {r["job_id"]: r for r in log if r["event"] == "job"}
    assert started <= set(ended), f"compiles without their record: {started - set(ended)}"
    assert len(remote) > 3  # the room reserved ahead keeps serving after the disk filled
    assert all(ended[job]["output_sha256"] and ended[job]["exit_status"] == 0 for job in remote)
    checked = run_tool("securecc-audit", "verify", "--key", str(realm.dir / "audit.key.pub"), str(s.audit_path))
    assert checked.returncode == 0 and "stopped 1 time(s) on a full disk" in checked.stdout, checked.stdout


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
    log = AuditLog(tmp_path / "a.jsonl", load_private_key(key), "build1", clock=Clock())
    log.write(event="job", principal="alice@TEST.REALM", decision="allowed", reason="group:committers", source="a.c",
              compiler="gcc", exit_status=0, bytes_in=100, bytes_out=10, duration=0.5)
    log.write(event="job", principal="bob@TEST.REALM", decision="refused", reason="not-in-allowed-group", source="b.c",
              compiler="gcc", bytes_in=50, duration=0.01)
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
    log = AuditLog(path, private, "build1", clock=Clock())
    watcher = subprocess.Popen([BIN / "securecc-audit", "show", "--follow", "--json", str(path)], stdout=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(1)
        log.write(event="job", principal="carol@TEST.REALM", decision="allowed", source="live.c")
        line = watcher.stdout.readline()
        assert json.loads(line)["source"] == "live.c"
    finally:
        watcher.kill()
        log.close()


# --- hostile names in the tools, head cuts, names that are not UTF-8 ----------------------------------------

FORGED = "2026-11-25T10:00:00.000Z  mallory@TEST.REALM      job     allowed   group:committers  ok.c  0"
HOSTILE = {"principal": "eve\u202e@TEST.REALM", "source": "x.c\x1b[2K\r" + FORGED, "reason": "r\x85\u2028\u2066\x7f",
           "decision": "refused", "cwd": "/tmp/\x1b]0;title\x07", "detail": "d\x9b31m"}


def hostile_log(path: Path, private) -> Path:
    log = AuditLog(path, private, "build1\r", clock=Clock())
    log.write(event="job", **HOSTILE)
    log.close()
    return path


def assert_inert(text: str) -> None:
    """No character a terminal acts on: C0 but newline, DEL, C1, separators, bidi controls, surrogates."""
    assert all(c == "\n" or (c.isprintable() and c.isascii()) or c.isalnum() for c in text), repr(text)


def test_visible_escapes_what_a_terminal_would_act_on():
    """One function escapes control characters, bidi overrides, separators and lone surrogates, and the backslash."""
    from securecc.tools.auditor import visible

    assert visible("a.c") == "a.c" and visible("é日本.c") == "é日本.c" and visible(None) == "None"
    assert visible("\x1b[2K\r\n\t\x00\x7f\x85\x9b") == r"\x1b[2K\r\n\t\x00\x7f\x85\x9b"
    assert visible("\u2028\u2029\u202a\u202e\u2066\u2069\u200b\ufeff") == r"\u2028\u2029\u202a\u202e\u2066\u2069\u200b\ufeff"
    assert visible("\udcff/\\x1b") == r"\udcff/\\x1b"  # a literal backslash cannot pass for an escape


def test_show_and_stats_escape_hostile_names(tmp_path, keys):
    """ESC, CR, C1 and bidi controls in client-chosen names are printed escaped: no erased or forged row."""
    private, _, _ = keys
    path = hostile_log(tmp_path / "a.jsonl", private)
    shown = run_tool("securecc-audit", "show", "--all", str(path))
    assert shown.returncode == 0, shown.stderr
    assert_inert(shown.stdout)
    assert r"x.c\x1b[2K\r2026-11-25" in shown.stdout and r"eve\u202e@TEST.REALM" in shown.stdout
    assert r"r\x85\u2028\u2066\x7f" in shown.stdout
    assert len(shown.stdout.splitlines()) == 1 + 2  # the header, the job, the checkpoint: no forged row
    stats = run_tool("securecc-audit", "stats", str(path))
    assert stats.returncode == 0 and r"eve\u202e@TEST.REALM 1" in stats.stdout and r"r\x85\u2028" in stats.stdout
    assert_inert(stats.stdout)
    as_json = run_tool("securecc-audit", "show", "--json", str(path))
    assert as_json.stdout.isascii() and as_json.stdout.count("\n") == 1
    assert {k: json.loads(as_json.stdout)[k] for k in HOSTILE} == HOSTILE


def test_verify_escapes_what_it_quotes_from_the_log(tmp_path, keys):
    """verify's message quotes a checkpoint's key name: escaped too."""
    private, _, public_path = keys
    path = write_log(tmp_path / "a.jsonl", private, records=3)
    lines = lines_of(path)
    lines[-1] = reencode(lines[-1], key="k\x1b[2K\rOK: 5 records")
    path.write_bytes(b"".join(lines))
    bad = run_tool("securecc-audit", "verify", "--key", str(public_path), str(path))
    assert bad.returncode == 1 and r"k\x1b[2K\rOK" in bad.stdout
    assert_inert(bad.stdout)


def test_follow_escapes_hostile_names(tmp_path, keys):
    """show --follow (the table) escapes as show does."""
    private, _, _ = keys
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, private, "build1", clock=Clock())
    watcher = subprocess.Popen([BIN / "securecc-audit", "show", "--follow", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        log.write(event="job", **HOSTILE)
        line = watcher.stdout.readline()
        assert r"x.c\x1b[2K\r2026-11-25" in line
        assert_inert(line)
    finally:
        watcher.kill()
        log.close()


def test_deleted_head_is_found(tmp_path, keys):
    """A log whose first lines were deleted starts at a later seq: refused, at the file and line where it starts."""
    private, public, _ = keys
    path = write_log(tmp_path / "a.jsonl", private, records=100)
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[57:]))
    assert check(path, public) == (f"{path}:1: the log starts at seq 57, not at 0 or at a rotation record "
                                   "(the first line of a rotated file): its head was removed")


@pytest.mark.parametrize("start", ["checkpoint", "after-checkpoint", "server-start"])
def test_head_deleted_down_to_a_checkpoint_or_restart_is_found(tmp_path, keys, start):
    """A signed checkpoint vouches for what precedes it, not that nothing did: a head cut down to one is refused."""
    private, public, _ = keys
    log = AuditLog(tmp_path / "a.jsonl", private, "build1", checkpoint_every=10, clock=Clock())
    for n in range(25):
        log.write(event="server-start" if n == 12 else "job", job_id=f"j{n}")
    log.close()
    lines = lines_of(tmp_path / "a.jsonl")
    events = [json.loads(line)["event"] for line in lines]
    first = {"checkpoint": events.index("checkpoint"), "after-checkpoint": events.index("checkpoint") + 1,
             "server-start": events.index("server-start")}[start]
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines[first:]))
    assert f"a.jsonl:1: the log starts at seq {first}, not at 0 or at a rotation record" in check(tmp_path / "a.jsonl", public)


def test_rotation_set_with_older_files_removed(tmp_path, keys):
    """Older rotated files removed (retention) verify, from the rotation record that opens the first one present;
    the head of that file cut is refused; the tool says where the chain starts."""
    private, _, public_path = keys
    write_log(tmp_path / "a.jsonl", private, records=200, rotate_bytes=8000)
    rotated = sorted(tmp_path.glob("a.jsonl.*"))
    kept = [*rotated[2:], tmp_path / "a.jsonl"]
    public = load_public_key(public_path)
    report = verify(kept, public)
    first = json.loads(lines_of(rotated[2])[0])
    assert report.ok and first["event"] == "rotation" and report.first_seq == first["seq"] > 0
    ok = run_tool("securecc-audit", "verify", "--key", str(public_path), *map(str, kept))
    assert ok.returncode == 0 and f"starts at seq {first['seq']} (the older rotated files not given)" in ok.stdout
    rotated[2].write_bytes(b"".join(lines_of(rotated[2])[3:]))
    assert f"{rotated[2]}:1: the log starts at seq {first['seq'] + 3}, not at 0" in verify(kept, public).problem


def test_a_file_continuing_a_rotated_one_starts_with_a_rotation_record(tmp_path, keys):
    """A crash between the rename and the new file's first record (or a file moved away by hand): the new file
    still opens with a rotation record, so it verifies alone once the older one is gone."""
    private, public, _ = keys
    path = write_log(tmp_path / "a.jsonl", private)
    path.rename(tmp_path / "a.jsonl.20260101T000000.000000Z")
    write_log(path, private)
    assert json.loads(lines_of(path)[0])["event"] == "rotation"
    assert verify([path, tmp_path / "a.jsonl.20260101T000000.000000Z"], public).ok
    assert verify([path], public).ok


def test_cuts_verify_cannot_see(tmp_path, keys):
    """What the docstring and --help say verify cannot detect, pinned: a cut that ends at a checkpoint
    (newest files removed included), and in --live any cut of the unsigned tail."""
    private, public, _ = keys
    write_log(tmp_path / "a.jsonl", private, records=200, rotate_bytes=8000)
    files = sorted(tmp_path.glob("a.jsonl*"))
    assert verify([f for f in files if f.name != "a.jsonl"][:-1], public).ok  # the current and newest rotated files gone
    path = write_log(tmp_path / "b.jsonl", private, records=30)
    lines = lines_of(path)
    checkpoints = [i for i, line in enumerate(lines) if b'"event":"checkpoint"' in line]
    path.write_bytes(b"".join(lines[: checkpoints[-2] + 1]))  # back to an earlier checkpoint
    assert verify([path], public).ok
    path.write_bytes(b"".join(lines[: checkpoints[-2] + 3]))  # two unsigned records after it, one of them cut
    assert "ends 2 record(s) after its last checkpoint" in check(path, public)
    assert verify([path], public, live=True).ok and verify([path], public, live=True).unsigned_tail == 2
    helped = run_tool("securecc-audit", "verify", "--help")
    assert "cannot detect" in helped.stdout and "rotated files" in helped.stdout


def test_names_that_are_not_utf8_are_recorded(tmp_path, keys):
    """A cwd b'\\xffsrc' (a str with surrogateescape) or bytes is recorded losslessly, verifies, and shows escaped."""
    from securecc.audit import records

    private, public, _ = keys
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, private, "build1", clock=Clock())
    log.write(event="job", principal="alice@TEST.REALM", decision="allowed", cwd="/tmp/\udcffsrc", args=["\udcff"],
              source="\udcff.c")
    log.write(event="job", principal="alice@TEST.REALM", decision="allowed", cwd=b"/tmp/\xffsrc", args=[b"-I\xfe"])
    log.write(event="job", decision="allowed", source="\ud83d\ude00.c")  # a pair of surrogates: the character they encode
    log.close()
    assert b'"cwd":"/tmp/\\udcffsrc"' in path.read_bytes()
    report = verify([path], public)
    assert report.ok and report.records == 3, report.problem
    first, second, third, _ = records([path])
    assert (first["cwd"], first["args"], first["source"]) == ("/tmp/\udcffsrc", ["\udcff"], "\udcff.c")
    assert (second["cwd"], second["args"]) == ("/tmp/\udcffsrc", ["-I\udcfe"])
    assert third["source"] == "\U0001f600.c"
    shown = run_tool("securecc-audit", "show", str(path))
    assert shown.returncode == 0 and r"\udcff.c" in shown.stdout and "\U0001f600.c" in shown.stdout, shown.stderr


def test_canonical_form_of_utf8_records_is_unchanged():
    """Logs written before surrogates were handled keep their bytes, so they still verify."""
    from securecc.audit import canonical

    record = {"v": 1, "seq": 3, "source": "é日本\U0001f600.c", "args": ["-DX=\"\\\"", "\x1b"], "n": 1.5, "none": None}
    assert canonical(record) == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("value", [{1, 2}, object(), float, [b"ok", object()]])
def test_a_value_json_cannot_take_is_an_audit_error(tmp_path, keys, value):
    """Only AuditError leaves write (the server refuses the job); the log stays healthy and valid."""
    from securecc.audit import AuditError

    private, public, _ = keys
    log = AuditLog(tmp_path / "a.jsonl", private, "build1", clock=Clock())
    with pytest.raises(AuditError, match="cannot record"):
        log.write(event="job", detail=value)
    assert log.healthy
    log.write(event="job", detail="fine")
    log.close()
    assert verify([tmp_path / "a.jsonl"], public).ok
