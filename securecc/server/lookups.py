"""How the Twisted server asks for group membership: one LDAP query in flight per principal.

:class:`~securecc.server.directory.Directory` blocks, so it runs on a thread
pool; this is the reactor's side of that pool, which keeps one principal's
jobs from filling it while LDAP is slow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from securecc.server.directory import Membership


class MembershipSource(Protocol):
    """What :class:`MembershipLookups` needs of a :class:`Directory` (tests give it a fake)."""

    def fresh(self, principal: str) -> Membership | None: ...

    def membership(self, principal: str) -> Membership: ...


Submit = Callable[[Callable[[], Membership]], "Deferred[Membership]"]


class MembershipLookups:
    """The server's way to ask LDAP: fair to every principal while LDAP is slow.

    Asking :meth:`Directory.membership` on the LDAP thread pool once per job
    lets one principal's ``make -j64`` occupy every pool thread (each either
    querying or waiting for the query it joined) while LDAP hangs, and
    everyone else's jobs queue behind them.  Here, in the reactor thread,
    lookups for one principal are joined *before* they take a thread: each
    principal has at most one thread, and every other lookup for it waits
    for that answer.  A fresh cached answer takes no thread at all.
    """

    def __init__(self, directory: MembershipSource, submit: Submit) -> None:
        self._directory = directory
        self._submit = submit  # runs a blocking call on the pool; its Deferred fires in the reactor thread
        self._waiting: dict[str, list[Deferred[Membership]]] = {}

    @classmethod
    def on_pool(cls, directory: MembershipSource, reactor: Any, pool: Any) -> MembershipLookups:
        """Lookups run on a Twisted ``ThreadPool`` (``reactor`` delivers their answers)."""
        return cls(directory, lambda call: threads.deferToThreadPool(reactor, pool, call))

    def in_flight(self) -> int:
        """Principals with a query on the pool now (each holds at most one thread)."""
        return len(self._waiting)

    def lookup(self, principal: str) -> Deferred[Membership]:
        """The principal's :class:`Membership`; fails with :class:`DirectoryUnavailable` as the directory does."""
        fresh = self._directory.fresh(principal)
        if fresh is not None:
            return defer.succeed(fresh)
        answer: Deferred[Membership] = defer.Deferred()
        waiting = self._waiting.get(principal)
        if waiting is not None:
            waiting.append(answer)
            return answer
        self._waiting[principal] = [answer]
        self._submit(functools.partial(self._directory.membership, principal)).addBoth(self._answered, principal)
        return answer

    def _answered(self, result: Membership | Failure, principal: str) -> None:
        for waiter in self._waiting.pop(principal):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
