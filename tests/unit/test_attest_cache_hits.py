"""Attacks on attested results from a compromised job handler: the cache entries it hands back, and the cost of checking.

The job handler writes the cache and holds no key: whatever it hands back for a key must not come out signed
unless the server's own earlier statement vouches for those bytes, that compiler and that key.
"""


from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securecc import attest
from securecc import protocol as wire
from securecc.audit import load_private_key, records
from securecc.cachekey import cache_key
from securecc.sandbox import Outcome
from securecc.server.cache import Entry
from securecc.server.session import Session
from securecc.testing import GCC_IDENTITY, MemoryService, memory_service, replied

ALICE, PEER, SERVER = "alice@TEST.REALM", "127.0.0.1:40000", "securecc/localhost@TEST.REALM"
OBJECT, EVIL = b"\x7fELF object", b"\x7fELF evil"


def job(source: bytes = b"int a;\n") -> wire.Job:
    return wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", source, compiler_identity=GCC_IDENTITY)


def accepted(s: MemoryService, tmp_path: Path, reply: wire.Message, j: wire.Job) -> bool:
    """Whether the client would take this reply: the Channel's check with the server's (pinned) key."""
    if not isinstance(reply, wire.Result):
        return False
    try:
        attest.check(reply, j, SERVER, attest.public_key(load_private_key(tmp_path / "signing.key")))
    except attest.BadAttestation:
        return False
    return True


def final_records(s: MemoryService) -> list[dict[str, Any]]:
    return [r for r in records([s.log]) if r.get("event") == "job"]


# --- a compromised job handler: the cache entries it hands back ------------------------------------------


def test_a_cache_entry_whose_bytes_were_changed_is_not_accepted(tmp_path: Path) -> None:
    s = memory_service(tmp_path, caching=True)
    s.compile(job(), OBJECT)
    [(key, entry)] = s.handler.cache.items()
    s.handler.cache[key] = dataclasses.replace(entry, output=EVIL)
    reply = s.service.run(Session(ALICE, PEER, 3600.0), job())
    if s.handler.runs[-1:] and not s.handler.runs[-1].result.called:
        s.handler.runs[-1].finish(Outcome(0, b"", b"", OBJECT))
    reply = replied(reply)
    assert not (isinstance(reply, wire.Result) and reply.output == EVIL and accepted(s, tmp_path, reply, job()))


@pytest.mark.parametrize("attestation", [None, "garbage", {"statement": 1}, {"statement": "x", "signature": "y", "key": "z"}],
                         ids=["stripped", "a-string", "wrong-types", "unverifiable"])
def test_a_cache_entry_with_changed_bytes_and_no_valid_statement_is_never_signed(tmp_path: Path, attestation: Any) -> None:
    """The handler swaps the object and drops (or mangles) the producer's statement: the server must not sign those
    bytes with its own key; it compiles afresh, and the job still has exactly one final record."""
    s = memory_service(tmp_path, caching=True)
    s.compile(job(), OBJECT)
    [(key, entry)] = s.handler.cache.items()
    producer = {k: v for k, v in entry.producer.items() if k != "attestation"}
    if attestation is not None:
        producer["attestation"] = attestation
    s.handler.cache[key] = dataclasses.replace(entry, output=EVIL, producer=producer)
    d = s.service.run(Session(ALICE, PEER, 3600.0), job())
    if len(s.handler.runs) == 2:
        s.handler.runs[-1].finish(Outcome(0, b"", b"", OBJECT))
    reply = replied(d)
    assert not (isinstance(reply, wire.Result) and reply.output == EVIL and accepted(s, tmp_path, reply, job()))
    assert isinstance(reply, wire.Result) and reply.output == OBJECT and accepted(s, tmp_path, reply, job())
    assert len(final_records(s)) == 2


def test_another_jobs_genuine_result_replayed_under_this_key_is_not_served(tmp_path: Path) -> None:
    """The handler files mallory's genuine object and statement under alice's cache key: signed bytes, for another
    job.  The producer's statement must name the key it is served under."""
    s = memory_service(tmp_path, caching=True)
    s.compile(job(b"int evil;\n"), EVIL)
    [(evil_key, evil_entry)] = s.handler.cache.items()
    key = cache_key(GCC_IDENTITY, job())
    assert key != evil_key
    s.handler.cache[key] = evil_entry
    d = s.service.run(Session(ALICE, PEER, 3600.0), job())
    if len(s.handler.runs) == 2:
        s.handler.runs[-1].finish(Outcome(0, b"", b"", OBJECT))
    reply = replied(d)
    assert not (reply.output == EVIL and accepted(s, tmp_path, reply, job()))


def test_an_entry_from_before_attestations_is_compiled_again_without_an_error(tmp_path: Path) -> None:
    """An entry stored by an older server has no statement: a miss, one final record, no traceback."""
    s = memory_service(tmp_path, caching=True)
    s.handler.cache[cache_key(GCC_IDENTITY, job())] = Entry(b"", b"", OBJECT, {"job_id": "0" * 16, "principal": ALICE})
    d = s.service.run(Session(ALICE, PEER, 3600.0), job())
    if s.handler.runs:
        s.handler.runs[-1].finish(Outcome(0, b"", b"", OBJECT))
    reply = replied(d)
    assert isinstance(reply, wire.Result) and accepted(s, tmp_path, reply, job())
    [record] = final_records(s)
    assert record["job_id"] == reply.job_id and record.get("cache") != "hit"


def test_a_genuine_hit_still_carries_both_statements(tmp_path: Path) -> None:
    s = memory_service(tmp_path, caching=True)
    first = s.compile(job(), OBJECT)
    hit = replied(s.service.run(Session(ALICE, PEER, 3600.0), job()))
    assert len(s.handler.runs) == 1
    mine, producer = attest.check(hit, job(), SERVER, attest.public_key(load_private_key(tmp_path / "signing.key")))
    assert producer["job_id"] == first.job_id and mine["job_id"] == hit.job_id


def test_a_timeout_a_failed_compile_and_a_split_dwarf_object_each_get_one_record_and_no_error(tmp_path: Path) -> None:
    s = memory_service(tmp_path, caching=True)
    d = s.service.run(Session(ALICE, PEER, 3600.0), job(b"int t;\n"))
    s.handler.runs[-1].kill("timeout")
    assert replied(d).reason == wire.Reason.TIMEOUT
    d = s.service.run(Session(ALICE, PEER, 3600.0), job(b"int f;\n"))
    s.handler.runs[-1].finish(Outcome(1, b"", b"error\n", None))
    failed = replied(d)
    assert failed.exit_status == 1 and accepted(s, tmp_path, failed, job(b"int f;\n"))
    split = dataclasses.replace(job(b"int d;\n"), args=["-O2", "-gsplit-dwarf"], output_path="a.o")
    d = s.service.run(Session(ALICE, PEER, 3600.0), split)
    s.handler.runs[-1].finish(Outcome(0, b"", b"", OBJECT, dwo=b"dwo bytes"))
    dwo = replied(d)
    assert isinstance(dwo, wire.Result), dwo
    assert dwo.dwo == b"dwo bytes" and accepted(s, tmp_path, dwo, split)
    assert not accepted(s, tmp_path, dataclasses.replace(dwo, dwo=b"other dwo"), split)
    assert len(final_records(s)) == 3



# --- cost --------------------------------------------------------------------------------------------------


def test_checking_a_result_encodes_the_job_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """attest.check hashes the whole job (its source and every header): once per result, not once per statement."""
    key = Ed25519PrivateKey.generate()
    big = dataclasses.replace(job(b"x" * 100_000), include_paths=[f"h{i}.h" for i in range(50)], includes=[b"y" * 1000] * 50)
    one = attest.sign(key, SERVER, "j1", attest.job_digest(big), big, attest.outputs(0, b"", b"", OBJECT, None), 1, "ab")
    reply = wire.Result(0, b"", b"", OBJECT, "j1", attestations=[one.fields()])
    calls = []
    encode = wire.encode_message
    monkeypatch.setattr(wire, "encode_message", lambda m: calls.append(1) or encode(m))
    attest.check(reply, big, SERVER, None)
    assert len(calls) == 1
