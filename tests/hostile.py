"""A hostile client: the real wire protocol with a real ticket, and any bytes an attacker likes.

It shares nothing with securecc's client but the GSS facade: it frames,
chunks, compresses and seals by hand, so it can send what our own client
never would — job headers with any field and type, wrong blob lengths,
zstd bombs, pipelined messages — and read the server's raw answer.
"""

from __future__ import annotations

import json
import socket
import struct

import zstandard

from securecc import protocol as wire
from securecc.args import SERVER_PREPROCESSES
from securecc.gss import Initiator
from securecc.toolchain import HeaderDigests

JOB = 1  # the Job message's type code
NO_HEADERS = HeaderDigests().of([])
STATUS_REQUEST = 6


def job_header(**fields: object) -> dict[str, object]:
    """A Job header as the server expects it, with ``fields`` changed."""
    header: dict[str, object] = {"compiler": "gcc", "args": [], "language": "cpp-output", "mode": "-c", "cwd": "/src",
                                 "source_path": "a.c", "environment": {}, "include_paths": [], "compiler_identity": "",
                                 "system_headers": [], "system_digest": "", "output_path": "", "directories": []}
    header.update(fields)
    if header["language"] in SERVER_PREPROCESSES and "system_digest" not in fields:
        header["system_digest"] = NO_HEADERS  # as a client sends for a file that includes nothing
    return header


def message(code: int, header: dict[str, object], blobs: list[bytes]) -> bytes:
    """``u8 type | u32 header length | JSON header | blobs``, the blob lengths listed as given."""
    body = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    return struct.pack(">BI", code, len(body)) + body + b"".join(blobs)


class Hostile:
    """One authenticated connection to ``port`` as whoever the environment's ticket names."""

    def __init__(self, port: int, service: str = "securecc/localhost@TEST.REALM", timeout: float = 60) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = wire.Connection()
        initiator = Initiator(service)
        self.sock.sendall(wire.hello() + wire.token(initiator.step() or b""))
        while not initiator.complete:
            for event in self._events():
                if isinstance(event, wire.TokenReceived):
                    reply = initiator.step(event.token)
                    if reply:
                        self.sock.sendall(wire.token(reply))
                elif isinstance(event, wire.ErrorReceived):
                    raise ConnectionError(event.message)
        self.session = initiator.session()
        self.reader.secure(self.session.wrap, self.session.unwrap)

    def _events(self) -> list[wire.Event]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        return self.reader.receive_data(data)

    def seal(self, data: bytes, compressed: bool = False) -> bytes:
        """Chunk and wrap raw message bytes as the protocol does (flags: last, compressed)."""
        flags = wire.COMPRESSED if compressed else 0
        frames, chunks = [], [data[i : i + wire.CHUNK] for i in range(0, max(len(data), 1), wire.CHUNK)]
        for n, chunk in enumerate(chunks):
            last = wire.LAST if n == len(chunks) - 1 else 0
            frames.append(wire.frame(wire.Kind.SEALED, self.session.wrap(bytes([last | flags]) + chunk)))
        return b"".join(frames)

    def send(self, raw: bytes, compressed: bool = False) -> None:
        if compressed:
            raw = zstandard.ZstdCompressor(level=19).compress(raw)
        self.sock.sendall(self.seal(raw, compressed))

    def reply(self) -> wire.Message:
        """The next message other than a heartbeat."""
        while True:
            for event in self._events():
                assert isinstance(event, wire.MessageReceived), event
                if not isinstance(event.message, wire.Alive):
                    return event.message

    def job(self, blobs: tuple[bytes, bytes] = (b"int x;\n", b""), includes: list[bytes] = (), **fields: object) -> wire.Message:
        """Send one Job with ``fields`` over the defaults and return the server's answer."""
        self.send(message(JOB, job_header(**fields), [*blobs, *includes]))
        return self.reply()

    def close(self) -> None:
        self.sock.close()
