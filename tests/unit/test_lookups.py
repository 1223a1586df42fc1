"""MembershipLookups on in-memory twins: one query per principal, fail closed, cached answers take no thread."""

from __future__ import annotations

from securecc.server.directory import DirectoryUnavailable, Membership
from securecc.server.lookups import MembershipLookups
from securecc.testing import ManualPool, MemoryDirectory

ALICE, BOB = "alice@TEST.REALM", "bob@TEST.REALM"


def test_one_principals_lookups_share_one_query_and_do_not_hold_up_anothers() -> None:
    directory, pool = MemoryDirectory({ALICE: frozenset({"committers"}), BOB: frozenset()}), ManualPool()
    lookups = MembershipLookups(directory, pool.submit)
    alices: list[Membership] = []
    for _ in range(50):
        lookups.lookup(ALICE).addCallback(alices.append)
    bobs: list[Membership] = []
    lookups.lookup(BOB).addCallback(bobs.append)
    assert len(pool.calls) == 2 and lookups.in_flight() == 2  # one query for alice's 50 lookups, one for bob's
    pool.run_next()
    pool.run_next()
    assert directory.asked == [ALICE, BOB] and lookups.in_flight() == 0
    assert len(alices) == 50 and {a.groups for a in alices} == {frozenset({"committers"})} and bobs[0].groups == frozenset()


def test_a_failed_lookup_fails_every_waiter_and_is_asked_again() -> None:
    """LDAP down: each joined lookup fails as the one query did (fail closed); the next lookup asks anew."""
    pool = ManualPool()
    lookups = MembershipLookups(MemoryDirectory(down=True), pool.submit)
    failures: list[object] = []
    for _ in range(3):
        lookups.lookup(ALICE).addErrback(lambda f: failures.append(f.trap(DirectoryUnavailable)))
    assert len(pool.calls) == 1
    pool.run_next()
    assert failures == [DirectoryUnavailable] * 3 and lookups.in_flight() == 0
    lookups.lookup(ALICE).addErrback(lambda f: None)
    assert len(pool.calls) == 1


def test_a_fresh_answer_takes_no_thread() -> None:
    directory, pool = MemoryDirectory({ALICE: frozenset({"committers"})}, remembers=True), ManualPool()
    lookups = MembershipLookups(directory, pool.submit)
    lookups.lookup(ALICE)
    pool.run_next()
    second: list[Membership] = []
    lookups.lookup(ALICE).addCallback(second.append)
    assert not pool.calls and second[0].cached and second[0].groups == {"committers"} and directory.asked == [ALICE]
