"""The native protocol's Twisted glue: a connection's handshake, then its jobs one after another."""

from __future__ import annotations

import json

from twisted.internet import defer, protocol, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from securecc import protocol as wire
from securecc.acl import is_admin
from securecc.handshake import Acceptor, ServerHandshake, Step
from securecc.server.directory import DirectoryUnavailable
from securecc.server.service import CompileService
from securecc.server.session import Session


class JobProtocol(protocol.Protocol):
    """One client connection: handshake, then jobs one after another."""

    _log = Logger()

    def __init__(self, service: CompileService, acceptor: Acceptor) -> None:
        self.service = service
        self.config = service.config
        self.wire = wire.Connection(max_message=service.config.max_input + 1024 * 1024, defer_unpack=True)
        self.handshake = ServerHandshake(self.wire, acceptor.new_context())
        self.session: Session | None = None  # once authenticated
        self.busy = False
        self.lost = False
        self.peer = "?"
        self._heartbeat: task.LoopingCall | None = None
        self._timer = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self._timer = self.service.clock.callLater(self.config.handshake_timeout, self._expired, "handshake")
        self._connected = self.service.clock.seconds()

    def _expired(self, phase: str) -> None:
        self._log.info("{peer}: {phase} timed out; dropping", peer=self.peer, phase=phase)
        self._timer = None
        self.transport.abortConnection()

    def _rearm(self, seconds: float | None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.service.clock.callLater(seconds, self._expired, "idle") if seconds else None

    def dataReceived(self, data: bytes) -> None:
        try:
            for event in self.wire.receive_data(data):
                if isinstance(event, wire.PackedMessageReceived):
                    self._unpack(event)
                else:
                    self._event(event)
        except wire.ProtocolError as e:
            self._protocol_error(e)

    def _protocol_error(self, e: wire.ProtocolError) -> None:
        self._log.info("{peer}: protocol error: {error}; dropping", peer=self.peer, error=str(e))
        self.transport.abortConnection()

    def _unpack(self, event: wire.PackedMessageReceived) -> None:
        """Decompress in a thread (a bomb cannot stall the reactor); nothing more is read meanwhile."""
        if self.busy:
            raise wire.ProtocolError("a message while a job runs")
        self.busy = True
        self.transport.pauseProducing()
        d = threads.deferToThreadPool(self.service.clock, self.service.hash_pool, wire.unpack_message, event)

        def unpacked(message: wire.MessageReceived) -> None:
            self.busy = False
            self.transport.resumeProducing()
            self._event(message)

        d.addCallback(unpacked)
        d.addErrback(lambda f: f.trap(wire.ProtocolError) and self._protocol_error(f.value))

    def _event(self, event: wire.Event) -> None:
        if not self.handshake.done:
            self._handshake_step(self.handshake.receive(event))
        elif isinstance(event, wire.MessageReceived) and isinstance(event.message, wire.Job) and not self.busy:
            self._start_job(event.message)
        elif isinstance(event, wire.MessageReceived) and isinstance(event.message, wire.StatusRequest) and not self.busy:
            self._send_status()
        elif isinstance(event, wire.MessageReceived) and isinstance(event.message, wire.Revoke) and not self.busy:
            self._revoke(event.message.principal)
        elif isinstance(event, wire.MessageReceived) and isinstance(event.message, wire.Divergence) and not self.busy:
            assert self.session is not None
            self.transport.write(self.wire.seal(self.service.divergences.report(self.session, event.message)))
        else:
            raise wire.ProtocolError(f"unexpected {type(event).__name__}")

    def _handshake_step(self, step: Step) -> None:
        if step.failure:
            self._log.info("{peer}: authentication failed: {error}", peer=self.peer, error=step.failure)
            self.service.auth_failed(self.peer, step.failure)
        if step.data:
            self.transport.write(step.data)
        if step.close:
            self.transport.loseConnection()
        elif self.handshake.done:
            context = self.handshake.context
            assert context.principal is not None
            now = self.service.clock.seconds()  # a session ends with the ticket that opened it:
            self.session = Session(context.principal, self.peer, now + context.lifetime, transport=self.transport, server=context.server)
            self.service.sessions.add(self.session)
            self.service.metrics.handshake.observe(now - self._connected)
            self.authenticated()
            self._rearm(self.config.idle_timeout)

    def _start_job(self, job: wire.Job) -> None:
        assert self.session is not None
        self.busy = True
        self._rearm(None)
        clock = self.service.clock
        started = clock.seconds()
        self._heartbeat = task.LoopingCall(lambda: self.transport.write(self.wire.seal(wire.Alive(clock.seconds() - started))))
        self._heartbeat.clock = self.service.clock
        self._heartbeat.start(self.config.heartbeat, now=False)
        d = self.service.run(self.session, job)
        d.addBoth(self._stop_heartbeat)
        d.addCallback(self._reply)
        d.addErrback(self._failed)

    def _admin(self) -> defer.Deferred[bool]:
        """Whether this session's principal is one of the ACL's admins (by name, or by its groups)."""
        assert self.session is not None
        principal, acl = self.session.principal, self.service.acl.current()
        if is_admin(acl, principal, frozenset()):
            return defer.succeed(True)
        d = self.service.lookups.lookup(principal).addCallback(lambda membership: membership.groups)
        d.addErrback(lambda f: f.trap(DirectoryUnavailable) and frozenset())
        return d.addCallback(lambda groups: is_admin(acl, principal, groups))

    def _revoke(self, principal: str) -> None:
        """securecc-admin revoke: an admin ends ``principal``'s access here now; anyone else is refused."""
        assert self.session is not None
        admin = self.session.principal

        def decided(allowed: bool) -> None:
            if self.lost:
                return
            if not allowed:
                self.transport.write(self.wire.seal(wire.Refused(wire.Reason.NOT_ADMIN, f"{admin} is not an admin of this server")))
                return
            sessions, jobs = self.service.revoke(principal, "revoked:admin", by=admin)
            if not self.lost:
                self.transport.write(self.wire.seal(wire.Status(json.dumps({"revoked": principal, "sessions": sessions, "jobs": jobs}))))

        self._admin().addCallback(decided)

    def _send_status(self) -> None:
        """For securecc-monitor: this server's status; principal names only for the ACL's admins."""

        def send(admin: bool) -> None:
            current = self.service.status()
            if not admin:  # who compiles what is for admins only
                current["running"] = [{"principal": "(admins only)", "source": "(admins only)", "job_id": "", "peer": "",
                                       "compiler": job["compiler"], "started": job["started"]} for job in current["running"]]
            if not self.lost:
                self.transport.write(self.wire.seal(wire.Status(json.dumps(current))))

        self._admin().addCallback(send)

    def _stop_heartbeat(self, result: object) -> object:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return result

    def _reply(self, message: wire.Message) -> None:
        self.busy = False
        if self.lost:
            return
        self.transport.write(self.wire.seal(message))
        self._rearm(self.config.idle_timeout)

    def _failed(self, failure: Failure) -> None:
        self._log.failure("{peer}: job failed", failure, peer=self.peer)
        self.busy = False
        if not self.lost:
            self.transport.write(self.wire.seal(wire.Refused(wire.Reason.SERVER_ERROR, "internal server error")))
            self.transport.loseConnection()

    def authenticated(self) -> None:
        """Set by the factory: this connection no longer counts against the pre-auth caps."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        self.authenticated()
        self._rearm(None)
        self._stop_heartbeat(None)
        if self.session is not None:
            self.service.sessions.discard(self.session)
            if self.session.cancel():
                self._log.info("{peer}: client went away; its compile was killed", peer=self.peer)
