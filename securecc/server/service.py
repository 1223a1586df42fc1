"""The stages of a job on the server, in order: validate, check, authorize, cache, admit, compile, record.

Each refusal names a stable reason, and every job however it ends gets one
audit record.  The protocols (:mod:`securecc.server.listener`,
:mod:`securecc.server.distcc_listener`) hand jobs in; the job runs in the
handler's sandbox (:mod:`securecc.server.handler_client`).  Every result
is signed (:mod:`securecc.attest`), and access ends with the rights:
:meth:`CompileService.recheck` decides the open sessions again and
:meth:`CompileService.revoke` ends one principal's.

Why one file of ~440 lines: a job's stages, each of which may refuse it,
the one place its record is written and the statement signed over that
record are one sequence, read in the order it runs.
"""

from __future__ import annotations

import functools
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from securecc import args as argpolicy
from securecc import attest, sandbox
from securecc import protocol as wire
from securecc.acl import decide, split_principal
from securecc.audit import AuditError, AuthRecord, Decision, JobRecord, now_rfc3339, sha256
from securecc.cachekey import cache_key, expands_time
from securecc.server import jobspec
from securecc.server.aclfile import AclFile
from securecc.server.admission import FairShare
from securecc.server.auditlog import AuditLog, Reservation
from securecc.server.cache import Entry
from securecc.server.config import Compiler, ServerConfig
from securecc.server.directory import Directory, DirectoryUnavailable
from securecc.server.divergences import Divergences
from securecc.server.handler_client import HandlerLink, Running
from securecc.server.lookups import MembershipLookups
from securecc.server.metrics import Metrics
from securecc.server.session import Session

AUDIT_DOWN = "the server cannot write its audit log; it runs no job unrecorded"
LDAP_DOWN = "LDAP unavailable: this server cannot learn your groups now (its audit log says why); try again later"
AUTH_FAILURE_WINDOW = 10.0  # seconds: one failed-handshake record per source address at most
REVOCATION_CHECK = 1.0  # seconds between re-decisions of the open sessions (cached answers make one cost microseconds)


class _Refusal(Exception):
    """A job refused: ``message`` for the client, ``detail`` (when the why is the server's own business, such as
    its LDAP's error, which may name its files) for the audit record and the log alone."""

    def __init__(self, reason: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.detail = reason, detail


@dataclass
class CompileService:
    """The stages of a job, in order; each refusal names a stable reason."""

    config: ServerConfig
    reactor: IReactorProcess
    clock: IReactorTime
    acl: AclFile
    directory: Directory
    pool: ThreadPool
    audit: AuditLog
    identities: dict[str, str]  # compiler path -> what it says of itself (securecc.toolchain)
    signer: Ed25519PrivateKey  # signs every result (securecc.attest); the front's alone, like the audit key
    host: str = field(default_factory=socket.getfqdn)
    handler: HandlerLink = field(default_factory=HandlerLink)  # where jobs run (securecc.server.handler)
    hash_pool: ThreadPool = field(default_factory=lambda: ThreadPool(minthreads=0, maxthreads=2, name="hash"))
    caching: bool = False
    compiler_roots: tuple[str, ...] = ()
    stopping: bool = False
    auth_failures: dict[str, tuple[float, int]] = field(default_factory=dict)  # source -> last recorded, left out since
    running: set[Running] = field(default_factory=set)
    sessions: set[Session] = field(default_factory=set)  # authenticated and open: what a revocation ends
    inflight: dict[str, list[defer.Deferred]] = field(default_factory=dict)  # key -> jobs waiting for its compile
    metrics: Metrics = field(default_factory=Metrics)
    jobs_now: dict[str, dict[str, object]] = field(default_factory=dict)  # job id -> who compiles what, since when
    _log = Logger()

    def auth_failed(self, peer: str, detail: str, protocol: str | None = None) -> None:
        """Record a failed handshake, for both protocols: the first from a source in ``AUTH_FAILURE_WINDOW`` seconds,
        with how many were left out before it, so unauthenticated peers cannot flood the log (and fill its disk)."""
        source, now = peer.rpartition(":")[0] or peer, self.clock.seconds()
        last, suppressed = self.auth_failures.get(source, (float("-inf"), 0))
        if now - last < AUTH_FAILURE_WINDOW:
            self.auth_failures[source] = (last, suppressed + 1)
            return
        if len(self.auth_failures) > 10000:  # forget the quiet ones
            self.auth_failures = {k: v for k, v in self.auth_failures.items() if now - v[0] < AUTH_FAILURE_WINDOW}
        self.auth_failures[source] = (now, 0)
        try:
            self.audit.write(**AuthRecord(peer=peer, reason=wire.Reason.AUTHENTICATION_FAILED, detail=detail[:500], protocol=protocol,
                                          suppressed_before=suppressed or None).to_fields())
        except AuditError:
            pass  # logged by the caller; nothing ran

    def revoke(self, principal: str, reason: str, by: str | None = None) -> tuple[int, int]:
        """End ``principal``'s access now: kill its running jobs (their records say ``ended_by: revoked``), close its
        sessions, forget its cached groups, and record it.  Returns (sessions closed, jobs killed)."""
        ended = [s for s in self.sessions if s.principal == principal]
        killed = sum(s.cancel("revoked") for s in ended)
        for session in ended:
            self.sessions.discard(session)
            if session.transport is not None:
                session.transport.loseConnection()
        self.directory.forget(principal)
        self._log.warn("revoked {principal} ({reason}): {sessions} session(s) closed, {jobs} job(s) killed",
                       principal=principal, reason=reason, sessions=len(ended), jobs=killed)
        try:
            self.audit.write(event="revoked", principal=principal, reason=reason, sessions=len(ended), jobs=killed,
                             **({"by": by} if by else {}))
        except AuditError as e:
            self._log.critical("{error}", error=str(e))
        return len(ended), killed

    def recheck(self) -> defer.Deferred[None]:
        """Every principal with an open session, decided again on the ACL in force and its groups (as cached for the
        positive TTL): one that may run none of this server's compilers any more is revoked.  An LDAP outage
        revokes nobody (jobs use cached answers until ``max_stale`` as it is)."""
        acl = self.acl.current()

        def decided(membership: Any, principal: str) -> None:
            allowed = [decide(acl, principal, membership.groups, name) for name in self.config.compilers]
            if not any(d.allowed for d in allowed) and any(s.principal == principal for s in self.sessions):
                self.revoke(principal, allowed[0].reason if allowed else "denied:no-compilers")

        def failed(failure: Failure) -> None:
            if not failure.check(DirectoryUnavailable):
                self._log.failure("re-deciding the open sessions failed", failure)

        checks = [self.lookups.lookup(p).addCallback(decided, p).addErrback(failed) for p in {s.principal for s in self.sessions}]
        return defer.gatherResults(checks).addCallback(lambda _: None)

    def status(self) -> dict[str, Any]:
        """What the dashboard and securecc-monitor show: this server, its slots, who compiles what now."""
        jobs = self.metrics.jobs.collect()[0].samples
        totals: dict[str, float] = {}
        refusals: dict[str, float] = {}  # refused jobs by reason: what a monitor shows beside the totals
        for sample in jobs:
            if sample.name.endswith("_total"):
                decision = sample.labels["decision"]
                totals[decision] = totals.get(decision, 0) + sample.value
                if decision == "refused":
                    refusals[sample.labels["reason"]] = refusals.get(sample.labels["reason"], 0) + sample.value
        return {
            "server": self.host,
            "slots": self.config.slots,
            "running": sorted(self.jobs_now.values(), key=lambda j: j["started"]),
            "totals": totals,
            "divergences": self.divergences.count,
            "refusals": refusals,
            "recent_durations": [list(job) for job in self.metrics.recent],  # [ended, seconds], oldest first
            "time": time.time(),
        }

    @functools.cached_property
    def share(self) -> FairShare:
        return FairShare(self.config.slots, self.clock)

    @functools.cached_property
    def divergences(self) -> Divergences:
        return Divergences(attest.public_key(self.signer), self.audit, self.metrics, self.handler.cache_drop)

    @functools.cached_property
    def lookups(self) -> MembershipLookups:
        """LDAP lookups on the pool, one thread per principal at most: a hung LDAP stalls nobody else's."""
        return MembershipLookups.on_pool(self.directory, self.clock, self.pool)

    def handler_gone(self) -> None:
        """The job handler died: no job can run; record it and stop, for the service manager to restart us."""
        self._log.critical("the job handler exited; stopping")
        try:
            self.audit.write(event="handler-exit", running=len(self.running))
        except AuditError:
            pass
        if not self.stopping and getattr(self.reactor, "running", False):
            self.reactor.stop()

    @defer.inlineCallbacks
    def stop(self):
        """Server shutdown: no compile outlives the server, each is recorded, the log ends signed."""
        self.stopping = True
        killed = list(self.running)
        for job in killed:
            job.kill("shutdown")
        yield defer.DeferredList([job.result for job in killed], consumeErrors=True)
        yield task.deferLater(self.clock, 0, lambda: None)  # let their records be written first
        try:
            self.audit.close(event="server-stop", killed=len(killed))
        except AuditError as e:
            self._log.critical("the audit log could not be closed: {error}", error=str(e))

    @defer.inlineCallbacks
    def run(self, session: Session, job: wire.Job):
        """Validate, authorize and run one job; returns the reply message.

        However it ends (refused, busy, compiled, killed, or an error of
        ours), the job gets exactly one audit record; a compile also gets a
        ``job-start`` record before it starts, so a crash leaves a trace.
        """
        job_id = secrets.token_hex(8)
        started = self.clock.seconds()
        mode = self.config.sandbox.mode
        record = JobRecord(
            principal=session.principal, peer=session.peer, protocol=session.protocol, payload=session.payload, job_id=job_id,
            compiler=job.compiler, args=job.args, source=job.source_path, cwd=job.cwd, headers=len(job.include_paths),
            bytes_in=len(job.source) + len(job.original) + sum(map(len, job.includes)), sandbox=None if mode == "bwrap" else mode,
        )
        try:
            reply = yield self._run(job_id, session.principal, job, session, record, started)
        except _Refusal as refusal:
            record.decision, record.reason, record.detail = Decision.REFUSED, refusal.reason, refusal.detail or str(refusal)
            self._record(record, started, session)
            return wire.Refused(refusal.reason, str(refusal), job_id)
        except Exception as e:  # ours, not the client's: still recorded, once, and the server goes on
            self._log.failure("job {job_id} failed", Failure(), job_id=job_id)
            if record.duration is not None:  # its final record is written: what failed came after it
                return wire.Refused(wire.Reason.SERVER_ERROR, "internal server error after the job was recorded", job_id)
            record.decision, record.reason, record.detail = Decision.ERROR, wire.Reason.SERVER_ERROR, f"{type(e).__name__}: {e}"[:500]
            self._record(record, started, session)
            return wire.Refused(wire.Reason.SERVER_ERROR, "internal server error; the job was not run", job_id)
        return reply

    @defer.inlineCallbacks
    def _run(self, job_id: str, principal: str, raw: wire.Job, session: Session, record: JobRecord, started: float):
        try:
            job = jobspec.validate(raw, self.compiler_roots)
        except jobspec.Invalid as e:
            raise _Refusal(e.reason, str(e)) from None
        if self.clock.seconds() >= session.expires:
            raise _Refusal(wire.Reason.SESSION_EXPIRED, "the Kerberos ticket of this session has ended: reconnect")
        compiler = self._check_job(job)
        decision = yield self._authorize(principal, job)
        record.compiler_path, record.compiler_identity, record.reason = compiler.path, job.compiler_identity, decision.reason
        if not decision.allowed:
            raise _Refusal(decision.reason, f"{principal} may not compile here ({decision.reason})")
        self._check_compiler(job, compiler)
        # Authorized: only now the large work (hashing the input, the cache key), off the reactor.
        record.input_sha256, key, job_sha256 = yield threads.deferToThreadPool(self.clock, self.hash_pool, self._digests, job)
        hit, owner = yield self._cached(key)
        served = producer = None
        if hit is not None:
            served = attest.outputs(0, hit.stdout, hit.stderr, hit.output, None)
            producer = self._vouched(hit, key, job.compiler_identity, served)
            if producer is None:  # the handler's word alone: compiled afresh (and stored again, vouched for)
                hit = None
        stored = room = None
        try:
            if hit is not None and producer is not None and served is not None:
                record.decision, record.cache, record.cached_from = Decision.ALLOWED, "hit", producer.get("job_id")
                record.exit_status, record.output_sha256, record.bytes_out = 0, served["outputs"]["object"], len(hit.output) + len(hit.stderr)
                written = self._record(record, started, session)
                if written is None:
                    return wire.Refused(wire.Reason.AUDIT_UNAVAILABLE, AUDIT_DOWN, job_id)
                mine = self._attest(session, job_id, job_sha256, raw, served, written)
                self.divergences.served(job_id, principal, served["outputs"]["object"], key)
                return wire.Result(0, hit.stdout, hit.stderr, hit.output, job_id, attestations=[mine.fields(), hit.producer["attestation"]])
            busy = self._admit(principal, decision.rule.max_jobs if decision.rule else None)
            if busy is not None:
                record.decision, record.reason, record.load = Decision.BUSY, busy.reason, busy.load
                self._record(record, started, session)
                return busy
            start = record.to_fields("job-start")
            try:  # room for both of its records first: no compile runs that its record could not follow
                room = self.audit.reserve(start)
                self.audit.write(room, **start)
            except AuditError as e:
                self._log.critical("{error}; refusing jobs until it can be written", error=str(e))
                return wire.Refused(wire.Reason.AUDIT_UNAVAILABLE, AUDIT_DOWN, job_id)
            self.share.started(principal)
            self.jobs_now[job_id] = {"principal": principal, "compiler": job.compiler, "source": job.source_path,
                                     "started": time.time(), "peer": session.peer, "job_id": job_id}
            try:
                outcome = yield self._compile(job_id, compiler, job, session)
            finally:
                self.share.finished(principal)
                self.jobs_now.pop(job_id, None)
            record.decision, record.exit_status, record.ended_by = Decision.ALLOWED, outcome.exit_status, outcome.ended_by
            record.output_sha256 = sha256(outcome.output)
            record.bytes_out = len(outcome.output or b"") + len(outcome.dwo or b"") + len(outcome.stdout) + len(outcome.stderr)
            entry = self._entry(key, outcome, {"job_id": job_id, "principal": principal})
            if entry is not None:
                record.cache = "stored"
            written = self._record(record, started, session, room)
            if written is None:
                return wire.Refused(wire.Reason.AUDIT_UNAVAILABLE, AUDIT_DOWN, job_id)
            signed = self._attest(session, job_id, job_sha256, raw, attest.outputs(outcome.exit_status, outcome.stdout, outcome.stderr,
                                                                          outcome.output, outcome.dwo), written, key if entry else None)
            if entry is not None:
                entry.producer["attestation"] = signed.fields()  # a hit carries it on, beside the serving server's own
            stored = entry  # recorded first: the cache never holds an unaudited result
        finally:
            if room is not None:
                self.audit.release(room)
            if owner:
                self._share(key, stored, hit)
        if outcome.ended_by == "timeout":
            return wire.Refused(wire.Reason.TIMEOUT, f"compile killed after {compiler.timeout:g} s", job_id)
        if outcome.exit_status == 0 and outcome.output is not None:  # what a client may check, and report
            self.divergences.served(job_id, principal, record.output_sha256, key if stored else None)
        return wire.Result(outcome.exit_status, outcome.stdout, outcome.stderr, outcome.output, job_id, outcome.dwo,
                           [signed.fields()])

    def _digests(self, job: jobspec.ValidJob) -> tuple[str | None, str | None, str]:
        """The input's sha256 for the record, the cache key (None: not cached) and the whole job's for its attestation,
        in a thread."""
        # A key cannot carry the time of the compile; an entry holds one output, not a .dwo too.
        cacheable = self.caching and not expands_time(job.job) and not job.split_dwarf
        return (sha256(job.original if job.preprocessing else job.source), cache_key(job.compiler_identity, job.job) if cacheable else None,
                attest.job_digest(job.job))

    def _attest(self, session: Session, job_id: str, job_sha256: str, job: wire.Job, result: dict[str, Any],
                written: tuple[int, str], cache_key: str | None = None) -> attest.Attestation:
        """This server's signed statement of a reply, naming the job's final audit record (already written)."""
        return attest.sign(self.signer, session.server or self.config.principal, job_id, job_sha256, job, result, *written,
                           cache_key=cache_key)

    def _vouched(self, hit: Entry, key: str | None, identity: str, served: dict[str, Any]) -> dict[str, Any] | None:
        """The facts of a cache entry's producer statement if it is this server's own, for this key, this compiler and
        these bytes; None if not.  The job handler writes the cache and holds no key: an entry it altered, stripped
        of its statement or filed under another job's key (and one from before attestations) is no hit."""
        fields = hit.producer.get("attestation") if isinstance(hit.producer, dict) else None
        try:
            if not isinstance(fields, dict):
                raise attest.BadAttestation("no statement")
            statement = attest.Attestation.of(fields)
            facts = statement.verified()
            if statement.key != attest.public_key(self.signer) or facts.get("cache_key") != key or \
                    facts.get("compiler_identity") != identity or {k: facts.get(k) for k in served} != served:
                raise attest.BadAttestation("another entry's")
        except attest.BadAttestation as e:
            self._log.warn("cache entry {key} is not vouched for by this server's statement ({why}): compiling afresh", key=key, why=str(e))
            return None
        return facts

    def _entry(self, key: str | None, outcome: sandbox.Outcome, producer: dict[str, str]) -> Entry | None:
        """A cache entry of a successful compile, or None."""
        if key and outcome.exit_status == 0 and outcome.output is not None and outcome.ended_by is None:
            return Entry(outcome.stdout, outcome.stderr, outcome.output, {**producer, "server": self.host, "time": now_rfc3339()})
        return None

    def _share(self, key: str, stored: Entry | None, hit: Entry | None) -> None:
        """Store a successful, recorded compile (the handler writes it); hand it, or the hit, to identical jobs."""
        if stored is not None:
            try:
                self.handler.cache_put(key, stored)
            except Exception:  # the cache only saves work: a job recorded and answered stays so, and its waiters wake
                self._log.failure("the result of a job could not be stored in the cache", Failure())
        for waiter in self.inflight.pop(key, []):
            waiter.callback(stored or hit)  # None: they compile for themselves

    @defer.inlineCallbacks
    def _cached(self, key: str | None):
        """``(entry, owner)``: a stored result for ``key`` or None, waiting for an identical job
        already under way.  An owner must :meth:`_share` its outcome with the jobs that wait for it."""
        if key is None:
            return None, False
        if key in self.inflight:
            waiter: defer.Deferred[Entry | None] = defer.Deferred()
            self.inflight[key].append(waiter)
            entry = yield waiter
            return entry, False  # None: compile for ourselves, unshared
        self.inflight[key] = []
        try:
            entry = yield self.handler.cache_get(key)
        except BaseException:
            self._share(key, None, None)
            raise
        return entry, True

    def _admit(self, principal: str, max_jobs: int | None) -> wire.Busy | None:
        """A slot for this job, or BUSY (:class:`~securecc.server.admission.FairShare` says why)."""
        reason = self.share.admit(principal, max_jobs)
        return None if reason is None else wire.Busy(reason, self.share.load, self.config.slots)

    def _record(self, record: JobRecord, started: float, session: Session, room: Reservation | None = None) -> tuple[int, str] | None:
        """Write a job's audit record (into its ``room`` if it ran): its seq and line hash; None (and a log line) when the
        log cannot take it.

        ``delivered``: the reply goes to the client's open connection right
        after this record (the record comes first, so nothing unrecorded is
        ever delivered); false when the client had gone (a result computed
        for nobody, e.g. on a server frozen past the client's patience).
        """
        record.duration, record.delivered = round(self.clock.seconds() - started, 4), not session.gone()
        self.metrics.observe(record)
        try:
            return self.audit.write(room, **record.to_fields())
        except AuditError as e:
            self.metrics.audit_errors.inc()
            self._log.critical("{error}; refusing jobs until it can be written", error=str(e))
            return None

    def _check_job(self, job: jobspec.ValidJob) -> Compiler:
        """What this server adds to the job's grammar, before the ACL: its audit log and the compilers it offers."""
        if not self.audit.healthy:
            try:
                self.audit.recover()
            except AuditError:
                raise _Refusal(wire.Reason.AUDIT_UNAVAILABLE, AUDIT_DOWN) from None
        compiler = self.config.compilers.get(job.compiler)
        if compiler is None:
            raise _Refusal(wire.Reason.COMPILER_NOT_OFFERED, f"compiler {job.compiler!r} is not offered by this server")
        return compiler

    def _check_compiler(self, job: jobspec.ValidJob, compiler: Compiler) -> None:
        """After the ACL, for an allowed principal only: the compiler's identity, which names this server's version."""
        identity = self.identities.get(compiler.path)
        if job.compiler_identity != identity:
            raise _Refusal(wire.Reason.COMPILER_MISMATCH, f"this server's {job.compiler} is {identity}, yours is "
                           f"{job.compiler_identity[:200] or 'unknown'}; objects would differ")
        if self.config.sandbox.mode != "bwrap" and (job.preprocessing or job.split_dwarf):
            raise _Refusal(wire.Reason.UNSUPPORTED, "this server runs without bubblewrap: it cannot preprocess, "
                           "nor write a -gsplit-dwarf .dwo")

    @defer.inlineCallbacks
    def _authorize(self, principal: str, job: jobspec.ValidJob):
        acl = self.acl.current()
        groups: frozenset[str] = frozenset()
        if split_principal(principal)[1] in acl.realms and acl.groups:
            try:
                membership = yield self.lookups.lookup(principal)
            except DirectoryUnavailable as e:
                self.metrics.ldap_errors.inc()
                raise _Refusal(wire.Reason.LDAP_UNAVAILABLE, LDAP_DOWN, str(e)) from None
            groups = membership.groups
            if membership.cached:
                self.metrics.ldap_cache_hits.inc()
        return decide(acl, principal, groups, job.compiler, job.input_size)

    @defer.inlineCallbacks
    def _compile(self, job_id: str, compiler: Compiler, job: jobspec.ValidJob, session: Session):
        """Run the job in the handler's sandbox; only validated values cross to it."""
        files = {} if job.preprocessing else {"input": job.source}  # the server preprocesses: no /job/input to write
        mounts = []
        if job.original or job.preprocessing:  # the file the server preprocesses, be it empty
            files["original"] = job.original
            mounts.append(("original", job.source_mount))
        for n, (path, data) in enumerate(zip(job.include_paths, job.includes)):
            files[f"include-{n}"] = data
            mounts.append((f"include-{n}", path))
        spec = {
            "compiler": compiler.path, "args": [*argpolicy.COMPILE_LANGUAGE[job.language.value], *job.args, job.mode.value],
            "cwd": job.cwd, "source_path": job.source_path, "environment": job.environment, "mounts": mounts,
            "preprocessed": not job.preprocessing, "compiler_root": compiler.root,
            "system_headers": job.system_headers, "system_digest": job.system_digest, "split_dwarf": job.split_dwarf,
            "directories": job.directories,
        }
        running = self.handler.run(job_id, spec, files, compiler.timeout, self.config.sandbox.limits.file_size)
        self.running.add(running)
        session.while_running(running.kill)  # at once if it left meanwhile: nobody to compile for
        try:
            outcome = yield running.result
        finally:
            session.while_running(None)
            self.running.discard(running)
        return outcome
