#!/usr/bin/env python3
"""What a hung server costs a build: the same build with the host absent, and with it SIGSTOPped.

Not a test: `.venv/bin/python bench/hung_host.py [-n 24] [-j 4]`. Starts a throwaway realm
(krb5-testrealm) and two securecc-servers, builds N generated C files with
`make -jJ CC="securecc gcc"`, prints both wall times and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def start_server(realm: Path, name: str) -> tuple[subprocess.Popen, int]:
    config = yaml.safe_load((realm / "securecc.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = realm / name
    work.mkdir()
    os.chmod(work, 0o755)
    config.update(listen=f"127.0.0.1:{port}", slots=4)
    config["audit"] = {**config["audit"], "path": str(work / "audit.jsonl")}
    config["sandbox"] = {**config["sandbox"], "scratch": str(work / "scratch")}
    (work / "securecc.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, **json.loads((realm / "realm.json").read_text())["env"]}
    process = subprocess.Popen([BIN / "securecc-server", "--config", work / "securecc.yaml"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("securecc-server did not start")


def build(project: Path, realm: Path, hosts: str, jobs: int) -> float:
    env = {**os.environ, **json.loads((realm / "realm.json").read_text())["env"], "SECURECC_HOSTS": hosts,
           "XDG_CACHE_HOME": str(project / ".cache"), "PWD": str(project)}  # fmt: skip
    shutil.rmtree(project / ".cache", ignore_errors=True)
    subprocess.run(["make", "-s", "clean"], cwd=project, check=True)
    started = time.monotonic()
    subprocess.run(["make", "-s", f"-j{jobs}", f"CC={BIN}/securecc gcc"], cwd=project, env=env, check=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=24, help="C files")
    parser.add_argument("-j", type=int, default=4, help="make -j")
    options = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="scc-hung-", dir="/tmp"))
    os.chmod(top, 0o755)
    realm, project = top / "realm", top / "project"
    project.mkdir()
    for n in range(options.n):
        (project / f"f{n}.c").write_text(f"#define SCALE(x) ((x) * 3)\nint f{n}(int x) {{ return SCALE(x) + {n}; }}\n")
    (project / "Makefile").write_text("all: " + " ".join(f"f{n}.o" for n in range(options.n))
                                      + "\n%.o: %.c\n\t$(CC) -g -O2 -c $< -o $@\nclean:\n\trm -f *.o\n")  # fmt: skip
    subprocess.run([sys.executable, REPO / "krb5-testrealm" / "testrealm", "up", realm], check=True, capture_output=True)
    servers = []
    try:
        servers = [start_server(realm, "healthy"), start_server(realm, "hung")]
        principal = ",principal=securecc/localhost@TEST.REALM"
        healthy, hung = (f"127.0.0.1:{port}/4{principal}" for _, port in servers)
        absent = build(project, realm, healthy, options.j)
        servers[1][0].send_signal(signal.SIGSTOP)
        with_hung = build(project, realm, f"{hung} {healthy}", options.j)
        print(f"{options.n} files, make -j{options.j}: host absent {absent:.2f} s, host hung {with_hung:.2f} s, "
              f"lost {with_hung - absent:.2f} s (handshake timeout "
              f"{os.environ.get('SECURECC_HANDSHAKE_TIMEOUT', '5')} s, then back-off)")  # fmt: skip
    finally:
        for process, _ in servers:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            process.wait()
        subprocess.run([sys.executable, REPO / "krb5-testrealm" / "testrealm", "down", realm], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
