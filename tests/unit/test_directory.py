"""Directory's cache on a clock the test advances: the TTLs, max_stale and the breaker, over an in-memory slapd."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from twisted.internet.task import Clock

from securecc.server.directory import DirectoryUnavailable
from securecc.testing import MemoryLdap

ALICE, BOB = "alice@TEST.REALM", "bob@TEST.REALM"


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate``: the breaker's probe pauses in real time, on its own thread."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_removed_member_keeps_the_group_until_the_positive_ttl_ends() -> None:
    slapd, clock = MemoryLdap({ALICE: frozenset({"committers", "temp"})}), Clock()
    directory = slapd.directory(clock)
    ttl = directory.config.positive_ttl
    assert directory.groups_of(ALICE) == {"committers", "temp"}
    slapd.groups[ALICE] = frozenset({"committers"})
    clock.advance(ttl - 1)
    fresh = directory.fresh(ALICE)
    assert fresh is not None and fresh.cached and "temp" in fresh.groups
    assert "temp" in directory.groups_of(ALICE) and slapd.searches == 1  # from the cache
    clock.advance(1)
    assert directory.fresh(ALICE) is None
    assert directory.groups_of(ALICE) == {"committers"} and slapd.searches == 2


def test_a_negative_answer_is_kept_for_the_shorter_negative_ttl() -> None:
    slapd, clock = MemoryLdap({BOB: frozenset()}), Clock()
    directory = slapd.directory(clock)
    assert directory.config.negative_ttl < directory.config.positive_ttl
    assert directory.groups_of(BOB) == frozenset()
    slapd.groups[BOB] = frozenset({"committers"})  # just added to a group
    clock.advance(directory.config.negative_ttl - 1)
    assert directory.groups_of(BOB) == frozenset()
    clock.advance(1)
    assert directory.groups_of(BOB) == {"committers"}


def test_ldap_down_a_recent_answer_serves_until_max_stale_and_nobody_waits_for_ldap() -> None:
    """The failed query opens the breaker: then lookups are answered from the cache or refused without asking LDAP."""
    slapd, clock = MemoryLdap({ALICE: frozenset({"committers"})}), Clock()
    directory = slapd.directory(clock, retry_down=60)  # the probe sleeps through this test
    config = directory.config
    directory.groups_of(ALICE)
    slapd.down = True
    clock.advance(config.positive_ttl)
    answer = directory.membership(ALICE)
    assert answer.cached and answer.groups == {"committers"} and answer.facts[-1] == "LDAP down: cached answer"
    tried = slapd.connects
    with pytest.raises(DirectoryUnavailable, match="retried every 60 s in the background"):
        directory.membership(BOB)  # nothing cached: fail closed
    clock.advance(config.max_stale - config.positive_ttl - 1)
    assert directory.membership(ALICE).groups == {"committers"}
    clock.advance(1)
    with pytest.raises(DirectoryUnavailable, match="LDAP unavailable: Can't contact LDAP server"):
        directory.membership(ALICE)
    assert slapd.connects == tried  # known down: no lookup went to LDAP


def test_the_probe_keeps_trying_and_closes_the_breaker_once_ldap_answers() -> None:
    slapd, clock = MemoryLdap({ALICE: frozenset({"committers"})}), Clock()
    directory = slapd.directory(clock, retry_down=0.01)
    directory.groups_of(ALICE)
    slapd.down = True
    clock.advance(directory.config.positive_ttl)
    assert directory.membership(ALICE).cached  # the breaker is open
    tried = slapd.connects
    assert eventually(lambda: slapd.connects >= tried + 2)  # the probe, again and again
    assert directory.membership(ALICE).cached
    slapd.groups[ALICE], slapd.down = frozenset(), False
    assert eventually(lambda: not directory.membership(ALICE).cached)  # asked LDAP again
    assert directory.groups_of(ALICE) == frozenset()
