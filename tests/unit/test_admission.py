"""Admission and sessions without a network: pre-auth caps and fair share on a clock the test advances."""

from __future__ import annotations

from twisted.internet.task import Clock

from securecc.server.admission import FAIR_SHARE_MEMORY, FairShare, PreauthGate
from securecc.server.session import Session


def test_a_full_server_turns_everyone_away() -> None:
    share = FairShare(2, Clock())
    for _ in range(2):
        assert share.admit("alice@R", None) is None
        share.started("alice@R")
    assert share.admit("bob@R", None) == "busy:full"
    share.finished("alice@R")
    assert share.admit("bob@R", None) is None


def test_a_principal_at_its_acl_limit_is_busy_while_the_server_has_room() -> None:
    share = FairShare(8, Clock())
    share.started("alice@R")
    assert share.admit("alice@R", 1) == "busy:principal-limit"
    assert share.admit("alice@R", 2) is None


def test_one_principal_cannot_keep_another_out_for_longer_than_the_memory() -> None:
    clock = Clock()
    share = FairShare(4, clock)
    for _ in range(4):
        assert share.admit("alice@R", None) is None
        share.started("alice@R")
    assert share.admit("bob@R", None) == "busy:full"  # bob is now waiting for a share
    share.finished("alice@R")
    assert share.admit("alice@R", None) == "busy:fair-share"  # alice holds 3 of 4, her share is 2
    clock.advance(FAIR_SHARE_MEMORY - 1)
    assert share.admit("alice@R", None) == "busy:fair-share"  # bob still counts as waiting
    clock.advance(2)  # bob has not asked again for longer than the memory: alice may take the free slot
    assert share.admit("alice@R", None) is None
    share.started("alice@R")
    assert share.admit("bob@R", None) == "busy:full"


def test_the_preauth_gate_caps_each_source_and_releases_once() -> None:
    gate = PreauthGate(total=3, per_source=2)
    first, second = gate.admit("10.0.0.1"), gate.admit("10.0.0.1")
    assert first and second and gate.admit("10.0.0.1") is None
    assert gate.admit("10.0.0.2") is not None and gate.admit("10.0.0.3") is None  # the total cap
    first()
    first()  # a second release gives nothing back twice
    assert gate.admit("10.0.0.1") is not None and gate.admit("10.0.0.1") is None


def test_a_session_kills_what_runs_for_it_when_its_client_leaves() -> None:
    killed: list[str] = []
    session = Session("alice@R", "10.0.0.1:4000", expires=100.0)
    session.while_running(killed.append)
    session.while_running(None)  # that job ended: leaving now kills nothing
    assert not session.cancel() and killed == []
    session.while_running(killed.append)  # a job admitted after its client left is killed at once
    assert killed == ["disconnect"] and session.gone()
    revoked = Session("mallory@R", "10.0.0.2:4000", expires=100.0)
    revoked.while_running(killed.append)
    assert revoked.cancel("revoked") and killed == ["disconnect", "revoked"]  # its record says why it ended
