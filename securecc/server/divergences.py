"""Reports of results a client's own compile contradicted: believed only of this server's signed results.

A client that checks a sampled job by compiling it again (its own gcc, or
another server) and gets another object reports the result it refused
(:class:`wire.Divergence`).  The report carries the result's attestations,
so the server believes it only about a result it signed itself: nobody can
blame it for an object it never made.  And only from the principal it served
that result to, about one of its recent results (:meth:`Divergences.served`
remembers the last ``RECENT`` of them): a statement is no secret (a cache
hit hands the producer's on, provenance files carry them), so without that
anyone who read one could have it counted, audited and its cache entry
dropped, as often as they liked.  Each believed report is audited once
(``event: divergence``, the reporter, the job, both digests), counted in
``/metrics`` and the status, and the cache entry the server itself served
the job from or stored it in (never one a statement names) is dropped, so no
one else is handed the same object.  A report about anything else, or a
second one about the same job, is refused and audited too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from securecc import attest
from securecc import protocol as wire
from securecc.audit import AuditError
from securecc.server import jobspec
from securecc.server.auditlog import AuditLog
from securecc.server.metrics import Metrics
from securecc.server.session import Session

RECENT = 10_000  # results a report may be about: a client reports within its job, seconds after the result (~0.5-1 KB each)


@dataclass(frozen=True, slots=True)
class Served:
    principal: str
    object_sha256: str | None
    cache_key: str | None


@dataclass
class Divergences:
    """The divergence reports of one server."""

    key: str  # this server's public result key (attest.public_key)
    audit: AuditLog
    metrics: Metrics
    drop_cached: Callable[[str], None]  # removes a result cache entry by its key
    count: int = 0  # jobs reported (each once: it is forgotten when reported)
    recent: OrderedDict[str, Served] = field(default_factory=OrderedDict)  # job id -> what it was served, newest last
    _log = Logger()

    def served(self, job_id: str, principal: str, object_sha256: str | None, cache_key: str | None) -> None:
        """A result was sent: its principal may report it (``cache_key``: the entry it came from or went to)."""
        self.recent[job_id] = Served(principal, object_sha256, cache_key)
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)

    def report(self, session: Session, report: wire.Divergence) -> wire.Message:
        """Audit and count a believed report; the reply the reporter gets."""
        try:
            ours = self._ours(jobspec.validate_report(report))
        except (jobspec.Invalid, attest.BadAttestation) as e:
            return self._refused(session, str(e))
        facts = ours[0]
        job_id = str(facts.get("job_id"))
        served = self.recent.get(job_id)
        if served is None or served.principal != session.principal or served.object_sha256 != facts["outputs"].get("object"):
            return self._refused(session, f"job {job_id[:64]} is not a recent result of {session.principal}'s, or was reported already")
        if served.cache_key:
            self.drop_cached(served.cache_key)
        self._log.warn("{principal} reports job {job_id}'s object diverged: {detail}", principal=session.principal,
                       job_id=facts.get("job_id"), detail=report.detail)
        try:
            seq, _ = self.audit.write(event="divergence", principal=session.principal, peer=session.peer, job_id=facts.get("job_id"),
                                      object_sha256=facts["outputs"].get("object"), local_sha256=report.local_sha256,
                                      detail=report.detail, job_audit_seq=facts.get("audit", {}).get("seq"),
                                      cache_dropped=True if served.cache_key else None)
        except AuditError as e:
            self._log.critical("{error}", error=str(e))
            return wire.Refused(wire.Reason.AUDIT_UNAVAILABLE, "the server cannot write its audit log; report it again later")
        del self.recent[job_id]  # audited and counted once
        self.count += 1
        self.metrics.divergences.inc()
        return wire.Status(f'{{"recorded": {seq}}}')

    def _ours(self, report: wire.Divergence) -> list[dict[str, Any]]:
        """The facts of the report's statements, the serving one first: each signed with this server's key."""
        found = []
        for fields in report.attestations:
            statement = attest.Attestation.of(fields)
            facts = statement.verified()
            if statement.key != self.key:
                raise attest.BadAttestation("the result it reports was not signed by this server")
            if not isinstance(facts.get("outputs"), dict):
                raise attest.BadAttestation("its statement names no outputs")
            found.append(facts)
        return found

    def _refused(self, session: Session, why: str) -> wire.Message:
        try:
            self.audit.write(event="divergence", principal=session.principal, peer=session.peer, decision="refused",
                             reason=wire.Reason.BAD_REPORT, detail=why[:500])
        except AuditError as e:
            self._log.critical("{error}", error=str(e))
        return wire.Refused(wire.Reason.BAD_REPORT, f"report refused: {why}")
