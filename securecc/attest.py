"""Server-attested results: what a server signs with every reply, and how a client checks it.

A server has an Ed25519 signing key of its own (``securecc-admin signing
keygen``; neither the keytab nor the audit key), held by the front, which no
job can reach.  Every :class:`~securecc.protocol.Result` carries one
:class:`Attestation` per server that stands behind it: the serving server's,
and for a cache hit also the original one of the server that compiled it.
Each is a statement, canonical JSON (keys sorted, no spaces), and the
signature over its bytes::

    {"type": STATEMENT_TYPE, "server": "securecc/build1@REALM", "job_id": ...,
     "job_sha256": sha256 of the job as the client encoded it (compiler,
       arguments, paths, environment, the source and every header sent),
     "compiler_identity": ..., "args_sha256": sha256 of the arguments (JSON),
     "exit_status": 0, "outputs": {"object": sha256 or null, "dwo": ...,
       "stdout": ..., "stderr": ...},
     "audit": {"seq": N, "line_sha256": ...}: the job's final audit record,
     "cache_key": the result cache's key of a job it stored (else null): a hit on
       that entry is served only if this statement is the server's own for that key,
     "time": RFC 3339, "key": the public key (base64, raw 32 bytes)}

The client checks, before it writes any output (:func:`check`): the
signature, that the signing key is the one pinned for that principal (the
first one it met, kept in its host state, so a server that changes its key
is refused until the user forgets the old one), that ``server`` is the
principal it authenticated by mutual Kerberos, that ``job_sha256`` is its
own job's, and that every output's digest is the reply's.  Anything else is
:class:`BadAttestation`, and the job compiles locally.

With ``SECURECC_PROVENANCE`` the client keeps, per object, an in-toto
statement (:func:`provenance`) whose subject is the object's digest and
whose predicate carries those signed statements; :func:`check_provenance`
is what ``securecc-audit provenance`` applies to it.  A leaf: the
cryptography package and the wire format, nothing else of securecc.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securecc import protocol as wire

STATEMENT_TYPE = "securecc-result/v1"


class BadAttestation(Exception):
    """A reply whose attestation is missing, does not verify, or does not describe this job and these bytes."""


@dataclass(frozen=True)
class Attestation:
    statement: str  # canonical JSON: its exact bytes are what is signed
    signature: str  # base64 Ed25519 signature
    key: str  # base64 raw public key

    def fields(self) -> dict[str, str]:
        return {"statement": self.statement, "signature": self.signature, "key": self.key}

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Attestation:
        if set(fields) != {"statement", "signature", "key"} or not all(isinstance(v, str) for v in fields.values()):
            raise BadAttestation("malformed attestation")
        return cls(fields["statement"], fields["signature"], fields["key"])

    def facts(self) -> dict[str, Any]:
        """The statement, parsed (only after :meth:`verified`)."""
        parsed = json.loads(self.statement)
        if not isinstance(parsed, dict) or parsed.get("type") != STATEMENT_TYPE:
            raise BadAttestation("not a securecc result statement")
        return parsed

    def verified(self) -> dict[str, Any]:
        """The statement's facts if its signature holds under its own key; BadAttestation otherwise."""
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(self.key, validate=True))
            key.verify(base64.b64decode(self.signature, validate=True), self.statement.encode())
            facts = self.facts()
        except (InvalidSignature, ValueError) as e:
            raise BadAttestation(f"its signature does not verify ({type(e).__name__})") from None
        if facts.get("key") != self.key:
            raise BadAttestation("the statement names another key than the one that signed it")
        return facts


def public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A key as statements name it: the raw public key, base64."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def job_digest(job: wire.Job) -> str:
    """The job as the client encoded it: both ends hash the same bytes (the encoding is deterministic)."""
    return hashlib.sha256(wire.encode_message(job)).hexdigest()


def args_digest(args: list[str]) -> str:
    return hashlib.sha256(json.dumps(args, separators=(",", ":")).encode()).hexdigest()


def outputs(exit_status: int, stdout: bytes, stderr: bytes, output: bytes | None, dwo: bytes | None) -> dict[str, Any]:
    return {"exit_status": exit_status,
            "outputs": {"object": digest(output), "dwo": digest(dwo), "stdout": digest(stdout), "stderr": digest(stderr)}}


def sign(key: Ed25519PrivateKey, server: str, job_id: str, job_sha256: str, job: wire.Job, result: dict[str, Any],
         audit_seq: int, audit_line_sha256: str, cache_key: str | None = None) -> Attestation:
    """The serving server's statement of one reply (``result``: :func:`outputs`); ``cache_key``: the result cache's key
    of the job (None: not cached), which a later hit on that entry checks before it serves the entry's bytes."""
    statement = {"type": STATEMENT_TYPE, "server": server, "job_id": job_id, "job_sha256": job_sha256,
                 "compiler_identity": job.compiler_identity, "args_sha256": args_digest(job.args), **result, "cache_key": cache_key,
                 "audit": {"seq": audit_seq, "line_sha256": audit_line_sha256},
                 "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"), "key": public_key(key)}
    text = json.dumps(statement, sort_keys=True, separators=(",", ":"))
    return Attestation(text, base64.b64encode(key.sign(text.encode())).decode(), statement["key"])


def signer(reply: wire.Result) -> tuple[str, str]:
    """Who signed a reply :func:`check` accepted, and with which key: what the client pins."""
    facts = Attestation.of(reply.attestations[0]).facts()
    return str(facts["server"]), str(facts["key"])


def check(reply: wire.Result, job: wire.Job, server: str, pinned: str | None) -> list[dict[str, Any]]:
    """The facts of ``reply``'s attestations once every check holds (the serving server's first); BadAttestation if not.

    ``server`` is the principal the client authenticated; ``pinned`` the key it has pinned for it (None: the first
    meeting, the caller pins this one).  A producer's statement (a cache hit) must name the same compiler and bytes:
    its job had the same cache key, not necessarily every field of this one.
    """
    if not reply.attestations:
        raise BadAttestation("the reply carries no attestation")
    mine = job_digest(job)
    served = outputs(reply.exit_status, reply.stdout, reply.stderr, reply.output, reply.dwo)
    found = []
    for index, fields in enumerate(reply.attestations):
        attestation = Attestation.of(fields)
        facts = attestation.verified()
        if index == 0:
            if facts.get("server") != server:
                raise BadAttestation(f"it is signed as {facts.get('server')!r}, not as the server authenticated ({server})")
            if pinned is not None and attestation.key != pinned:
                raise BadAttestation(f"{server} signed with another key than the one pinned for it")
            if facts.get("job_id") != reply.job_id:
                raise BadAttestation("it names another job")
            if facts.get("job_sha256") != mine:
                raise BadAttestation("it describes another job than the one sent")
        elif facts.get("compiler_identity") != job.compiler_identity:  # a producer compiled an equal job
            raise BadAttestation("the producer's statement names another compiler")
        if {k: facts.get(k) for k in served} != served:
            raise BadAttestation("its digests do not match the outputs received")
        found.append(facts)
    return found


# --- provenance: one in-toto statement per object the client received -------------------------------------

PROVENANCE_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://securecc.dev/provenance/result/v1"


def provenance(name: str, data: bytes, reply: wire.Result) -> dict[str, Any]:
    """The in-toto statement of one output (``name``, as the build calls it) of an accepted reply: its subject is the
    file's digest, its predicate the servers' signed statements, which name the same digest.  The file itself is not
    signed (the client holds no key); what it carries is, and checks with the servers' keys alone."""
    facts = [Attestation.of(a).facts() for a in reply.attestations]
    first = facts[0]
    return {
        "_type": PROVENANCE_TYPE,
        "subject": [{"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "builder": {"id": first["server"]}, "job_id": first["job_id"], "compiler_identity": first["compiler_identity"],
            "time": first["time"], "audit": first["audit"],
            "attestations": [{**a, "public_key_pem": _pem(a["key"])} for a in reply.attestations],
        },
    }


def _pem(key: str) -> str:
    raw = Ed25519PublicKey.from_public_bytes(base64.b64decode(key))
    return raw.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def check_provenance(document: dict[str, Any], data: bytes) -> list[dict[str, Any]]:
    """The verified facts behind one object's provenance (the serving server's first); BadAttestation if ``data`` is
    not the subject, or any statement does not verify or does not name the object's digest."""
    if document.get("_type") != PROVENANCE_TYPE or document.get("predicateType") != PREDICATE_TYPE:
        raise BadAttestation("not a securecc provenance statement")
    wanted = hashlib.sha256(data).hexdigest()
    subjects = document.get("subject")
    if not isinstance(subjects, list) or [s.get("digest", {}).get("sha256") for s in subjects if isinstance(s, dict)] != [wanted]:
        raise BadAttestation("it describes another file (its subject's digest is not this file's)")
    predicate = document.get("predicate")
    listed = predicate.get("attestations") if isinstance(predicate, dict) else None
    if not isinstance(listed, list) or not listed:
        raise BadAttestation("it carries no server statement")
    found = []
    for fields in listed:
        if not isinstance(fields, dict):
            raise BadAttestation("malformed attestation")
        facts = Attestation.of({k: fields.get(k) for k in ("statement", "signature", "key")}).verified()
        _complete(facts)
        made = facts["outputs"]
        if wanted not in (made.get("object"), made.get("dwo")):  # not its stdout's or stderr's: an empty file is everyone's stdout
            raise BadAttestation(f"{facts['server']}'s statement names another object")
        found.append(facts)
    return found


def _complete(facts: dict[str, Any]) -> None:
    """A verified statement holds every field a reader prints, of its type (anyone can sign one with a key of their own)."""
    audit = facts.get("audit")
    if not (all(isinstance(facts.get(k), str) for k in ("server", "job_id", "compiler_identity", "time", "key"))
            and isinstance(facts.get("outputs"), dict) and isinstance(audit, dict)
            and isinstance(audit.get("seq"), int) and not isinstance(audit.get("seq"), bool) and isinstance(audit.get("line_sha256"), str)):
        raise BadAttestation("its statement lacks a field, or has one of the wrong type")
