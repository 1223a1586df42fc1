"""The native protocol's Twisted glue in memory: deadlines on a task.Clock, the handshake through
JobProtocol with the in-memory GSS, and a refusal that reaches the audit log; no KDC, no slapd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol, threads
from twisted.internet.testing import StringTransport

from securecc import handshake
from securecc import protocol as wire
from securecc.audit import records
from securecc.client.channel import Channel, RemoteFailure
from securecc.client.hosts import Host
from securecc.server.listener import JobProtocol
from securecc.testing import MemoryAcceptor, MemoryInitiator, MemoryService, memory_service

SERVER, ALICE = "securecc/localhost@TEST.REALM", "alice@TEST.REALM"
ACCEPTOR = MemoryAcceptor(SERVER, clients=frozenset({ALICE}))


@pytest.fixture
def memory(tmp_path: Path) -> MemoryService:
    return memory_service(tmp_path)


def connected(memory: MemoryService) -> tuple[JobProtocol, StringTransport, Any]:
    proto = JobProtocol(memory.service, ACCEPTOR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, memory.clock


def authenticated(proto: JobProtocol, transport: StringTransport, client: str = ALICE) -> handshake.ClientHandshake:
    """The client's end of the handshake, in memory, against ``proto``."""
    initiator = MemoryInitiator(client, SERVER)
    ours = handshake.ClientHandshake(wire.Connection(), initiator)
    proto.dataReceived(ours.opening(initiator.step() or b""))
    for event in ours.connection.receive_data(transport.value()):
        ours.receive(event)
    transport.clear()
    return ours


def test_handshake_deadline(memory):
    """A peer that connects and says nothing is dropped when the handshake deadline passes."""
    _proto, transport, clock = connected(memory)
    clock.advance(memory.service.config.handshake_timeout - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_idle_deadline_after_the_handshake(memory):
    proto, transport, clock = connected(memory)
    assert authenticated(proto, transport).done
    clock.advance(memory.service.config.idle_timeout - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_unsupported_version_gets_a_clear_error(memory):
    """A client speaking only a future version is told which version the server speaks."""
    proto, transport, _clock = connected(memory)
    proto.dataReceived(wire.hello(7, 9))
    events = wire.Connection().receive_data(transport.value())
    assert events == [wire.ErrorReceived("unsupported-version", f"this server speaks version {wire.VERSION}")]
    assert transport.disconnecting


def test_a_refusal_reaches_a_real_client_whose_token_follows_its_hello(memory):
    """A client writes HELLO and its first token at once: the token, arriving after the server refused the
    version, must not turn the refusal into an abort (a reset, which drops the ERROR frame unsent)."""
    proto, transport, _clock = connected(memory)
    initiator = MemoryInitiator(ALICE, SERVER)
    proto.dataReceived(wire.hello(7, 9) + wire.token(initiator.step() or b""))
    events = wire.Connection().receive_data(transport.value())
    assert events == [wire.ErrorReceived("unsupported-version", f"this server speaks version {wire.VERSION}")]
    assert transport.disconnecting and not transport.disconnected  # closed after the write, not aborted
    assert proto.session is None


def test_a_client_refused_its_authentication_is_told_why_whatever_follows(memory):
    proto, transport, _clock = connected(memory)
    initiator = MemoryInitiator("mallory@TEST.REALM", SERVER)
    proto.dataReceived(wire.hello() + wire.token(initiator.step() or b"") + wire.token(b"MEMORY-REQ {}") + wire.hello())
    events = wire.Connection().receive_data(transport.value())
    assert events[-1] == wire.ErrorReceived("authentication-failed", f"mallory@TEST.REALM may not authenticate to {SERVER}")
    assert transport.disconnecting and not transport.disconnected and proto.session is None
    [record] = records([memory.log])
    assert record["event"] == "auth"  # one record: what followed was not a second attempt


def test_token_before_hello_is_a_protocol_error(memory):
    """The handshake has an order: a GSS token without a hello drops the connection."""
    proto, transport, _clock = connected(memory)
    proto.dataReceived(wire.token(b"\x60\x01\x00"))
    assert transport.disconnecting and transport.value() == b""


def test_a_failed_authentication_is_told_and_audited(memory):
    proto, transport, _clock = connected(memory)
    with pytest.raises(handshake.AuthenticationFailure, match="may not authenticate"):
        authenticated(proto, transport, client="mallory@TEST.REALM")
    assert transport.disconnecting and proto.session is None
    [record] = records([memory.log])
    assert (record["event"], record["decision"], record["reason"]) == ("auth", "refused", "denied:authentication-failed")


def test_an_authenticated_job_with_a_bad_path_is_refused_and_recorded(memory):
    """The whole line in memory: handshake, a sealed job, the service's validation, its audit record, the reply."""
    proto, transport, _clock = connected(memory)
    client = authenticated(proto, transport)
    assert proto.session is not None and proto.session.principal == ALICE
    job = wire.Job("gcc", ["-O2"], "cpp-output", "-c", "relative/dir", "t.c", b"int x;\n", compiler_identity="gcc 12")
    proto.dataReceived(client.connection.seal(job))
    [reply] = client.connection.receive_data(transport.value())
    assert isinstance(reply, wire.MessageReceived) and isinstance(reply.message, wire.Refused)
    assert reply.message.reason == wire.Reason.BAD_PATH
    [record] = records([memory.log])
    assert (record["principal"], record["decision"], record["reason"], record["job_id"]) == (
        ALICE, "refused", "denied:bad-path", reply.message.job_id)


def test_a_job_before_the_handshake_completes_drops_the_connection(memory):
    proto, transport, _clock = connected(memory)
    proto.dataReceived(wire.hello())
    proto.dataReceived(wire.frame(wire.Kind.SEALED, b"\x01" * 64))
    assert transport.disconnecting and proto.session is None


@pytest_twisted.inlineCallbacks
def test_the_clients_channel_against_the_listener_on_loopback(tmp_path):
    """The client's Channel and the server's JobProtocol, both real, over a loopback socket; GSS in memory."""
    from twisted.internet import reactor

    service = memory_service(tmp_path, clock=reactor).service
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
    assert refused == f"mallory@TEST.REALM may not authenticate to {SERVER}"
    assert [r["event"] for r in records([tmp_path / "audit.jsonl"])] == ["job", "auth"]
