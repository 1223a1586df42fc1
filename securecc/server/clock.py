"""The clock the server's cache TTLs and settle times are measured on: monotonic, and injected.

The service's clock for deadlines and sessions is the reactor (``IReactorTime``),
whose ``seconds()`` is ``time.time``: wall time, which NTP, an admin or a
resumed VM can step.  An LDAP answer timed on it would outlive its TTL (and
``max_stale``) by as long as a step back, so a removed member would keep
their groups that much longer; an acl.yaml "seen unchanged for a second"
could be trusted half-written after a step forward.  So the server gives
those :data:`MONOTONIC`, which has the reactor's ``seconds()`` and nothing
else, and tests give the same code a ``twisted.internet.task.Clock`` to advance.
"""

from __future__ import annotations

import time
from typing import Protocol


class TimeSource(Protocol):
    """What a TTL needs of a clock: ``IReactorTime.seconds`` (a ``task.Clock`` has it too)."""

    def seconds(self) -> float: ...


class Monotonic:
    """``seconds()`` on ``time.monotonic``: never steps, so an age measured on it is the time that passed."""

    def seconds(self) -> float:
        return time.monotonic()


MONOTONIC = Monotonic()
