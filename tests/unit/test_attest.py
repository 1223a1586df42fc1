"""Attested results (securecc.attest): what the client accepts, and every change it refuses."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securecc import attest
from securecc import protocol as wire

SERVER = "securecc/build1@TEST.REALM"
KEY, OTHER = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
JOB = wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", b"int a;\n", compiler_identity="gcc 12")


def result(key: Ed25519PrivateKey = KEY, server: str = SERVER, job: wire.Job = JOB, output: bytes = b"\x7fELF",
           job_id: str = "j1") -> wire.Result:
    signed = attest.sign(key, server, job_id, attest.job_digest(job), job, attest.outputs(0, b"", b"warn\n", output, None), 7, "ab" * 32)
    return wire.Result(0, b"", b"warn\n", output, job_id, attestations=[signed.fields()])


def test_a_faithful_result_is_accepted_and_names_its_audit_record():
    [facts] = attest.check(result(), JOB, SERVER, None)
    assert (facts["server"], facts["job_id"], facts["audit"]) == (SERVER, "j1", {"seq": 7, "line_sha256": "ab" * 32})
    assert facts["args_sha256"] == attest.args_digest(["-O2"]) and facts["compiler_identity"] == "gcc 12"
    assert attest.signer(result()) == (SERVER, attest.public_key(KEY))


def refused(reply: wire.Result, pinned: str | None = None, job: wire.Job = JOB) -> str:
    with pytest.raises(attest.BadAttestation) as caught:
        attest.check(reply, job, SERVER, pinned)
    return str(caught.value)


def test_no_attestation_is_refused():
    assert "no attestation" in refused(dataclasses.replace(result(), attestations=[]))


def test_an_object_changed_after_signing_is_refused():
    assert "digests" in refused(dataclasses.replace(result(), output=b"\x7fELG"))
    assert "digests" in refused(dataclasses.replace(result(), stderr=b"other\n"))
    assert "digests" in refused(dataclasses.replace(result(), exit_status=1))


def test_a_changed_statement_fails_its_signature():
    reply = result()
    fields = dict(reply.attestations[0])
    fields["statement"] = fields["statement"].replace('"seq":7', '"seq":8')
    assert "signature" in refused(dataclasses.replace(reply, attestations=[fields]))


def test_a_statement_signed_by_a_key_it_does_not_name_is_refused():
    reply = result()
    fields = {**reply.attestations[0], "key": attest.public_key(OTHER)}
    assert "signature" in refused(dataclasses.replace(reply, attestations=[fields]))


def test_another_servers_statement_or_key_is_refused():
    assert "not as the server authenticated" in refused(result(server="securecc/rogue@TEST.REALM"))
    assert "pinned" in refused(result(key=OTHER), pinned=attest.public_key(KEY))


def test_a_result_for_another_job_is_refused():
    other = dataclasses.replace(JOB, source=b"int b;\n")
    assert "another job" in refused(result(job=other))
    assert "another job" in refused(dataclasses.replace(result(), job_id="j2"))


def test_a_cache_hit_carries_its_producers_statement_which_must_match_the_bytes():
    producer = Ed25519PrivateKey.generate()
    original = result(key=producer, server="securecc/build2@TEST.REALM", job_id="j0")
    served = result()
    hit = dataclasses.replace(served, attestations=[*served.attestations, *original.attestations])
    mine, theirs = attest.check(hit, JOB, SERVER, None)
    assert theirs["server"] == "securecc/build2@TEST.REALM" and theirs["job_id"] == "j0"
    forged = result(key=producer, server="securecc/build2@TEST.REALM", output=b"\x7fELG")
    assert "digests" in refused(dataclasses.replace(served, attestations=[*served.attestations, *forged.attestations]))


def test_malformed_attestations_are_refused_not_raised():
    reply = result()
    for fields in ({"statement": "x"}, {**reply.attestations[0], "signature": "!!"}, {**reply.attestations[0], "statement": "[]"}):
        assert refused(dataclasses.replace(reply, attestations=[fields]))
    statement = json.loads(reply.attestations[0]["statement"])
    assert statement["type"] == attest.STATEMENT_TYPE


def test_the_clients_channel_turns_a_bad_attestation_into_a_host_failure():
    """A result that fails its attestation is the host's failure (backed off, the next one tried, then local)."""
    from securecc.client.channel import Channel, HostFailure
    from securecc.client.hosts import Host

    channel = Channel(Host("build1", 3632, principal=SERVER))
    channel.server = SERVER
    faithful = result()
    assert channel._attested(JOB, faithful) is faithful
    with pytest.raises(HostFailure, match="fails its attestation"):
        channel._attested(JOB, dataclasses.replace(result(), output=b"\x7fELG"))
    refusal = wire.Refused(wire.Reason.BAD_PATH, "no")
    assert channel._attested(JOB, refusal) is refusal  # only results are attested


def test_provenance_names_the_object_and_checks_only_with_it():
    reply = result()
    document = attest.provenance("/src/a.o", b"\x7fELF", reply)
    assert document["subject"] == [{"name": "/src/a.o", "digest": {"sha256": attest.digest(b"\x7fELF")}}]
    [facts] = attest.check_provenance(document, b"\x7fELF")
    assert facts["server"] == SERVER and "BEGIN PUBLIC KEY" in document["predicate"]["attestations"][0]["public_key_pem"]
    with pytest.raises(attest.BadAttestation, match="another file"):
        attest.check_provenance(document, b"\x7fELG")
    forged = json.loads(json.dumps(document))
    forged["subject"][0]["digest"]["sha256"] = attest.digest(b"\x7fELG")
    with pytest.raises(attest.BadAttestation, match="names another object"):
        attest.check_provenance(forged, b"\x7fELG")  # a subject rewritten to another object: the signed digests say no
