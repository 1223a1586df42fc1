"""Attacks on provenance files and securecc-audit provenance: the file is the client's and unsigned; only the
signed statements in it count, only for the object they name, and everything they say is the signer's text."""


from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securecc import attest
from securecc import protocol as wire
from securecc.testing import GCC_IDENTITY, memory_service

ALICE, PEER, SERVER = "alice@TEST.REALM", "127.0.0.1:40000", "securecc/localhost@TEST.REALM"
OBJECT, EVIL = b"\x7fELF object", b"\x7fELF evil"


def job(source: bytes = b"int a;\n") -> wire.Job:
    return wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", source, compiler_identity=GCC_IDENTITY)


# --- provenance files and securecc-audit provenance ---------------------------------------------------


def signed_result(key: Ed25519PrivateKey, stdout: bytes = b"", stderr: bytes = b"", output: bytes = OBJECT,
                  audit: tuple[Any, str] = (7, "ab" * 32), server: str = SERVER) -> wire.Result:
    j = job()
    statement = attest.sign(key, server, "j1", attest.job_digest(j), j, attest.outputs(0, stdout, stderr, output, None), *audit)
    return wire.Result(0, stdout, stderr, output, "j1", attestations=[statement.fields()])


def test_an_empty_file_does_not_pass_as_an_object_by_matching_an_empty_stdout() -> None:
    """Every statement names the digest of its (usually empty) stdout: that must not vouch for an empty 'object'."""
    reply = signed_result(Ed25519PrivateKey.generate())
    document = attest.provenance("/src/a.o", b"", reply)
    with pytest.raises(attest.BadAttestation):
        attest.check_provenance(document, b"")


def test_a_file_equal_to_a_jobs_diagnostics_does_not_pass_as_its_object() -> None:
    stderr = b"a.c:1: warning: the attacker chose these bytes\n"
    reply = signed_result(Ed25519PrivateKey.generate(), stderr=stderr)
    with pytest.raises(attest.BadAttestation):
        attest.check_provenance(attest.provenance("/src/a.o", stderr, reply), stderr)


def write_document(tmp_path: Path, data: bytes, reply: wire.Result) -> tuple[Path, Path]:
    """The provenance file as a forger writes it: the client's layout, the statements given."""
    directory = tmp_path / "prov"
    directory.mkdir(exist_ok=True)
    obj = tmp_path / "a.o"
    obj.write_bytes(data)
    document = {"_type": attest.PROVENANCE_TYPE, "predicateType": attest.PREDICATE_TYPE,
                "subject": [{"name": str(obj), "digest": {"sha256": hashlib.sha256(data).hexdigest()}}],
                "predicate": {"attestations": reply.attestations}}
    (directory / (hashlib.sha256(data).hexdigest() + ".json")).write_text(json.dumps(document))
    return obj, directory


def audit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from securecc.tools.auditor import main

    with pytest.raises(SystemExit) as ended:
        main(argv)
    return int(ended.value.code or 0), capsys.readouterr().out


def test_the_auditor_escapes_every_field_of_a_forged_statement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A statement signed by any key verifies under that key: all its text is the forger's, seq included."""
    evil = "1\x1b[2K\rtrusted.o: compiled by securecc/build1"
    reply = signed_result(Ed25519PrivateKey.generate(), audit=(evil, "cd" * 32), server="x\x1b[31m")
    obj, directory = write_document(tmp_path, OBJECT, reply)
    log = tmp_path / "audit.jsonl"
    log.write_text("")
    code, out = audit(["provenance", str(obj), "--dir", str(directory), "--log", str(log)], capsys)
    assert "\x1b" not in out and "\r" not in out and code == 1


@pytest.mark.parametrize("drop", ["audit", "server", "job_id", "time", "compiler_identity"])
def test_the_auditor_reports_a_statement_missing_a_field_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                           drop: str) -> None:
    key = Ed25519PrivateKey.generate()
    facts = {"type": attest.STATEMENT_TYPE, "server": SERVER, "job_id": "j1", "compiler_identity": "gcc", "time": "now",
             "audit": {"seq": 1, "line_sha256": "ab"}, "exit_status": 0, "key": attest.public_key(key),
             "outputs": {"object": hashlib.sha256(OBJECT).hexdigest(), "dwo": None, "stdout": None, "stderr": None}}
    del facts[drop]
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    fields = {"statement": text, "signature": base64.b64encode(key.sign(text.encode())).decode(), "key": attest.public_key(key)}
    reply = wire.Result(0, b"", b"", OBJECT, "j1", attestations=[fields])
    obj, directory = write_document(tmp_path, OBJECT, reply)
    code, out = audit(["provenance", str(obj), "--dir", str(directory)], capsys)
    assert code == 1 and "FAILED" in out


def test_a_forged_statement_naming_a_real_audit_record_fails_against_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The forger copies a genuine record's seq, line hash and job id (the log is readable) into a statement they
    sign with a key of their own, for another object: the record's own output digest says no."""
    (tmp_path / "server").mkdir()
    s = memory_service(tmp_path / "server")
    genuine = s.compile(job(), OBJECT)
    [facts] = attest.check(genuine, job(), SERVER, None)
    forger = Ed25519PrivateKey.generate()
    j = job()
    forged = attest.sign(forger, SERVER, genuine.job_id, attest.job_digest(j), j, attest.outputs(0, b"", b"", EVIL, None),
                         facts["audit"]["seq"], facts["audit"]["line_sha256"])
    reply = wire.Result(0, b"", b"", EVIL, genuine.job_id, attestations=[forged.fields()])
    obj, directory = write_document(tmp_path, EVIL, reply)
    code, out = audit(["provenance", str(obj), "--dir", str(directory), "--log", str(s.log)], capsys)
    assert code == 1 and "FAILED" in out, out
    obj, directory = write_document(tmp_path, OBJECT, genuine)
    code, out = audit(["provenance", str(obj), "--dir", str(directory), "--log", str(s.log)], capsys)
    assert code == 0 and "is in the log" in out, out
