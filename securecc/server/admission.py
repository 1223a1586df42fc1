"""Who may open a connection before authenticating: caps in total and per source address."""

from __future__ import annotations

import collections
from collections.abc import Callable

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
