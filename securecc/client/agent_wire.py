"""What the shim and the agent say over the agent's Unix socket: the one description of it.

Three programs speak it: the C shim (``bin/securecc.c``), the Python shim
(``bin/securecc_shim.py``, which may import nothing of securecc: it runs
without ``site``) and the agent (:mod:`securecc.client.agent`, through this
module).  The shims follow this text; ``tests/unit/test_agent_wire.py``
holds the Python shim to it, and the agent tests the C shim.

**Where.**  ``DIR/agent-HEX.sock``: ``DIR`` is ``$SECURECC_AGENT_DIR``, else
``$XDG_RUNTIME_DIR/securecc``, else ``/tmp/securecc-UID``, and must be the
user's own directory with mode 0700; ``HEX`` is the 64-bit FNV-1a, 16 hex
digits, of ``PROTOCOL NUL KRB5ENV`` (:func:`agent_name`).  ``KRB5ENV`` is
the ``KRB5*`` variables as ``NAME=VALUE``, sorted by name, joined by
newlines: it decides whose tickets an agent uses, so two terminals with
different ccaches reach different agents.  A newline in a value can make two
environments join alike; the agent therefore also compares the request's
``KRB5*`` environment entries (field 7) with its own, and answers ``D`` to
any other.  Both ends check the peer's uid.

**Request** (shim to agent): the decimal size of the rest and a newline,
then these fields joined by NUL:

1. ``PROTOCOL``;
2. ``KRB5ENV``, exactly as hashed (an agent answers only its own);
3. the working directory;
4. the umask, in octal;
5. ``1`` if stderr is a terminal, else ``0``;
6. ``argc``, in decimal, then ``argc`` fields of argv (argv[0] first);
7. every environment entry, ``NAME=VALUE``, to the end.

**Reply** (agent to shim, then the agent closes):

- ``R STATUS OUTLEN ERRLEN\\n`` stdout stderr: print both, exit with STATUS;
- ``L ERRLEN\\n`` stderr ``PATH NUL ARGV0 NUL ARGV1...``: print stderr,
  then exec PATH with that argv (the job compiles locally, in the shim's
  process, so make's signals reach the compiler);
- ``D\\n``: do it yourself (direct mode).  So is a reply cut short, one the
  shim cannot parse, or none: the agent can only make a build faster.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

PROTOCOL = b"securecc-agent 2"  # 2: `securecc stats`
DIRECT = b"D\n"
_MAX_SIZE_DIGITS = 12


def kerberos_environment(environ: Mapping[str, str]) -> bytes:
    """``KRB5ENV``: the ``KRB5*`` entries of ``environ``, sorted by name, newline-joined."""
    return b"\n".join(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in sorted(environ.items()) if k.startswith("KRB5"))


def kerberos_entries(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``KRB5*`` entries themselves.  KRB5ENV may read as another environment's (a value holding a newline
    and a second entry: ``KRB5CCNAME=A\\nKRB5_CONFIG=B`` joins as the two entries do), so the agent compares
    these, the request's environment entries, with its own as well."""
    return {k: v for k, v in environ.items() if k.startswith("KRB5")}


def fnv1a(data: bytes) -> str:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def agent_name(kerberos: bytes) -> str:
    """The agent's name for ``KRB5ENV``: its socket is ``DIR/NAME.sock``."""
    return "agent-" + fnv1a(PROTOCOL + b"\0" + kerberos)


@dataclass(frozen=True)
class Request:
    kerberos: bytes
    cwd: str
    umask: int
    tty: bool
    argv: list[str]
    environ: dict[str, str]


def encode_request(request: Request) -> bytes:
    """A request as the shims send it, size line included (for tests and benches that play the shim)."""
    fields = [PROTOCOL, request.kerberos, os.fsencode(request.cwd), b"%o" % request.umask, b"1" if request.tty else b"0",
              b"%d" % len(request.argv), *map(os.fsencode, request.argv),
              *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in request.environ.items())]
    body = b"\0".join(fields)
    return b"%d\n" % len(body) + body


def parse_request(data: bytes) -> Request | None:
    """The fields after the size line; None for another protocol version.  ValueError if malformed."""
    fields = data.split(b"\0")
    if len(fields) < 6 or fields[0] != PROTOCOL:
        return None
    argc = int(fields[5])
    if argc < 0 or 6 + argc > len(fields):
        raise ValueError("argc beyond the request")
    return Request(fields[1], os.fsdecode(fields[2]), int(fields[3], 8), fields[4] == b"1",
                   [os.fsdecode(a) for a in fields[6 : 6 + argc]],
                   dict(os.fsdecode(item).partition("=")[::2] for item in fields[6 + argc :]))


def receive_request(conn: socket.socket) -> bytes:
    """A request's fields, read whole (ConnectionError if the shim stops short)."""
    header = b""
    while not header.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte or len(header) > _MAX_SIZE_DIGITS:
            raise ConnectionError("short request")
        header += byte
    size, chunks, got = int(header), [], 0
    while got < size:
        chunk = conn.recv(min(1 << 20, size - got))
        if not chunk:
            raise ConnectionError("short request")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def result(status: int, out: bytes, err: bytes) -> bytes:
    """``R``: the job's streams and exit status."""
    return b"R %d %d %d\n" % (status, len(out), len(err)) + out + err


def run_locally(err: bytes, path: str, argv: list[str]) -> bytes:
    """``L``: what to say, then the local compile for the shim to exec."""
    return b"L %d\n" % len(err) + err + b"\0".join(os.fsencode(a) for a in (path, *argv))
