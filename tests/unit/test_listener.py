"""The native protocol's Twisted glue in memory: deadlines on a task.Clock, the handshake through
JobProtocol with the in-memory GSS, and a refusal that reaches the audit log; no KDC, no slapd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import protocol, task, threads
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.threadpool import ThreadPool

from securecc import handshake
from securecc import protocol as wire
from securecc.client.channel import Channel, RemoteFailure
from securecc.client.hosts import Host
from securecc.sandbox import Limits, Settings
from securecc.server.aclfile import AclFile
from securecc.server.auditlog import AuditLog
from securecc.server.config import AuditConfig, Compiler, ServerConfig
from securecc.server.directory import LdapConfig
from securecc.server.listener import JobProtocol
from securecc.server.service import CompileService
from securecc.testing import MemoryAcceptor, MemoryDirectory, MemoryInitiator

SERVER, ALICE = "securecc/build1@TEST.REALM", "alice@TEST.REALM"


@pytest.fixture
def config(tmp_path: Path) -> ServerConfig:
    acl = tmp_path / "acl.yaml"
    acl.write_text("realms: [TEST.REALM]\nallow:\n  - principal: alice\n")
    return ServerConfig(
        listen_host="127.0.0.1", listen_port=0, principal=SERVER, keytab="/nonexistent", acl=acl,
        audit=AuditConfig(tmp_path / "audit.jsonl", tmp_path / "audit.key"),
        ldap=LdapConfig(("ldap://127.0.0.1:1",), "dc=test", "ou=people", "ou=groups", bind="none"),
        compilers={"gcc": Compiler("/usr/bin/gcc", 60.0)}, scratch=tmp_path / "scratch",
        sandbox=Settings(Limits(), None, None),
    )


def service_on(config: ServerConfig, clock) -> CompileService:
    audit = AuditLog(config.audit.path, Ed25519PrivateKey.generate(), "test")
    return CompileService(config, MemoryReactorClock(), clock, AclFile(config.acl, clock), MemoryDirectory(), ThreadPool(), audit, {})


ACCEPTOR = MemoryAcceptor(SERVER, clients=frozenset({ALICE}))


def connected(config: ServerConfig) -> tuple[JobProtocol, StringTransport, task.Clock]:
    clock = task.Clock()
    proto = JobProtocol(service_on(config, clock), ACCEPTOR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def authenticated(proto: JobProtocol, transport: StringTransport, client: str = ALICE) -> handshake.ClientHandshake:
    """The client's end of the handshake, in memory, against ``proto``."""
    initiator = MemoryInitiator(client, SERVER)
    ours = handshake.ClientHandshake(wire.Connection(), initiator)
    proto.dataReceived(ours.opening(initiator.step() or b""))
    for event in ours.connection.receive_data(transport.value()):
        ours.receive(event)
    transport.clear()
    return ours


def records(config: ServerConfig) -> list[dict[str, object]]:
    return [json.loads(line) for line in config.audit.path.read_text().splitlines()]


def test_handshake_deadline(config):
    """A peer that connects and says nothing is dropped when the handshake deadline passes."""
    _proto, transport, clock = connected(config)
    clock.advance(config.handshake_timeout - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_idle_deadline_after_the_handshake(config):
    proto, transport, clock = connected(config)
    assert authenticated(proto, transport).done
    clock.advance(config.idle_timeout - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_unsupported_version_gets_a_clear_error(config):
    """A client speaking only a future version is told which version the server speaks."""
    proto, transport, _clock = connected(config)
    proto.dataReceived(wire.hello(7, 9))
    events = wire.Connection().receive_data(transport.value())
    assert events == [wire.ErrorReceived("unsupported-version", f"this server speaks version {wire.VERSION}")]
    assert transport.disconnecting


def test_token_before_hello_is_a_protocol_error(config):
    """The handshake has an order: a GSS token without a hello drops the connection."""
    proto, transport, _clock = connected(config)
    proto.dataReceived(wire.token(b"\x60\x01\x00"))
    assert transport.disconnecting and transport.value() == b""


def test_a_failed_authentication_is_told_and_audited(config):
    proto, transport, _clock = connected(config)
    with pytest.raises(handshake.AuthenticationFailure, match="may not authenticate"):
        authenticated(proto, transport, client="mallory@TEST.REALM")
    assert transport.disconnecting and proto.session is None
    [record] = records(config)
    assert (record["event"], record["decision"], record["reason"]) == ("auth", "refused", "denied:authentication-failed")


def test_an_authenticated_job_with_a_bad_path_is_refused_and_recorded(config):
    """The whole line in memory: handshake, a sealed job, the service's validation, its audit record, the reply."""
    proto, transport, _clock = connected(config)
    client = authenticated(proto, transport)
    assert proto.session is not None and proto.session.principal == ALICE
    job = wire.Job("gcc", ["-O2"], "cpp-output", "-c", "relative/dir", "t.c", b"int x;\n", compiler_identity="gcc 12")
    proto.dataReceived(client.connection.seal(job))
    [reply] = client.connection.receive_data(transport.value())
    assert isinstance(reply, wire.MessageReceived) and isinstance(reply.message, wire.Refused)
    assert reply.message.reason == wire.Reason.BAD_PATH
    [record] = records(config)
    assert (record["principal"], record["decision"], record["reason"], record["job_id"]) == (
        ALICE, "refused", "denied:bad-path", reply.message.job_id)


def test_a_job_before_the_handshake_completes_drops_the_connection(config):
    proto, transport, _clock = connected(config)
    proto.dataReceived(wire.hello())
    proto.dataReceived(wire.frame(wire.Kind.SEALED, b"\x01" * 64))
    assert transport.disconnecting and proto.session is None


@pytest_twisted.inlineCallbacks
def test_the_clients_channel_against_the_listener_on_loopback(config):
    """The client's Channel and the server's JobProtocol, both real, over a loopback socket; GSS in memory."""
    from twisted.internet import reactor

    service = service_on(config, reactor)
    factory = protocol.Factory()
    factory.buildProtocol = lambda addr: JobProtocol(service, ACCEPTOR)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    host = Host("127.0.0.1", port.getHost().port, principal=SERVER)
    job = wire.Job("gcc", ["-O2"], "cpp-output", "-c", "relative/dir", "t.c", b"int x;\n", compiler_identity="gcc 12")

    def submit(client: str) -> wire.Message | str:
        channel = Channel(host)
        try:
            channel.authenticate(initiator=MemoryInitiator(client, SERVER))
            return channel.call(job)
        except RemoteFailure as e:
            return str(e)
        finally:
            channel.close()

    try:
        reply = yield threads.deferToThread(submit, ALICE)
        refused = yield threads.deferToThread(submit, "mallory@TEST.REALM")
    finally:
        yield port.stopListening()
    assert isinstance(reply, wire.Refused) and reply.reason == wire.Reason.BAD_PATH
    assert refused == "mallory@TEST.REALM may not authenticate to securecc/build1@TEST.REALM"
    assert [r["event"] for r in records(config)] == ["job", "auth"]
