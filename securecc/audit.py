"""The job log: one hash-chained JSON line per job attempt and per server event.

Format version 1 (the ``v`` field).  Every line is the canonical JSON of one
record (keys sorted, no spaces, UTF-8; see :func:`canonical` for names that
are not UTF-8), so its bytes are its identity:

- ``v`` format version; ``seq`` position in the chain (0, 1, ... across
  rotated files); ``prev`` sha256 of the previous line's bytes (64 zeros for
  the first); ``time`` UTC, RFC 3339; ``event`` (below); ``server`` host.
- ``event: job`` — one per job attempt however it ended, and ``job-start``,
  a compile's record so far, written before it runs: :class:`JobRecord`
  lists the fields and says which are written when.
- ``event: auth`` — a connection whose authentication failed: :class:`AuthRecord`.
- ``event: server-start`` (``sandbox``, ``compilers`` and their identities,
  ``torn_line`` after a crash) / ``server-stop`` / ``acl-reload`` /
  ``rotation`` / ``key-rotation`` (``old_key``, ``new_key``) /
  ``audit-recovered`` (``lost``: records that could not be written), and
  ``checkpoint``: ``key`` (which key signed), ``sig``, an Ed25519 signature
  (base64) over the canonical JSON of the checkpoint without ``sig``; since
  it includes ``prev``, it signs the whole chain up to it.

Why checkpoints, not a signature per record: hashing a record costs ~3 µs
and signing ~30 µs, but verifying a signature ~100 µs, which would hold an
auditor to ~10,000 records/s.  The server signs a checkpoint every
``checkpoint_every`` records or ``checkpoint_seconds``, at rotation and at
stop; everything before a valid checkpoint is as trustworthy as a signature
on each.  Records after the last checkpoint are unsigned until the next;
``securecc-audit verify`` says how many.  A log cut exactly after one of its
checkpoints still verifies: only a copy of a later checkpoint kept elsewhere
(``syslog``) shows that, so forward them off the box.  A log's head cannot be
cut the same way: a chain starts at seq 0 or, once older files are rotated
away, at the ``rotation`` record that opens each newer file (:func:`verify`).

The writer is :mod:`securecc.server.auditlog`; this module is what both it and an auditor need.
Why one file of ~420 lines: the record types, the line format and :func:`verify` are the one
contract between the writer and every auditor, and a change to one is a change to all of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from securecc.protocol import Reason

VERSION = 1
GENESIS = "0" * 64


class AuditError(Exception):
    """The audit log cannot be written: no job may run unrecorded."""


def canonical(record: dict[str, Any]) -> bytes:
    """A record's bytes: keys sorted, no spaces, UTF-8 as is (so lines written before keep their bytes).

    A name that is not UTF-8 arrives as a str with surrogate escapes (b'\\xff' is '\\udcff'), which UTF-8
    cannot carry: such lone surrogates become JSON escapes ("\\udcff"), which read back as the same str.  A
    surrogate pair is the character it encodes, as JSON reads it.  A bytes value is recorded as that same str
    (surrogateescape).  Raises TypeError or ValueError for what JSON cannot take (sets, objects, cycles).
    """
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_fsdecode)
    try:
        return text.encode()
    except UnicodeEncodeError:
        pass
    plain = json.loads(json.dumps(record, default=_fsdecode))  # pairs joined, as a reader will see them
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _fsdecode(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the records of jobs and handshakes ----------------------------------------


class Decision(StrEnum):
    """What became of a job (the ``decision`` of its record); a failed handshake is refused."""

    ALLOWED = "allowed"  # it compiled, or its result came from the cache
    REFUSED = "refused"
    BUSY = "busy"  # no slot now: the client tries another server
    ERROR = "error"  # ours, not the client's


class Unset(Enum):
    """The default of the fields whose None is written (as null): until set, such a field is left out."""

    UNSET = "unset"

    def __bool__(self) -> Literal[False]:
        return False


UNSET: Final = Unset.UNSET


def _fields(record: JobRecord | AuthRecord, event: str) -> dict[str, Any]:
    """A record's fields as written: None is left out, and so is UNSET (a field that defaults to it writes its None)."""
    written: dict[str, Any] = {"event": event}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is not UNSET and (value is not None or f.default is UNSET):
            written[f.name] = value
    return written


@dataclass(kw_only=True, slots=True)
class JobRecord:
    """One job's record, filled in by its stages (:mod:`securecc.server.service`) as they learn each field.

    Mutable: a refusal at any stage is recorded with what the stages before
    it learnt, through this one object.  Slots: a field the format does not
    have cannot be set.  A field at None is left out, but the three that
    start :data:`UNSET` write their None, as null: a compile that ended by
    itself, or made no object.  Which outcome writes which fields:

    - refused before authorization: who, what, ``decision``, ``reason``, ``detail``, ``duration``, ``delivered``;
      a distcc command that is no compile: who, ``args`` and why, nothing else;
    - refused by the ACL: also ``compiler_path`` and ``compiler_identity``;
    - busy: also ``input_sha256`` and ``load``, no ``detail``;
    - compiled: ``exit_status``, ``ended_by``, ``output_sha256``, ``bytes_out``, ``cache`` when stored;
    - from the cache: ``cache``, ``cached_from``, ``exit_status``, ``output_sha256``, ``bytes_out``;
    - an error of ours: what was known when it happened, and ``detail``;
    - ``job-start``: a compile's record before it runs (:meth:`to_fields`), without ``decision``.
    """

    # who, from where, how (protocol and payload only when not the native protocol's sealed stream)
    principal: str
    peer: str  # host:port
    protocol: str | None = None  # "distcc"
    payload: str | None = None  # "cleartext": the job came unsealed
    # what
    job_id: str | None = None  # None: a distcc command refused before it was a job
    compiler: str | None = None  # the name the client asked for
    args: list[str]
    source: str | None = None  # the source path as the client names it
    cwd: str | None = None
    headers: int | None = None  # files sent for the server to preprocess
    bytes_in: int | None = None
    sandbox: str | None = None  # its mode, when not bwrap
    # once the compiler is checked and the ACL asked
    compiler_path: str | None = None
    compiler_identity: str | None = None
    input_sha256: str | None = None  # once authorized: only then is the input hashed
    # how it ended
    decision: Decision | None = None
    reason: Reason | str | None = None  # the ACL's reason (allowed:group:NAME...), replaced by a refusal's or BUSY's
    detail: str | None = None
    load: int | None = None  # busy: jobs running then
    cache: Literal["hit", "stored"] | None = None
    cached_from: str | None | Unset = UNSET  # a hit: the job that stored it (null: its entry names none)
    exit_status: int | None = None
    # a compile: timeout, disconnect, shutdown, revoked (we killed it), or the rlimit (cpu-limit, file-size-limit,
    # memory-limit, process-limit), or system-call-refused (the sandbox's filter killed it); null: it ended by itself
    ended_by: str | None | Unset = UNSET
    output_sha256: str | None | Unset = UNSET  # a compile or a hit (null: no object)
    bytes_out: int | None = None
    duration: float | None = None  # seconds, arrival to record
    delivered: bool | None = None  # false: the client had gone before the reply could be sent

    def to_fields(self, event: Literal["job", "job-start"] = "job") -> dict[str, Any]:
        """What :meth:`~securecc.server.auditlog.AuditLog.write` takes; ``job-start``: a compile's record so far."""
        return _fields(self, event)


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthRecord:
    """A connection whose authentication failed (frozen: built whole, in one place, the service's ``auth_failed``)."""

    peer: str
    reason: Reason | str
    detail: str
    protocol: str | None = None  # "distcc"
    suppressed_before: int | None = None  # failures from the same source left out since the last record
    decision: Decision = Decision.REFUSED

    def to_fields(self) -> dict[str, Any]:
        return _fields(self, "auth")


# --- keys -------------------------------------------------------------------


def generate_key(path: Path) -> Path:
    """Write a new Ed25519 private key (0600) and its public key beside it (``.pub``)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's short name in the log: the start of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = path.read_bytes()
    key = (serialization.load_pem_private_key(data, None).public_key() if b"PRIVATE" in data
           else serialization.load_pem_public_key(data))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return key


# --- reading and verifying ----------------------------------------------------


@dataclass
class Line:
    path: Path
    number: int  # 1-based
    raw: bytes
    record: dict[str, Any] | None  # None: not a record

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def read_lines(paths: list[Path]) -> Iterator[Line]:
    """Every line of the given files, in chain order (files sorted by their first seq)."""

    def first_seq(path: Path) -> int:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    return int(json.loads(raw)["seq"])
                except (ValueError, KeyError, TypeError):
                    continue
        return -1

    for path in sorted(paths, key=first_seq):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                raw = raw.rstrip(b"\n")
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict):
                        record = None
                except ValueError:
                    record = None
                yield Line(path, number, raw, record)


@dataclass
class Report:
    records: int = 0
    checkpoints: int = 0
    files: int = 0
    unsigned_tail: int = 0
    first_seq: int | None = None
    lost: int = 0  # records the server could not write (its audit-recovered records say so)
    full_disk_stops: int = 0  # clean stops while the disk was full
    problem: str | None = None  # the first thing wrong, with file and line

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(paths: list[Path], public_keys: Ed25519PublicKey | list[Ed25519PublicKey], live: bool = False) -> Report:
    """Check the chain, the order, where it starts and every checkpoint's signature; stop at the first problem.

    ``public_keys``: the server's key, or all its keys when the log spans a
    key rotation (each checkpoint names the key that signed it).

    ``live``: the log is being written, so records after the last checkpoint
    are expected (otherwise a log must end with a checkpoint: one that does
    not was cut, or its server crashed — then the next start says so).

    The start: the first record must be seq 0 (chained to the genesis hash)
    or a ``rotation`` record, which the server writes only as the first line
    of a file continuing a rotated one; the older files may have been
    retired.  Its hash is covered by the next checkpoint, so it cannot be
    forged.  A start anywhere else is a head removed, even at a checkpoint:
    a signature vouches for the records before it, not that there were none.

    What this cannot detect, since no signature covers what is missing:

    - a cut that leaves the log ending with a checkpoint: the records after
      any checkpoint, or whole newest files (a rotated file ends with one);
      a cut that leaves unsigned records after it fails, except in ``live``,
      where any cut of the unsigned tail passes (``unsigned_tail`` counts it);
    - whole oldest rotated files removed: that is retention; ``first_seq``
      says where the chain starts;
    - every file removed or emptied: no records, nothing to check.

    Only a copy of a later checkpoint kept off the box (:func:`forwarder`) shows the first two.
    """
    keys = {key_id(k): k for k in (public_keys if isinstance(public_keys, list) else [public_keys])}
    report = Report(files=len(paths))
    prev: Line | None = None
    pending_torn: Line | None = None
    for line in read_lines(paths):
        record = line.record
        if record is None:
            if pending_torn is not None:
                report.problem = f"{pending_torn.where}: not a record (corrupt or torn)"
                return report
            pending_torn = line
            continue
        try:
            seq, link, event = record["seq"], record["prev"], record["event"]
        except KeyError as e:
            report.problem = f"{line.where}: not a securecc record (no {e.args[0]})"
            return report
        if type(seq) is not int:
            report.problem = f"{line.where}: not a securecc record (seq is not a number)"
            return report
        if canonical(record) != line.raw:
            report.problem = f"{line.where}: edited (the line is not its record's canonical form)"
            return report
        if pending_torn is not None:
            declared = event == "server-start" and record.get("torn_line") == pending_torn.number
            if not declared:
                report.problem = f"{pending_torn.where}: not a record (corrupt, torn or inserted)"
                return report
            pending_torn = None
        if prev is None:
            report.first_seq = seq
            if seq == 0 and link != GENESIS:
                report.problem = f"{line.where}: the first record does not start a chain"
                return report
            if seq != 0 and event != "rotation":
                report.problem = (f"{line.where}: the log starts at seq {seq}, not at 0 or at a rotation record "
                                  "(the first line of a rotated file): its head was removed")
                return report
        else:
            assert prev.record is not None
            expected = prev.record["seq"] + 1
            if seq < expected:
                report.problem = f"{line.where}: out of order (seq {seq} after {expected - 1}): records reordered or inserted"
                return report
            if seq > expected:
                report.problem = (f"{line.where}: seq jumps from {expected - 1} to {seq}: "
                                  "records deleted, or reordered, before this line")
                return report
            if link != line_hash(prev.raw):
                report.problem = f"{prev.where}: edited or replaced (the next record, {line.where}, chains to other bytes)"
                return report
        if event == "checkpoint":
            unsigned = {k: v for k, v in record.items() if k != "sig"}
            public_key = keys.get(record["key"]) if isinstance(record.get("key"), str) else None
            if public_key is None:
                report.problem = f"{line.where}: checkpoint signed by key {record.get('key')}, which was not given"
                return report
            try:
                public_key.verify(base64.b64decode(record.get("sig", ""), validate=True), canonical(unsigned))
            except (InvalidSignature, ValueError, TypeError):
                report.problem = f"{line.where}: checkpoint signature invalid (forged, or signed by another key)"
                return report
            report.checkpoints += 1
            report.unsigned_tail = 0
        else:
            report.records += 1
            report.unsigned_tail += 1
            if event == "audit-recovered" and type(record.get("lost")) is int:
                report.lost += record["lost"]
            report.full_disk_stops += event == "server-stop" and record.get("full_disk") is True
        prev = line
    if pending_torn is not None:
        report.problem = f"{pending_torn.where}: torn last line (the server crashed mid-write, or the file was cut)"
    elif report.unsigned_tail and not live:
        where = prev.where if prev else "?"
        if prev is not None and prev.record is not None and prev.record.get("event") == "server-stop":
            why = ("its server stopped but could not sign them (no room or an I/O error for the checkpoint; "
                   "the server's own log says which)")
        else:
            why = "cut, or its server died (then its next start continues it); --live for a running server"
        report.problem = f"{where}: the log ends {report.unsigned_tail} record(s) after its last checkpoint: {why}"
    return report


def records(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The records of a log, in order, skipping what is not a record."""
    for line in read_lines(paths):
        if line.record is not None:
            yield line.record
