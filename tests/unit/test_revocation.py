"""Live revocation on the real service over twins: a revoked principal's job is killed and recorded, its session
closed, on an admin's word or when the ACL stops allowing it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from securecc import handshake
from securecc import protocol as wire
from securecc.audit import records
from securecc.server.listener import JobProtocol
from securecc.server.lookups import MembershipLookups
from securecc.server.session import Session
from securecc.testing import GCC_IDENTITY, MemoryAcceptor, MemoryDirectory, MemoryInitiator, MemoryService, memory_service

ALICE, CAROL, SERVER = "alice@TEST.REALM", "carol@TEST.REALM", "securecc/localhost@TEST.REALM"
ACL = "realms: [TEST.REALM]\nallow:\n  - principal: alice\n  - principal: carol\nadmins:\n  principals: [carol]\n"


def job() -> wire.Job:
    return wire.Job("gcc", ["-O2"], "c", "-c", "/src", "a.c", b"int a;\n", compiler_identity=GCC_IDENTITY)


def running(s: MemoryService, principal: str = ALICE) -> tuple[Session, defer.Deferred[Any]]:
    session = Session(principal, "127.0.0.1:40000", 3600.0, transport=StringTransport())
    s.service.sessions.add(session)
    return session, s.service.run(session, job())


def logged(s: MemoryService, event: str) -> list[dict[str, Any]]:
    return [r for r in records([s.log]) if r["event"] == event]


def test_a_revocation_kills_the_job_records_it_and_closes_the_session(tmp_path: Path) -> None:
    s = memory_service(tmp_path, acl=ACL)
    session, reply = running(s)
    assert s.handler.runs and s.service.revoke(ALICE, "revoked:admin", by=CAROL) == (1, 1)
    assert session.transport.disconnecting and session not in s.service.sessions
    [record] = logged(s, "job")
    assert record["ended_by"] == "revoked" and record["delivered"] is False
    [revoked] = logged(s, "revoked")
    assert (revoked["principal"], revoked["sessions"], revoked["jobs"], revoked["by"]) == (ALICE, 1, 1, CAROL)
    assert reply.called


def test_an_acl_that_denies_a_principal_revokes_its_open_sessions(tmp_path: Path) -> None:
    s = memory_service(tmp_path, acl=ACL)
    directory = MemoryDirectory()
    s.service.__dict__["lookups"] = MembershipLookups(directory, lambda call: defer.succeed(call()))
    session, _ = running(s)
    s.service.recheck()
    assert not session.cancelled  # the ACL in force still allows alice
    (tmp_path / "acl.yaml").write_text(ACL + "deny:\n  principals: [alice]\n")
    s.service.recheck()  # a change seen, not yet settled: a half-written save is never used
    assert not session.cancelled
    s.clock.advance(2)  # settled on the server's clock
    s.service.recheck()
    assert session.cancelled and logged(s, "job")[0]["ended_by"] == "revoked"
    assert logged(s, "revoked")[0]["reason"] == "denied:principal-deny-list"


def test_an_ldap_outage_revokes_nobody(tmp_path: Path) -> None:
    s = memory_service(tmp_path, acl="realms: [TEST.REALM]\nallow:\n  - group: committers\n")
    s.service.__dict__["lookups"] = MembershipLookups(MemoryDirectory(down=True), lambda call: defer.maybeDeferred(call))
    session, _ = running(s)
    s.service.recheck()
    assert not session.cancelled and not logged(s, "revoked")


def test_an_admin_revokes_through_the_protocol(tmp_path: Path) -> None:
    s = memory_service(tmp_path, acl=ACL)
    victim, _ = running(s)
    proto = JobProtocol(s.service, MemoryAcceptor(SERVER, clients=frozenset({CAROL})))
    transport = StringTransport()
    proto.makeConnection(transport)
    initiator = MemoryInitiator(CAROL, SERVER)
    ours = handshake.ClientHandshake(wire.Connection(), initiator)
    proto.dataReceived(ours.opening(initiator.step() or b""))
    for event in ours.connection.receive_data(transport.value()):
        ours.receive(event)
    transport.clear()
    proto.dataReceived(ours.connection.seal(wire.Revoke(ALICE)))
    [answer] = ours.connection.receive_data(transport.value())
    assert isinstance(answer, wire.MessageReceived) and isinstance(answer.message, wire.Status)
    assert json.loads(answer.message.json) == {"revoked": ALICE, "sessions": 1, "jobs": 1}
    assert victim.cancelled and proto.session in s.service.sessions  # the admin's own session stays
