"""A KDC that does not answer: jobs that need a ticket fall back at once, with one line; cached tickets still work.

The KDC here is a socket that accepts and never answers, as a hung or
SIGSTOPped krb5kdc does (libkrb5 waits ~27 s for each request to one).
The server in SECURECC_HOSTS is either the real one (its ticket cached
first) or a listener that counts connections: none may be opened while a
job waits for the KDC.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import local, securecc
from test_agent import kinit

PRINCIPAL = "principal=securecc/localhost@TEST.REALM"
SOURCES = 8


@pytest.fixture
def silent_kdc(realm, tmp_path):
    """A krb5.conf whose KDC accepts TCP connections (and takes UDP datagrams) and never answers."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(128)
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    conf = Path(realm.env["KRB5_CONFIG"]).read_text()
    path = tmp_path / "silent-kdc.conf"
    path.write_text(re.sub(r"kdc = 127\.0\.0\.1:\d+", f"kdc = 127.0.0.1:{port}", conf))
    yield str(path)
    tcp.close()
    udp.close()


class Listener:
    """A "server" that only counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.hosts = f"127.0.0.1:{self.sock.getsockname()[1]},{PRINCIPAL}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                self.sock.accept()[0].close()
                self.accepted += 1
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def project(workdir: Path) -> None:
    for n in range(SOURCES):
        (workdir / f"s{n}.c").write_text(f"int f{n}(int x) {{ return x * {n + 1}; }}\n")


def build(realm, workdir: Path, hosts: str, kdc_conf: str, **env: str) -> tuple[float, list]:
    """Every source at once, as ``make -j8`` would start them; (wall seconds, the runs)."""
    started = time.monotonic()
    with ThreadPoolExecutor(SOURCES) as pool:
        runs = list(pool.map(lambda n: securecc(realm, None, "alice", workdir, "gcc", "-O2", "-c", f"s{n}.c", hosts=hosts,
                                                KRB5_CONFIG=kdc_conf, KRB5_CLIENT_KTNAME=str(workdir / "none.keytab"),
                                                **env), range(SOURCES)))
    return time.monotonic() - started, runs


def kdc_lines(runs: list) -> list[str]:
    return [line for run in runs for line in run.stderr.decode().splitlines() if "Kerberos KDC" in line]


def objects_are_gccs(workdir: Path) -> None:
    for n in range(SOURCES):
        local(workdir, "gcc", "-O2", "-c", f"s{n}.c", "-o", f"l{n}.o")
        assert (workdir / f"s{n}.o").read_bytes() == (workdir / f"l{n}.o").read_bytes()


@pytest.mark.parametrize("agent", ["on", "off"])
def test_a_silent_kdc_costs_a_build_one_deadline_and_one_line(realm, workdir, silent_kdc, listener, agent):
    """A fresh ccache (a TGT, no service ticket): 8 parallel jobs wait one 1 s deadline, not 27 s each, say it
    once, never connect to the server, and later jobs fall back at once and quietly."""
    project(workdir)
    kinit(realm, workdir / "alice.ccache", "alice")
    elapsed, runs = build(realm, workdir, listener.hosts, silent_kdc, SECURECC_KDC_TIMEOUT="1", SECURECC_AGENT=agent)
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    objects_are_gccs(workdir)
    assert elapsed < 8, f"the build took {elapsed:.1f} s"
    said = kdc_lines(runs)
    assert len(said) == 1 if agent == "on" else 1 <= len(said) <= SOURCES, said
    assert "the Kerberos KDC did not answer within 1 s" in said[0] and "tickets already cached still work" in said[0]
    assert listener.accepted == 0, "a job held a connection to the server while it waited for the KDC"

    elapsed, runs = build(realm, workdir, listener.hosts, silent_kdc, SECURECC_KDC_TIMEOUT="1", SECURECC_AGENT=agent)
    assert all(run.returncode == 0 for run in runs) and kdc_lines(runs) == []
    assert elapsed < 4, f"jobs during the outage took {elapsed:.1f} s"
    assert listener.accepted == 0
    shown = securecc(realm, None, "alice", workdir, "--show-hosts", hosts=listener.hosts, KRB5_CONFIG=silent_kdc)
    assert "Kerberos KDC of TEST.REALM: not answering" in shown.stdout.decode(), shown.stdout


def test_cached_tickets_keep_working_while_the_kdc_is_silent(realm, server, workdir, silent_kdc, listener):
    """A ticket for the server got before the outage: new connections still authenticate, during the back-off too."""
    project(workdir)
    kinit(realm, workdir / "alice.ccache", "alice")
    first = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", "s0.c", SECURECC_AGENT="off",
                     SECURECC_VERBOSE="1", KRB5_CLIENT_KTNAME=str(workdir / "none.keytab"))
    assert b"compiled s0.c on 127.0.0.1" in first.stderr, first.stderr
    # Another server whose ticket is not cached puts the KDC into back-off.
    hosts = f"{listener.hosts.replace(PRINCIPAL, 'principal=securecc/elsewhere@TEST.REALM')}"
    cut_off = securecc(realm, None, "alice", workdir, "gcc", "-O2", "-c", "s1.c", hosts=hosts, KRB5_CONFIG=silent_kdc,
                       SECURECC_KDC_TIMEOUT="1", KRB5_CLIENT_KTNAME=str(workdir / "none.keytab"))
    assert cut_off.returncode == 0 and b"KDC did not answer" in cut_off.stderr, cut_off.stderr
    for agent in ("off", "on"):
        started = time.monotonic()
        done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", "s2.c", KRB5_CONFIG=silent_kdc,
                        SECURECC_VERBOSE="1", SECURECC_AGENT=agent, KRB5_CLIENT_KTNAME=str(workdir / "none.keytab"))
        assert done.returncode == 0 and b"compiled s2.c on 127.0.0.1:" in done.stderr, done.stderr
        assert time.monotonic() - started < 3
    assert listener.accepted == 0
