"""The small typed protocol between the server's front and its job handler, sans-IO.

Each message is one Int32-prefixed string (Twisted's ``Int32StringReceiver``
frames them on both sides): ``u32 header length | JSON header | blobs``,
the header naming the message (``op``) and listing its blob lengths.  The
front sends only values :mod:`securecc.server.jobspec` validated; the handler's
answers are bounded by its caps and checked again here.

front → handler: ``start`` (settings), ``run`` (one job's spec and files),
``kill``, ``cache-get``, ``cache-put``, ``cache-drop``.
handler → front: ``ready`` / ``fatal``, ``done`` (an outcome), ``cache-entry``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

LINK_FD = 3
"""The handler's end of the socketpair, in the handler."""
MAX_LINK_MESSAGE = 2**31 - 1
"""Int32StringReceiver's bound; the front's inputs and the handler's outputs are capped below it."""
_LEN = struct.Struct(">I")
OPS = {
    "start": {"settings": dict},
    "ready": {},
    "fatal": {"error": str},
    "run": {"id": str, "spec": dict, "files": list, "timeout": (int, float), "output_cap": int},
    "kill": {"id": str, "why": str},
    "done": {"id": str, "exit_status": int, "ended_by": (str, type(None))},
    "cache-get": {"id": str, "key": str},
    "cache-entry": {"id": str, "producer": (dict, type(None))},
    "cache-put": {"key": str, "producer": dict},
    "cache-drop": {"key": str},
}


class LinkError(Exception):
    """A malformed message between front and handler: the link is dropped."""


def pack(op: str, blobs: list[bytes | None] = (), **fields: Any) -> bytes:
    """One message: ``op`` with its fields and blobs (None stays None)."""
    header = json.dumps({"op": op, **fields, "blobs": [None if b is None else len(b) for b in blobs]}).encode()
    return b"".join([_LEN.pack(len(header)), header, *(b for b in blobs if b)])


def unpack(data: bytes) -> tuple[dict[str, Any], list[bytes | None]]:
    """The header (fields type-checked against :data:`OPS`) and the blobs of one message."""
    try:
        (size,) = _LEN.unpack_from(data)
        header = json.loads(data[_LEN.size : _LEN.size + size])
        fields = OPS[header["op"]]
        lengths = header.pop("blobs")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise LinkError(f"bad handler message: {e!r}") from None
    if set(header) != {"op", *fields} or not all(isinstance(header[k], t) for k, t in fields.items()):
        raise LinkError(f"bad {header['op']} message")
    blobs: list[bytes | None] = []
    offset = _LEN.size + size
    for length in lengths if isinstance(lengths, list) else [-1]:
        if length is None:
            blobs.append(None)
            continue
        if not isinstance(length, int) or length < 0 or offset + length > len(data):
            raise LinkError("bad blob length")
        blobs.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise LinkError("message length does not match its blobs")
    return header, blobs
