"""The handshake's order, both ends against each other in memory (securecc.handshake, securecc.testing's GSS)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securecc import handshake
from securecc import protocol as wire
from securecc.testing import MemoryAcceptor, MemoryInitiator

SERVER, CLIENT = "securecc/build1@TEST.REALM", "alice@TEST.REALM"


def ends(client: str = CLIENT, server: str = SERVER) -> tuple[handshake.ClientHandshake, handshake.ServerHandshake]:
    initiator = MemoryInitiator(client, server, lifetime=600.0)
    acceptor = MemoryAcceptor(SERVER, clients=frozenset({CLIENT}))
    return (handshake.ClientHandshake(wire.Connection(), initiator),
            handshake.ServerHandshake(wire.Connection(), acceptor.new_context()))


def shake(client: handshake.ClientHandshake, server: handshake.ServerHandshake) -> list[handshake.Step]:
    """Run the handshake to its end; returns the server's steps."""
    steps, to_server = [], client.opening(client.context.step() or b"")
    while to_server and server.phase is not handshake.Phase.CLOSED:
        to_client = b""
        for event in server.connection.receive_data(to_server):
            steps.append(server.receive(event))
            to_client += steps[-1].data
        to_server = b""
        for event in client.connection.receive_data(to_client):
            to_server += client.receive(event)
    return steps


def test_both_ends_seal_and_carry_messages():
    client, server = ends()
    shake(client, server)
    assert client.done and server.done
    assert server.context.principal == CLIENT and server.context.lifetime == 600.0
    job = wire.Job("gcc", ["-O2"], "cpp-output", "-c", "/src", "t.c", b"int x;\n")
    assert server.connection.receive_data(client.connection.seal(job)) == [wire.MessageReceived(job)]
    reply = wire.Refused(wire.Reason.BAD_PATH, "no")
    assert client.connection.receive_data(server.connection.seal(reply)) == [wire.MessageReceived(reply)]


def test_a_refused_client_learns_why_and_the_server_closes():
    client, server = ends(client="mallory@TEST.REALM")
    with pytest.raises(handshake.AuthenticationFailure, match="mallory@TEST.REALM may not authenticate"):
        shake(client, server)
    assert server.phase is handshake.Phase.CLOSED and not client.done


def test_the_server_tells_its_reason_in_the_step():
    _client, server = ends()
    [hello, token] = server.connection.receive_data(wire.hello() + wire.token(b"MEMORY-REQ {}"))
    server.receive(hello)
    step = server.receive(token)
    assert step.close and step.failure
    events = wire.Connection().receive_data(step.data)
    assert events[-1] == wire.ErrorReceived(handshake.AUTHENTICATION_FAILED, step.failure)


def test_a_version_from_the_future_is_told_which_version_the_server_speaks():
    _client, server = ends()
    [hello] = server.connection.receive_data(wire.hello(7, 9))
    step = server.receive(hello)
    assert step.close and not step.failure
    assert wire.Connection().receive_data(step.data) == [
        wire.ErrorReceived(handshake.UNSUPPORTED_VERSION, f"this server speaks version {wire.VERSION}")]


def test_a_server_of_an_old_version_is_refused_by_the_client():
    client, _server = ends()
    client.context.step()
    with pytest.raises(handshake.Refused, match="version 1 only"):
        client.receive(wire.HelloReceived(1, 1))


@pytest.mark.parametrize("events", [
    [wire.TokenReceived(b"x")],  # a token before the hello
    [wire.HelloReceived(wire.VERSION, wire.VERSION), wire.HelloReceived(wire.VERSION, wire.VERSION)],  # a second hello
    [wire.MessageReceived(wire.StatusRequest())],  # a message before the context is complete
])
def test_the_server_refuses_events_out_of_order(events):
    _client, server = ends()
    with pytest.raises(wire.ProtocolError, match="during the handshake"):
        for event in events:
            server.receive(event)
    assert not server.done


def test_the_client_refuses_a_token_before_the_hello_and_one_after_completion():
    client, server = ends()
    client.context.step()
    with pytest.raises(wire.ProtocolError):
        client.receive(wire.TokenReceived(b"x"))
    client, server = ends()
    shake(client, server)
    with pytest.raises(wire.ProtocolError):
        client.receive(wire.TokenReceived(b"x"))


def test_sealed_frames_are_checked_for_tampering_and_replay():
    client, server = ends()
    shake(client, server)
    sealed = client.connection.seal(wire.StatusRequest())
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(wire.ProtocolError, match="sealed frame rejected"):
        server.connection.receive_data(tampered)
    client, server = ends()
    shake(client, server)
    sealed = client.connection.seal(wire.StatusRequest())
    server.connection.receive_data(sealed)
    with pytest.raises(wire.ProtocolError, match="sealed frame rejected"):
        server.connection.receive_data(sealed)


EVENTS = st.sampled_from([
    wire.HelloReceived(wire.VERSION, wire.VERSION), wire.HelloReceived(9, 9), wire.TokenReceived(b"MEMORY-REQ {}"),
    wire.TokenReceived(b"junk"), wire.ErrorReceived("x", "y"), wire.MessageReceived(wire.StatusRequest()),
])


@given(st.lists(EVENTS, max_size=6))
def test_no_order_of_events_without_a_valid_request_opens_a_session(events):
    """Whatever a peer sends, in whatever order, the server seals only after a hello and a request it accepts."""
    _client, server = ends()
    for event in events:
        try:
            step = server.receive(event)
        except wire.ProtocolError:
            break
        if step.close:
            break
    assert not server.done and not server.connection.is_secure


def test_after_a_refusal_nothing_the_peer_sends_is_answered_or_opens_a_session():
    """Refused (a version from the future), the server ignores the rest while its refusal is flushed: even a
    HELLO and a request it would accept neither get an answer nor seal the connection."""
    client, server = ends()
    [hello] = server.connection.receive_data(wire.hello(7, 9))
    assert server.receive(hello).close
    for event in server.connection.receive_data(client.opening(client.context.step() or b"")):
        assert server.receive(event) == handshake.Step()
    assert server.phase is handshake.Phase.CLOSED and not server.done and not server.connection.is_secure
