"""Stock distcc 3.4 clients (Debian's, built with GSS-API) against securecc-server's distcc listener."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from conftest import free_port
from test_hosts import project

from securecc.server import distcc_wire as distcc


@pytest.fixture
def distcc_server(own_server):
    port = free_port()
    server = own_server(slots=8, distcc={"listen": f"127.0.0.1:{port}", "cleartext": True})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return server, port


def distcc_build(realm, workdir, port: int, user: str | None, options: str = "") -> subprocess.CompletedProcess:
    env = realm.user_env(user, workdir)
    (workdir / f".distcc-{user}").mkdir(exist_ok=True)  # distcc does not make its own directory
    env.update(DISTCC_HOSTS=f"127.0.0.1:{port}/2{options},auth=localhost", DISTCC_PRINCIPAL="securecc",
               DISTCC_DIR=str(workdir / f".distcc-{user}"), DISTCC_VERBOSE="0", PWD=str(workdir))
    subprocess.run(["make", "-s", "clean"], cwd=workdir, capture_output=True)
    for o in workdir.glob("*.o"):
        o.unlink()
    return subprocess.run(["make", "-j2", "CC=distcc gcc"], cwd=workdir, env=env, capture_output=True, timeout=120)


def write_project(workdir) -> list[str]:
    names = project(workdir, files=6)
    text = (workdir / "Makefile").read_text().replace("-g -O2", "-O2 -Wall")  # distcc sends fully expanded -E text
    (workdir / "Makefile").write_text(text)
    return names


@pytest.mark.parametrize("options", ["", ",lzo"], ids=["v1", "v2-lzo"])
def test_stock_client_builds_remotely_as_alice(realm, distcc_server, workdir, options):
    """alice's stock distcc build runs through securecc's stages: objects exact, records say distcc and cleartext."""
    server, port = distcc_server
    names = write_project(workdir)
    done = distcc_build(realm, workdir, port, "alice", options)
    assert done.returncode == 0, done.stderr
    records = server.jobs(principal="alice@TEST.REALM")
    assert len(records) == len(names) and all(r["decision"] == "allowed" for r in records)
    assert all(r["protocol"] == "distcc" and r["payload"] == "cleartext" for r in records)
    for n in names:
        subprocess.run(["gcc", "-O2", "-Wall", "-c", f"{n}.c", "-o", f"{n}.local"], cwd=workdir, check=True)
        assert (workdir / f"{n}.o").read_bytes() == (workdir / f"{n}.local").read_bytes()


def test_bob_is_refused_audited_and_builds_locally(realm, distcc_server, workdir):
    """bob authenticates but is not a committer: refused per job, audited, and his client builds locally."""
    server, port = distcc_server
    names = write_project(workdir)
    done = distcc_build(realm, workdir, port, "bob")
    assert done.returncode == 0 and all((workdir / f"{n}.o").exists() for n in names)
    refused = server.jobs(principal="bob@TEST.REALM")
    assert refused and all(r["decision"] == "refused" and r["reason"] == "denied:not-in-group" for r in refused)


def test_no_ticket_is_refused_and_builds_locally(realm, distcc_server, workdir):
    """Without credentials the handshake never completes: nothing runs remotely, the build still succeeds."""
    server, port = distcc_server
    names = write_project(workdir)
    done = distcc_build(realm, workdir, port, None)
    assert done.returncode == 0 and all((workdir / f"{n}.o").exists() for n in names)
    assert not server.jobs()


def test_oversized_token_is_refused_before_allocation(realm, distcc_server, workdir):
    """An unauthenticated peer announcing a 2 GiB GSS token is dropped at once; the server keeps serving."""
    server, port = distcc_server
    attacker = socket.create_connection(("127.0.0.1", port))
    attacker.settimeout(5)
    attacker.sendall(b"*")
    assert attacker.recv(1) == b"*"  # answered at once: the stock client waits only 1 s
    attacker.sendall(distcc.item(b"TLEN", 0x7FFFFFFF))
    try:
        assert attacker.recv(100) == b""
    except ConnectionResetError:
        pass
    plain = socket.create_connection(("127.0.0.1", port))
    plain.sendall(b"DIST00000001")  # a client without ,auth
    plain.settimeout(5)
    try:
        assert plain.recv(100) == b""
    except ConnectionResetError:
        pass
    write_project(workdir)
    assert distcc_build(realm, workdir, port, "alice").returncode == 0
    assert server.alive() and "TLEN 2147483647 exceeds 65536" in server.log_path.read_text()


def test_parser_caps_and_round_trip():
    """Requests parse in any split; caps are checked from the header alone; replies carry wait statuses."""
    request = (distcc.item(b"DIST", 2) + distcc.item(b"ARGC", 2) + distcc.item(b"ARGV", 3, b"gcc")
               + distcc.item(b"ARGV", 2, b"-c"))
    body = distcc.lzo_compress(b"int x;\n" * 100)
    request += distcc.item(b"DOTI", len(body), body)
    parser = distcc.Parser(max_input=1 << 20)
    for byte in request[:-1]:
        parser.feed(bytes([byte]))
        assert parser.request() is None
    parser.feed(request[-1:])
    assert parser.request() == distcc.Request(2, ["gcc", "-c"], b"int x;\n" * 100)
    greedy = distcc.Parser(max_input=1000)
    greedy.feed(distcc.item(b"DIST", 1) + distcc.item(b"ARGC", 0) + distcc.item(b"DOTI", 5000))
    with pytest.raises(distcc.DistccError, match="DOTI 5000 exceeds 1000"):
        greedy.request()
    pump = distcc.Parser(max_input=1000)
    pump.feed(distcc.item(b"DIST", 3))
    with pytest.raises(distcc.DistccError, match="no pump mode"):
        pump.request()
    assert distcc.wait_status(1) == 0x100 and distcc.wait_status(137) == 9
    reply = distcc.reply(1, 0x100, b"", b"error\n", None)
    assert reply == b"DONE00000001STAT00000100SERR00000006error\nSOUT00000000DOTO00000000"
