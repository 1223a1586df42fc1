"""distcc's wire protocol (v1, v2 with LZO) and its GSS-API handshake, sans-IO.

For stock distcc 3.4 clients built with GSS-API (Debian's are), so a site can
move users over gradually.  Facts from ``notes/distcc-protocol.md``: every
item is a 4-letter token plus 8 lowercase hex digits (a value, or the length
of the bytes that follow); the handshake is ``*`` / ``*``, then ``TLEN``
tokens, then ``y`` or ``n``; a request is ``DIST ARGC ARGV… DOTI``; a reply
``DONE STAT SERR SOUT DOTO`` with ``STAT`` a wait(2) status.  In v2 every
bulk body is one raw LZO1X-1 block.

What this module adds to distccd: every length is capped before anything is
buffered (distccd mallocs a pre-authentication ``TLEN`` of up to 2 GiB), and
the parser raises :class:`DistccError` on anything unexpected.  The stock
client never wraps the job stream, so it travels in the clear: the server
marks such jobs ``payload: cleartext`` and the README says where this port
belongs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TOKEN = 64 * 1024  # a GSS token; krb5 AP-REQs are ~1-12 KiB
MAX_ARGC = 4096
MAX_ARG = 64 * 1024


class DistccError(Exception):
    """The peer broke the distcc protocol or a cap: drop the connection."""


@dataclass(frozen=True)
class Request:
    version: int
    argv: list[str]
    source: bytes  # the preprocessed source, decompressed


def item(token: bytes, value: int, body: bytes = b"") -> bytes:
    return token + b"%08x" % value + body


def lzo_compress(data: bytes) -> bytes:
    import lzallright

    return lzallright.LZOCompressor().compress(data) if data else b""


def lzo_decompress(data: bytes, limit: int) -> bytes:
    """A raw LZO1X block of unknown size, refused if it would decode to more than ``limit`` bytes.

    lzallright grows its buffer until the block fits (its size hint is no cap: a 360 KiB
    block of zeros is 64 MiB), so the size is bounded first: from the byte counts when that
    is enough (only zero bytes expand more than 72x: each adds 255 to a length), else by
    walking the block's instructions (~16 MB/s, only for blocks over limit/72).
    """
    import lzallright

    if not data:
        return b""
    size = 255 * data.count(0) + 72 * len(data)
    if size > limit and (size := _lzo_size(data, limit)) > limit:
        raise DistccError(f"LZO body larger than {limit} bytes")
    try:
        out = lzallright.LZOCompressor.decompress(data, output_size_hint=min(size, max(4096, 8 * len(data))))
    except lzallright.LZOError as e:
        raise DistccError(f"corrupt LZO body ({e!r})") from None
    if len(out) > limit:  # cannot happen if _lzo_size is right
        raise DistccError(f"LZO body larger than {limit} bytes")
    return out


_ZEROS = re.compile(rb"\0*")


def _lzo_size(data: bytes, limit: int) -> int:
    """At least what the LZO1X block ``data`` decodes to (or has decoded when it fails), stopping past ``limit``.

    Walks the instructions as lzallright's decoder does, without its distance checks
    (they only stop it sooner).
    """
    end, pos, out, state = len(data), 0, 0, 0
    if data[0] >= 18:  # the first byte may open with literals
        out = data[0] - 17
        pos, state = 1 + out, min(out, 4)
    while pos < end and out <= limit:
        inst = data[pos]
        pos += 1
        if inst >= 64:  # M2: a 3-8 byte match, 1 distance byte
            out += (inst >> 5) + 1
            pos += 1
        elif inst >= 16:  # M3 (32-63) or M4 (16-31): a match whose length may be extended, 2 distance bytes
            base = 7 if inst < 32 else 31
            length = (inst & base) + 2
            if length == 2:
                zeros = _ZEROS.match(data, pos).end() - pos
                pos += zeros + 1
                if pos > end:
                    break
                length += zeros * 255 + base + data[pos - 1]
            if pos + 2 > end:
                break
            distance = data[pos] | data[pos + 1] << 8
            pos += 2
            if inst < 32 and ((inst & 8) << 11) + (distance >> 2) == 0:
                break  # the end-of-stream marker
            out += length
            inst = distance  # its low bits count the literals that follow
        elif state == 0:  # a run of 4 or more literals, its length maybe extended
            length = inst + 3
            if length == 3:
                zeros = _ZEROS.match(data, pos).end() - pos
                pos += zeros + 1
                if pos > end:
                    break
                length += zeros * 255 + 15 + data[pos - 1]
            out += length
            pos += length
            state = 4
            continue
        else:  # M1: a 2-byte match (after 1-3 literals) or a 3-byte one (after a run), 1 distance byte
            out += 3 if state == 4 else 2
            pos += 1
        state = inst & 3  # then 0-3 literals
        out += state
        pos += state
    return out


class Parser:
    """Feed bytes; ask for the handshake byte, GSS tokens, then one request."""

    def __init__(self, max_input: int) -> None:
        self.max_input = max_input
        self._buffer = bytearray()
        # The most a client ever has unread: "*", one token, then its request (argv and source
        # share max_input); nothing once the request is in.
        self._room = 1 + 12 + MAX_TOKEN + 12 * (3 + MAX_ARGC) + max_input
        self._argv_read: tuple[int, list[str], int] | None = None  # the request's arguments read so far

    def feed(self, data: bytes) -> None:
        if data and len(self._buffer) + len(data) > self._room:
            raise DistccError("bytes after the request" if not self._room else "more unread bytes than a request holds")
        self._buffer += data

    def _header(self, pos: int, token: bytes, cap: int) -> int | None:
        """The value of the ``token`` header at ``pos``, checked against ``cap`` before its body is read."""
        if len(self._buffer) < pos + 12:
            return None
        name, digits = bytes(self._buffer[pos : pos + 4]), bytes(self._buffer[pos + 4 : pos + 12])
        if name != token:
            raise DistccError(f"expected {token.decode()}, got {name!r}")
        if not all(c in b"0123456789abcdef" for c in digits):
            raise DistccError(f"bad {token.decode()} value {digits!r}")
        value = int(digits, 16)
        if value > cap:
            raise DistccError(f"{token.decode()} {value} exceeds {cap}")
        return value

    def handshake_byte(self) -> bool | None:
        """True once the client's ``*`` arrived; a plain (unauthenticated) client is refused."""
        if not self._buffer:
            return None
        first = self._buffer[0]
        del self._buffer[:1]
        if first != ord("*"):
            raise DistccError("the client did not ask for authentication (this listener requires ,auth)")
        return True

    def gss_token(self) -> bytes | None:
        length = self._header(0, b"TLEN", MAX_TOKEN)
        if length is None:
            return None
        if length == 0:
            raise DistccError("empty GSS token")
        if len(self._buffer) < 12 + length:
            return None
        token = bytes(self._buffer[12 : 12 + length])
        del self._buffer[: 12 + length]
        return token

    def request(self) -> Request | None:
        """The whole request once it has arrived (caps checked as each header comes in)."""
        view, pos = self._buffer, 0

        def header(token: bytes, cap: int) -> int | None:
            nonlocal pos
            value = self._header(pos, token, cap)
            if value is not None:
                pos += 12
            return value

        version = header(b"DIST", 3)
        if version is None:
            return None
        if version not in (1, 2):
            raise DistccError(f"protocol version {version} is not offered (only 1 and 2; no pump mode)")
        argc = header(b"ARGC", MAX_ARGC)
        if argc is None:
            return None
        argv, room = [], self.max_input  # argv shares max_input with the source: else 4096 args of 64 KiB
        if self._argv_read is not None:  # resume: rescanning 4096 args per 13-byte read cost 7 s of CPU
            pos, argv, room = self._argv_read
        while len(argv) < argc:
            length = header(b"ARGV", min(MAX_ARG, room))
            if length is None or len(view) < pos + length:
                return None
            argv.append(bytes(view[pos : pos + length]).decode("utf-8", "surrogateescape"))
            pos += length
            room -= length
            self._argv_read = (pos, argv, room)
        length = header(b"DOTI", room)
        if length is None or len(view) < pos + length:
            return None
        body = bytes(view[pos : pos + length])
        del self._buffer[: pos + length]
        self._room = 0
        source = lzo_decompress(body, self.max_input) if version == 2 else body
        return Request(version, argv, source)


def reply(version: int, wait_status: int, stdout: bytes, stderr: bytes, output: bytes | None) -> bytes:
    """``DONE STAT SERR SOUT DOTO`` in one buffer (one write: no Nagle/delayed-ACK stall)."""
    pack = lzo_compress if version == 2 else (lambda b: b)
    parts = [item(b"DONE", version), item(b"STAT", wait_status)]
    for token, body in ((b"SERR", stderr), (b"SOUT", stdout), (b"DOTO", output or b"")):
        packed = pack(body)
        parts.append(item(token, len(packed), packed))
    return b"".join(parts)


def wait_status(exit_status: int) -> int:
    """Our exit status (128+N when killed by signal N) as the wait(2) status distcc expects."""
    return exit_status - 128 if exit_status > 128 else exit_status << 8
