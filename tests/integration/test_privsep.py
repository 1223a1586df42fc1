"""Privilege separation: the front drops to its own user, the job handler has another, and
neither the handler nor a sandbox can read what the front holds."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import securecc

from securecc.server.config import ConfigError, load_config

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the uid switches need root (CI runs as root)")
FRONT, HANDLER = 65534, 64999  # nobody, and a uid with no account at all


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("\nUid:\t", 1)[1].split()[0])


def handler_pids(server_pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"securecc.server.handler" in cmdline and ppid == server_pid:
                found.append(int(entry.name))
    return found


@root_only
def test_front_runs_as_its_user_and_the_handler_cannot_read_its_secrets(realm, own_server, workdir):
    """run_as: the front is nobody after binding and spawning; the handler (uid 64999) compiles alice's
    job but can open none of the keytab, audit key, signing key, config or ACL."""
    secrets = workdir / "secrets"
    secrets.mkdir(mode=0o700)
    for name in ("service.keytab", "audit.key", "signing.key", "acl.yaml"):
        shutil.copy(realm.dir / name, secrets / name)
    rcache = workdir / "rcache"
    rcache.mkdir()
    audit_dir = workdir / "audit"
    audit_dir.mkdir()
    for path in (secrets, *secrets.iterdir(), rcache, audit_dir):
        os.chown(path, FRONT, FRONT)
    s = own_server(env={"KRB5RCACHEDIR": str(rcache)}, run_as="nobody", keytab=str(secrets / "service.keytab"),
                   acl=str(secrets / "acl.yaml"), signing_key=str(secrets / "signing.key"), sandbox={"uid": HANDLER, "gid": HANDLER},
                   audit={"key": str(secrets / "audit.key"), "path": str(audit_dir / "audit.jsonl")})
    s.audit_path = audit_dir / "audit.jsonl"
    os.chmod(s.config_path, 0o600)  # as an admin installs it (the fixture writes it world-readable)
    assert uid_of(s.process.pid) == FRONT
    [handler] = handler_pids(s.process.pid)
    assert uid_of(handler) == HANDLER
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    done = securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled a.c on 127.0.0.1" in done.stderr, done.stderr
    assert s.jobs(decision="allowed")
    for secret in (*secrets.iterdir(), s.config_path):
        attempt = subprocess.run(["setpriv", f"--reuid={HANDLER}", f"--regid={HANDLER}", "--clear-groups", "cat", secret],
                                 capture_output=True)
        assert attempt.returncode != 0, secret


def test_compiler_roots_cannot_be_the_host_or_hold_secrets(realm, tmp_path):
    base = yaml.safe_load((realm.dir / "securecc.yaml").read_text())
    toolchain = tmp_path / "cross"
    (toolchain / "bin").mkdir(parents=True)
    gcc = toolchain / "bin" / "gcc"
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(0o755)
    cases = {"/": "/bin/true", "/usr": "/usr/bin/gcc", "/etc": "/etc/cron.daily/dpkg"}
    for root, path in cases.items():
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, "compilers": {"gcc": {"path": path, "root": root}}}))
        with pytest.raises(ConfigError, match="root"):
            load_config(tmp_path / "c.yaml")
    keytab = toolchain / "service.keytab"
    shutil.copy(realm.dir / "service.keytab", keytab)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, "keytab": str(keytab),
                                                      "compilers": {"gcc": {"path": str(gcc), "root": str(toolchain)}}}))
    with pytest.raises(ConfigError, match="holds"):
        load_config(tmp_path / "c.yaml")
    os.chmod(toolchain, 0o777)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, "compilers": {"gcc": {"path": str(gcc), "root": str(toolchain)}}}))
    with pytest.raises(ConfigError, match="writable"):
        load_config(tmp_path / "c.yaml")


def test_a_secret_open_to_other_users_stops_the_server(realm, own_server, workdir):
    """A keytab others can read would be readable by the job handler's uid: the server refuses to start."""
    keytab = workdir / "open.keytab"
    shutil.copy(realm.dir / "service.keytab", keytab)
    os.chmod(keytab, 0o644)
    with pytest.raises(RuntimeError, match="open to other users"):
        own_server(keytab=str(keytab))
