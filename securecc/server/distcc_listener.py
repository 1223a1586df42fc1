"""Stock distcc clients: their GSS handshake and one job per connection, through the same stages."""

from __future__ import annotations

import socket

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from securecc import args as argpolicy
from securecc import protocol as wire
from securecc.audit import AuditError, Decision, JobRecord
from securecc.gss import DISTCC_FLAGS, Acceptor, GSSFailure
from securecc.server import distcc_wire as distcc
from securecc.server.service import CompileService
from securecc.server.session import Session


class DistccProtocol(protocol.Protocol):
    """A stock distcc 3.4 client: its GSS handshake, one v1/v2 job, the same stages as a native job.

    Refusals close the connection without a reply, as distccd does: the
    client then compiles locally.  The job stream is not wrapped (the stock
    client cannot), so records say ``payload: cleartext``.
    """

    _log = Logger()

    def __init__(self, service: CompileService, acceptor: Acceptor) -> None:
        self.service = service
        self.parser = distcc.Parser(service.config.max_input)
        self.context = acceptor.new_context(DISTCC_FLAGS)
        self.state = "star"
        self.principal: str | None = None
        self.session: Session | None = None  # once authenticated
        self.lost = False
        self.peer = "?"
        self._timer = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.transport.setTcpNoDelay(True)
        self._timer = self.service.clock.callLater(self.service.config.handshake_timeout, self._drop, "handshake timed out")

    def _drop(self, why: str) -> None:
        self._log.info("distcc {peer}: {why}; dropping", peer=self.peer, why=why)
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:  # the client's 12-byte headers come one write at a time: ACK at once, not after 40 ms
            self.transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except (AttributeError, OSError):
            pass
        try:
            self.parser.feed(data)
            self._advance()
        except (distcc.DistccError, GSSFailure) as e:
            if isinstance(e, GSSFailure):
                self.service.auth_failed(self.peer, e.detail or str(e), protocol="distcc")
            self._drop(getattr(e, "detail", None) or str(e))  # the log's: a distcc peer is told nothing

    def _advance(self) -> None:
        if self.state == "star" and self.parser.handshake_byte():
            self.transport.write(b"*")  # at once: the client waits only 1 s
            self.state = "gss"
        while self.state == "gss":
            token = self.parser.gss_token()
            if token is None:
                return
            reply = self.context.step(token)
            out = distcc.item(b"TLEN", len(reply), reply) if reply else b""
            if self.context.complete:
                self.principal = self.context.principal
                self.session = Session(self.principal, self.peer, self.service.clock.seconds() + self.context.lifetime,
                                       self.transport, protocol="distcc", payload="cleartext", server=self.context.server)
                self.service.sessions.add(self.session)
                self.authenticated()
                self.transport.write(out + b"y")  # tokens and verdict in one write
                self.state = "request"
            elif out:
                self.transport.write(out)
        if self.state == "request":
            request = self.parser.request()
            if request is not None:
                self.state = "running"
                self._cancel_timer()
                self._run(request)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _run(self, request: distcc.Request) -> None:
        session = self.session
        assert session is not None
        try:
            job = distcc_job(request, self.service)
        except argpolicy.NotDistributable as e:  # not something a server runs: refused and audited, like any job
            record = JobRecord(principal=session.principal, peer=session.peer, protocol=session.protocol, payload=session.payload,
                               args=request.argv, decision=Decision.REFUSED, reason=wire.Reason.ARGUMENT_REFUSED, detail=str(e))
            try:
                self.service.audit.write(**record.to_fields())
            except AuditError:
                pass
            self.transport.loseConnection()
            return
        d = self.service.run(session, job)
        d.addCallback(self._reply, request.version)
        d.addErrback(lambda f: (self._log.failure("distcc job failed", f), self.transport.loseConnection()))

    def _reply(self, message: wire.Message, version: int) -> None:
        if self.lost:
            return
        if isinstance(message, wire.Result):
            self.transport.write(distcc.reply(version, distcc.wait_status(message.exit_status), message.stdout,
                                              message.stderr, message.output))
        self.transport.loseConnection()  # refused or busy: no reply, the client compiles locally

    def authenticated(self) -> None:
        """Set by the factory: this connection no longer counts against the pre-auth caps."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        self.authenticated()
        self._cancel_timer()
        if self.session is not None:
            self.service.sessions.discard(self.session)
            self.session.cancel()


def distcc_job(request: distcc.Request, service: CompileService) -> wire.Job:
    """A native job from a distcc request; raises NotDistributable, saying why, when it cannot be one.

    distcc sends argv with the original names (``gcc -c x.c -o x.o``) and
    the fully preprocessed text; it rewrites ``gcc`` to ``<target>-gcc``.
    It cannot say which compiler version it has: the server's is assumed.
    """
    if not request.argv:
        raise argpolicy.NotDistributable("empty argv")
    name = request.argv[0].removeprefix("/usr/bin/").removeprefix("/bin/")
    compilers = service.config.compilers
    if name not in compilers:
        name = next((n for n in compilers if name.endswith("-" + n) and n in compilers), name)
    plan = argpolicy.plan(request.argv[1:])
    language = argpolicy.PREPROCESSED.get(plan.language, plan.language)
    identity = service.identities.get(compilers[name].path, "") if name in compilers else ""
    return wire.Job(name, plan.remote_args, language, plan.mode, "/build", plan.source, request.source,
                    compiler_identity=identity)
