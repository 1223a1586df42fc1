"""The Twisted glue in-process: deadlines on an injected clock, and a job on the real reactor."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import pytest_twisted
import yaml
from conftest import REPO, make_job
from twisted.internet import task, threads
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.threadpool import ThreadPool

from securecc import protocol as wire
from securecc.audit import load_private_key
from securecc.client.channel import Channel
from securecc.client.hosts import Host
from securecc.gss import Acceptor
from securecc.server.aclfile import AclFile
from securecc.server.auditlog import AuditLog
from securecc.server.config import load_config
from securecc.server.directory import Directory
from securecc.server.listener import JobProtocol
from securecc.server.main import build, start_handler
from securecc.server.service import CompileService


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


def connected_protocol(config) -> tuple[JobProtocol, StringTransport, task.Clock]:
    clock = task.Clock()
    audit = AuditLog(config.audit.path, load_private_key(config.audit.key), "test")
    service = CompileService(config, MemoryReactorClock(), clock, AclFile(config.acl), Directory(config.ldap),
                             ThreadPool(), audit, {})
    proto = JobProtocol(service, Acceptor(config.principal, config.keytab))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def test_handshake_deadline(config):
    """A peer that connects and says nothing is dropped when the handshake deadline passes."""
    _proto, transport, clock = connected_protocol(config)
    clock.advance(config.handshake_timeout - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_unsupported_version_gets_a_clear_error(config):
    """A client speaking only a future version is told which version the server speaks."""
    proto, transport, _clock = connected_protocol(config)
    proto.dataReceived(wire.hello(7, 9))
    events = wire.Connection().receive_data(transport.value())
    assert events == [wire.ErrorReceived("unsupported-version", f"this server speaks version {wire.VERSION}")]
    assert transport.disconnecting


def test_token_before_hello_is_a_protocol_error(config):
    """The handshake has an order: a GSS token without a hello drops the connection."""
    proto, transport, _clock = connected_protocol(config)
    proto.dataReceived(wire.token(b"\x60\x01\x00"))
    assert transport.disconnecting and transport.value() == b""


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
