"""The job handler's own failures, in memory: what the front (and so the client) is told, and what only the
server's log is."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from securecc import sandbox
from securecc.server import handler
from securecc.server.handler_link import unpack


def test_a_handler_failure_tells_the_client_nothing_of_the_servers_insides(tmp_path: Path, monkeypatch, capsys) -> None:
    """A job that fails inside the handler (a spawn that raised, say) ends as a handler error whose message names
    the job and nothing else: the exception, its paths and its traceback go to the server's log only."""
    monkeypatch.setattr(handler.threads, "deferToThread", lambda f, *a: f(*a))  # the job directory's removal, at once
    proto, transport = handler.HandlerProtocol(), StringTransport()
    proto.makeConnection(transport)
    try:
        raise OSError(24, "Too many open files", "/var/lib/securecc/scratch/4f2a/secret.h")
    except OSError:
        failure = Failure()
    (tmp_path / "4f2a").mkdir()
    proto._done(failure, "4f2a", tmp_path / "4f2a")

    received: list[bytes] = []
    front = Int32StringReceiver()
    front.stringReceived = received.append
    front.dataReceived(transport.value())
    header, (stdout, stderr, output, dwo) = unpack(received[0])
    assert header == {"op": "done", "id": "4f2a", "exit_status": 1, "ended_by": "handler-error"}
    assert b"secret.h" not in stderr and b"Too many" not in stderr and b"Traceback" not in stderr, stderr
    assert stderr == handler.HANDLER_FAILED.format("4f2a").encode() and stderr.startswith(b"securecc: ")
    assert not stdout and output is None and dwo is None
    logged = capsys.readouterr().err
    assert "job 4f2a failed" in logged and "secret.h" in logged and "Traceback" in logged
    assert not (tmp_path / "4f2a").exists()


def _probe_verdict(tmp_path: Path, outcome: sandbox.Outcome) -> dict[str, str]:
    proto, transport = handler.HandlerProtocol(), StringTransport()
    proto.makeConnection(transport)
    (tmp_path / "socket-probe").mkdir()
    proto._probed(outcome, tmp_path / "socket-probe")
    received: list[bytes] = []
    front = Int32StringReceiver()
    front.stringReceived = received.append
    front.dataReceived(transport.value())
    assert not (tmp_path / "socket-probe").exists()
    return unpack(received[0])[0]


def test_the_socket_probe_says_whether_the_filter_failed_or_the_probe_could_not_run(tmp_path: Path) -> None:
    """A made socket is the filter's failure; an interpreter that cannot start in the sandbox is not, and the start
    fails either way (the real filter's failure is attacked in tests/integration/test_sandbox.py)."""
    assert _probe_verdict(tmp_path, sandbox.Outcome(0, b"", b"", b"", None)) == {"op": "ready"}
    made = _probe_verdict(tmp_path, sandbox.Outcome(1, b"", b"a socket of AF_INET was made\n", b"", None))
    assert made["op"] == "fatal" and made["error"].startswith("the sandbox's system call filter does not hold (a socket")
    broken = _probe_verdict(tmp_path, sandbox.Outcome(127, b"", b"bwrap: execvp /opt/py/bin/python3: No such file\n", b"", None))
    assert broken["op"] == "fatal" and broken["error"].startswith("the sandbox cannot run the handler's own interpreter (bwrap")
