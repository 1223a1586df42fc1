"""Admission: who may open a connection before authenticating, and whose job may take a slot now."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from securecc import protocol as wire

FAIR_SHARE_MEMORY = 10.0  # seconds a principal turned away counts as waiting for a share
PREAUTH_TOTAL = 2048  # connections not yet authenticated, from everyone together (~11 KiB each)
PREAUTH_PER_SOURCE = 256  # ... from one address: a make -j200 build host opens ~200 at once


class PreauthGate:
    """Caps connections that have not authenticated yet, in total and per source address.

    An unauthenticated peer costs a buffer of at most one handshake frame
    until the handshake deadline; the caps bound how many such peers there are.
    """

    def __init__(self, total: int = PREAUTH_TOTAL, per_source: int = PREAUTH_PER_SOURCE) -> None:
        self.total, self.per_source = total, per_source
        self.waiting: collections.Counter[str] = collections.Counter()

    def admit(self, source: str) -> Callable[[], None] | None:
        """A one-shot release for a new connection from ``source``, or None when a cap is reached."""
        if sum(self.waiting.values()) >= self.total or self.waiting[source] >= self.per_source:
            return None
        self.waiting[source] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.waiting[source] -= 1
                if self.waiting[source] <= 0:
                    del self.waiting[source]

        return release


@dataclass
class FairShare:
    """The server's job slots, shared between principals.

    A job is turned away (BUSY, and its client compiles locally) when the
    server is full, when its principal is at the ACL's ``max_jobs``, or when
    its principal holds its share (slots / principals wanting them) while
    another principal was turned away in the last ``memory`` seconds: one
    user's ``make -j64`` cannot keep a second user out for long.
    """

    slots: int
    clock: IReactorTime
    memory: float = FAIR_SHARE_MEMORY
    active: collections.Counter[str] = field(default_factory=collections.Counter)  # running jobs per principal
    turned_away: dict[str, float] = field(default_factory=dict)  # principal -> when it was last told BUSY

    @property
    def load(self) -> int:
        return sum(self.active.values())

    def admit(self, principal: str, max_jobs: int | None) -> wire.Reason | None:
        """None if a job of ``principal`` may start now, else the BUSY reason."""
        now = self.clock.seconds()
        waiting = {p for p, when in self.turned_away.items() if now - when < self.memory and p != principal}
        reason: wire.Reason | None = None
        if self.load >= self.slots:
            reason = wire.Reason.BUSY_FULL
        elif max_jobs is not None and self.active[principal] >= max_jobs:
            reason = wire.Reason.BUSY_PRINCIPAL_LIMIT
        elif waiting:
            sharing = {p for p, n in self.active.items() if n} | waiting | {principal}
            if self.active[principal] >= max(1, self.slots // len(sharing)):
                reason = wire.Reason.BUSY_FAIR_SHARE
        if reason is None:
            self.turned_away.pop(principal, None)
        else:
            self.turned_away[principal] = now
        return reason

    def started(self, principal: str) -> None:
        self.active[principal] += 1

    def finished(self, principal: str) -> None:
        self.active[principal] -= 1
