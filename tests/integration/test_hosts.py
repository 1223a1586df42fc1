"""Many servers, many users: discovery, turn-away, fair share, back-off, prequalification, health checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, local, make_job, securecc
from test_acl import credentials_for
from test_job_path import authenticated_channel, slow_job, wait_until

from securecc import protocol as wire
from securecc.client.hosts import Host, HostState, parse_hosts

PRINCIPAL = "securecc/localhost@TEST.REALM"


def test_host_state_backs_off_and_orders(tmp_path, monkeypatch):
    """A failing host is skipped for a doubling, capped period; order favours capacity and speed."""
    state = HostState(str(tmp_path / "hosts.json"))
    a, b = Host("a", 1, limit=8), Host("b", 2, limit=1)
    state.failed(a, "down")
    first = state.backed_off(a)
    state.failed(a, "down again")
    assert 14 < first <= 15 and 29 < state.backed_off(a) <= 30
    for _ in range(10):
        state.failed(a, "still down")
    assert state.backed_off(a) <= 300
    assert state.order([a, b]) == [b]
    reloaded = HostState(str(tmp_path / "hosts.json"))
    assert reloaded.backed_off(a) > 0 and reloaded.hosts["a:1"]["why"] == "still down"
    state.succeeded(a, 0.01)
    state.succeeded(b, 2.0)
    firsts = [state.order([a, b])[0] for _ in range(200)]
    assert firsts.count(a) > 180  # 8 slots at 10 ms beat 1 slot at 2 s, nearly always


def project(directory: Path, files: int = 12) -> list[str]:
    """A make project of ``files`` C files, each with a macro mid-line and a header."""
    (directory / "common.h").write_text("#define SCALE(x) ((x) * 3)\nint helper(int);\n")
    names = []
    for n in range(files):
        (directory / f"f{n}.c").write_text(f'#include "common.h"\nint f{n}(int x) {{ return SCALE(x) + {n}; }}\n')
        names.append(f"f{n}")
    objects = " ".join(f"{n}.o" for n in names)
    (directory / "Makefile").write_text(f"all: {objects}\n%.o: %.c\n\t$(CC) -g -O2 -c $< -o $@\n")
    return names


def build(realm, workdir: Path, hosts: str, **env: str) -> tuple[float, subprocess.CompletedProcess]:
    environment = realm.user_env("alice", workdir)
    environment.update(SECURECC_HOSTS=hosts, PWD=str(workdir), XDG_CACHE_HOME=str(workdir / ".cache"),
                       SECURECC_VERBOSE="1", **env)
    subprocess.run(["make", "-s", "clean"], cwd=workdir, capture_output=True)
    for o in workdir.glob("*.o"):
        o.unlink()
    started = time.monotonic()
    done = subprocess.run(["make", "-j4", f"CC={BIN}/securecc gcc"], cwd=workdir, env=environment, capture_output=True,
                          timeout=300)
    return time.monotonic() - started, done


def spec(server) -> str:
    return f"127.0.0.1:{server.port}/4,principal={PRINCIPAL}"


def test_concurrent_writers_keep_every_backoff(tmp_path):
    """Many jobs (processes, or the agent's threads) loaded the file at once and each backs off its own host:
    every back-off is in the file afterwards (the last writer used to drop the others')."""
    path = str(tmp_path / "hosts.json")
    hosts = [Host(f"h{n}", 3637, 4, f"securecc/h{n}") for n in range(16)]
    states = [HostState(path=path) for _ in hosts]  # all read the file before anyone writes
    barrier = threading.Barrier(len(hosts))

    def fail(state: HostState, host: Host) -> None:
        barrier.wait()
        state.failed(host, "cannot connect")

    threads = [threading.Thread(target=fail, args=pair) for pair in zip(states, hosts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fresh = HostState(path=path)
    assert all(fresh.backed_off(h) > 0 for h in hosts), sorted(fresh.hosts)
    assert not list(tmp_path.glob("*.tmp"))
    subprocess.run([sys.executable, "-c", "import sys; from securecc.client.hosts import Host, HostState; "
                    "HostState(path=sys.argv[1]).succeeded(Host('h0', 3637, 4, 'securecc/h0'), 0.01)", path], check=True)
    fresh = HostState(path=path)
    assert not fresh.backed_off(hosts[0]) and all(fresh.backed_off(h) > 0 for h in hosts[1:])


def test_full_hung_and_down_servers_do_not_stop_the_build(realm, own_server, workdir, monkeypatch):
    """One full (BUSY), one hung (SIGSTOP), one down: the build completes on the healthy one, objects exact."""
    names = project(workdir)
    healthy, full, hung = own_server(slots=4), own_server(slots=1), own_server()
    down = f"127.0.0.1:{free_port()}/4,principal={PRINCIPAL}"
    normal, done = build(realm, workdir, spec(healthy))
    assert done.returncode == 0, done.stderr
    expected = {n: (workdir / f"{n}.o").read_bytes() for n in names}
    for n in names:
        local(workdir, "gcc", "-g", "-O2", "-c", f"{n}.c", "-o", f"{n}.local")
        assert (workdir / f"{n}.local").read_bytes() == expected[n]
    blocker = authenticated_channel(full, realm, monkeypatch)
    blocker.sock.sendall(blocker.wire.seal(slow_job(workdir, "40000000L")))  # fills the full one's only slot
    assert wait_until(lambda: full.started() == 1)
    hung.process.send_signal(signal.SIGSTOP)
    try:
        hosts = " ".join([spec(full), spec(hung), down, spec(healthy)])
        elapsed, done = build(realm, workdir, hosts, SECURECC_IO_TIMEOUT="1", SECURECC_CONNECT_TIMEOUT="1")
    finally:
        hung.process.send_signal(signal.SIGCONT)
        blocker.close()
    assert done.returncode == 0, done.stderr
    assert all((workdir / f"{n}.o").read_bytes() == expected[n] for n in names)
    assert b"compiling locally" not in done.stderr  # every job found the healthy server
    assert elapsed < 2 * normal + 1.0, (elapsed, normal)
    assert all(r["decision"] == "busy" for r in full.jobs(principal="alice@TEST.REALM"))
    assert not hung.jobs(principal="alice@TEST.REALM")
    assert len(healthy.jobs(principal="alice@TEST.REALM", decision="allowed")) == 2 * len(names)
    state = json.loads((workdir / ".cache" / "securecc" / "hosts.json").read_text())["hosts"]
    assert state[f"127.0.0.1:{hung.port}"]["until"] > time.time()
    assert "did not answer within 1 s" in state[f"127.0.0.1:{hung.port}"]["why"]
    assert "cannot connect" in state[down.split("/")[0]]["why"]


def test_backoff_expires_and_is_shown(realm, own_server, workdir):
    """A down host is backed off (securecc --show-hosts says so), then tried again once the period ends."""
    s = own_server()
    port = free_port()
    down = f"127.0.0.1:{port}/4,principal={PRINCIPAL}"
    (workdir / "a.c").write_text("int a;\n")
    hosts = f"{down} {spec(s)}"
    securecc(realm, None, "alice", workdir, "gcc", "-c", "a.c", hosts=down, SECURECC_BACKOFF="1")  # fails, built here
    done = securecc(realm, None, "alice", workdir, "gcc", "-c", "a.c", hosts=hosts, SECURECC_VERBOSE="1")
    assert b"compiled a.c" in done.stderr and b"cannot connect" not in done.stderr  # the down host was skipped
    shown = securecc(realm, None, "alice", workdir, "--show-hosts", hosts=hosts)
    lines = shown.stdout.decode().splitlines()
    assert lines[0] == "hosts from SECURECC_HOSTS:"
    assert f"127.0.0.1:{port}/4 principal {PRINCIPAL}: backed off" in lines[1] and "cannot connect" in lines[1]
    assert lines[2].startswith(f"  127.0.0.1:{s.port}/4 principal {PRINCIPAL}: ok, latency ")
    until = json.loads((workdir / ".cache" / "securecc" / "hosts.json").read_text())["hosts"][f"127.0.0.1:{port}"]["until"]
    assert wait_until(lambda: time.time() > until)  # the back-off's end, on the wall clock the client stored it by
    shown = securecc(realm, None, "alice", workdir, "--show-hosts", hosts=hosts)
    assert f"127.0.0.1:{port}/4 principal {PRINCIPAL}: ok" in shown.stdout.decode()


def test_busy_server_turns_work_away_at_once(realm, own_server, workdir, monkeypatch):
    """A full server answers BUSY with its load at once, and audits it."""
    s = own_server(slots=1)
    blocker = authenticated_channel(s, realm, monkeypatch)
    blocker.sock.sendall(blocker.wire.seal(slow_job(workdir, "40000000L")))
    assert wait_until(lambda: s.started() == 1)
    second = authenticated_channel(s, realm, monkeypatch)
    started = time.monotonic()
    reply = second.call(make_job("gcc", [], "c", "-c", str(workdir), "b.c", b"int b;\n"))
    assert time.monotonic() - started < 0.5
    assert reply == wire.Busy("busy:full", 1, 1)
    assert s.jobs(decision="busy")[-1]["reason"] == "busy:full"
    second.close()
    blocker.close()


def test_two_principals_share_a_full_server(realm, own_server, workdir, monkeypatch):
    """alice holds every slot; bob is turned away; then alice's next job yields to bob's."""
    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    from securecc.client.channel import Channel

    s = own_server(slots=2, acl=str(write_acl(workdir, "  - principal: bob\n")))
    creds = {u: credentials_for(realm, u) for u in ("alice", "bob")}

    def channel(user: str) -> Channel:
        c = Channel(parse_host(s.hosts))
        c.authenticate(creds[user])
        return c

    hogs = [channel("alice") for _ in range(2)]
    for n, hog in enumerate(hogs):  # two different jobs (identical ones would share one compile)
        hog.sock.sendall(hog.wire.seal(slow_job(workdir, f"4000000{n}L")))
    assert wait_until(lambda: s.started() == 2)
    bob = channel("bob")
    assert bob.call(make_job("gcc", [], "c", "-c", str(workdir), "b.c", b"int b;\n")).reason == "busy:full"
    hogs[0].close()  # one of alice's compiles ends (killed with its client): its record follows its slot's release
    assert wait_until(lambda: bool(s.jobs(ended_by="disconnect")))
    alice = channel("alice")
    assert alice.call(make_job("gcc", [], "c", "-c", str(workdir), "a.c", b"int a;\n")).reason == "busy:fair-share"
    reply = bob.call(make_job("gcc", [], "c", "-c", str(workdir), "b.c", b"int b;\n"))
    assert isinstance(reply, wire.Result) and reply.exit_status == 0
    for c in (hogs[1], bob, alice):
        c.close()


def write_acl(directory: Path, extra_rules: str) -> Path:
    path = directory / "acl.yaml"
    path.write_text(f"realms: [TEST.REALM]\nallow:\n  - group: committers\n{extra_rules}")
    return path


def parse_host(spec_text: str) -> Host:
    return parse_hosts(spec_text)[0]


def test_check_lists_exactly_the_healthy_hosts(realm, own_server, workdir):
    """securecc-hosts --check: healthy hosts in SECURECC_HOSTS form with latency; the rest explained."""
    healthy, hung = own_server(), own_server()
    down = f"127.0.0.1:{free_port()}/4,principal={PRINCIPAL}"
    hung.process.send_signal(signal.SIGSTOP)
    try:
        env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": f"{spec(healthy)} {spec(hung)} {down}",
               "XDG_CACHE_HOME": str(workdir / ".cache")}
        started = time.monotonic()
        done = subprocess.run([BIN / "securecc-hosts", "--check", "--deadline", "1s"], env=env, capture_output=True,
                              text=True, timeout=30)
        elapsed = time.monotonic() - started
        as_json = subprocess.run([BIN / "securecc-hosts", "--check", "--json", "--deadline", "500ms"], env=env,
                                 capture_output=True, text=True, timeout=30)
    finally:
        hung.process.send_signal(signal.SIGCONT)
    assert done.returncode == 0 and elapsed < 3
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{spec(healthy)}  # ") and lines[0].endswith(" ms")
    assert parse_hosts(done.stdout) == parse_hosts(spec(healthy))  # usable as SECURECC_HOSTS as it stands
    assert f"{spec(hung)} left out" in done.stderr and f"{down} left out: cannot connect" in done.stderr
    results = json.loads(as_json.stdout)
    assert [r["ok"] for r in results] == [True, False, False]
    none = subprocess.run([BIN / "securecc-hosts", "--check", down], env=env, capture_output=True, text=True)
    assert none.returncode == 1


def test_cron_health_check_alerts_with_a_fake_mailer(realm, own_server, workdir):
    """etc/cron/securecc-health sends one alert naming the down host, and nothing when all are healthy."""
    healthy = own_server()
    down = f"127.0.0.1:{free_port()}/4,principal={PRINCIPAL}"
    mailbox = workdir / "mail.txt"
    env = {**realm.user_env("alice", workdir), "PATH": f"{BIN}:{os.environ['PATH']}",
           "SECURECC_ALERT": f"cat > {mailbox}", "XDG_CACHE_HOME": str(workdir / ".cache")}
    script = REPO / "etc" / "cron" / "securecc-health"
    quiet = subprocess.run([script], env={**env, "SECURECC_HOSTS": spec(healthy)}, capture_output=True)
    assert quiet.returncode == 0 and not mailbox.exists()
    alert = subprocess.run([script], env={**env, "SECURECC_HOSTS": f"{spec(healthy)} {down}"}, capture_output=True)
    assert alert.returncode == 1
    text = mailbox.read_text()
    assert f"{down}: cannot connect" in text and spec(healthy) not in text


@pytest.fixture
def dnsmasq(own_server, tmp_path):
    """A real DNS server on loopback publishing _securecc._tcp.test.realm for two servers."""
    first, second = own_server(), own_server()
    port = free_port()
    process = subprocess.Popen([
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
        "--listen-address=127.0.0.1", f"--port={port}", "--user=root" if os.geteuid() == 0 else "--user=",
        "--address=/localhost/127.0.0.1",
        f"--srv-host=_securecc._tcp.test.realm,localhost,{first.port},0,10",
        f"--srv-host=_securecc._tcp.test.realm,localhost,{second.port},10,10",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                break  # dnsmasq holds it
        time.sleep(0.05)
    yield port, first, second
    process.terminate()
    process.wait(5)


def test_dns_srv_discovery(realm, dnsmasq, workdir):
    """With no host list, SRV records (priority honoured) name the servers and their principals."""
    port, first, second = dnsmasq
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    env = {"SECURECC_DOMAIN": "test.realm", "SECURECC_DNS": f"127.0.0.1:{port}", "SECURECC_VERBOSE": "1"}
    shown = securecc(realm, None, "alice", workdir, "--show-hosts", hosts=None, **env)
    lines = shown.stdout.decode().splitlines()
    assert lines[0] == "hosts from DNS SRV _securecc._tcp.test.realm.:"
    assert lines[1].startswith(f"  localhost:{first.port}/4 principal securecc/localhost: ")
    assert lines[2].startswith(f"  localhost:{second.port}/4 principal securecc/localhost: ")
    done = securecc(realm, None, "alice", workdir, "gcc", "-c", "a.c", hosts=None, **env)
    assert done.returncode == 0 and b"compiled a.c on localhost" in done.stderr
    assert len(first.jobs(decision="allowed")) + len(second.jobs(decision="allowed")) == 1


def test_four_servers_two_hundred_jobs(realm, own_server, workdir):
    """200 compiles over 4 servers: every object exact, every remote attempt audited, none lost."""
    servers = [own_server(slots=2) for _ in range(4)]
    hosts = " ".join(spec(s) for s in servers)
    (workdir / "common.h").write_text("#define SCALE(x) ((x) * 3)\n")
    sources = []
    for n in range(200):
        (workdir / f"j{n}.c").write_text(f'#include "common.h"\nint j{n}(int x) {{ return SCALE(x) + {n}; }}\n')
        sources.append(f"j{n}")
    results: dict[str, subprocess.CompletedProcess] = {}
    semaphore = threading.Semaphore(16)

    def compile_one(name: str) -> None:
        with semaphore:
            results[name] = securecc(realm, None, "alice", workdir, "gcc", "-O2", "-c", f"{name}.c", "-o", f"{name}.o",
                                     hosts=hosts, SECURECC_VERBOSE="1")

    threads = [threading.Thread(target=compile_one, args=(n,)) for n in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 200 and all(r.returncode == 0 for r in results.values())
    remote = sum(b"securecc: compiled" in r.stderr for r in results.values())
    fallback = sum(b"compiling locally" in r.stderr for r in results.values())
    assert remote + fallback == 200 and remote > 100
    allowed = sum(len(s.jobs(principal="alice@TEST.REALM", decision="allowed")) for s in servers)
    assert allowed == remote
    for n in sources[:: 20]:
        local(workdir, "gcc", "-O2", "-c", f"{n}.c", "-o", f"{n}.local")
        assert (workdir / f"{n}.o").read_bytes() == (workdir / f"{n}.local").read_bytes()


def test_a_host_without_principal_is_securecc_slash_host_in_the_default_realm(realm, server, workdir):
    """``localhost:PORT`` alone reaches securecc/localhost@TEST.REALM (it asked for securecc@localhost, a principal
    of a realm named "localhost", before)."""
    (workdir / "a.c").write_text("int a;\n")
    done = securecc(realm, server, "alice", workdir, "gcc", "-c", "a.c", hosts=f"localhost:{server.port}",
                    SECURECC_VERBOSE="1")
    assert done.returncode == 0 and f"compiled a.c on localhost:{server.port}".encode() in done.stderr, done.stderr
    assert parse_host("build1.example.com").target == "securecc/build1.example.com"
    assert parse_host("build1.example.com").realm == "" and parse_host("h,principal=securecc/h@R.ORG").realm == "R.ORG"
