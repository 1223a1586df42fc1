"""What the service knows of a client's connection: who, from where, until when, and whether it is still there.

Both protocols make one after the handshake and hand it to
:meth:`~securecc.server.service.CompileService.run` with each job; the
service never sees the Twisted protocol object.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class Session:
    principal: str
    peer: str  # host:port
    expires: float  # on the service's clock: when the ticket that opened the session ends
    transport: Any = None  # its socket is peeked to tell whether the client has gone (see :meth:`gone`)
    protocol: str | None = None  # its jobs' records name a protocol other than the native one ("distcc")
    payload: str | None = None  # ... and say "cleartext" when its jobs came unsealed
    server: str = ""  # the service principal the client authenticated to: what this server signs its results as
    cancelled: bool = False
    _on_cancel: Callable[[str], None] | None = None

    def gone(self) -> bool:
        """The client has left: noticed already, or its FIN or RST waiting unread in the socket (as when
        this process was frozen meanwhile: the reactor has not seen it yet)."""
        if self.cancelled:
            return True
        handle = getattr(self.transport, "getHandle", None)
        if handle is None:
            return False
        try:
            return handle().recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def while_running(self, kill: Callable[[str], None] | None) -> None:
        """What to call, with why, if the session ends while its job runs (None: nothing runs now)."""
        self._on_cancel = kill
        if kill is not None and self.cancelled:
            kill("disconnect")

    def cancel(self, why: str = "disconnect") -> bool:
        """The session ends (the connection is lost, or its principal's access was revoked): kill what runs for it,
        its record saying ``ended_by: why``; True if something did."""
        self.cancelled = True
        kill, self._on_cancel = self._on_cancel, None
        if kill is not None:
            kill(why)
        return kill is not None
