"""The shim–agent format (securecc.client.agent_wire): the agent's side, and the Python shim held to it."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securecc.client import agent_wire

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bin"))
import securecc_shim  # noqa: E402 - a script beside the package, not in it

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0="), min_size=1, max_size=10)


@given(st.builds(agent_wire.Request, kerberos=st.just(b"KRB5CCNAME=FILE:/tmp/x"), cwd=TEXT, umask=st.integers(0, 0o777),
                 tty=st.booleans(), argv=st.lists(TEXT, min_size=1, max_size=5), environ=st.dictionaries(NAME, TEXT, max_size=5)))
def test_a_request_survives_the_wire(request):
    size, _, body = agent_wire.encode_request(request).partition(b"\n")
    assert int(size) == len(body)
    assert agent_wire.parse_request(body) == request


def test_another_version_is_not_ours_and_a_lying_argc_is_malformed():
    assert agent_wire.parse_request(b"securecc-agent 1\0k\0/\0" + b"22\0" + b"0\0" + b"1\0gcc") is None
    with pytest.raises(ValueError):
        agent_wire.parse_request(agent_wire.PROTOCOL + b"\0k\0/\0" + b"22\0" + b"0\0" + b"5\0gcc")


def test_the_kerberos_environment_is_sorted_by_name_and_newline_joined():
    environ = {"KRB5_TRACE": "/dev/null", "PATH": "/bin", "KRB5CCNAME": "FILE:/tmp/c", "KRB5-X": "y"}
    assert agent_wire.kerberos_environment(environ) == b"KRB5-X=y\nKRB5CCNAME=FILE:/tmp/c\nKRB5_TRACE=/dev/null"


def test_the_python_shim_names_the_agent_as_described(monkeypatch):
    environ = {b"KRB5_TRACE": b"/dev/null", b"PATH": b"/bin", b"KRB5CCNAME": b"FILE:/tmp/c"}
    monkeypatch.setattr(securecc_shim, "ENVIRON", environ)
    kerberos = securecc_shim.kerberos_environment()
    assert kerberos == agent_wire.kerberos_environment({k.decode(): v.decode() for k, v in environ.items()})
    assert securecc_shim.AGENT_PROTOCOL == agent_wire.PROTOCOL
    assert "agent-" + securecc_shim.fnv1a(securecc_shim.AGENT_PROTOCOL + b"\0" + kerberos) == agent_wire.agent_name(kerberos)


@pytest.mark.parametrize(("reply", "status", "out", "err"), [
    (agent_wire.result(3, b"to stdout", b"to stderr"), 3, b"to stdout", b"to stderr"),
    (agent_wire.DIRECT, None, b"", b""),
    (b"R 0 100 0\nshort", None, b"", b""),  # cut short: the agent went away
])
def test_the_python_shim_sends_a_request_the_agent_parses_and_obeys_its_reply(monkeypatch, capfd, reply, status, out, err):
    monkeypatch.setattr(sys, "argv", ["gcc", "-c", "t.c"])
    monkeypatch.setattr(securecc_shim, "ENVIRON", {b"KRB5CCNAME": b"FILE:/tmp/c", b"HOME": b"/home/a"})
    shim, agent = socket.socketpair()
    received: list[agent_wire.Request | None] = []

    def serve() -> None:
        received.append(agent_wire.parse_request(agent_wire.receive_request(agent)))
        agent.sendall(reply)
        agent.close()

    thread = threading.Thread(target=serve)
    thread.start()
    assert securecc_shim.exchange(shim, securecc_shim.kerberos_environment()) == status
    thread.join()
    [request] = received
    assert request == agent_wire.Request(b"KRB5CCNAME=FILE:/tmp/c", os.getcwd(), request.umask, request.tty,
                                         ["gcc", "-c", "t.c"], {"KRB5CCNAME": "FILE:/tmp/c", "HOME": "/home/a"})
    assert capfd.readouterr() == (out.decode(), err.decode())


# --- whose Kerberos environment the agent serves ---------------------------------------------

OURS = {"KRB5CCNAME": "FILE:/tmp/krb5cc_a", "KRB5_CONFIG": "/etc/krb5-other.conf"}
# One variable whose value holds a newline and the other's entry: KRB5ENV joins it to OURS's bytes exactly.
FORGED = {"KRB5CCNAME": "FILE:/tmp/krb5cc_a\nKRB5_CONFIG=/etc/krb5-other.conf"}


@pytest.fixture
def agent_environment(monkeypatch):
    """The agent's module, started in OURS (its Kerberos environment is read once, at first use)."""
    from securecc.client import agent

    def clear() -> None:
        for cached in (agent.kerberos_environment, getattr(agent, "kerberos_entries", None)):
            if cached is not None:
                cached.cache_clear()

    for name in [k for k in os.environ if k.startswith("KRB5")]:
        monkeypatch.delenv(name)
    for name, value in OURS.items():
        monkeypatch.setenv(name, value)
    clear()
    yield agent
    clear()


def test_another_kerberos_environment_that_joins_to_the_same_bytes_is_not_served(agent_environment):
    """KRB5ENV is newline-joined in the name and in the request, so FORGED's shim reaches OURS's agent by name
    and sends OURS's bytes; the agent must still see that its ccache is another one, and answer D."""
    import io

    assert agent_wire.kerberos_environment(FORGED) == agent_wire.kerberos_environment(OURS)

    def asked(environ: dict[str, str]) -> bool:
        request = agent_wire.Request(agent_wire.kerberos_environment(environ), "/src", 0o22, False, ["gcc", "-c", "t.c"],
                                     {**environ, "PATH": "/usr/bin"})
        body = agent_wire.encode_request(request).partition(b"\n")[2]
        watch, other = socket.socketpair()
        try:
            return agent_environment.invocation(body, watch, io.BytesIO(), io.BytesIO()) is not None
        finally:
            watch.close()
            other.close()

    assert asked(OURS)
    assert not asked(FORGED)
    assert not asked({**OURS, "KRB5_TRACE": "/dev/stderr"})  # an entry more, under the same kerberos field's claim


FIELD = st.binary(max_size=12) | st.sampled_from([b"", b"-1", b"+3", b" 2 ", b"1_0", b"9" * 5000, b"0o7", b"\xff", b"777777777777"])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(FIELD, max_size=10))  # the fixture only sets the agent's environment, the same for every example
def test_no_request_makes_the_agent_raise_what_it_does_not_catch(agent_environment, fields):
    """Agent.handle answers D to a request that raises ValueError or IndexError; anything else would kill the
    connection's thread with a traceback (same uid only, but a shim of another version must not)."""
    import io

    body = b"\0".join([agent_wire.PROTOCOL, agent_wire.kerberos_environment(OURS), *fields])
    watch, other = socket.socketpair()
    try:
        agent_environment.invocation(body, watch, io.BytesIO(), io.BytesIO())
    except (ValueError, IndexError):
        pass
    finally:
        watch.close()
        other.close()
