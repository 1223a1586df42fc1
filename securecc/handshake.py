"""The order of a connection's handshake, sans-IO, once for both ends.

The client opens with ``HELLO`` and its first GSS token in one write; the
server answers ``HELLO`` (the chosen version) and its token; tokens go back
and forth until both contexts are complete, and then the connection is
sealed (:meth:`securecc.protocol.Connection.secure`).  Anything out of that
order is a :class:`~securecc.protocol.ProtocolError`.  The server's
``JobProtocol`` and the client's ``Channel`` feed events in and write what
comes out; neither keeps flags of its own.

The GSS contexts come in behind the small interfaces below: :mod:`securecc.gss`
has the Kerberos ones, :mod:`securecc.testing` in-memory twins, so the order
is tested without a KDC.  Nothing here imports gssapi.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from securecc import protocol as wire

UNSUPPORTED_VERSION = "unsupported-version"
AUTHENTICATION_FAILED = "authentication-failed"
"""The reason codes of a server's ``ERROR`` frame."""


class AuthenticationFailure(Exception):
    """A context could not be established; ``str()`` is one sentence for the user.

    ``token`` is an error token for the peer when the mechanism made one (the
    peer then learns *why*); ``kdc_down`` says the authority (the KDC) could
    not be reached: an outage the client backs off, not a refusal.  ``detail``:
    what only the server's log and audit record get, where an acceptor tells
    its unauthenticated peer less than it knows.
    """

    def __init__(self, message: str, token: bytes | None = None, kdc_down: bool = False, detail: str | None = None) -> None:
        super().__init__(message)
        self.token = token
        self.kdc_down = kdc_down
        self.detail = detail


class Sealing(Protocol):
    """A completed context's per-message protection: confidentiality, integrity, order."""

    def wrap(self, data: bytes) -> bytes: ...

    def unwrap(self, data: bytes) -> bytes: ...


class SecurityContext(Protocol):
    """One end's context in the making; ``step`` raises :class:`AuthenticationFailure`."""

    @property
    def complete(self) -> bool: ...

    def session(self) -> Sealing: ...


class InitiatorContext(SecurityContext, Protocol):
    principal: str  # the server's, as the client names it

    def step(self, in_token: bytes | None = None) -> bytes | None: ...

    @property
    def lifetime(self) -> float: ...

    @property
    def server(self) -> str:
        """The server's principal as the completed context names it (with its realm)."""
        ...


class AcceptorContext(SecurityContext, Protocol):
    principal: str | None  # the client's, once complete
    lifetime: float  # seconds from completion: the client's ticket's end
    server: str  # the service principal the client authenticated to, once complete

    def step(self, in_token: bytes) -> bytes | None: ...


class Acceptor(Protocol):
    """The server's credentials: a fresh context per connection."""

    def new_context(self) -> AcceptorContext: ...


class Phase(Enum):
    HELLO = "hello"  # waiting for the peer's HELLO
    TOKENS = "tokens"  # GSS tokens until the context is complete
    SESSION = "session"  # sealed: messages only
    CLOSED = "closed"  # refused; the connection is to be closed


@dataclass(frozen=True)
class Step:
    """What the server does after one handshake event: write ``data`` (all at once), then close if ``close``.
    ``failure`` says why authentication failed, for the audit log."""

    data: bytes = b""
    close: bool = False
    failure: str = ""


class ServerHandshake:
    """The server's end: one HELLO, then tokens until the acceptor context completes."""

    def __init__(self, connection: wire.Connection, context: AcceptorContext) -> None:
        self.connection = connection
        self.context = context
        self.phase = Phase.HELLO

    def receive(self, event: wire.Event) -> Step:
        if self.phase is Phase.CLOSED:  # refused already; a client's token comes in the write of its HELLO: a
            return Step()  # protocol error now would abort the connection and drop the refusal unsent
        if self.phase is Phase.HELLO and isinstance(event, wire.HelloReceived):
            version = wire.choose_version(event)
            if version is None:
                self.phase = Phase.CLOSED
                return Step(wire.error(UNSUPPORTED_VERSION, f"this server speaks version {wire.VERSION}"), close=True)
            self.phase = Phase.TOKENS
            return Step(wire.hello(version, version))
        if self.phase is Phase.TOKENS and isinstance(event, wire.TokenReceived):
            try:
                reply = self.context.step(event.token)
            except AuthenticationFailure as e:
                self.phase = Phase.CLOSED
                sent = (wire.token(e.token) if e.token else b"") + wire.error(AUTHENTICATION_FAILED, str(e))
                return Step(sent, close=True, failure=e.detail or str(e))
            if self.context.complete:
                self._seal(self.context.session())
            return Step(wire.token(reply) if reply else b"")
        raise wire.ProtocolError(f"unexpected {type(event).__name__} during the handshake ({self.phase.value})")

    def _seal(self, sealing: Sealing) -> None:
        self.connection.secure(sealing.wrap, sealing.unwrap)
        self.phase = Phase.SESSION

    @property
    def done(self) -> bool:
        return self.phase is Phase.SESSION


class Refused(Exception):
    """The server ended the handshake: it speaks no version of ours, or it refused us (``str()`` says why)."""


class ClientHandshake:
    """The client's end: HELLO and the first token, then tokens until both sides are complete."""

    def __init__(self, connection: wire.Connection, context: InitiatorContext) -> None:
        self.connection = connection
        self.context = context
        self.phase = Phase.HELLO

    def opening(self, first_token: bytes) -> bytes:
        """The first write: HELLO and the context's first token."""
        return wire.hello() + wire.token(first_token)

    def receive(self, event: wire.Event) -> bytes:
        """Consume one event; returns what to send (maybe nothing).  Raises :class:`Refused`, the context's
        :class:`AuthenticationFailure`, or ProtocolError for a server out of order."""
        if isinstance(event, wire.ErrorReceived) and self.phase is not Phase.SESSION:
            self.phase = Phase.CLOSED
            raise Refused(f"refused the connection: {event.message}")
        if self.phase is Phase.HELLO and isinstance(event, wire.HelloReceived):
            if wire.choose_version(event) is None:
                self.phase = Phase.CLOSED
                raise Refused(f"speaks protocol version {event.max_version} only")
            self.phase = Phase.TOKENS
            return self._maybe_done(b"")
        if self.phase is Phase.TOKENS and isinstance(event, wire.TokenReceived) and not self.context.complete:
            reply = self.context.step(event.token)
            return self._maybe_done(wire.token(reply) if reply else b"")
        raise wire.ProtocolError(f"unexpected {type(event).__name__} during the handshake ({self.phase.value})")

    def _maybe_done(self, send: bytes) -> bytes:
        if self.phase is Phase.TOKENS and self.context.complete:
            sealing = self.context.session()
            self.connection.secure(sealing.wrap, sealing.unwrap)
            self.phase = Phase.SESSION
        return send

    @property
    def done(self) -> bool:
        return self.phase is Phase.SESSION
