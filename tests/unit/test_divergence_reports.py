"""Divergence reports, attacked: the server believes one only about a result it signed, audits every report,
counts each job once and drops the result from its cache; the client's host state keeps a quarantine.

A real CompileService over twins (securecc.testing), a real audit log and real signatures; no KDC, no gcc.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securecc import attest
from securecc import protocol as wire
from securecc.audit import records
from securecc.client.hosts import Host, HostState
from securecc.server.session import Session
from securecc.testing import GCC_IDENTITY, MemoryService, memory_service

ALICE, BOB = "alice@TEST.REALM", "bob@TEST.REALM"
OBJECT, LOCAL = b"\x7fELF wrong object", b"\x7fELF right object"
LOCAL_SHA = attest.digest(LOCAL)


def job(source: bytes = b"int a;\n") -> wire.Job:
    return wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", source, compiler_identity=GCC_IDENTITY)


def report(s: MemoryService, message: wire.Divergence, principal: str = ALICE) -> wire.Message:
    sent = wire.decode_message(wire.encode_message(message))  # what the server gets is what the wire carries
    assert isinstance(sent, wire.Divergence)
    return s.service.divergences.report(Session(principal, "127.0.0.1:40001", 3600.0), sent)


def divergence_records(s: MemoryService) -> list[dict[str, Any]]:
    return [r for r in records([s.log]) if r.get("event") == "divergence"]


def counted(s: MemoryService) -> float:
    return s.service.metrics.divergences._value.get()


def test_a_report_of_a_signed_result_is_audited_counted_once_and_shown(tmp_path: Path) -> None:
    s = memory_service(tmp_path)
    result = s.compile(job(), OBJECT)
    facts = json.loads(result.attestations[0]["statement"])
    answer = report(s, wire.Divergence(result.attestations, LOCAL_SHA, "a.c: its object differs"))
    assert isinstance(answer, wire.Status) and "recorded" in json.loads(answer.json)
    [record] = divergence_records(s)
    assert record["principal"] == ALICE and record["job_id"] == result.job_id
    assert record["object_sha256"] == attest.digest(OBJECT) and record["local_sha256"] == LOCAL_SHA
    assert record["job_audit_seq"] == facts["audit"]["seq"] and record["detail"] == "a.c: its object differs"
    assert counted(s) == 1 and s.service.status()["divergences"] == 1
    assert b"securecc_divergences_total 1.0" in s.service.metrics.text()
    again = report(s, wire.Divergence(result.attestations, LOCAL_SHA, "again"))
    assert isinstance(again, wire.Refused) and again.reason == wire.Reason.BAD_REPORT, "a job is believed once"
    assert [r.get("decision") for r in divergence_records(s)] == [None, "refused"], "every report is recorded"
    assert counted(s) == 1 and s.service.status()["divergences"] == 1, "a job counts once"


def test_a_report_of_a_failed_local_compile_names_no_digest(tmp_path: Path) -> None:
    s = memory_service(tmp_path)
    result = s.compile(job(), OBJECT)
    assert isinstance(report(s, wire.Divergence(result.attestations, None, "the compile here failed (exit 1)")), wire.Status)
    assert divergence_records(s)[0]["local_sha256"] is None


def forged(result: wire.Result, change: dict[str, Any], key: Ed25519PrivateKey | None = None) -> list[dict[str, str]]:
    """The result's statement with ``change`` applied, signed with ``key`` (None: left with the old signature)."""
    fields = dict(result.attestations[0])
    statement = {**json.loads(fields["statement"]), **change}
    if key is not None:
        statement["key"] = fields["key"] = attest.public_key(key)
    fields["statement"] = json.dumps(statement, sort_keys=True, separators=(",", ":"))
    if key is not None:
        fields["signature"] = base64.b64encode(key.sign(fields["statement"].encode())).decode()
    return [fields]


@pytest.mark.parametrize("attack", ["another server's key", "statement changed", "no attestation", "three attestations",
                                    "not a digest", "two lines", "garbage statement"])
def test_a_report_about_a_result_this_server_did_not_sign_is_refused_and_audited(tmp_path: Path, attack: str) -> None:
    """Nobody can make a server count, or an admin read, a divergence of an object it never signed."""
    s = memory_service(tmp_path)
    result = s.compile(job(), OBJECT)
    attestations, digest, detail = result.attestations, LOCAL_SHA, "differs"
    if attack == "another server's key":
        attestations = forged(result, {"job_id": "0" * 16}, Ed25519PrivateKey.generate())
    elif attack == "statement changed":
        attestations = forged(result, {"job_id": "0" * 16})
    elif attack == "no attestation":
        attestations = []
    elif attack == "three attestations":
        attestations = attestations * 3
    elif attack == "not a digest":
        digest = "../../etc/passwd"
    elif attack == "two lines":
        detail = "differs\nforged: record"
    else:
        attestations = [{**attestations[0], "statement": "[" * 5000}]
    answer = report(s, wire.Divergence(attestations, digest, detail))
    assert isinstance(answer, wire.Refused) and answer.reason == wire.Reason.BAD_REPORT, answer
    [record] = divergence_records(s)
    assert record["decision"] == "refused" and record["reason"] == wire.Reason.BAD_REPORT and record["principal"] == ALICE
    assert "job_id" not in record
    assert counted(s) == 0 and s.service.status()["divergences"] == 0


def test_the_wire_refuses_a_report_whose_attestations_are_not_strings() -> None:
    good = wire.encode_message(wire.Divergence([{"statement": "s", "signature": "x", "key": "k"}], None, "d"))
    bad = good.replace(b'"key":"k"', b'"key":700')  # same length: the header still parses
    with pytest.raises(wire.ProtocolError, match="Divergence.attestations"):
        wire.decode_message(bad)


def test_a_reported_result_leaves_the_cache_whether_stored_or_served_from_it(tmp_path: Path) -> None:
    """The same wrong object must not be handed to the next user: a stored result and a hit on it are both dropped."""
    s = memory_service(tmp_path, caching=True)
    stored = s.compile(job(), OBJECT)
    assert len(s.handler.cache) == 1
    report(s, wire.Divergence(stored.attestations, LOCAL_SHA, "differs"))
    assert s.handler.cache == {} and divergence_records(s)[-1]["cache_dropped"] is True
    s.compile(job(), OBJECT)  # compiled and stored again
    hit = s.compile(job(), b"unused: served from the cache")
    assert len(hit.attestations) == 2 and hit.output == OBJECT
    report(s, wire.Divergence(hit.attestations, LOCAL_SHA, "differs"))
    assert s.handler.cache == {}, "the producer's statement names the entry"


# --- the client's side: the quarantine in its host state ------------------------------------------------


def test_a_quarantined_host_gets_no_job_until_cleared_even_by_a_process_that_read_the_file_before(tmp_path: Path) -> None:
    path = str(tmp_path / "hosts.json")
    good, bad = Host("good"), Host("bad")
    stale = HostState(path)  # another compile, started before the quarantine
    HostState(path).quarantine(bad, "its object differs", "00ff")
    stale.succeeded(bad, 0.01)  # writes its own view of "bad" back
    stale.save()
    fresh = HostState(path)
    assert fresh.quarantined(bad) == {"since": pytest.approx(fresh.quarantined(bad)["since"]), "why": "its object differs",
                                      "job_id": "00ff"}
    assert fresh.order([good, bad]) == [good]
    assert fresh.clear(bad) and not HostState(path).quarantined(bad)
    assert set(HostState(path).order([good, bad])) == {good, bad}
    assert not HostState(path).clear(good), "nothing to clear"


def test_a_quarantine_holds_in_the_process_when_the_state_file_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    state = HostState(str(tmp_path / "ro" / "sub" / "hosts.json"))
    (tmp_path / "ro").chmod(0o500)
    try:
        state.quarantine(Host("bad"), "differs", "1")
        if state.save() is None:  # not writable (as root it may be: then the file holds it)
            assert state.order([Host("bad")]) == []
        else:
            assert HostState(state.path).quarantined(Host("bad"))
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_verify_samples_by_rate_and_names_a_bad_rate() -> None:
    import io

    from securecc.client import verify
    from securecc.client.job import Invocation

    def sampled(rate: str) -> tuple[bool, str]:
        err = io.BytesIO()
        inv = Invocation(["gcc"], {"SECURECC_VERIFY_RATE": rate} if rate else {}, "/", False, io.BytesIO(), err)
        return verify.sampled(inv), err.getvalue().decode()

    assert sampled("1") == (True, "") and sampled("0") == (False, "")
    assert sum(sampled("")[0] for _ in range(2000)) < 100, "1% by default"
    taken, said = sampled("2")
    assert said == "securecc: SECURECC_VERIFY_RATE='2' is not a fraction from 0 to 1; using 0.01\n"


def test_verify_leaves_alone_what_no_comparison_can_judge() -> None:
    from securecc import args as argpolicy
    from securecc.client import verify

    plain = argpolicy.plan(["-O2", "-c", "a.c"])
    assert verify.unverifiable(plain, job()) is None
    assert "dwo" in str(verify.unverifiable(argpolicy.plan(["-g", "-gsplit-dwarf", "-c", "a.c"]), job()))
    assert "__TIME__" in str(verify.unverifiable(plain, job(b"const char *t = __TIME__;\n")))
    pinned = dataclasses.replace(job(b"const char *t = __TIME__;\n"), environment={"SOURCE_DATE_EPOCH": "1"})
    assert verify.unverifiable(plain, pinned) is None
    assert "dependency" in str(verify.unverifiable(argpolicy.plan(["-Wp,-MD,a.d", "-c", "a.c"]), job()))


# --- who may report what: a statement is no secret (cache hits pass the producer's on, provenance files keep them)


def test_nobody_but_the_principal_served_a_result_can_report_it(tmp_path: Path) -> None:
    """Bob, holding Alice's statement (her provenance file), cannot have her job counted or her entry dropped."""
    s = memory_service(tmp_path, caching=True)
    alices = s.compile(job(), OBJECT)
    answer = report(s, wire.Divergence(alices.attestations, LOCAL_SHA, "differs"), principal=BOB)
    assert isinstance(answer, wire.Refused) and answer.reason == wire.Reason.BAD_REPORT
    assert len(s.handler.cache) == 1 and counted(s) == 0
    [record] = divergence_records(s)
    assert record["decision"] == "refused" and record["principal"] == BOB and "job_id" not in record
    assert isinstance(report(s, wire.Divergence(alices.attestations, LOCAL_SHA, "differs")), wire.Status), "Alice still can"


def test_the_entry_dropped_is_the_one_the_server_served_not_one_a_statement_names(tmp_path: Path) -> None:
    """A reporter who pairs a result of its own with another entry's producer statement drops nothing of that entry."""
    s = memory_service(tmp_path, caching=True, acl="realms: [TEST.REALM]\nallow:\n  - principal: alice\n  - principal: bob\n")
    others = s.compile(job(b"int other;\n"), OBJECT, principal=BOB)  # Bob's entry
    s.compile(job(), OBJECT)
    hit = s.compile(job(), b"unused: served from the cache")  # Alice's hit on her own entry
    assert len(s.handler.cache) == 2 and len(hit.attestations) == 2
    answer = report(s, wire.Divergence([hit.attestations[0], others.attestations[0]], LOCAL_SHA, "differs"))
    assert isinstance(answer, wire.Status)
    assert len(s.handler.cache) == 1 and divergence_records(s)[-1]["cache_dropped"] is True
    [left] = s.handler.cache.values()
    assert left.producer["principal"] == BOB, "Bob's entry stays: only the one Alice's job was served from went"


def test_only_recent_results_can_be_reported_and_the_server_remembers_a_bounded_number(tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from securecc.server import divergences

    monkeypatch.setattr(divergences, "RECENT", 3)
    s = memory_service(tmp_path)
    results = [s.compile(job(b"int a%d;\n" % n), OBJECT) for n in range(5)]
    assert len(s.service.divergences.recent) == 3
    old = report(s, wire.Divergence(results[0].attestations, LOCAL_SHA, "differs"))
    assert isinstance(old, wire.Refused) and old.reason == wire.Reason.BAD_REPORT
    assert isinstance(report(s, wire.Divergence(results[4].attestations, LOCAL_SHA, "differs")), wire.Status)
    assert counted(s) == 1 and len(s.service.divergences.recent) == 2


FAKE_GCC = """#!/bin/sh
# records its arguments, one a line, and writes the -o file
: > "$SEEN"
for a in "$@"; do printf '%s\\n' "$a" >> "$SEEN"; done
while [ $# -gt 0 ]; do
  if [ "$1" = -o ]; then printf 'object' > "$2"; fi
  shift
done
"""


def test_the_check_compile_reads_each_option_with_its_value_and_drops_only_dependency_options(tmp_path: Path) -> None:
    """A separate value (an include directory called -MFdir) is never taken for an option, and -MF/-MT/-MQ go with theirs."""
    import io

    from securecc import args as argpolicy
    from securecc.client import verify
    from securecc.client.job import Invocation

    gcc = tmp_path / "gcc"
    gcc.write_text(FAKE_GCC)
    gcc.chmod(0o755)
    seen = tmp_path / "seen"
    plan = argpolicy.plan(["-MMD", "-MT", "a.o", "-I", "-MFdir", "-c", "a.c", "-o", "sub/a.o"])
    inv = Invocation(["gcc"], {"SEEN": str(seen), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}, str(tmp_path), False,
                     io.BytesIO(), io.BytesIO())
    assert verify.compile_here(inv, "gcc", str(gcc), plan) == (0, b"object")
    args = seen.read_text().splitlines()
    assert args[:4] == ["-I", "-MFdir", "a.c", "-c"] and args[4] == "-o", args
    assert os.path.dirname(args[5]).startswith(str(tmp_path / "securecc-check-")) and len(args) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gcc", "seen"], "nothing left beside the user's files"


def test_dependency_options_handed_through_xpreprocessor_are_not_checked() -> None:
    """-Xpreprocessor -MD -Xpreprocessor dep.d writes dep.d: the check compile would write it again, or, dropping
    the -MD alone, give gcc dep.d as a second source, fail, and quarantine a sound server."""
    from securecc import args as argpolicy
    from securecc.client import verify

    plan = argpolicy.plan(["-c", "a.c", "-Xpreprocessor", "-MD", "-Xpreprocessor", "dep.d"])
    assert "dependency" in str(verify.unverifiable(plan, job()))
    assert verify.unverifiable(argpolicy.plan(["-c", "a.c", "-Xpreprocessor", "-P"]), job()) is None


@pytest.mark.parametrize("entry", [{"since": "yesterday", "why": ["x"], "job_id": {"a": 1}}, {"since": 1e300},
                                   {"since": float("nan"), "why": "a\x1b[2Jb", "job_id": "\x1b]0;owned\x07"}, "corrupt", 7])
def test_a_corrupt_quarantine_entry_still_quarantines_and_no_tool_tracebacks(tmp_path: Path, entry: Any, monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from securecc.client import probe
    from securecc.client.job import Invocation, show_hosts

    (tmp_path / "securecc").mkdir()
    (tmp_path / "securecc" / "hosts.json").write_text(json.dumps({"hosts": {}, "quarantine": {"bad:3637": entry}}))
    env = {"XDG_CACHE_HOME": str(tmp_path), "SECURECC_HOSTS": "bad"}
    state = HostState(env=env)
    shown = state.quarantined(Host("bad"))
    assert shown is not None and state.order([Host("bad")]) == [], "a quarantine the file holds, however written, holds"
    assert all(isinstance(shown[k], str) and shown[k].isprintable() for k in ("why", "job_id"))
    out = io.BytesIO()
    assert show_hosts(Invocation(["securecc", "--show-hosts"], env, "/", False, out, io.BytesIO())) == 0
    assert "QUARANTINED since" in out.getvalue().decode() and "\x1b" not in out.getvalue().decode()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        probe.main(["--check", "--json", "bad"])
    assert json.loads(capsys.readouterr().out)[0]["quarantined"]["job_id"] == shown["job_id"]


@pytest.mark.parametrize("failure", ["exit 1", "kill -9 $$"])
def test_a_check_compile_that_fails_here_blames_no_server(tmp_path: Path, failure: str) -> None:
    """A full TMPDIR, a ulimit or the OOM killer fail the compile here: that is no divergence of the server's object
    (it is not used either: the job compiles here)."""
    import io

    from securecc import args as argpolicy
    from securecc.client import verify
    from securecc.client.channel import RemoteFailure, Timeouts
    from securecc.client.job import Invocation

    gcc = tmp_path / "gcc"
    gcc.write_text(f"#!/bin/sh\n{failure}\n")
    gcc.chmod(0o755)
    state = HostState(str(tmp_path / "hosts.json"))
    host = Host("127.0.0.1", 9)
    reply = wire.Result(0, b"", b"", OBJECT, "00ff")
    inv = Invocation(["gcc"], {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}, str(tmp_path), False, io.BytesIO(), io.BytesIO())
    with pytest.raises(RemoteFailure, match="cannot check the object from 127.0.0.1 .*the compile here") as raised:
        verify.check(inv, "gcc", str(gcc), argpolicy.plan(["-c", "a.c"]), job(), host, reply, state, Timeouts(0.2, 0.2, 0.2, 0.2))
    assert not isinstance(raised.value, verify.Diverged)
    assert HostState(state.path).quarantined(host) is None and state.order([host]) == [host]


def test_a_server_that_answers_its_report_with_alive_forever_does_not_hold_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from securecc.client import verify
    from securecc.client.channel import Channel, Timeouts

    class Socket:
        def settimeout(self, timeout: float) -> None:
            pass

        def sendall(self, data: bytes) -> None:
            pass

    sent = []

    def alive(self: Channel, timeout: float, watch: object = None) -> list[wire.Event]:
        time.sleep(0.01)
        sent.append(1)
        assert len(sent) < 300, "the client waits for the report's answer for ever"
        return [wire.MessageReceived(wire.Alive(1.0))]

    monkeypatch.setattr(Channel, "authenticate", lambda self: None)
    monkeypatch.setattr(Channel, "_socket", lambda self: Socket())
    monkeypatch.setattr(Channel, "_events", alive)
    monkeypatch.setattr(Channel, "close", lambda self: None)
    monkeypatch.setattr(wire.Connection, "seal", lambda self, message: b"")
    started = time.monotonic()
    told = verify.report(Host("127.0.0.1", 9), wire.Result(0, b"", b"", OBJECT, "00ff"), LOCAL_SHA, "differs", Timeouts(0.2, 0.2, 0.2, 0.2))
    assert "reporting it failed" in told and "no answer within 0.2 s" in told and time.monotonic() - started < 2
