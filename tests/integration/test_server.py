"""The Twisted glue in-process: a job on the real reactor (the in-memory half is tests/unit/test_listener.py)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import pytest_twisted
import yaml
from conftest import REPO, make_job
from twisted.internet import threads

from securecc import protocol as wire
from securecc.client.channel import Channel
from securecc.client.hosts import Host
from securecc.server.config import load_config
from securecc.server.main import build, start_handler


@pytest.fixture
def config(realm, tmp_path):
    """The realm's config, with an ACL naming alice directly (no LDAP bind in this process)."""
    acl = tmp_path / "acl.yaml"
    acl.write_text("realms: [TEST.REALM]\nallow:\n  - principal: alice\n")
    os.chmod(tmp_path, 0o755)
    base = load_config(realm.dir / "securecc.yaml")
    return dataclasses.replace(base, acl=acl, audit=dataclasses.replace(base.audit, path=tmp_path / "audit.jsonl"),
                               scratch=realm.dir / f"scratch-{tmp_path.name}",
                               ldap=dataclasses.replace(base.ldap, bind="none"))


@pytest_twisted.inlineCallbacks
def test_job_through_the_real_reactor(realm, config, monkeypatch, workdir):
    """The server built by build() compiles alice's job in its sandbox, in this process's reactor."""
    from twisted.internet import reactor

    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    handler = start_handler(config, reactor)
    yield handler.ready
    factory, pool = build(config, reactor, handler)
    pool.start()
    factory.service.hash_pool.start()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        host = Host("127.0.0.1", port.getHost().port, principal="securecc/localhost@TEST.REALM")

        def submit() -> wire.Message:
            channel = Channel(host)
            channel.authenticate()
            try:
                return channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), "t.c", b"int t(void){return 7;}\n"))
            finally:
                channel.close()

        reply = yield threads.deferToThread(submit)
    finally:
        yield port.stopListening()
        pool.stop()
        factory.service.hash_pool.stop()
        handler.on_gone = lambda: None  # the server would stop its reactor: this one is pytest's
        handler.transport.loseConnection()
    assert isinstance(reply, wire.Result) and reply.exit_status == 0
    assert reply.output and reply.output.startswith(b"\x7fELF")
    record = json.loads(config.audit.path.read_text().splitlines()[-1])
    assert (record["principal"], record["decision"], record["reason"]) == ("alice@TEST.REALM", "allowed", "allowed:principal:alice")


def test_process_limit_grows_with_slots(tmp_path):
    """RLIMIT_NPROC counts every job of the shared sandbox uid: the default leaves 16 processes per slot."""
    base = yaml.safe_load((REPO / "etc" / "securecc.yaml").read_text())
    for slots, expected in ((4, 256), (64, 1024)):
        path = tmp_path / f"s{slots}.yaml"
        path.write_text(yaml.safe_dump({**base, "slots": slots}))
        assert load_config(path).sandbox.limits.processes == expected
