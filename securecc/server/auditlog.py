"""The audit log's writer: one hash-chained line per record, signed checkpoints, rotation (format: :mod:`securecc.audit`).

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
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.interfaces import IReactorTime

from securecc.audit import GENESIS, VERSION, AuditError, canonical, key_id, line_hash, now_rfc3339

STANDING_RESERVE = 16 << 10  # bytes always kept for audit-recovered, server-stop and checkpoints
JOB_MARGIN = 4 << 10  # what a job's final record may add to its start record (detail, digests, figures)
ALLOCATE_AHEAD = 64 << 10  # reserve space in steps this large: a syscall per many records, not per record



@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int]:
    """libc's fallocate (the os module has only posix_fallocate, which changes the file's size)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc.fallocate


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
    clock: IReactorTime = field(kw_only=True)  # checkpoint_seconds pass on it: the reactor, whose loop calls tick
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
                                 "an audit log); move it away to start a new chain") from None
            self._seq, self._head = seq + 1, line_hash(last)
            self.previous_key = json.loads(last).get("key")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        if torn:
            os.write(self._fd, b"\n")  # the fragment stays a line of its own, never glued to a record
            self._size += 1
            self.torn_line = count
        self._unsigned = 0
        self._last_checkpoint = self.clock.seconds()
        self._lost = 0
        self._reserved = 0  # bytes promised to jobs under way
        self._allocated = self._size  # the file's blocks are ours up to here (a crash's leftovers not counted)
        try:
            self._allocate(self._size + STANDING_RESERVE)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise AuditError(f"the filesystem of {self.path} cannot reserve space for records (fallocate: "
                                 f"{e.strerror}); put the audit log on ext4, xfs, btrfs or tmpfs") from None
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
                                       "server": self.server, **start_record})) + JOB_MARGIN
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

    def write(self, reservation: Reservation | None = None, **fields: Any) -> tuple[int, str]:
        """Append one record: its seq and its line's sha256.  Raises AuditError, and only that, if it cannot be
        written or has a value JSON cannot take.

        A record without a ``reservation`` is written only if it leaves the
        room promised to jobs under way and the standing reserve intact.
        Once it is written, the write succeeded: a checkpoint or rotation
        that fails after it leaves the log unhealthy (the next write without a
        reservation, and the next job, find out) or is tried again later.
        """
        try:
            if reservation is None:  # a reserved record is written even while the log is out of room
                self.recover()
        except AuditError:
            self._lost += 1
            raise
        line = self._append(fields, reservation=reservation)
        written = (self._seq - 1, line_hash(line))
        self._unsigned += 1
        try:
            if self._unsigned >= self.checkpoint_every:
                self.checkpoint()
            if self.rotate_bytes and self._size >= self.rotate_bytes:
                self.rotate()
        except (AuditError, OSError):
            pass  # the record is written: its caller must not take it for lost (a job-start left without its end)
        return written

    def _append(self, fields: dict[str, Any], sign: bool = False, reservation: Reservation | None = None,
                essential: bool = False) -> bytes:
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
        self._last_checkpoint = self.clock.seconds()
        try:
            os.fdatasync(self._fd)
        except OSError:
            pass
        if self.forward:
            self.forward(line)

    def tick(self) -> None:
        """Called every second or so: checkpoint when records have waited long enough."""
        if self._unsigned and self.clock.seconds() - self._last_checkpoint >= self.checkpoint_seconds:
            try:
                self.checkpoint()
            except AuditError:
                pass

    def rotate(self) -> None:
        """Start a new file, unless the disk has no room for what is promised or the directory refuses the
        rename (then later).  The rename comes first: the open descriptor still writes the renamed file, which
        the checkpoint ends, and it is closed only once the new file is open, never left closed for another
        file or a client's socket to take its number and the next records."""
        free = os.statvfs(self.path.parent)
        if free.f_bavail * free.f_frsize < self._reserved + STANDING_RESERVE + ALLOCATE_AHEAD:
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        try:
            os.rename(self.path, self.path.with_name(f"{self.path.name}.{stamp}"))
        except OSError:
            return  # a directory the server's user may not write (a mistaken install): this file goes on
        self.checkpoint()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._give_back()
        self._fd = fd
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
        sock, address = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), (host, int(port))

    def send(line: bytes) -> None:
        try:
            sock.sendto(b"<110>securecc-audit: " + line, address)  # facility 13 (log audit), info
        except OSError:
            pass

    return send


