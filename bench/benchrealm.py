"""Shared by the benchmarks: a throwaway realm with securecc-servers, and timed builds through them."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PRINCIPAL = ",principal=securecc/localhost@TEST.REALM"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Realm:
    """testrealm up in ``directory``; servers started on demand; everything stopped by close()."""

    def __init__(self, directory: Path, acl: str | None = None) -> None:
        self.dir = directory
        subprocess.run([sys.executable, REPO / "krb5-testrealm" / "testrealm", "up", directory], check=True,
                       capture_output=True)
        if acl:
            (directory / "acl.yaml").write_text(acl)
        self.env = json.loads((directory / "realm.json").read_text())["env"]
        self.servers: list[subprocess.Popen] = []

    def server(self, name: str, **settings: object) -> tuple[subprocess.Popen, str]:
        """A securecc-server with the realm's config plus ``settings``; returns it and its SECURECC_HOSTS entry."""
        config = yaml.safe_load((self.dir / "securecc.yaml").read_text())
        port = free_port()
        work = self.dir / name
        work.mkdir()
        os.chmod(work, 0o755)
        config.update(listen=f"127.0.0.1:{port}", **settings)
        config["audit"] = {**config["audit"], "path": str(work / "audit.jsonl")}
        config["cache"] = {**config["cache"], "path": str(work / "cache")}
        config["sandbox"] = {**config["sandbox"], "scratch": str(work / "scratch")}
        (work / "securecc.yaml").write_text(yaml.safe_dump(config))
        process = subprocess.Popen([BIN / "securecc-server", "--config", work / "securecc.yaml"],
                                   env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.servers.append(process)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                return process, f"127.0.0.1:{port}/8{PRINCIPAL}"
            except OSError:
                time.sleep(0.05)
        raise SystemExit("securecc-server did not start")

    def user_env(self, user: str, cache_home: Path) -> dict[str, str]:
        return {**os.environ, **self.env, "KRB5CCNAME": f"FILE:{cache_home}/{user}.ccache",
                "KRB5_CLIENT_KTNAME": str(self.dir / f"{user}.keytab"), "XDG_CACHE_HOME": str(cache_home)}

    def close(self) -> None:
        for process in self.servers:
            process.terminate()
            process.wait()
        subprocess.run([sys.executable, REPO / "krb5-testrealm" / "testrealm", "down", self.dir], capture_output=True)


def timed_make(project: Path, args: list[str], env: dict[str, str] | None = None, clean: str = "clean") -> float:
    """Wall time of ``make ARGS`` after ``make clean``."""
    subprocess.run(["make", "-s", clean], cwd=project, capture_output=True)
    started = time.monotonic()
    done = subprocess.run(["make", "-s", *args], cwd=project, env={**(env or os.environ), "PWD": str(project)},
                          capture_output=True)
    if done.returncode != 0 or os.environ.get("BENCH_VERBOSE"):
        sys.stderr.write(done.stderr.decode(errors="replace")[-3000:])
        if done.returncode != 0:
            raise SystemExit(f"make {' '.join(args)} failed")
    return time.monotonic() - started


def debian_source(package: str, where: Path) -> Path:
    """The upstream tree of a Debian source package: ``apt-get source --download-only``, then its
    .orig tarball unpacked (the Debian-patched tree needs its packaging's configure step to build).
    deb-src is enabled for the same suite if need be; a version whose files 404 gives way to older ones."""
    target = where / package
    if target.is_dir() and any(p.is_dir() for p in target.iterdir()):
        return next(p for p in target.iterdir() if p.is_dir())
    shutil_rm(target)  # what an interrupted earlier call left
    target.mkdir(parents=True)
    sources = Path("/etc/apt/sources.list.d/debian-src.sources")
    if not sources.exists() and Path("/etc/apt/sources.list.d/debian.sources").exists() and os.geteuid() == 0:
        text = Path("/etc/apt/sources.list.d/debian.sources").read_text().replace("Types: deb\n", "Types: deb-src\n")
        sources.write_text(text)
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
    failures: list[str] = []
    for version in [None, *source_versions(package)]:  # the candidate first, then the suite's own versions
        wanted = package if version is None else f"{package}={version}"
        done = subprocess.run(["apt-get", "source", "-q", "--download-only", wanted], cwd=target, capture_output=True,
                              check=False)
        if done.returncode == 0:
            break
        failures.append(f"{wanted}: {done.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
        for leftover in target.iterdir():  # a security update's files can 404 while part of it arrived
            leftover.unlink()
    else:
        target.rmdir()
        raise SystemExit(f"apt-get source {package} failed for every version: {'; '.join(failures)}")
    orig = next(p for p in target.iterdir() if ".orig.tar." in p.name and not p.name.endswith(".asc"))
    subprocess.run(["tar", "xf", orig.name], cwd=target, check=True)
    return next(p for p in target.iterdir() if p.is_dir())


def source_versions(package: str) -> list[str]:
    """The versions of a source package that apt knows, newest first: a security update's files may be
    missing from a mirror (404) while the suite's own version is there."""
    shown = subprocess.run(["apt-cache", "showsrc", package], capture_output=True, text=True, check=True).stdout
    versions = list(dict.fromkeys(line.split()[1] for line in shown.splitlines() if line.startswith("Version: ")))

    def compare(a: str, b: str) -> int:
        return -1 if subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode == 0 else 1

    return sorted(versions, key=functools.cmp_to_key(compare), reverse=True)


def ensure_tools(tools: dict[str, str]) -> None:
    """Install (apt) the Debian packages of ``tools`` (command: package) whose command is missing."""
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing tools; install them first: apt-get install {' '.join(missing)}")
    print(f"installing {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env,
                      check=False).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, check=True)


def shutil_rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
