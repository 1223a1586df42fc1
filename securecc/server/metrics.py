"""The server's Prometheus metrics.

Every metric is derived from what the server does anyway: job outcomes from
the audit record of each job (:meth:`Metrics.observe`), so the two can
never disagree.  :attr:`Metrics.recent` keeps the last allowed jobs' durations
exactly, because a histogram's buckets (0.5 s, 1 s, 2.5 s...) are too coarse
for a monitor's p50/p95 of a farm whose jobs mostly take under a second.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from securecc.audit import Decision, JobRecord

RECENT_JOBS = 256  # durations kept for status(): about 4 KiB of JSON, ten minutes of a busy 16-slot server's p95


class Metrics:
    """The server's counters, gauges and histograms, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.jobs = Counter("securecc_jobs", "Job attempts by decision (allowed, refused, busy) and reason",
                            ["decision", "reason"], registry=r)
        self.kills = Counter("securecc_sandbox_kills", "Compiles ended by a limit or by us", ["ended_by"], registry=r)
        self.cache_hits = Counter("securecc_cache_hits", "Jobs served from the result cache", registry=r)
        self.bytes_in = Counter("securecc_bytes_in", "Bytes of source received", registry=r)
        self.bytes_out = Counter("securecc_bytes_out", "Bytes of output and messages sent", registry=r)
        self.duration = Histogram("securecc_job_duration_seconds", "Job duration", registry=r,
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1200))
        self.handshake = Histogram("securecc_handshake_seconds", "Connection to authenticated", registry=r,
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.running = Gauge("securecc_running_jobs", "Compiles running now", registry=r)
        self.slots = Gauge("securecc_slots", "Job slots", registry=r)
        self.ldap_cache_hits = Counter("securecc_ldap_cache_hits", "Group lookups answered from the cache", registry=r)
        self.ldap_errors = Counter("securecc_ldap_errors", "Group lookups LDAP could not answer", registry=r)
        self.preauth_refused = Counter("securecc_preauth_refused", "Connections closed at once: too many unauthenticated",
                                       registry=r)
        self.divergences = Counter("securecc_divergences", "Jobs whose result a client's own compile contradicted", registry=r)
        self.audit_errors = Counter("securecc_audit_write_errors", "Audit records that could not be written", registry=r)
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_JOBS)  # (ended, wall time; seconds) of allowed jobs

    def observe(self, record: JobRecord) -> None:
        """One job's audit record, the single source of job outcomes."""
        self.jobs.labels(record.decision or "?", record.reason or "?").inc()
        if record.ended_by:
            self.kills.labels(record.ended_by).inc()
        if record.cache == "hit":
            self.cache_hits.inc()
        self.bytes_in.inc(record.bytes_in or 0)
        self.bytes_out.inc(record.bytes_out or 0)
        if record.duration is not None:
            self.duration.observe(record.duration)
            if record.decision == Decision.ALLOWED:
                self.recent.append((round(time.time(), 3), record.duration))

    def text(self) -> bytes:
        return generate_latest(self.registry)
