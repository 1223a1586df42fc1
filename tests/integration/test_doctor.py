"""`securecc doctor` and SECURECC_FALLBACK=0 against a real realm and servers, as a user and a CI job run them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import free_port, securecc


def lines(done) -> dict[str, str]:
    """The report by check name: "OK  host x: detail" -> {"host x": "OK  ..."}."""
    found = {}
    for line in done.stdout.decode().splitlines():
        _status, rest = line.split(None, 1)
        found[rest.partition(": ")[0]] = line
    return found


def test_a_healthy_farm_is_all_ok(realm, server, workdir):
    done = securecc(realm, server, "alice", workdir, "doctor")
    report = lines(done)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    name = f"host 127.0.0.1:{server.port}"
    for check in ("ticket", "client keytab", "agent directory", "hosts", f"{name} principal", f"{name} authentication",
                  f"{name} clock", f"{name} compile", f"{name} result key", "remote compiles"):
        assert report[check].startswith("OK"), (check, done.stdout.decode())
    assert "alice@TEST.REALM" in report["ticket"] and "left" in report["ticket"]
    assert "same compiler" in report[f"{name} compile"] and " ms" in report[f"{name} compile"]
    assert "1 of 1 hosts take jobs" in report["remote compiles"]


def test_no_ticket_fails_and_says_kinit(realm, server, workdir):
    done = securecc(realm, server, None, workdir, "doctor")
    report = lines(done)
    assert done.returncode == 1 and report["ticket"].startswith("FAIL") and "kinit" in report["ticket"], done.stdout.decode()
    assert report["client keytab"].startswith("FAIL")  # KRB5_CLIENT_KTNAME names a keytab that is not there


def test_a_dead_farm_warns_and_strict_fails(realm, workdir):
    dead = f"127.0.0.1:{free_port()},principal=securecc/localhost@TEST.REALM"
    done = securecc(realm, None, "alice", workdir, "doctor", hosts=dead)
    report = lines(done)
    assert done.returncode == 0, done.stdout.decode()
    assert report[f"host {dead.partition(',')[0]}"].startswith("WARN") and "connect" in report[f"host {dead.partition(',')[0]}"]
    assert report["remote compiles"].startswith("WARN") and "stay local" in report["remote compiles"]
    strict = securecc(realm, None, "alice", workdir, "doctor", "--strict", hosts=dead)
    assert strict.returncode == 1 and lines(strict)["remote compiles"].startswith("FAIL"), strict.stdout.decode()


def test_a_host_principal_the_kdc_does_not_know_fails(realm, server, workdir):
    wrong = f"127.0.0.1:{server.port},principal=securecc/nosuchhost@TEST.REALM"
    done = securecc(realm, None, "alice", workdir, "doctor", hosts=wrong)
    line = lines(done)[f"host 127.0.0.1:{server.port} principal"]
    assert done.returncode == 1 and line.startswith("FAIL") and "unknown to the KDC" in line, done.stdout.decode()


def test_an_agent_directory_open_to_others_fails(realm, server, workdir):
    directory = workdir / "agents-open"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    done = securecc(realm, server, "alice", workdir, "doctor", SECURECC_AGENT_DIR=str(directory))
    line = lines(done)["agent directory"]
    assert done.returncode == 1 and line.startswith("FAIL") and f"chmod 700 {directory}" in line, done.stdout.decode()


def test_another_compiler_on_the_server_is_a_warning(realm, server, workdir):
    """The client's gcc says something else of itself than the server's: doctor says its gcc jobs stay off that host."""
    cache = workdir / ".cache" / "securecc" / "compilers.json"
    securecc(realm, server, "alice", workdir, "doctor")  # fills the identity cache
    known = json.loads(cache.read_text())
    for entry in known.values():
        entry[-1] = "gcc (GCC) 99.0.0; target x86_64-linux-gnu"
    cache.write_text(json.dumps(known))
    done = securecc(realm, server, "alice", workdir, "doctor")
    line = lines(done)[f"host 127.0.0.1:{server.port} compile"]
    assert line.startswith("WARN") and "same gcc" in line, done.stdout.decode()
    assert lines(done)["remote compiles"].startswith("WARN")


def test_no_fallback_fails_a_compile_the_farm_cannot_take(realm, workdir):
    """SECURECC_FALLBACK=0: a job that should go remote and cannot fails with the reason; a link stays local."""
    (workdir / "t.c").write_text("int main(void) { return 0; }\n")
    dead = f"127.0.0.1:{free_port()},principal=securecc/localhost@TEST.REALM"
    done = securecc(realm, None, "alice", workdir, "gcc", "-c", "t.c", hosts=dead, SECURECC_FALLBACK="0")
    assert done.returncode == 1 and not (workdir / "t.o").exists()
    assert b"not compiling locally (SECURECC_FALLBACK=0)" in done.stderr and done.stderr.count(b"\n") == 1, done.stderr
    fallen_back = securecc(realm, None, "alice", workdir, "gcc", "-c", "t.c", hosts=dead)
    assert fallen_back.returncode == 0 and (workdir / "t.o").exists() and b"compiling locally" in fallen_back.stderr
    linked = securecc(realm, None, "alice", workdir, "gcc", "t.o", "-o", "t", hosts=dead, SECURECC_FALLBACK="0")
    assert linked.returncode == 0 and Path(workdir / "t").exists()


def test_a_server_signing_with_another_key_than_the_pinned_one_fails(realm, server, workdir):
    state = workdir / ".cache" / "securecc" / "hosts.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"hosts": {}, "keys": {"securecc/localhost@TEST.REALM": "AAAA" * 11}}))
    done = securecc(realm, server, "alice", workdir, "doctor")
    line = lines(done)[f"host 127.0.0.1:{server.port} result key"]
    assert done.returncode == 1 and line.startswith("FAIL") and "delete its entry" in line, done.stdout.decode()
    assert json.loads(state.read_text())["keys"] == {"securecc/localhost@TEST.REALM": "AAAA" * 11}  # doctor pins nothing
