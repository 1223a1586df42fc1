"""The job log: one hash-chained JSON line per job attempt and per server event.

Format version 1 (the ``v`` field).  Every line is the canonical JSON of one
record (keys sorted, no spaces, UTF-8; see :func:`canonical` for names that
are not UTF-8), so its bytes are its identity:

- ``v`` format version; ``seq`` position in the chain (0, 1, ... across
  rotated files); ``prev`` sha256 of the previous line's bytes (64 zeros for
  the first); ``time`` UTC, RFC 3339; ``event`` (below); ``server`` host.
- ``event: job`` — ``job_id``, ``principal``, ``peer``, ``compiler``,
  ``compiler_path``, ``compiler_identity``, ``args``, ``source``, ``cwd``,
  ``headers`` (files sent for the server to preprocess), ``input_sha256``,
  ``output_sha256``, ``exit_status``, ``ended_by`` (timeout, disconnect,
  shutdown, or the rlimit: cpu-limit, file-size-limit, memory-limit,
  process-limit), ``duration`` (s), ``bytes_in``, ``bytes_out``,
  ``decision`` (allowed/refused), ``reason`` (the ACL's reason when allowed,
  the refusal's when refused), ``detail``; ``sandbox`` when not bwrap;
  ``delivered`` (false: the client had gone before the reply could be sent).
- ``event: auth`` — a connection whose authentication failed (``peer``,
  ``reason``, ``detail``).
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

Full disks: space is reserved (``fallocate`` past the end of the file,
which appends then fill) before a compile starts, for its ``job-start`` and
its final record, and a standing reserve keeps room for the records that
close the log (``audit-recovered``, ``server-stop``, a checkpoint).  A job
whose space cannot be reserved is refused, so no compile runs without room
for its record, and a clean stop can always sign; its ``server-stop``
record says how many records were lost while the disk was full (``lost``).

Crash safety: one ``write()`` per line on an O_APPEND descriptor; a short
write is cut back off.  At start the last line is checked: a torn one
(no newline) is terminated, never glued to the next record, and the
server-start record names it (``torn_line``) so verify can tell a crash
from tampering.  Rotation by size keeps the chain: the old file ends with a
checkpoint, the new one starts with a ``rotation`` record chained to it —
also when the server died between the rename and that record.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = 1
GENESIS = "0" * 64
STANDING_RESERVE = 16 << 10  # bytes always kept for audit-recovered, server-stop and checkpoints
JOB_MARGIN = 4 << 10  # what a job's final record may add to its start record (detail, digests, figures)
ALLOCATE_AHEAD = 64 << 10  # reserve space in steps this large: a syscall per many records, not per record


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
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
           else serialization.load_pem_public_key(data))  # fmt: skip
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return key


# --- writing ----------------------------------------------------------------


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    """libc's fallocate (the os module has only posix_fallocate, which changes the file's size)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc.fallocate  # type: ignore[no-any-return]


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate [offset, offset + length) of the file without changing its size (FALLOC_FL_KEEP_SIZE)."""
    if _fallocate()(fd, 1, offset, length) != 0:
        import ctypes

        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


@dataclass
class Reservation:
    """Space set aside in the log for one job's records."""

    size: int


def _last_line(path: Path) -> tuple[bytes | None, bool, int]:
    """(last complete line, whether a torn fragment follows it, number of lines incl. the fragment)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, False, 0
    torn = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")
    complete = lines[:-1]
    return (complete[-1] if complete else None), torn, len(complete) + (1 if torn else 0)


@dataclass
class AuditLog:
    """Appends chained records; signs checkpoints; rotates by size."""

    path: Path
    key: Ed25519PrivateKey
    server: str
    rotate_bytes: int | None = None
    checkpoint_every: int = 100
    checkpoint_seconds: float = 5.0
    forward: Callable[[bytes], None] | None = None  # a copy of each checkpoint line off the box
    torn_line: int | None = field(default=None, init=False)  # set when the last start found one
    previous_key: str | None = field(default=None, init=False)  # the key of the log's last checkpoint
    healthy: bool = field(default=True, init=False)

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._head = 0, GENESIS
        last, torn, count = _last_line(self.path)
        continues_rotated = last is None and not torn
        if continues_rotated:
            last = self._newest_rotated_line()
            continues_rotated = last is not None
        if last is not None:
            try:
                seq = json.loads(last)["seq"]
                if not isinstance(seq, int):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise AuditError(f"{self.path} does not end with a securecc audit record (another format, or not "
                                 "an audit log); move it away to start a new chain") from None  # fmt: skip
            self._seq, self._head = seq + 1, line_hash(last)
            self.previous_key = json.loads(last).get("key")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        if torn:
            os.write(self._fd, b"\n")  # the fragment stays a line of its own, never glued to a record
            self._size += 1
            self.torn_line = count
        self._unsigned = 0
        self._last_checkpoint = time.monotonic()
        self._lost = 0
        self._reserved = 0  # bytes promised to jobs under way
        self._allocated = self._size  # the file's blocks are ours up to here (a crash's leftovers not counted)
        try:
            self._allocate(self._size + STANDING_RESERVE)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise AuditError(f"the filesystem of {self.path} cannot reserve space for records (fallocate: "
                                 f"{e.strerror}); put the audit log on ext4, xfs, btrfs or tmpfs") from None  # fmt: skip
            self.healthy = False  # full already: the server starts, and refuses jobs until there is room
        if continues_rotated:  # died between rename and rotation record, or moved away by hand: verify needs the record
            self._append({"event": "rotation"})
            self._unsigned += 1

    def _newest_rotated_line(self) -> bytes | None:
        rotated = sorted(self.path.parent.glob(self.path.name + ".*"))
        for candidate in reversed(rotated):
            last, _torn, _ = _last_line(candidate)
            if last:
                return last
        return None

    def _allocate(self, end: int) -> None:
        """Make the file's blocks ours up to ``end`` (OSError: no room), a step ahead when there is room."""
        if end <= self._allocated:
            return
        try:
            _preallocate(self._fd, self._allocated, end + ALLOCATE_AHEAD - self._allocated)
            self._allocated = end + ALLOCATE_AHEAD
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            _preallocate(self._fd, self._allocated, end - self._allocated)
            self._allocated = end

    def reserve(self, start_record: dict[str, Any]) -> Reservation:
        """Room for a job's ``job-start`` record and its final one, or AuditError: then the job must not run."""
        try:
            size = 2 * len(canonical({"v": VERSION, "seq": self._seq, "prev": self._head, "time": now_rfc3339(),
                                       "server": self.server, **start_record})) + JOB_MARGIN  # fmt: skip
        except (TypeError, ValueError, RecursionError) as e:
            raise AuditError(f"cannot record this job: {e}") from None
        try:
            self.recover()
            self._allocate(self._size + self._reserved + size + STANDING_RESERVE)
        except OSError as e:
            self.healthy = False
            raise AuditError(f"no room in the audit log {self.path} for a job's records: {e.strerror or e}") from None
        self._reserved += size
        return Reservation(size)

    def release(self, reservation: Reservation) -> None:
        """A job's records are written (or it ended without them): its room goes back."""
        self._reserved -= reservation.size
        reservation.size = 0

    def recover(self) -> None:
        """After failed writes or a refused reservation: once there is room for a job again, record how
        many records were lost (``audit-recovered``); AuditError while there is not."""
        if self.healthy:
            return
        try:
            self._allocate(self._size + self._reserved + STANDING_RESERVE + JOB_MARGIN)
        except OSError as e:
            raise AuditError(f"cannot write the audit log {self.path}: {e.strerror or e}") from None
        self._recovered()

    def _recovered(self) -> None:
        self._append({"event": "audit-recovered", "lost": self._lost}, essential=True)
        self._unsigned += 1
        self._lost, self.healthy = 0, True

    def write(self, reservation: Reservation | None = None, **fields: Any) -> None:
        """Append one record; raises AuditError, and only that, if it cannot be written or has a value JSON cannot take.

        A record without a ``reservation`` is written only if it leaves the
        room promised to jobs under way and the standing reserve intact.
        """
        try:
            if reservation is None:  # a reserved record is written even while the log is out of room
                self.recover()
        except AuditError:
            self._lost += 1
            raise
        self._append(fields, reservation=reservation)
        self._unsigned += 1
        if self._unsigned >= self.checkpoint_every:
            self.checkpoint()
        if self.rotate_bytes and self._size >= self.rotate_bytes:
            self.rotate()

    def _append(self, fields: dict[str, Any], sign: bool = False, reservation: Reservation | None = None,
                essential: bool = False) -> bytes:  # fmt: skip
        """``essential``: a record that closes or repairs the log, drawn from the standing reserve."""
        record = {"v": VERSION, "seq": self._seq, "prev": self._head, "time": now_rfc3339(), "server": self.server, **fields}
        try:
            if sign:
                record["sig"] = base64.b64encode(self.key.sign(canonical(record))).decode()
            line = canonical(record)
        except (TypeError, ValueError, RecursionError) as e:  # this record only: the log stays healthy
            raise AuditError(f"cannot record this {fields.get('event', 'event')}: {e}") from None
        try:
            if reservation is None:  # room beyond what is promised: jobs' and the standing reserve
                kept = self._reserved + (0 if essential or sign else STANDING_RESERVE)
                self._allocate(self._size + len(line) + 1 + kept)
            written = os.write(self._fd, line + b"\n")
            if written != len(line) + 1:
                os.ftruncate(self._fd, self._size)  # a short write (disk full) is cut back off
                raise OSError(f"short write ({written} of {len(line) + 1} bytes)")
        except OSError as e:
            self.healthy = False
            self._lost += 1
            raise AuditError(f"cannot write the audit log {self.path}: {e.strerror or e}") from None
        if reservation is not None:
            used = min(reservation.size, len(line) + 1)
            reservation.size -= used
            self._reserved -= used
        self._seq += 1
        self._head = line_hash(line)
        self._size += len(line) + 1
        return line

    def checkpoint(self) -> None:
        """Sign the chain head (a no-op when nothing was written since the last one)."""
        if self._unsigned == 0:
            return
        line = self._append({"event": "checkpoint", "records": self._unsigned, "key": self.key_id}, sign=True)
        self._unsigned = 0
        self._last_checkpoint = time.monotonic()
        try:
            os.fdatasync(self._fd)
        except OSError:
            pass
        if self.forward:
            self.forward(line)

    def tick(self) -> None:
        """Called every second or so: checkpoint when records have waited long enough."""
        if self._unsigned and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
            try:
                self.checkpoint()
            except AuditError:
                pass

    def rotate(self) -> None:
        """Start a new file, unless the disk has no room for what is promised (then later)."""
        free = os.statvfs(self.path.parent)
        if free.f_bavail * free.f_frsize < self._reserved + STANDING_RESERVE + ALLOCATE_AHEAD:
            return
        self.checkpoint()
        self._give_back()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        os.rename(self.path, self.path.with_name(f"{self.path.name}.{stamp}"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = self._allocated = 0
        try:
            self._allocate(self._reserved + STANDING_RESERVE)
        except OSError:
            self.healthy = False
        self._append({"event": "rotation"}, essential=True)
        self._unsigned += 1

    def _give_back(self) -> None:
        """Close the file, returning the blocks allocated past its end."""
        try:
            os.ftruncate(self._fd, self._size)
        finally:
            os.close(self._fd)

    def close(self, **stop: Any) -> None:
        """A clean stop: the ``stop`` record (``full_disk`` when the log was out of room, after the
        ``audit-recovered`` count of what was lost) and a checkpoint over it, from the standing reserve;
        AuditError says exactly what could not be written and what stays unsigned."""
        try:
            if stop:
                full = not self.healthy
                if full:
                    self._recovered()
                self._append({**stop, **({"full_disk": True} if full else {})}, essential=True)
                self._unsigned += 1
            self.checkpoint()
        except AuditError as e:
            raise AuditError(f"{e}; {self._unsigned} records (up to seq {self._seq - 1}) stay unsigned") from None
        finally:
            self._give_back()


def forwarder(target: str | None) -> Callable[[bytes], None] | None:
    """Send each checkpoint to syslog (``/dev/log`` or ``HOST:PORT`` over UDP), best effort.

    A copy of the signed chain head off the box lets an auditor notice a log
    cut back to an earlier checkpoint, which the log alone cannot show.
    """
    if not target:
        return None
    import socket

    if target.startswith("/"):
        sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), target
    else:
        host, _, port = target.rpartition(":")
        sock, address = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), (host, int(port))  # type: ignore[assignment]

    def send(line: bytes) -> None:
        try:
            sock.sendto(b"<110>securecc-audit: " + line, address)  # facility 13 (log audit), info
        except OSError:
            pass

    return send


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
                                  "(the first line of a rotated file): its head was removed")  # fmt: skip
                return report
        else:
            assert prev.record is not None
            expected = prev.record["seq"] + 1
            if seq < expected:
                report.problem = f"{line.where}: out of order (seq {seq} after {expected - 1}): records reordered or inserted"
                return report
            if seq > expected:
                report.problem = (f"{line.where}: seq jumps from {expected - 1} to {seq}: "
                                  "records deleted, or reordered, before this line")  # fmt: skip
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
                   "the server's own log says which)")  # fmt: skip
        else:
            why = "cut, or its server died (then its next start continues it); --live for a running server"
        report.problem = f"{where}: the log ends {report.unsigned_tail} record(s) after its last checkpoint: {why}"
    return report


def records(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The records of a log, in order, skipping what is not a record."""
    for line in read_lines(paths):
        if line.record is not None:
            yield line.record
