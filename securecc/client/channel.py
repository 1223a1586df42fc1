"""The client's end of one connection to a server: connect, authenticate, send jobs, read replies.

Blocking sockets with deadlines (the client runs once per compile, no event
loop), the handshake of :mod:`securecc.protocol` and :mod:`securecc.gss`,
and the failures that make a job compile locally instead.  Imports are taken
when a connection is really made, so a job that stays local never pays for
them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # for the types only: a job that stays local never imports these
    import socket

    import gssapi
    from _typeshed import FileDescriptorLike

    from securecc import protocol as wire
    from securecc.client.hosts import Host
    from securecc.handshake import InitiatorContext


class Timeouts(NamedTuple):
    connect: float = 2.0
    io: float = 8.0  # a server sends Alive every 2 s while it compiles: four missed mean it hung (or froze)
    handshake: float = 5.0  # a healthy server answers a handshake in milliseconds
    kdc: float = 2.0  # a ticket from a healthy KDC takes ms (a dead first KDC: 1 s to the next); libkrb5 waits ~27 s


DEFAULT_TIMEOUTS = Timeouts()


class RemoteFailure(Exception):
    """The job could not be done remotely; compile locally and say why."""

    quiet = False  # said only with SECURECC_VERBOSE


class FailedRemotely(RemoteFailure):
    """The server's compile failed.  The local compile gives the verdict and the messages, as distcc does:
    an error of the user's prints exactly what gcc prints here, and one of the server's costs nothing."""

    quiet = True


class KdcUnavailable(RemoteFailure):
    """No service ticket: the KDC did not answer in time or could not be reached (``pending``: a request
    for this server is still out).  Not the server's fault: the next server may have a cached ticket."""

    def __init__(self, message: str, pending: bool = False) -> None:
        super().__init__(message)
        self.pending = pending


class HostFailure(RemoteFailure):
    """This host failed (unreachable, silent, gone): back it off and try another."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Unattested(HostFailure):
    """This host's result failed its attestation (securecc.attest): a misbehaving server, backed off like a dead one."""


class Cancelled(Exception):
    """The caller went away (^C, make killed it): drop the job; closing the connection kills the compile."""


class Channel:
    """One authenticated, sealed connection to a server (blocking sockets).

    ``expires`` is when its GSS context does (monotonic clock): the ticket's
    end.  The agent keeps a channel for many jobs until shortly before then.
    """

    def __init__(self, host: Host, io_timeout: float | None = None, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        from securecc import protocol as wire

        self.host = host
        self.timeouts = timeouts._replace(io=io_timeout) if io_timeout else timeouts
        self.wire = wire.Connection()
        self.expires = 0.0
        self.server = ""  # the server's principal as the completed handshake names it: what its results are signed as
        self.sock: socket.socket | None = None  # connected by authenticate() once it holds the first token: never while the KDC is asked

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise HostFailure(f"no connection to {self.host.name}")
        return self.sock

    def _connect(self) -> socket.socket:
        import socket

        try:
            sock = socket.create_connection((self.host.name, self.host.port), timeout=min(self.timeouts.connect, self.timeouts.io))
        except OSError as e:
            raise HostFailure(f"cannot connect to {self.host.name}:{self.host.port}: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _events(self, timeout: float, watch: FileDescriptorLike | None = None) -> list[wire.Event]:
        from securecc import protocol as wire

        sock = self._socket()
        while True:
            if watch is not None:
                import select

                ready, _, _ = select.select([sock, watch], [], [], timeout)
                if watch in ready:
                    raise Cancelled()
                if not ready:
                    raise HostFailure(f"{self.host.name} did not answer within {timeout:g} s", timed_out=True)
            sock.settimeout(timeout)
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                raise HostFailure(f"{self.host.name} did not answer within {timeout:g} s", timed_out=True) from None
            except OSError as e:
                raise HostFailure(f"connection to {self.host.name} failed: {e.strerror or e}") from None
            if not data:
                raise HostFailure(f"{self.host.name} closed the connection")
            try:
                events = self.wire.receive_data(data)
            except wire.ProtocolError as e:
                raise HostFailure(f"bad reply from {self.host.name}: {e}") from None
            if events:
                return events

    def authenticate(self, credentials: gssapi.Credentials | None = None, initiator: InitiatorContext | None = None) -> None:
        """Authenticate and seal; ``initiator`` (a :class:`securecc.handshake.InitiatorContext`) replaces
        the Kerberos one made from ``credentials``."""
        from securecc import handshake
        from securecc import protocol as wire
        from securecc.client import tickets

        if initiator is None:
            from securecc.gss import Initiator

            initiator = Initiator(self.host.target, credentials)
        try:
            first = tickets.first_token(initiator, self.timeouts.kdc)
        except tickets.NoAnswer as e:
            raise KdcUnavailable(str(e), pending=e.pending) from None
        except handshake.AuthenticationFailure as e:
            raise (KdcUnavailable if e.kdc_down else RemoteFailure)(str(e)) from None
        sock = self.sock = self._connect()
        steps = handshake.ClientHandshake(self.wire, initiator)
        try:
            sock.sendall(steps.opening(first))
            while not steps.done:
                for event in self._events(min(self.timeouts.io, self.timeouts.handshake)):
                    reply = steps.receive(event)
                    if reply:
                        sock.sendall(reply)
            self.expires, self.server = time.monotonic() + initiator.lifetime, initiator.server
        except handshake.Refused as e:
            raise RemoteFailure(f"{self.host.name} {e}") from None
        except handshake.AuthenticationFailure as e:
            raise RemoteFailure(str(e)) from None
        except wire.ProtocolError as e:
            raise HostFailure(f"bad reply from {self.host.name}: {e}") from None
        except OSError as e:
            raise HostFailure(f"connection to {self.host.name} failed: {e.strerror or e}") from None

    def call(self, message: wire.Message, watch: FileDescriptorLike | None = None, within: float | None = None) -> wire.Message:
        """Send ``message`` (a job, a status request), return the reply; ``watch`` readable (the caller gone) raises Cancelled.
        ``within``: the seconds the reply may take however many Alive come first (a job's may take as long as it compiles)."""
        from securecc import protocol as wire

        deadline = None if within is None else time.monotonic() + within
        sock = self._socket()
        try:
            sock.settimeout(self.timeouts.io)
            sock.sendall(self.wire.seal(message))
        except OSError as e:
            raise HostFailure(f"sending the job to {self.host.name} failed: {e.strerror or e}") from None
        while True:
            for event in self._events(self.timeouts.io, watch):
                if not isinstance(event, wire.MessageReceived):
                    raise HostFailure(f"unexpected {type(event).__name__} from {self.host.name}")
                if not isinstance(event.message, wire.Alive):
                    return self._attested(message, event.message)
                if deadline is not None and time.monotonic() >= deadline:
                    raise HostFailure(f"{self.host.name} sent no answer within {within:g} s", timed_out=True)

    def _attested(self, sent: wire.Message, reply: wire.Message) -> wire.Message:
        """A job's result only when its attestation holds (:func:`securecc.attest.check`); pinning is the caller's."""
        from securecc import protocol as wire

        if isinstance(sent, wire.Job) and isinstance(reply, wire.Result):
            from securecc import attest

            try:
                attest.check(reply, sent, self.server, None)
            except attest.BadAttestation as e:
                raise Unattested(f"the result from {self.host.name} fails its attestation: {e}") from None
        return reply

    def idle_and_open(self) -> bool:
        """Still connected with nothing pending: a server that closed an idle connection shows EOF."""
        import select

        return not select.select([self._socket()], [], [], 0)[0]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
