"""Every way a job ends and the records it leaves, field for field: the real service on in-memory twins.

The expected records are the format securecc-audit, the auditor and the
integration tests read: which fields each outcome carries, and which are
written as null (a compile's ``ended_by`` when it ended by itself, its
``output_sha256`` when it made no object).  The service runs on a clock the
test holds (so every duration is 0.0) and writes a real log, read back here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from securecc import attest
from securecc import protocol as wire
from securecc.audit import UNSET, AuthRecord, Decision, JobRecord, load_private_key, records
from securecc.sandbox import Outcome
from securecc.server.cache import Entry
from securecc.server.directory import DirectoryUnavailable, Membership
from securecc.server.distcc_listener import DistccProtocol
from securecc.server.distcc_wire import Request
from securecc.server.handler_client import HandlerGone
from securecc.server.lookups import MembershipLookups
from securecc.server.session import Session
from securecc.testing import GCC_IDENTITY, MemoryDirectory, MemoryService, memory_service, replied

ALICE, BOB, PEER = "alice@TEST.REALM", "bob@TEST.REALM", "127.0.0.1:40000"
GCC = GCC_IDENTITY
SOURCE, OBJECT = b"int a;\n", b"\x7fELF object"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job(**fields: Any) -> wire.Job:
    return wire.Job(**{"compiler": "gcc", "args": ["-O2"], "language": "c", "mode": "-c", "cwd": "/src", "source_path": "a.c",
                       "source": SOURCE, "compiler_identity": GCC, **fields})


# What each record of a job from alice carries, by the stage that adds it.
ARRIVED = {"event": "job", "principal": ALICE, "peer": PEER, "compiler": "gcc", "args": ["-O2"], "source": "a.c", "cwd": "/src",
           "headers": 0, "bytes_in": len(SOURCE)}
AUTHORIZED = {**ARRIVED, "compiler_path": "/usr/bin/gcc", "compiler_identity": GCC, "reason": "allowed:principal:alice"}
HASHED = {**AUTHORIZED, "input_sha256": digest(SOURCE)}
STARTED = {**HASHED, "event": "job-start"}
ENDED = {"duration": 0.0, "delivered": True}
COMPILED = {**HASHED, "decision": "allowed", "exit_status": 0, "ended_by": None, "output_sha256": digest(OBJECT),
            "bytes_out": len(OBJECT) + len(b"warning\n"), **ENDED}


class Acceptor:
    """The GSS acceptor, never asked for more than a context here."""

    def new_context(self, flags: object = None) -> object:
        return None


def server(tmp_path: Path, mode: str = "bwrap", slots: int = 2, caching: bool = False) -> MemoryService:
    return memory_service(tmp_path, mode=mode, slots=slots, caching=caching)


def job_records(s: MemoryService) -> list[dict[str, Any]]:
    """The log's job and auth records without their chain fields (checked by the log's own tests)."""
    chain = {"v", "seq", "prev", "time", "server"}
    found = [{k: v for k, v in r.items() if k not in chain} for r in records([s.log])]
    return [r for r in found if r["event"] in ("job", "job-start", "auth")]


def native(principal: str = ALICE, expires: float = 3600.0) -> Session:
    return Session(principal, PEER, expires)


def distcc() -> Session:
    return Session(ALICE, PEER, 3600.0, protocol="distcc", payload="cleartext")


def ids(found: list[dict[str, Any]]) -> list[str]:
    """The records' job ids, taken out of them (random, so compared with the replies)."""
    taken = [r.pop("job_id") for r in found]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in taken), taken
    return taken


def test_a_compile_leaves_its_start_and_its_record(tmp_path: Path) -> None:
    s = server(tmp_path)
    d = s.service.run(native(), job())
    started = job_records(s)
    ids(started)
    assert started == [STARTED]  # before the compile runs
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    reply = replied(d)
    found = job_records(s)
    assert ids(found) == [reply.job_id] * 2 and found == [STARTED, COMPILED]
    assert isinstance(reply, wire.Result) and reply.output == OBJECT


def test_a_failed_compile_records_a_null_output_digest(tmp_path: Path) -> None:
    s = server(tmp_path)
    d = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(1, b"", b"a.c:1: error\n", None))
    replied(d)
    found = job_records(s)
    ids(found)
    assert found[1] == {**COMPILED, "exit_status": 1, "output_sha256": None, "bytes_out": len(b"a.c:1: error\n")}


def test_a_timeout_and_a_client_gone_say_what_ended_the_compile(tmp_path: Path) -> None:
    s = server(tmp_path)
    d = s.service.run(native(), job())
    s.handler.runs[0].kill("timeout")
    assert replied(d).reason == wire.Reason.TIMEOUT
    session = native()
    d = s.service.run(session, job())
    session.cancel()  # the connection is lost: the service kills the compile
    replied(d)
    found = job_records(s)
    ids(found)
    killed = {**COMPILED, "exit_status": 137, "output_sha256": None, "bytes_out": 0}
    assert found == [STARTED, {**killed, "ended_by": "timeout"}, STARTED, {**killed, "ended_by": "disconnect", "delivered": False}]


def test_every_result_is_signed_naming_its_final_audit_record(tmp_path: Path) -> None:
    """The statement names the job's final record by seq and line hash (read back from the log), and a cache hit
    carries the producer's original statement after its own."""
    s = server(tmp_path, caching=True)
    first = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    hit = replied(s.service.run(native(), job()))
    compiled = replied(first)
    lines = s.log.read_bytes().splitlines()
    key = attest.public_key(load_private_key(tmp_path / "signing.key"))
    for reply, count in ((compiled, 1), (hit, 2)):
        facts = attest.check(reply, job(), "securecc/localhost@TEST.REALM", key)
        assert len(facts) == count and facts[0]["job_id"] == reply.job_id
        line = next(line for line in lines if json.loads(line).get("job_id") == reply.job_id and json.loads(line)["event"] == "job")
        assert facts[0]["audit"] == {"seq": json.loads(line)["seq"], "line_sha256": hashlib.sha256(line).hexdigest()}
    assert attest.check(hit, job(), "securecc/localhost@TEST.REALM", key)[1]["job_id"] == compiled.job_id


def test_a_cached_result_names_the_job_that_stored_it(tmp_path: Path) -> None:
    s = server(tmp_path, caching=True)
    first = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    stored = replied(first).job_id
    hit = replied(s.service.run(native(), job()))
    assert hit.output == OBJECT and len(s.handler.runs) == 1
    found = job_records(s)
    assert ids(found) == [stored, stored, hit.job_id]
    assert found == [STARTED, {**COMPILED, "cache": "stored"},
                     {**HASHED, "decision": "allowed", "cache": "hit", "cached_from": stored, "exit_status": 0,
                      "output_sha256": digest(OBJECT), "bytes_out": len(OBJECT) + len(b"warning\n"), **ENDED}]


def test_a_cache_that_fails_after_the_record_costs_neither_the_result_nor_a_second_record(tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The job handler gone between the compile and the cache: the job keeps its one record and its object."""
    s = server(tmp_path, caching=True)

    def gone(key: str, entry: Entry) -> None:
        raise HandlerGone("the job handler has exited")

    monkeypatch.setattr(s.handler, "cache_put", gone)
    reply = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    result = replied(reply)
    found = job_records(s)
    assert result.output == OBJECT and ids(found) == [result.job_id] * 2
    assert found == [STARTED, {**COMPILED, "cache": "stored"}]


def test_an_error_after_the_final_record_writes_no_second_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = server(tmp_path)

    def broken(*args: object) -> None:
        raise RuntimeError("after the record")

    monkeypatch.setattr(s.service.audit, "release", broken)
    reply = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    refused = replied(reply)
    found = job_records(s)
    assert refused.reason == wire.Reason.SERVER_ERROR and ids(found) == [refused.job_id] * 2
    assert found == [STARTED, COMPILED]


@pytest.mark.parametrize("failing", ["the start's checkpoint", "the final record's checkpoint"])
def test_a_checkpoint_that_fails_after_a_record_costs_the_job_neither_its_record_nor_its_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """A record written, then the checkpoint after it refused by the disk (EIO): the record stands.  Taken for
    unwritten, a job-start was left without any final record (the job refused, audit unavailable), or a compile
    recorded as delivered was refused to its client and kept out of the cache."""
    import errno
    import os

    s = server(tmp_path)
    s.service.audit.checkpoint_every = 1 if failing == "the start's checkpoint" else 2
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if b'"event":"checkpoint"' in data and not failed:
            failed.append(data)
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    failed: list[bytes] = []
    monkeypatch.setattr(os, "write", write)
    d = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    reply = replied(d)
    found = job_records(s)
    assert failed and isinstance(reply, wire.Result) and reply.output == OBJECT
    assert ids(found) == [reply.job_id] * 2 and found == [STARTED, COMPILED]


@pytest.mark.parametrize(("raw", "session", "reason"), [
    (job(cwd="src"), native(), wire.Reason.BAD_PATH),
    (job(), native(expires=0.0), wire.Reason.SESSION_EXPIRED),
])
def test_a_job_refused_before_its_authorization(tmp_path: Path, raw: wire.Job, session: Session, reason: wire.Reason) -> None:
    s = server(tmp_path)
    reply = replied(s.service.run(session, raw))
    found = job_records(s)
    assert ids(found) == [reply.job_id] and reply.reason == reason
    expected = {**ARRIVED, "cwd": raw.cwd, "decision": "refused", "reason": reason, "detail": reply.message, **ENDED}
    assert found == [expected]


def test_a_compiler_mismatch_is_refused_after_the_acl(tmp_path: Path) -> None:
    """Its message names the server's compiler version: only an allowed principal gets it."""
    s = server(tmp_path)
    reply = replied(s.service.run(native(), job(compiler_identity="gcc 1")))
    found = job_records(s)
    assert ids(found) == [reply.job_id] and reply.reason == wire.Reason.COMPILER_MISMATCH
    assert found == [{**AUTHORIZED, "compiler_identity": "gcc 1", "decision": "refused", "reason": wire.Reason.COMPILER_MISMATCH,
                      "detail": reply.message, **ENDED}]


def test_a_job_the_acl_refuses_names_the_compiler_it_asked_for(tmp_path: Path) -> None:
    s = server(tmp_path)
    reply = replied(s.service.run(native(BOB), job()))
    found = job_records(s)
    ids(found)
    assert found == [{**AUTHORIZED, "principal": BOB, "decision": "refused", "reason": "denied:not-in-group",
                      "detail": f"{BOB} may not compile here (denied:not-in-group)", **ENDED}]
    assert reply.reason == "denied:not-in-group"


class FailingDirectory(MemoryDirectory):
    """An LDAP that fails as a misconfigured one does: its error names a file of the server's."""

    def membership(self, principal: str) -> Membership:
        raise DirectoryUnavailable(LDAP_ERROR)


LDAP_ERROR = "LDAP unavailable: [Errno 2] No such file or directory: '/etc/securecc/ldap-bind.password'"


def test_an_ldap_outage_tells_the_client_no_more_than_that(tmp_path: Path) -> None:
    """The directory's own error goes to the record; the client learns only that its groups cannot be had now."""
    s = memory_service(tmp_path, acl="realms: [TEST.REALM]\nallow:\n  - group: committers\n")
    s.service.__dict__["lookups"] = MembershipLookups(FailingDirectory(), lambda call: defer.maybeDeferred(call))
    reply = replied(s.service.run(native(BOB), job()))
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:ldap-unavailable", reply
    assert "/etc/securecc" not in reply.message and reply.message.startswith("LDAP unavailable"), reply.message
    found = job_records(s)
    ids(found)
    assert found == [{**ARRIVED, "principal": BOB, "decision": "refused", "reason": "denied:ldap-unavailable",
                      "detail": LDAP_ERROR, **ENDED}]


def test_a_busy_job_says_how_loaded_the_server_was(tmp_path: Path) -> None:
    s = server(tmp_path, slots=1)
    running = s.service.run(native(), job())
    busy = replied(s.service.run(native(), job()))
    assert isinstance(busy, wire.Busy) and busy.reason == wire.Reason.BUSY_FULL
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    replied(running)
    found = job_records(s)
    ids(found)
    assert found == [STARTED, {**HASHED, "decision": "busy", "reason": "busy:full", "load": 1, **ENDED}, COMPILED]


def test_an_error_of_ours_is_recorded_after_its_start(tmp_path: Path) -> None:
    s = server(tmp_path)
    s.handler.gone = True
    reply = replied(s.service.run(native(), job()))
    assert reply.reason == wire.Reason.SERVER_ERROR
    found = job_records(s)
    ids(found)
    assert found == [STARTED, {**HASHED, "decision": "error", "reason": "server-error",
                               "detail": "HandlerGone: the job handler has exited", **ENDED}]


def test_records_say_when_a_server_runs_without_bubblewrap(tmp_path: Path) -> None:
    s = server(tmp_path, mode="rlimits-only")
    d = s.service.run(native(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    replied(d)
    found = job_records(s)
    ids(found)
    assert found == [{**STARTED, "sandbox": "rlimits-only"}, {**COMPILED, "sandbox": "rlimits-only"}]


def test_a_distcc_job_says_its_protocol_and_that_it_came_in_the_clear(tmp_path: Path) -> None:
    s = server(tmp_path)
    d = s.service.run(distcc(), job())
    s.handler.runs[0].finish(Outcome(0, b"", b"warning\n", OBJECT))
    replied(d)
    found = job_records(s)
    ids(found)
    clear = {"protocol": "distcc", "payload": "cleartext"}
    assert found == [{**STARTED, **clear}, {**COMPILED, **clear}]


def test_a_distcc_command_that_is_no_compile_is_refused_on_its_arguments(tmp_path: Path) -> None:
    """Refused by the distcc listener before it is a job: no job id, compiler or timing, but who, from where, and why."""
    s = server(tmp_path)
    protocol = DistccProtocol(s.service, Acceptor())
    protocol.transport, protocol.session = StringTransport(), distcc()
    protocol._run(Request(2, ["gcc", "-E", "a.c"], b""))
    assert protocol.transport.disconnecting and job_records(s) == [
        {"event": "job", "protocol": "distcc", "payload": "cleartext", "principal": ALICE, "peer": PEER,
         "args": ["gcc", "-E", "a.c"], "decision": "refused", "reason": "denied:argument-refused", "detail": "option -E"}]


def test_failed_handshakes_one_record_per_source_and_window(tmp_path: Path) -> None:
    s = server(tmp_path)
    s.service.auth_failed(PEER, "bad token")
    s.service.auth_failed("127.0.0.1:40001", "bad token")  # the same source, within the window: counted, not written
    s.clock.advance(10)
    s.service.auth_failed("127.0.0.1:40002", "x" * 600, protocol="distcc")
    failed = {"event": "auth", "decision": "refused", "reason": "denied:authentication-failed"}
    assert job_records(s) == [{**failed, "peer": PEER, "detail": "bad token"},
                           {**failed, "peer": "127.0.0.1:40002", "detail": "x" * 500, "suppressed_before": 1, "protocol": "distcc"}]


def test_the_metrics_count_what_the_records_say(tmp_path: Path) -> None:
    s = server(tmp_path, slots=1)
    running = s.service.run(native(), job())
    replied(s.service.run(native(), job()))  # busy
    replied(s.service.run(native(BOB), job()))  # refused
    s.handler.runs[0].kill("timeout")
    replied(running)
    status = s.service.status()
    assert status["totals"] == {"allowed": 1, "busy": 1, "refused": 1}
    assert status["refusals"] == {"denied:not-in-group": 1}  # by reason, for a monitor
    assert [duration for _, duration in status["recent_durations"]] == [0]  # the allowed job only (the clock never moved)
    assert s.service.metrics.kills.labels("timeout")._value.get() == 1
    assert s.service.metrics.bytes_in._value.get() == 3 * len(SOURCE)


def test_a_record_has_the_formats_fields_and_no_other() -> None:
    record = JobRecord(principal=ALICE, peer=PEER, args=[])
    with pytest.raises(AttributeError):
        record.exit_code = 0
    with pytest.raises(TypeError):
        JobRecord(principal=ALICE, peer=PEER, args=[], exit_code=0)
    with pytest.raises(AttributeError):
        AuthRecord(peer=PEER, reason="r", detail="d").peer = "elsewhere"


def test_what_is_unset_is_left_out_and_a_null_outcome_is_written() -> None:
    """None is no field, but a compile's ``ended_by`` or ``output_sha256`` set to None is written as null."""
    record = JobRecord(principal=ALICE, peer=PEER, args=[], job_id="j", compiler=None)
    assert record.to_fields() == {"event": "job", "principal": ALICE, "peer": PEER, "args": [], "job_id": "j"}
    record.decision, record.ended_by, record.output_sha256 = Decision.ALLOWED, None, None
    assert record.to_fields("job-start") == {"event": "job-start", "principal": ALICE, "peer": PEER, "args": [], "job_id": "j",
                                             "decision": "allowed", "ended_by": None, "output_sha256": None}
    assert not UNSET and JobRecord(principal=ALICE, peer=PEER, args=[]).cached_from is UNSET
