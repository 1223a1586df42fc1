"""The farm as one client sees it, over time: the pure model behind ``securecc-monitor --web``.

The monitor polls every server's status (``probe.server_status``) and, less
often, times a trivial compile on each (``probe.check_host``).  This module
turns those answers into what the page and the monitor's ``/metrics`` show:
each host's state, the last ten minutes as series (jobs/s, refusals/s, BUSY
answers/s from successive ``totals``; the probe's latency), p50/p95 job
latency from the servers' recent durations, and who compiles what.

It does no I/O and reads no clock: every call is given ``now``, so the unit
tests feed it statuses by hand.  Server-supplied strings are kept as they
came; escaping them is the page's job (``farmpage``), done in one place.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

WINDOW = 600.0  # seconds of history kept and drawn
MAX_DURATIONS = 4096  # per host: a bound on memory whatever a server sends


class State(StrEnum):
    """A host's state on the page, most serious first (a tile shows the first that applies)."""

    QUARANTINED = "quarantined"  # the client stopped trusting its results
    DOWN = "down"  # its status could not be read
    BACKED_OFF = "backed-off"  # the client skips it for now (hosts.json)
    BUSY = "busy"  # every slot in use: new jobs get BUSY
    OK = "ok"


Point = tuple[float, float | None]  # (monitor time, value); None: no value then (a gap in the line)


@dataclass(frozen=True)
class Job:
    """A job running now, as the server showed it (principal and source are "(admins only)" to others)."""

    principal: str
    compiler: str
    source: str
    seconds: float


@dataclass(frozen=True)
class HostView:
    """One host at ``now``: everything its tile and its metrics need."""

    key: str  # host:port, as the client names it
    server: str  # the name the server gives itself (server-supplied)
    state: State
    flags: tuple[State, ...]  # every state that applies, for the badges
    error: str
    slots: int
    in_use: int
    jobs: tuple[Job, ...]
    totals: Mapping[str, float]
    refusals: Mapping[str, float]  # by reason
    divergences: int
    backed_off: float  # seconds left
    quarantine: Mapping[str, Any] | None
    jobs_per_s: tuple[Point, ...]
    refusals_per_s: tuple[Point, ...]
    busy_per_s: tuple[Point, ...]
    probe_ms: tuple[Point, ...]
    probe_error: str
    p50: float | None  # seconds, over the window
    p95: float | None

    @property
    def last_probe_ms(self) -> float | None:
        return self.probe_ms[-1][1] if self.probe_ms else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100): a duration some job really took, never an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def increase(previous: float, current: float) -> float:
    """A counter's increase between two reads; a counter that went down was reset (the server restarted)."""
    return current - previous if current >= previous else current


@dataclass
class HostSeries:
    """One host's history: the last status, the rates derived from successive ones, the probe's latencies."""

    key: str
    status: dict[str, Any] | None = None
    error: str = "not polled yet"
    jobs_per_s: deque[Point] = field(default_factory=deque)
    refusals_per_s: deque[Point] = field(default_factory=deque)
    busy_per_s: deque[Point] = field(default_factory=deque)
    probe_ms: deque[Point] = field(default_factory=deque)
    probe_error: str = ""
    durations: dict[float, float] = field(default_factory=dict)  # server's end time -> seconds
    _previous: tuple[float, Mapping[str, float]] | None = None  # (server time, totals) of the last good status

    def status_received(self, answer: Mapping[str, Any], now: float) -> None:
        """A ``server_status`` answer: ``{"ok": False, "error": ...}``, or the server's status JSON."""
        if not answer.get("ok"):
            self.status, self.error = None, str(answer.get("error", "no answer"))
            for series in (self.jobs_per_s, self.refusals_per_s, self.busy_per_s):
                series.append((now, None))
            self._trim(now)
            return
        self.status, self.error = dict(answer), ""
        totals = {str(k): float(v) for k, v in (answer.get("totals") or {}).items()}
        server_time = float(answer.get("time", now))
        if self._previous is not None and server_time > self._previous[0]:
            elapsed, before = server_time - self._previous[0], self._previous[1]
            for series, decision in ((self.jobs_per_s, "allowed"), (self.refusals_per_s, "refused"), (self.busy_per_s, "busy")):
                series.append((now, increase(before.get(decision, 0.0), totals.get(decision, 0.0)) / elapsed))
        self._previous = (server_time, totals)
        for ended, seconds in answer.get("recent_durations") or ():
            self.durations[float(ended)] = float(seconds)
        horizon = server_time - WINDOW  # the server's clock against the server's clock: no skew
        self.durations = dict(sorted((t, d) for t, d in self.durations.items() if t >= horizon)[-MAX_DURATIONS:])
        self._trim(now)

    def probe_received(self, result: Mapping[str, Any], now: float) -> None:
        """A ``check_host`` result: its latency when it compiled, else a gap and why."""
        ok = bool(result.get("ok"))
        self.probe_ms.append((now, float(result["latency_ms"]) if ok else None))
        self.probe_error = "" if ok else str(result.get("error", "failed"))
        self._trim(now)

    def _trim(self, now: float) -> None:
        for series in (self.jobs_per_s, self.refusals_per_s, self.busy_per_s, self.probe_ms):
            while series and series[0][0] < now - WINDOW:
                series.popleft()

    def view(self, now: float, backed_off: float = 0.0, quarantine: Mapping[str, Any] | None = None) -> HostView:
        """This host at ``now``; ``backed_off`` and ``quarantine`` come from the client's own host state."""
        s = self.status or {}
        jobs = tuple(Job(str(j.get("principal", "")), str(j.get("compiler", "")), str(j.get("source", "")),
                         max(0.0, float(s.get("time", now)) - float(j.get("started", now)))) for j in s.get("running") or ())
        slots = int(s.get("slots", 0))
        flags = tuple(state for state, applies in (
            (State.QUARANTINED, quarantine is not None), (State.DOWN, self.status is None),
            (State.BACKED_OFF, backed_off > 0), (State.BUSY, self.status is not None and slots > 0 and len(jobs) >= slots),
        ) if applies)
        durations = list(self.durations.values())
        return HostView(
            key=self.key, server=str(s.get("server", "")), state=flags[0] if flags else State.OK, flags=flags,
            error=self.error, slots=slots, in_use=len(jobs), jobs=jobs,
            totals={str(k): float(v) for k, v in (s.get("totals") or {}).items()},
            refusals={str(k): float(v) for k, v in (s.get("refusals") or {}).items()},
            divergences=int(s.get("divergences", 0)), backed_off=backed_off, quarantine=quarantine,
            jobs_per_s=tuple(self.jobs_per_s), refusals_per_s=tuple(self.refusals_per_s), busy_per_s=tuple(self.busy_per_s),
            probe_ms=tuple(self.probe_ms), probe_error=self.probe_error,
            p50=percentile(durations, 50), p95=percentile(durations, 95),
        )


@dataclass(frozen=True)
class FarmView:
    """Every host at one moment, in the client's order."""

    time: float
    hosts: tuple[HostView, ...]

    def count(self, state: State) -> int:
        return sum(1 for h in self.hosts if h.state == state)
