"""Fixtures: a real realm (MIT KDC + slapd via testrealm), real servers, the real CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from securecc import protocol as wire
from securecc.args import SERVER_PREPROCESSES
from securecc.audit import records as audit_records
from securecc.toolchain import HeaderDigests, probe

REPO = Path(__file__).resolve().parent.parent
TESTREALM = REPO / "krb5-testrealm" / "testrealm"
BIN = Path(sys.executable).parent


@dataclass
class Realm:
    dir: Path
    info: dict

    @property
    def env(self) -> dict[str, str]:
        """The realm's environment (as env.sh exports it) over a clean base."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KRB5", "SECURECC"))}
        return {**base, **self.info["env"]}

    def user_env(self, user: str | None, tmp: Path) -> dict[str, str]:
        """Environment of ``user`` getting tickets from its keytab; None = no credentials at all."""
        env = self.env
        env["KRB5CCNAME"] = f"FILE:{tmp}/{user or 'nobody'}.ccache"
        env["KRB5_CLIENT_KTNAME"] = str(self.dir / f"{user}.keytab") if user else str(tmp / "no.keytab")
        env["SECURECC_AGENT_DIR"] = str(self.agents)  # the CLI goes through an agent, as a user's does
        env["SECURECC_AGENT_IDLE"] = "60"
        env["SECURECC_VERIFY_RATE"] = "0"  # no test's output may depend on a 1% draw; the checks' own tests set it
        return env

    @property
    def agents(self) -> Path:
        return self.dir / "agents"



def stop_agents(directory: Path) -> None:
    for pid_file in directory.glob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="session", autouse=True)
def agent_directory(tmp_path_factory):
    """Agents the tests start (every `securecc` run goes through one) live here and are stopped at the end.
    The client's state (host back-off, compiler identities, pinned server keys) goes to a directory of the run's
    too: every test realm has a key of its own for the same principal, which must not reach the user's cache."""
    directory = tmp_path_factory.mktemp("agents")
    os.environ["SECURECC_AGENT_DIR"] = str(directory)
    os.environ["SECURECC_AGENT_IDLE"] = "60"
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield directory
    stop_agents(directory)


@pytest.fixture(scope="session")
def realm():
    """TEST.REALM with alice (committer) and bob (not), in a short path for the ldapi socket."""
    directory = Path(tempfile.mkdtemp(prefix="scc-", dir="/tmp"))
    os.chmod(directory, 0o755)  # the sandbox uid must traverse to the scratch dir
    subprocess.run([sys.executable, TESTREALM, "up", directory], check=True, capture_output=True)
    info = json.loads((directory / "realm.json").read_text())
    realm = Realm(directory, info)
    try:
        yield realm
    finally:
        stop_agents(realm.agents)
        subprocess.run([sys.executable, TESTREALM, "down", directory], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running securecc-server process with its own config, audit log and scratch."""

    config_path: Path
    port: int
    audit_path: Path
    log_path: Path
    process: subprocess.Popen
    hosts: str = field(default="")
    monitor_port: int = 0

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return list(audit_records([self.audit_path]))  # skips a torn line

    def records(self, event: str, **match: object) -> list[dict]:
        """Its audit records of ``event`` whose fields have the values in ``match``."""
        return [r for r in self.audit() if r.get("event") == event and all(r.get(k) == v for k, v in match.items())]

    def jobs(self, **match: object) -> list[dict]:
        return self.records("job", **match)

    def started(self) -> int:
        """Compiles that took a slot: each writes its ``job-start`` record as it takes it."""
        return len(self.records("job-start"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(realm: Realm, workdir: Path, env: dict[str, str] | None = None, **overrides: object) -> Server:
    """Start securecc-server on a free port with the realm's config plus ``overrides`` (``env``: over the realm's)."""
    config = yaml.safe_load((realm.dir / "securecc.yaml").read_text())
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    config.update(listen=f"127.0.0.1:{port}")
    config["audit"] = {**config["audit"], "path": str(workdir / "audit.jsonl")}
    config["cache"] = {**config["cache"], "path": str(workdir / "cache")}  # each server its own
    config["monitor"] = {**config["monitor"], "listen": f"127.0.0.1:{free_port()}"}
    config["sandbox"] = {**config["sandbox"], "scratch": str(workdir / "scratch")}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    config_path = workdir / "securecc.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "server.log"
    env = {**realm.env, **(env or {})}
    process = subprocess.Popen(
        [BIN / "securecc-server", "--config", config_path],
        env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"securecc-server exited: {log_path.read_text()}")
        if b"securecc-server listening on" in log_path.read_bytes():  # the port is bound before it serves
            break
        time.sleep(0.05)
    else:
        process.kill()
        raise RuntimeError(f"securecc-server did not listen: {log_path.read_text()}")
    hosts = f"127.0.0.1:{port},principal=securecc/localhost@TEST.REALM"
    server = Server(config_path, port, Path(config["audit"]["path"]), log_path, process, hosts)
    server.monitor_port = int(config["monitor"]["listen"].rpartition(":")[2]) if config.get("monitor") else 0
    return server


@pytest.fixture(scope="session")
def server(realm):
    """One shared server for tests that do not disturb it."""
    s = start_server(realm, realm.dir / "shared-server")
    yield s
    s.stop()


@pytest.fixture
def own_server(realm, tmp_path_factory):
    """A server of the test's own (to kill, or with special settings): call it with overrides."""
    started: list[Server] = []

    def make(env: dict[str, str] | None = None, **overrides: object) -> Server:
        workdir = Path(tempfile.mkdtemp(prefix="srv-", dir=realm.dir))
        s = start_server(realm, workdir, env, **overrides)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def workdir(realm):
    """A build directory the sandbox uid can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="w-", dir=realm.dir))
    os.chmod(path, 0o755)
    return path


def securecc(realm: Realm, server: Server | None, user: str | None, cwd: Path, *args: str,
             hosts: str | None = None, shim: Path = BIN / "securecc", **env_overrides: str) -> subprocess.CompletedProcess:
    """Run the real ``securecc`` CLI (or ``shim``) as ``user`` in ``cwd``."""
    env = realm.user_env(user, cwd)
    if hosts is not None or server is not None:
        env["SECURECC_HOSTS"] = hosts if hosts is not None else server.hosts
    else:
        env.pop("SECURECC_HOSTS", None)  # discovery: hosts files, then DNS SRV
    env["PWD"] = str(cwd)
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")  # the client's compiler-identity cache
    env.update(env_overrides)
    return subprocess.run([shim, *args], cwd=cwd, env=env, capture_output=True, timeout=120)


def local(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, env={**os.environ, "PWD": str(cwd), **env}, capture_output=True, timeout=120)


def processes_of_uid(uid: int) -> list[str]:
    """Command lines of live (non-zombie) processes owned by ``uid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            if f"\nUid:\t{uid}\t" in status and "\nState:\tZ" not in status:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


class _Identities(dict):
    """gcc's and g++'s identities, probed on first use: importing conftest runs no compiler (unit tests need none)."""

    def __missing__(self, compiler: str) -> str:
        if compiler not in ("gcc", "g++"):
            raise KeyError(compiler)
        self[compiler] = probe(f"/usr/bin/{compiler}")
        return self[compiler]


IDENTITIES = _Identities()


def make_job(compiler: str, *fields: object, **named: object) -> wire.Job:
    """A wire.Job as the client builds it, with the compiler identity it would send."""
    named.setdefault("compiler_identity", IDENTITIES[compiler] if compiler in ("gcc", "g++") else "")
    job = wire.Job(compiler, *fields, **named)
    if job.language in SERVER_PREPROCESSES and not job.system_digest:
        job = dataclasses.replace(job, system_digest=HeaderDigests().of(job.system_headers))
    return job


REAL_COMPONENTS = {"realm", "server", "own_server", "workdir"}  # fixtures that start a KDC, slapd, a server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/unit runs without KDC, slapd, gcc or bwrap: a unit test that asks for a real component fails
    at collection instead of quietly becoming an integration test."""
    unit = Path(__file__).parent / "unit"
    for item in items:
        wanted = REAL_COMPONENTS & set(getattr(item, "fixturenames", ()))
        if unit in Path(str(item.path)).parents and wanted:
            raise pytest.UsageError(f"{item.nodeid} is in tests/unit but uses {', '.join(sorted(wanted))}: move it to tests/integration")
