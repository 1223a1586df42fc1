"""In-memory twins of the server's outside world, for unit tests that need no slapd and no threads.

Each one has the interface the server's code asks of the real component
(:class:`~securecc.server.directory.MembershipSource`, the pool's ``submit``
of :class:`~securecc.server.directory.MembershipLookups`), so a test drives the
real code, not a copy of it, and decides itself when an answer arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from securecc.server.directory import DirectoryUnavailable, Membership


@dataclass
class MemoryDirectory:
    """Group membership from a dict, as :class:`~securecc.server.directory.Directory` answers from LDAP.

    ``down`` makes every query fail as an LDAP outage does; ``asked`` lists
    the principals queried, in order; answers are remembered (``fresh``)
    only when ``remembers`` is set, like the real TTL cache.
    """

    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    down: bool = False
    remembers: bool = False
    asked: list[str] = field(default_factory=list)
    _known: dict[str, Membership] = field(default_factory=dict)

    def fresh(self, principal: str) -> Membership | None:
        known = self._known.get(principal)
        return Membership(known.user_dn, known.groups, cached=True) if known else None

    def membership(self, principal: str) -> Membership:
        self.asked.append(principal)
        if self.down:
            raise DirectoryUnavailable("LDAP unavailable (MemoryDirectory.down)")
        answer = Membership(f"uid={principal}", self.groups.get(principal, frozenset()))
        if self.remembers:
            self._known[principal] = answer
        return answer


@dataclass
class ManualPool:
    """A thread pool whose calls run only when the test says (:meth:`run_next`), in the test's thread."""

    calls: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = field(default_factory=list)

    def submit(self, call: Callable[[], Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((call, d))
        return d

    def run_next(self) -> None:
        call, d = self.calls.pop(0)
        try:
            d.callback(call())
        except Exception:
            d.errback()
