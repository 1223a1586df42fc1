"""The securecc wire protocol, sans-IO: bytes in, events out; no sockets, no gssapi.

Every frame is ``u32 length | u8 kind | payload`` (length counts kind and
payload, big-endian) and is refused before any buffering if it is larger than
``MAX_FRAME``, so an unauthenticated peer cannot make us allocate.

A connection has two phases:

1. Handshake, in the clear: the client sends ``HELLO`` (magic, lowest and
   highest version it speaks) and its first GSS token in one write; the server
   answers ``HELLO`` (chosen version) and its token.  ``TOKEN`` frames go back
   and forth until both GSS contexts are complete.  ``ERROR`` carries a reason
   code and a sentence when the server gives up (bad version, failed
   authentication); the connection is then closed.  The order is kept by
   :mod:`securecc.handshake`, for both ends.
2. Session: only ``SEALED`` frames.  Each holds one GSS ``wrap`` token of a
   chunk (``u8 flags | data``; bit 0 marks a message's last chunk, bit 1 a
   message sent as one zstd frame: preprocessed source shrinks 4-6x, so it
   is compressed when that pays, and unpacked with the same size cap).  The
   caller installs wrap/unwrap with :meth:`Connection.secure`; this module
   never sees keys.  Every chunk but a message's last is exactly ``CHUNK``
   bytes, so the number of chunks, too, is bounded by the message cap.  A frame that does not unwrap (tampered, replayed, out of
   order) is a :class:`ProtocolError` and the caller drops the connection.

Messages (the reassembled chunks) are ``u8 type | u32 header length | JSON
header | blobs``; the header lists the blob lengths, and every field is
type-checked on decode.  One authenticated connection can carry several jobs
one after another: nothing here is per-job state.

Why one file of ~500 lines: every byte a peer can send is parsed here, and a
reviewer reads the whole wire format in one place.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAGIC = b"securecc"
VERSION = 3
MIN_VERSION = 3  # 2: jobs name the system headers they need (Job.system_headers); 3: results are attested

MAX_FRAME = 512 * 1024
"""Largest sealed frame, header excluded."""
MAX_HANDSHAKE_FRAME = 16 * 1024
"""Largest frame before the handshake completes: a Kerberos AP-REQ, even with a PAC, is a few KiB,
so an unauthenticated peer makes us buffer no more than this."""
CHUNK = 256 * 1024
"""Plaintext bytes per sealed frame: wrap overhead is ~60 bytes per token."""
MAX_MESSAGE = 256 * 1024 * 1024
"""Default largest message (sum of a message's chunks)."""
MAX_HEADER = 64 * 1024
"""Largest JSON header inside a message."""

COMPRESS_MIN = 2048
"""Messages smaller than this go uncompressed: a frame header and the CPU would not pay."""
LAST, COMPRESSED = 1, 2  # chunk flags

JOB_ID = re.compile(r"[A-Za-z0-9_.-]{0,64}")
"""A job id as servers name jobs (16 hex digits): clients print it and keep it, so nothing else passes the wire."""

_FRAME = struct.Struct(">IB")
_HEADER = struct.Struct(">BI")


class Kind:
    HELLO = 1
    TOKEN = 2
    ERROR = 3
    SEALED = 4


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be dropped."""


# --- messages ---------------------------------------------------------------


class Reason(StrEnum):
    """Why a job did not run, or ran short: :attr:`Refused.reason` and :attr:`Busy.reason` on the wire, and the
    ``reason`` of its audit record.  One list for both ends; the ACL's own reasons (``allowed:group:NAME``,
    ``denied:not-in-group``...) come from :func:`securecc.acl.decide` and travel as they are."""

    AUTHENTICATION_FAILED = "denied:authentication-failed"
    SESSION_EXPIRED = "denied:session-expired"
    BAD_PATH = "denied:bad-path"
    ARGUMENT_REFUSED = "denied:argument-refused"
    COMPILER_NOT_OFFERED = "denied:compiler-not-offered"
    COMPILER_MISMATCH = "denied:compiler-mismatch"
    UNSUPPORTED = "denied:unsupported"
    LDAP_UNAVAILABLE = "denied:ldap-unavailable"
    AUDIT_UNAVAILABLE = "denied:audit-unavailable"
    BUSY_FULL = "busy:full"
    BUSY_PRINCIPAL_LIMIT = "busy:principal-limit"
    BUSY_FAIR_SHARE = "busy:fair-share"
    NOT_ADMIN = "denied:not-admin"
    BAD_REPORT = "denied:bad-report"  # a Divergence about a result this server did not sign
    TIMEOUT = "timeout"
    SERVER_ERROR = "server-error"

# A refusal of these says "not this server": the client tries the next one before compiling locally.
ANOTHER_HOST_MAY = frozenset({Reason.COMPILER_MISMATCH, Reason.COMPILER_NOT_OFFERED, Reason.UNSUPPORTED,
                              Reason.AUDIT_UNAVAILABLE, Reason.TIMEOUT, Reason.SERVER_ERROR})


@dataclass(frozen=True)
class Job:
    """A compile request: run ``compiler`` with ``args`` on ``source``.

    ``args`` hold neither input nor output: the server names those itself.
    ``cwd`` and ``source_path`` are where the client compiles: debug info
    names them, and the sandbox mounts ``original`` (the unpreprocessed main
    file) there so diagnostics quote the same source lines as a local build.
    ``environment`` carries the few variables that change gcc's output
    (``LC_ALL`` for its quotes, ``SOURCE_DATE_EPOCH`` for ``__DATE__``);
    the server accepts only those, see :mod:`securecc.sandbox`.
    """

    compiler: str
    args: list[str]
    language: str  # how to compile the text: "c", "c++", "cpp-output", "c++-cpp-output"
    mode: str  # "-c" (object) or "-S" (assembler)
    cwd: str
    source_path: str  # as given on the command line
    source: bytes = field(repr=False)  # the text to compile
    original: bytes = field(default=b"", repr=False)
    environment: dict[str, str] = field(default_factory=dict)
    compiler_identity: str = ""  # what the client's compiler says of itself (securecc.toolchain)
    # Jobs the server preprocesses: the project headers, at their absolute paths.
    include_paths: list[str] = field(default_factory=list)
    includes: list[bytes] = field(default_factory=list, repr=False)
    # ... and the headers of /usr they read, which the server's own must match (toolchain.HeaderDigests).
    system_headers: list[str] = field(default_factory=list)
    system_digest: str = ""
    # -gsplit-dwarf: the object's path as the client names it; the .dwo goes next to it, as gcc puts it.
    output_path: str = ""
    # Jobs the server preprocesses: directories to create that hold none of the job's files (args.lookup_directories).
    directories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """What the compiler did: its exit status, its streams and its output file."""

    exit_status: int
    stdout: bytes = field(repr=False)
    stderr: bytes = field(repr=False)
    output: bytes | None = field(repr=False)  # None when the compile failed
    job_id: str = ""
    dwo: bytes | None = field(default=None, repr=False)  # -gsplit-dwarf's .dwo
    # Signed statements of the servers behind it, the serving one's first (securecc.attest)
    attestations: list[dict[str, str]] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Refused:
    """The server will not run this job; ``reason`` is a stable code."""

    reason: str
    message: str
    job_id: str = ""


@dataclass(frozen=True)
class Busy:
    """No slot for this job now: try another server.  ``load`` of ``slots`` are running."""

    reason: str  # a Reason.BUSY_*
    load: int
    slots: int


@dataclass(frozen=True)
class Alive:
    """Sent while a job runs, so a client can tell a long compile from a hung server."""

    running: float = 0.0  # seconds so far


@dataclass(frozen=True)
class StatusRequest:
    """securecc-monitor asks what the server is doing."""

    detail: bool = True


@dataclass(frozen=True)
class Revoke:
    """An ACL admin ends ``principal``'s access on this server now: its jobs killed, its sessions closed."""

    principal: str


@dataclass(frozen=True)
class Divergence:
    """A client compiled a job's result again and got another object: it reports the result it refused.

    ``attestations`` are the result's own, as received: the server believes a
    report only about a result it signed itself.  ``local_sha256`` is the
    object the client made (None when its compile failed), ``detail`` says
    how they differ.
    """

    attestations: list[dict[str, str]]
    local_sha256: str | None
    detail: str


@dataclass(frozen=True)
class Status:
    """The server's status as JSON; principal names only for the ACL's admins."""

    json: str


Message = Job | Result | Refused | Busy | Alive | StatusRequest | Status | Revoke | Divergence

_TYPE_CODES: dict[type, int] = {Job: 1, Result: 2, Refused: 3, Busy: 4, Alive: 5, StatusRequest: 6, Status: 7, Revoke: 8,
                                 Divergence: 9}
_BLOB_FIELDS: dict[type, tuple[str, ...]] = {
    Job: ("source", "original"),
    Result: ("stdout", "stderr", "output", "dwo"),
    Refused: (),
    Busy: (),
    Alive: (),
    StatusRequest: (),
    Status: (),
    Revoke: (),
    Divergence: (),
}
_HEADER_FIELDS: dict[type, dict[str, type | tuple[type, ...]]] = {
    Job: {"compiler": str, "args": list, "language": str, "mode": str, "cwd": str, "source_path": str, "environment": dict, "include_paths": list,
          "compiler_identity": str, "system_headers": list, "system_digest": str, "output_path": str, "directories": list},
    Result: {"exit_status": int, "job_id": str, "attestations": list},
    Refused: {"reason": str, "message": str, "job_id": str},
    Busy: {"reason": str, "load": int, "slots": int},
    Alive: {"running": (int, float)},
    StatusRequest: {"detail": bool},
    Status: {"json": str},
    Revoke: {"principal": str},
    Divergence: {"attestations": list, "local_sha256": (str, type(None)), "detail": str},
}


def encode_message(message: Message) -> bytes:
    """Serialize one message (before chunking and sealing)."""
    kind = type(message)
    header: dict[str, object] = {name: getattr(message, name) for name in _HEADER_FIELDS[kind]}
    blobs = [getattr(message, name) for name in _BLOB_FIELDS[kind]]
    if isinstance(message, Job):
        blobs += message.includes
    header["blobs"] = [None if b is None else len(b) for b in blobs]
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(_TYPE_CODES[kind], len(encoded)), encoded, *(b for b in blobs if b)])


def decode_message(data: bytes) -> Message:
    """Parse one message, checking every field's type and every length."""
    if len(data) < _HEADER.size:
        raise ProtocolError("message too short")
    code, header_len = _HEADER.unpack_from(data)
    kind = next((k for k, c in _TYPE_CODES.items() if c == code), None)
    if kind is None:
        raise ProtocolError(f"unknown message type {code}")
    if header_len > MAX_HEADER or _HEADER.size + header_len > len(data):
        raise ProtocolError("bad message header length")
    try:
        header = json.loads(data[_HEADER.size : _HEADER.size + header_len])
    except (ValueError, RecursionError) as e:  # RecursionError: a header of 64 KiB of "[" nests too deep
        raise ProtocolError(f"bad message header: {e}") from None
    fields = _HEADER_FIELDS[kind]
    if not isinstance(header, dict) or set(header) != {*fields, "blobs"}:
        raise ProtocolError(f"bad {kind.__name__} header fields")
    for name, expected in fields.items():
        value = header[name]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ProtocolError(f"bad {kind.__name__}.{name}")
    if "args" in fields and not all(isinstance(a, str) for a in header["args"]):
        raise ProtocolError("bad Job.args")
    if kind is Job and not (
        all(isinstance(v, str) for v in header["environment"].values())
        and all(isinstance(p, str) for p in header["include_paths"])
        and all(isinstance(p, str) for p in header["system_headers"])
        and all(isinstance(p, str) for p in header["directories"])
    ):
        raise ProtocolError("bad Job.environment, Job.include_paths, Job.system_headers or Job.directories")
    if kind in (Result, Divergence) and not all(isinstance(a, dict) and all(isinstance(v, str) for v in a.values())
                                                for a in header["attestations"]):
        raise ProtocolError(f"bad {kind.__name__}.attestations")
    if "job_id" in fields and not JOB_ID.fullmatch(header["job_id"]):
        raise ProtocolError(f"bad {kind.__name__}.job_id")
    lengths = header.pop("blobs")
    names = _BLOB_FIELDS[kind]
    if kind is Job:
        names += ("includes",) * len(header["include_paths"])
        header["includes"] = []
    if not isinstance(lengths, list) or len(lengths) != len(names):
        raise ProtocolError("bad blob list")
    offset = _HEADER.size + header_len
    for name, length in zip(names, lengths):
        if length is None and name in ("output", "dwo"):
            header[name] = None
            continue
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ProtocolError(f"bad length for {name}")
        blob = data[offset : offset + length]
        if name == "includes":
            header[name].append(blob)
        else:
            header[name] = blob
        offset += length
    if offset != len(data):
        raise ProtocolError("message length does not match its blobs")
    message: Message = kind(**header)
    return message


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class HelloReceived:
    min_version: int
    max_version: int


@dataclass(frozen=True)
class TokenReceived:
    token: bytes = field(repr=False)


@dataclass(frozen=True)
class ErrorReceived:
    reason: str
    message: str


@dataclass(frozen=True)
class MessageReceived:
    message: Message


@dataclass(frozen=True)
class PackedMessageReceived:
    """A compressed message, to be unpacked with :func:`unpack_message` (off the event loop: it costs CPU)."""

    data: bytes = field(repr=False)
    limit: int


def unpack_message(event: PackedMessageReceived) -> MessageReceived:
    """Decompress (bounded by the message cap) and decode a packed message."""
    return MessageReceived(decode_message(_unpack(event.data, event.limit)))


Event = HelloReceived | TokenReceived | ErrorReceived | MessageReceived | PackedMessageReceived

Wrap = Callable[[bytes], bytes]


def frame(kind: int, payload: bytes) -> bytes:
    if len(payload) + 1 > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds MAX_FRAME")
    return _FRAME.pack(len(payload) + 1, kind) + payload


def hello(min_version: int = MIN_VERSION, max_version: int = VERSION) -> bytes:
    """The client's opening frame (the server answers with min == max == chosen)."""
    return frame(Kind.HELLO, MAGIC + bytes([min_version, max_version]))


def token(gss_token: bytes) -> bytes:
    if not gss_token:
        # An empty token makes MIT's acceptor answer a SPNEGO hint, not an error.
        raise ValueError("empty GSS token")
    return frame(Kind.TOKEN, gss_token)


def error(reason: str, message: str) -> bytes:
    return frame(Kind.ERROR, json.dumps({"reason": reason, "message": message[:1000]}).encode())


def choose_version(event: HelloReceived) -> int | None:
    """The highest version both sides speak, or None."""
    best = min(event.max_version, VERSION)
    return best if best >= max(event.min_version, MIN_VERSION) else None


class Connection:
    """Parses one side of a connection; emits events, builds outgoing bytes.

    ``max_message`` bounds what the peer may send us in one message (the server
    sets it from its input limit, the client from the largest object it will
    accept).
    """

    def __init__(self, max_message: int = MAX_MESSAGE, defer_unpack: bool = False) -> None:
        self.max_message = max_message
        self.defer_unpack = defer_unpack  # compressed messages come as PackedMessageReceived
        self._buffer = bytearray()
        self._wrap: Wrap | None = None
        self._unwrap: Wrap | None = None
        self._chunks: list[bytes] = []
        self._chunked = 0
        self._compressed: int | None = None  # the COMPRESSED flag of the message being received

    @property
    def is_secure(self) -> bool:
        return self._unwrap is not None

    def secure(self, wrap: Wrap, unwrap: Wrap) -> None:
        """Enter the session phase: from now on only sealed frames are valid."""
        self._wrap, self._unwrap = wrap, unwrap

    def seal(self, message: Message) -> bytes:
        """Encode, chunk and wrap one message: the bytes to write, all at once."""
        if self._wrap is None:
            raise ProtocolError("cannot send a message before the handshake completes")
        data, flags = encode_message(message), 0
        if len(data) >= COMPRESS_MIN:
            packed = _zstd().ZstdCompressor(level=1).compress(data)
            if len(packed) < len(data) * 0.9:
                data, flags = packed, COMPRESSED
        out = []
        for start in range(0, max(len(data), 1), CHUNK):
            last = LAST if start + CHUNK >= len(data) else 0
            out.append(frame(Kind.SEALED, self._wrap(bytes([last | flags]) + data[start : start + CHUNK])))
        return b"".join(out)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete."""
        self._buffer += data
        events: list[Event] = []
        while len(self._buffer) >= _FRAME.size:
            length, kind = _FRAME.unpack_from(self._buffer)
            if length < 1 or length > (MAX_FRAME if self._unwrap else MAX_HANDSHAKE_FRAME):
                raise ProtocolError(f"frame length {length} out of bounds")
            if len(self._buffer) < 4 + length:
                break
            payload = bytes(self._buffer[_FRAME.size : 4 + length])
            del self._buffer[: 4 + length]
            event = self._frame_received(kind, payload)
            if event is not None:
                events.append(event)
        return events

    def _frame_received(self, kind: int, payload: bytes) -> Event | None:
        if self._unwrap is not None:
            if kind != Kind.SEALED:
                raise ProtocolError(f"unexpected frame kind {kind} after the handshake")
            return self._sealed_received(payload)
        if kind == Kind.HELLO:
            if len(payload) != len(MAGIC) + 2 or not payload.startswith(MAGIC):
                raise ProtocolError("not a securecc peer (bad hello)")
            return HelloReceived(payload[-2], payload[-1])
        if kind == Kind.TOKEN:
            if not payload:
                raise ProtocolError("empty GSS token")
            return TokenReceived(payload)
        if kind == Kind.ERROR:
            try:
                body = json.loads(payload)
                return ErrorReceived(str(body["reason"]), str(body["message"]))
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: "[[[[..." nests too deep
                raise ProtocolError("malformed error frame") from None
        raise ProtocolError(f"unexpected frame kind {kind} during the handshake")

    def _sealed_received(self, payload: bytes) -> Event | None:
        assert self._unwrap is not None
        try:
            plain = self._unwrap(payload)
        except Exception as e:  # any failure to unwrap is a rejected frame
            raise ProtocolError(f"sealed frame rejected: {e}") from None
        if not plain or plain[0] & ~(LAST | COMPRESSED):
            raise ProtocolError("bad chunk flags")
        if self._compressed not in (None, plain[0] & COMPRESSED):
            raise ProtocolError("compression flag changed within a message")
        self._compressed = plain[0] & COMPRESSED
        if not plain[0] & LAST and len(plain) - 1 != CHUNK:
            raise ProtocolError("short chunk before a message's last")  # else empty chunks could pile up
        self._chunked += len(plain) - 1
        if self._chunked > self.max_message:
            raise ProtocolError(f"message exceeds {self.max_message} bytes")
        self._chunks.append(plain[1:])
        if not plain[0] & LAST:
            return None
        data, compressed = b"".join(self._chunks), self._compressed
        self._chunks, self._chunked, self._compressed = [], 0, None
        if compressed:
            packed = PackedMessageReceived(data, self.max_message)
            return packed if self.defer_unpack else unpack_message(packed)
        return MessageReceived(decode_message(data))


def _zstd() -> Any:
    """zstandard, imported on first use: a message too small to compress never pays for it (5 ms)."""
    import zstandard

    return zstandard


def _unpack(data: bytes, limit: int) -> bytes:
    """A zstd frame's content, reading at most ``limit`` bytes of it: a small bomb cannot make us allocate."""
    import io

    zstandard = _zstd()
    parts, size = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            while part := reader.read(CHUNK):
                size += len(part)
                if size > limit:
                    raise ProtocolError(f"message exceeds {limit} bytes once decompressed")
                parts.append(part)
    except zstandard.ZstdError as e:
        raise ProtocolError(f"bad compressed message: {e}") from None
    return b"".join(parts)
