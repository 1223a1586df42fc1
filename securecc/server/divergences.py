"""Reports of results a client's own compile contradicted: believed only of this server's signed results.

A client that checks a sampled job by compiling it again (its own gcc, or
another server) and gets another object reports the result it refused
(:class:`wire.Divergence`).  The report carries the result's attestations,
so the server believes it only about a result it signed itself: nobody can
blame it for an object it never made.  Each believed report is audited
(``event: divergence``, the reporter, the job, both digests), counted in
``/metrics`` and the status, and a result served from, or stored in, the
cache is dropped from it, so no one else is handed the same object.  A report
about anything else is refused and audited too.
"""

from __future__ import annotations

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


@dataclass
class Divergences:
    """The divergence reports of one server."""

    key: str  # this server's public result key (attest.public_key)
    audit: AuditLog
    metrics: Metrics
    drop_cached: Callable[[str], None]  # removes a result cache entry by its key
    jobs: set[str] = field(default_factory=set)  # job ids reported: a job counts once however often it is reported
    _log = Logger()

    @property
    def count(self) -> int:
        return len(self.jobs)

    def report(self, session: Session, report: wire.Divergence) -> wire.Message:
        """Audit and count a believed report; the reply the reporter gets."""
        try:
            ours = self._ours(jobspec.validate_report(report))
        except (jobspec.Invalid, attest.BadAttestation) as e:
            return self._refused(session, str(e))
        facts = ours[0]
        cached = [f["cache_key"] for f in ours if isinstance(f.get("cache_key"), str) and len(f["cache_key"]) == 64]
        for key in cached:
            self.drop_cached(key)
        self._log.warn("{principal} reports job {job_id}'s object diverged: {detail}", principal=session.principal,
                       job_id=facts.get("job_id"), detail=report.detail)
        try:
            seq, _ = self.audit.write(event="divergence", principal=session.principal, peer=session.peer, job_id=facts.get("job_id"),
                                      object_sha256=facts["outputs"].get("object"), local_sha256=report.local_sha256,
                                      detail=report.detail, job_audit_seq=facts.get("audit", {}).get("seq"),
                                      cache_dropped=len(cached) or None)
        except AuditError as e:
            self._log.critical("{error}", error=str(e))
            return wire.Refused(wire.Reason.AUDIT_UNAVAILABLE, "the server cannot write its audit log; report it again later")
        if str(facts.get("job_id")) not in self.jobs:
            self.jobs.add(str(facts.get("job_id")))
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
