"""A hostile peer against JobProtocol and both ends of the handshake, in memory: what it sends before, with and
instead of authenticating, and a server that is not the one the client asked for.  Each test is an attack; it
passes when the defence holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from securecc import handshake
from securecc import protocol as wire
from securecc.audit import records
from securecc.server.listener import JobProtocol
from securecc.testing import MemoryAcceptor, MemoryInitiator, MemoryService, memory_service

SERVER, ALICE = "securecc/localhost@TEST.REALM", "alice@TEST.REALM"
ACCEPTOR = MemoryAcceptor(SERVER, clients=frozenset({ALICE}))
JOB = wire.Job("gcc", ["-O2"], "cpp-output", "-c", "/src", "t.c", b"int x;\n", compiler_identity="gcc 12")


@pytest.fixture
def memory(tmp_path: Path) -> MemoryService:
    return memory_service(tmp_path)


def connected(memory: MemoryService) -> tuple[JobProtocol, StringTransport]:
    proto = JobProtocol(memory.service, ACCEPTOR)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def request(**fields: object) -> bytes:
    return b"MEMORY-REQ " + json.dumps(fields).encode()


def test_a_job_sent_with_the_opening_is_never_run(memory):
    """HELLO, a valid token and a job sealed with a key guessed ahead, in one write: the job's frame is read
    before the session exists, so the connection drops, unauthenticated, and nothing runs or is recorded."""
    proto, transport = connected(memory)
    initiator = MemoryInitiator(ALICE, SERVER)
    opening = wire.hello() + wire.token(initiator.step() or b"")
    proto.dataReceived(opening + wire.frame(wire.Kind.SEALED, b"\x00" * 40 + b"\x01"))
    assert transport.disconnected and proto.session is None
    assert memory.handler.runs == [] and list(records([memory.log])) == []


def test_frames_after_the_completing_token_in_the_same_read_are_not_messages(memory):
    """After the token that completes the context, a second token or HELLO in the same read: a session was
    opened for the authenticated principal, the stray frame drops it, and still no job runs."""
    proto, transport = connected(memory)
    initiator = MemoryInitiator(ALICE, SERVER)
    proto.dataReceived(wire.hello() + wire.token(initiator.step() or b"") + wire.token(b"MEMORY-REQ {}"))
    assert transport.disconnected and memory.handler.runs == []
    assert proto.session is not None and proto.session.principal == ALICE


def test_a_frame_longer_than_a_handshake_frame_is_refused_before_it_is_buffered(memory):
    proto, transport = connected(memory)
    proto.dataReceived(wire.hello() + (wire.MAX_HANDSHAKE_FRAME + 1).to_bytes(4, "big") + bytes([wire.Kind.TOKEN]))
    assert transport.disconnected and len(proto.wire._buffer) <= wire.MAX_HANDSHAKE_FRAME
    assert proto.session is None


def test_a_sealed_frame_from_another_connection_is_refused(memory):
    """A frame sealed for alice's session, replayed into mallory's connection (or a second one of alice's): its
    key and its sequence are another context's, so the frame is rejected, not run under the new session."""
    first, first_transport = connected(memory)
    theirs = MemoryInitiator(ALICE, SERVER)
    client = handshake.ClientHandshake(wire.Connection(), theirs)
    first.dataReceived(client.opening(theirs.step() or b""))
    for event in client.connection.receive_data(first_transport.value()):
        client.receive(event)
    sealed = client.connection.seal(JOB)
    second, second_transport = connected(memory)
    ours = MemoryInitiator(ALICE, SERVER)
    second.dataReceived(wire.hello() + wire.token(ours.step() or b""))
    assert second.session is not None
    second.dataReceived(sealed)
    assert second_transport.disconnected and memory.handler.runs == [] and list(records([memory.log])) == []


@pytest.mark.parametrize("token", [
    request(server=SERVER, client=ALICE),  # no nonce, no lifetime
    request(server=SERVER, client=[ALICE], nonce="00", lifetime=1),  # a client that is no name
    request(server=SERVER, client=ALICE, nonce="zz", lifetime=1),
    request(server=SERVER, client=ALICE, nonce="00", lifetime="long"),
    request(server=SERVER, client=ALICE, nonce="00", lifetime=None),
    b"MEMORY-REQ []",
])
def test_a_malformed_request_is_a_failed_authentication_not_a_traceback(memory, token):
    """The acceptor's contract (handshake.AcceptorContext) is AuthenticationFailure for any token it cannot
    accept, as gss's does for any GSSError; anything else escaped dataReceived as an unhandled exception."""
    proto, transport = connected(memory)
    proto.dataReceived(wire.hello() + wire.token(token))
    events = wire.Connection().receive_data(transport.value())
    assert isinstance(events[-1], wire.ErrorReceived) and events[-1].reason == handshake.AUTHENTICATION_FAILED
    assert transport.disconnecting and proto.session is None


@settings(max_examples=60, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_any_bytes_before_authentication_drop_cleanly_and_open_no_session(tmp_path_factory, data):
    """Whatever an unauthenticated peer sends after its HELLO: an answer or a drop, never an exception, a session or a job."""
    memory = memory_service(tmp_path_factory.mktemp("s"))
    proto, transport = connected(memory)
    proto.dataReceived(wire.hello() + data)
    proto.dataReceived(wire.token(b"MEMORY-REQ " + data))
    assert proto.session is None and memory.handler.runs == []


# --- the client against a server that is not the one it asked for ---------------------------------------------


def client_after_hello() -> handshake.ClientHandshake:
    initiator = MemoryInitiator(ALICE, SERVER)
    client = handshake.ClientHandshake(wire.Connection(), initiator)
    initiator.step()
    [hello] = client.connection.receive_data(wire.hello(wire.VERSION, wire.VERSION))
    assert client.receive(hello) == b"" and not client.done
    return client


def test_the_client_takes_no_sealed_reply_before_the_server_proves_itself():
    """A server that answers HELLO and then a 'result' at once, without the token only the real server can make."""
    client = client_after_hello()
    with pytest.raises(wire.ProtocolError, match="during the handshake"):
        client.connection.receive_data(wire.frame(wire.Kind.SEALED, b"\x00" * 48))
    assert not client.done and not client.connection.is_secure


def test_the_client_refuses_a_reply_token_that_answers_another_request():
    client = client_after_hello()
    [token] = client.connection.receive_data(wire.token(b"MEMORY-REP " + b"\x00" * 16))
    with pytest.raises(handshake.AuthenticationFailure):
        client.receive(token)
    assert not client.done and not client.connection.is_secure
