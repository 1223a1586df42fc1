"""The per-user agent: kept sessions, tickets looked at per job, private socket, and the shim that uses it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, local, make_job, securecc
from test_job_path import SLOW_CXX, SLOW_FLAGS, sandbox_processes, wait_until, write_project

from securecc import protocol as wire
from securecc.client import agent_wire
from securecc.client.channel import Channel
from securecc.client.hosts import parse_host

SHIMS = {"c": BIN / "securecc", "python": BIN / "securecc-py"}  # scripts/setup builds both; C falls back to Python


@pytest.fixture(params=SHIMS)
def shim(request) -> Path:
    """Each shim in turn: both must pass the same trust checks."""
    return SHIMS[request.param]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def agent_pids(directory: Path) -> list[int]:
    pids = [int(pid_file.read_text()) for pid_file in directory.glob("*.pid")]
    return [pid for pid in pids if running(pid) and b"securecc.client.agent" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def compile_main(realm, server, workdir: Path, user: str = "alice", shim: Path = SHIMS["c"],
                 **env: str) -> subprocess.CompletedProcess:
    return securecc(realm, server, user, workdir, "gcc", "-O2", "-DSCALE=3", "-I.", "-c", "src/main.c", "-o", "main.o",
                    shim=shim, **env)


def kinit(realm, ccache: Path, user: str, lifetime: str | None = None) -> None:
    """A ticket in ``ccache`` from the user's keytab; the tests that use it give the client no keytab of its own."""
    command = ["kinit", "-k", "-t", str(realm.dir / f"{user}.keytab"), *(["-l", lifetime] if lifetime else []), user]
    subprocess.run(command, env={**realm.env, "KRB5CCNAME": f"FILE:{ccache}"}, check=True, capture_output=True)


def test_jobs_share_one_authenticated_session(realm, server, workdir):
    """Four compiles: every object identical to gcc's, every job audited as alice, all over one connection."""
    write_project(workdir)
    before = len(server.jobs(principal="alice@TEST.REALM"))
    for n in range(4):
        (workdir / "src" / "main.c").write_text((workdir / "src" / "main.c").read_text() + f"int v{n};\n")
        local(workdir, "gcc", "-O2", "-DSCALE=3", "-I.", "-c", "src/main.c", "-o", "expected.o")
        done = compile_main(realm, server, workdir)
        assert done.returncode == 0, done.stderr
        assert (workdir / "main.o").read_bytes() == (workdir / "expected.o").read_bytes()
    records = server.jobs(principal="alice@TEST.REALM")[before:]
    assert [r["decision"] for r in records] == ["allowed"] * 4
    assert len({r["peer"] for r in records}) == 1, "each job opened its own connection"
    assert (realm.agents.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in realm.agents.glob("*.sock"))


def test_a_new_principal_in_the_ccache_gets_its_own_session(realm, server, workdir):
    """alice's session is open; the same ccache now holds bob's ticket: bob's job is authorized as bob (refused)."""
    write_project(workdir)
    ccache = workdir / "shared.ccache"
    env = {"KRB5CCNAME": f"FILE:{ccache}", "KRB5_CLIENT_KTNAME": str(workdir / "none.keytab")}
    kinit(realm, ccache, "alice")
    assert compile_main(realm, server, workdir, **env).returncode == 0
    allowed = server.jobs(principal="alice@TEST.REALM")[-1]
    kinit(realm, ccache, "bob")
    done = compile_main(realm, server, workdir, **env)
    assert done.returncode == 0 and (workdir / "main.o").exists()
    assert "refused the job" in done.stderr.decode() and "compiling locally" in done.stderr.decode()
    refused = server.jobs(principal="bob@TEST.REALM")[-1]
    assert refused["decision"] == "refused" and refused["peer"] != allowed["peer"]


def test_expired_ticket_is_noticed_and_a_new_one_picked_up(realm, server, workdir):
    """A ticket that ends: the usual message and a local compile; after kinit, remote again."""
    write_project(workdir)
    ccache = workdir / "short.ccache"
    env = {"KRB5CCNAME": f"FILE:{ccache}", "KRB5_CLIENT_KTNAME": str(workdir / "none.keytab")}
    kinit(realm, ccache, "alice", "4s")
    started = time.monotonic()
    assert compile_main(realm, server, workdir, **env).returncode == 0
    remote = len(server.jobs(principal="alice@TEST.REALM"))
    # Until 1 s past the ticket's end (4 s, by the KDC): the agent trusts a checked ticket for its lifetime, counted
    # in whole seconds, so up to 1 s beyond; only a compile shows when it stops, and that is the test.
    time.sleep(max(0.0, 5 - (time.monotonic() - started)))
    done = compile_main(realm, server, workdir, **env)
    assert done.returncode == 0 and (workdir / "main.o").exists()
    assert re.fullmatch(r"securecc: .*(expired|no Kerberos ticket).*run kinit.*; compiling locally\n", done.stderr.decode())
    assert len(server.jobs(principal="alice@TEST.REALM")) == remote
    kinit(realm, ccache, "alice")
    done = compile_main(realm, server, workdir, **env)
    assert done.returncode == 0 and done.stderr == b""
    assert len(server.jobs(principal="alice@TEST.REALM")) == remote + 1


def test_server_refuses_a_job_after_the_session_ticket_ended(realm, own_server, workdir, monkeypatch):
    """Defence in depth: a session kept past its ticket's end gets no more jobs (refused and audited).

    The server's GSS context lasts until the ticket's end plus the allowed clock skew (as an AP-REQ
    would be accepted): that skew is 1 s here instead of 300."""
    conf = workdir / "krb5.conf"
    conf.write_text(Path(realm.env["KRB5_CONFIG"]).read_text().replace("[libdefaults]\n", "[libdefaults]\n clockskew = 1\n"))
    server = own_server(env={"KRB5_CONFIG": str(conf)})
    ccache = workdir / "short.ccache"
    kinit(realm, ccache, "alice", "3s")
    for key, value in {**realm.env, "KRB5CCNAME": f"FILE:{ccache}", "KRB5_CLIENT_KTNAME": str(workdir / "no")}.items():
        monkeypatch.setenv(key, value)
    channel = Channel(parse_host(server.hosts))
    channel.authenticate()
    assert channel.expires - time.monotonic() < 4
    # Until the session's end on the real server's clock (the ticket's end plus the 1 s skew), and a margin:
    # a job sent to see whether it has ended would be the test itself.
    time.sleep(max(0.0, channel.expires - time.monotonic()) + 1.5)
    try:
        reply = channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), "x.c", b"int x;\n"))
    finally:
        channel.close()
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:session-expired", reply
    assert server.jobs(reason="denied:session-expired")


def test_another_uid_cannot_use_the_agent(realm, server, workdir):
    """Even with the directory and socket opened up by mistake, the agent hangs up on another uid."""
    write_project(workdir)
    agents = workdir / "agents"
    assert compile_main(realm, server, workdir, SECURECC_AGENT_DIR=str(agents)).returncode == 0
    (sock,) = agents.glob("*.sock")
    os.chmod(agents, 0o755)
    os.chmod(sock, 0o666)
    probe = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
        "r = b'securecc-agent 1'\ntry: s.sendall(b'%d\\n' % len(r) + r); print(repr(s.recv(100)))\n"
        "except ConnectionError: print(repr(b''))"
    )
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", probe,
                           str(sock)], capture_output=True, text=True, cwd="/")
    assert done.stdout.strip() == "b''", done.stderr
    assert "refused a connection from another uid" in next(agents.glob("*.log")).read_text()


def test_a_directory_that_is_not_private_is_not_used(realm, server, workdir, shim):
    """A world-writable agent directory (anyone could plant a socket): one line, then direct mode, still remote."""
    write_project(workdir)
    shared = workdir / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    before = len(server.jobs(principal="alice@TEST.REALM"))
    done = compile_main(realm, server, workdir, shim=shim, SECURECC_AGENT_DIR=str(shared))
    assert done.returncode == 0
    assert done.stderr.decode() == (f"securecc: {shared} is not a private directory of yours (owner uid 0, mode 777); "
                                    "not using the agent (fix it or set SECURECC_AGENT_DIR)\n")
    assert not list(shared.iterdir())
    assert len(server.jobs(principal="alice@TEST.REALM")) == before + 1


FAKE_AGENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8); print("ready", flush=True)
while True:
    conn, _ = s.accept(); conn.settimeout(2)
    try: got = conn.recv(1 << 16)
    except OSError: got = b"?"
    print(len(got), flush=True)
    try: conn.sendall(b"L 0\\n/bin/sh\\0sh\\0-c\\0touch " + sys.argv[2].encode())
    except OSError: pass
    conn.close()
"""


def test_an_agent_socket_of_another_uid_is_not_trusted(realm, server, workdir, shim):
    """Another user's "agent" planted at our agent's name (while the directory was open by mistake) would be
    handed our job and could tell us what to run: each shim hangs up before sending a byte; the job is done."""
    write_project(workdir)
    agents = workdir / "agents"
    agents.mkdir(mode=0o777)
    os.chmod(agents, 0o777)
    pwned = workdir / "pwned"
    fake = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                             FAKE_AGENT, agents / f"{agent_name(realm.user_env('alice', workdir))}.sock", pwned],
                            stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert fake.stdout.readline() == "ready\n"
        os.chmod(agents, 0o700)
        done = compile_main(realm, server, workdir, shim=shim, SECURECC_AGENT_DIR=str(agents))
        assert done.returncode == 0 and (workdir / "main.o").exists(), done.stderr
    finally:
        fake.kill()
    received = fake.communicate()[0].split()
    assert received and set(received) == {"0"}, received  # connected (the shim asked who it is), never sent
    assert not pwned.exists()
    assert len(agent_pids(agents)) == 1  # our own agent replaced the planted socket and did the job


HOSTILE_AGENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8); print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.recv(1 << 20)
    conn.sendall(bytes.fromhex(sys.argv[2]))
    conn.close()
"""


@pytest.mark.parametrize("reply", [
    b"R  0  1  3\nabcd", b"R 0 9223372036854775807 1\nx", b"R 0 5 5\nshort", b"R 0 -1 1\nx", b"X 1 2\n", b"",
    b"L 0\n/bin/sh", b"L 0\n/bin/sh\0\0-c\0touch made", b"L -1\n/bin/sh\0sh\0-c\0touch made",
], ids=["spaces", "overflow", "short", "negative", "kind", "empty", "no-argv", "empty-argv0", "negative-L"])
def test_a_malformed_agent_reply_means_direct_mode(realm, workdir, shim, reply):
    """An agent (ours, so trusted) answering nonsense: each shim does the job itself, runs nothing the reply
    names, and prints no traceback."""
    write_project(workdir)
    agents = workdir / "agents"
    agents.mkdir(mode=0o700)
    fake = subprocess.Popen([sys.executable, "-c", HOSTILE_AGENT, agents / f"{agent_name(realm.user_env('alice', workdir))}.sock",
                             reply.hex()], stdout=subprocess.PIPE, text=True, cwd=workdir)
    try:
        assert fake.stdout.readline() == "ready\n"
        done = compile_main(realm, None, workdir, shim=shim, SECURECC_AGENT_DIR=str(agents), SECURECC_HOSTS="")
    finally:
        fake.kill()
        fake.wait()
    assert done.returncode == 0 and (workdir / "main.o").exists(), done.stderr
    assert b"Traceback" not in done.stderr and not (workdir / "made").exists()


def test_the_c_shim_hands_a_job_over_without_python(realm, server, workdir):
    """Once the agent runs, a compile is one process, the C shim's: no interpreter started per job; the
    Python shim finds the same agent (one agent per Kerberos environment, here with names whose order as
    names and as "NAME=value" strings differ)."""
    write_project(workdir)
    agents = workdir / "agents"
    env = {"SECURECC_AGENT_DIR": str(agents), "KRB5A": "1", "KRB5A-B": "2"}
    assert compile_main(realm, server, workdir, **env).returncode == 0  # starts the agent, through Python
    trace = workdir / "execve.trace"
    shim_name = SHIMS["c"]
    assert shim_name.read_bytes()[:4] == b"\x7fELF", "scripts/setup did not build bin/securecc.c"
    done = securecc(realm, server, "alice", workdir, "-f", "-qq", "-e", "trace=execve", "-o", str(trace),
                    str(shim_name), "gcc", "-O2", "-DSCALE=3", "-I.", "-c", "src/main.c", "-o", "main.o",
                    shim=Path("/usr/bin/strace"), **env)
    assert done.returncode == 0, done.stderr
    execs = [line for line in trace.read_text().splitlines() if "execve(" in line]
    assert len(execs) == 1 and f'execve("{shim_name}"' in execs[0], execs
    assert compile_main(realm, server, workdir, shim=SHIMS["python"], **env).returncode == 0
    assert len(agent_pids(agents)) == 1
    assert next(agents.glob("*.log")).read_text().count("listening on") == 1


def test_a_symlink_named_gcc_run_by_a_bare_name_does_not_run_itself(realm, workdir, shim):
    """make may run a symlink named gcc with argv[0] "gcc" while /usr/bin comes first on PATH: the shim
    must know itself by the file it was run as, not by argv[0], or it takes the symlink for the real
    compiler and execs itself for ever when the job compiles locally (the C shim did, before AT_EXECFN)."""
    write_project(workdir)
    bindir = workdir / "bin"
    bindir.mkdir()
    (bindir / "gcc").symlink_to(shim)
    env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": "", "PWD": str(workdir),
           "XDG_CACHE_HOME": str(workdir / ".cache"), "SECURECC_AGENT_DIR": str(workdir / "agents"),
           "PATH": f"/usr/bin:/bin:{bindir}"}
    for agent in ("on", "off"):  # the agent's "compile it here", and direct mode
        (workdir / "main.o").unlink(missing_ok=True)
        done = subprocess.run(["gcc", "-O2", "-DSCALE=3", "-I.", "-c", "src/main.c", "-o", "main.o"],
                              executable=bindir / "gcc", cwd=workdir, env={**env, "SECURECC_AGENT": agent},
                              capture_output=True, timeout=30)
        assert done.returncode == 0 and (workdir / "main.o").exists(), done.stderr


def slow_compile(realm, server, workdir: Path, agents: Path, spin: str, shim: Path) -> subprocess.Popen:
    (workdir / "slow.cc").write_text(SLOW_CXX)
    env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": server.hosts, "PWD": str(workdir),
           "XDG_CACHE_HOME": str(workdir / ".cache"), "SECURECC_AGENT_DIR": str(agents)}
    return subprocess.Popen([shim, "g++", f"-DSPIN={spin}", *SLOW_FLAGS, "-c", "slow.cc", "-o", "slow.o"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def sandboxes_of(workdir: Path) -> list[str]:
    """This test's compiles (bwrap recreates the client's directory): other tests' leftovers do not count."""
    return [p for p in sandbox_processes() if f"--chdir {workdir} " in p]


def test_killing_the_shim_kills_the_remote_compile(realm, own_server, workdir, shim):
    """^C on make kills the shim: the agent drops the job's connection and the server kills the compile."""
    s = own_server()
    shim = slow_compile(realm, s, workdir, workdir / "agents", "1000000000L", shim)
    assert wait_until(lambda: bool(sandboxes_of(workdir)), 20), "the remote compile never started"
    shim.send_signal(signal.SIGINT)
    shim.wait(10)
    assert wait_until(lambda: not sandboxes_of(workdir), 5), sandboxes_of(workdir)
    assert wait_until(lambda: bool(s.jobs(ended_by="disconnect")), 5)


def test_agent_dying_mid_job_falls_back_to_direct_mode(realm, own_server, workdir, shim):
    """The agent is killed while the job runs: the shim does the job itself, remotely, and the build goes on."""
    s = own_server()
    shim = slow_compile(realm, s, workdir, workdir / "agents", "400000L", shim)
    assert wait_until(lambda: bool(sandboxes_of(workdir)), 20), "the remote compile never started"
    (pid,) = agent_pids(workdir / "agents")
    os.kill(pid, signal.SIGKILL)
    _, err = shim.communicate(timeout=120)
    assert shim.returncode == 0 and (workdir / "slow.o").exists() and err == b""
    assert [(r["decision"], r["ended_by"]) for r in s.jobs()] == [("allowed", "disconnect"), ("allowed", None)]


def test_many_first_uses_start_one_agent(realm, server, workdir):
    """make -j8 with no agent yet: eight shims race to start one; exactly one runs and every job is done."""
    write_project(workdir)
    agents = workdir / "agents"
    for n in range(8):
        (workdir / f"f{n}.c").write_text(f"int f{n}(void) {{ return {n}; }}\n")
    results: list[subprocess.CompletedProcess] = []
    threads = [threading.Thread(target=lambda n=n: results.append(securecc(
        realm, server, "alice", workdir, "gcc", "-c", f"f{n}.c", SECURECC_AGENT_DIR=str(agents)))) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert all((workdir / f"f{n}.o").exists() for n in range(8))
    assert len(agent_pids(agents)) == 1
    assert next(agents.glob("*.log")).read_text().count("listening on") == 1


def test_idle_agent_exits_and_cleans_up(realm, server, workdir):
    write_project(workdir)
    agents = workdir / "agents"
    assert compile_main(realm, server, workdir, SECURECC_AGENT_DIR=str(agents), SECURECC_AGENT_IDLE="1").returncode == 0
    (pid,) = agent_pids(agents)
    assert wait_until(lambda: not running(pid), 10)
    assert not list(agents.glob("*.sock"))
    assert "exiting (idle); 1 handshakes made" in next(agents.glob("*.log")).read_text()


def test_the_shim_loads_only_builtin_modules(tmp_path):
    """The per-compile process: no site, nothing but the interpreter's own modules (measured: 8.6 ms of start-up)."""
    assert SHIMS["python"].read_text().splitlines()[0].endswith("/python -ES")
    (tmp_path / "a.c").write_text("int a;\n")
    env = {**os.environ, "SECURECC_HOSTS": "", "SECURECC_AGENT_DIR": str(tmp_path / "agents")}
    for _ in range(2):  # the first run starts the agent (that path may import more); the second is every job's
        done = subprocess.run([sys.executable, "-ES", "-X", "importtime", SHIMS["python"], "gcc", "-c", "a.c"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    loaded = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    startup = {"encodings", "encodings.aliases", "encodings.utf_8", "codecs", "_codecs", "io", "abc", "_abc",
               "_signal", "_io", "marshal", "posix", "_frozen_importlib_external", "time", "zipimport", "_weakref",
               "_warnings", "_thread", "_imp", "_weakrefset", "os", "stat", "_stat", "_collections_abc",
               "posixpath", "genericpath", "os.path", "_sitebuiltins", "encodings.latin_1", "_socket", "securecc_shim"}
    loaded -= {"module", "imported package"}  # the report's header line
    assert loaded <= startup, loaded - startup
    assert (REPO / "bin" / "securecc").read_text().splitlines()[0] == "#!python -ES"


def agent_name(env: dict[str, str]) -> str:
    """The name the shim gives the agent of ``env``'s Kerberos environment."""
    return agent_wire.agent_name(agent_wire.kerberos_environment(env))


def test_an_agent_that_cannot_start_costs_nothing(realm, server, workdir):
    """The agent cannot take its lock file (a directory is in the way): every compile goes direct at once."""
    write_project(workdir)
    agents = workdir / "agents"
    agents.mkdir(mode=0o700)
    (agents / (agent_name(realm.user_env("alice", workdir)) + ".lock")).mkdir()
    before = len(server.jobs(principal="alice@TEST.REALM"))
    for _ in range(2):
        started = time.monotonic()
        done = compile_main(realm, server, workdir, SECURECC_AGENT_DIR=str(agents))
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        assert time.monotonic() - started < 2.5
    assert len(server.jobs(principal="alice@TEST.REALM")) == before + 2
    assert not agent_pids(agents)
    assert "IsADirectoryError" in next(agents.glob("*.log")).read_text()
