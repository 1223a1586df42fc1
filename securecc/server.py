"""securecc-server: Twisted glue from a TCP connection to a sandboxed compile.

Per connection: handshake under a deadline (:mod:`securecc.protocol`,
:mod:`securecc.gss`) → principal → per job: compiler allowlist, argument
policy (:mod:`securecc.args`), authorization (:func:`securecc.acl.decide`
with LDAP groups fetched on a bounded thread pool) → sandboxed compile
(:mod:`securecc.sandbox`) → sealed reply → one audit record.  A refusal is a
reply and an audit record too.  This module holds no policy of its own.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twisted.internet import defer, error, protocol, task, threads
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from securecc import args as argpolicy
from securecc import sandbox
from securecc import protocol as wire
from securecc import toolchain
from securecc.acl import (
    SETTLE,
    Acl,
    AclError,
    AclUnstable,
    FileStamp,
    MembershipLookups,
    file_stamp,
    read_acl_stable,
    Directory,
    DirectoryUnavailable,
    decide,
    is_admin,
    load_acl,
    split_principal,
    use_service_credentials,
)
from securecc.audit import AuditError, AuditLog, Reservation, forwarder, load_private_key, now_rfc3339, sha256
from securecc.cache import Entry, cache_key, expands_time
from securecc import handler_client, jobspec
from securecc.handler_client import HandlerGone, HandlerLink, Running
from securecc.config import Compiler, ConfigError, ServerConfig, load_config
from securecc import distcc, monitor
from securecc.monitor import Metrics
from securecc.monitor import status as monitor_status
from securecc.gss import DISTCC_FLAGS, Acceptor, GSSFailure

LDAP_THREADS = 4
AUDIT_DOWN = "the server cannot write its audit log; it runs no job unrecorded"
FAIR_SHARE_MEMORY = 10.0  # seconds a principal turned away counts as waiting for a share
PREAUTH_TOTAL = 2048  # connections not yet authenticated, from everyone together (~11 KiB each)
PREAUTH_PER_SOURCE = 256  # ... from one address: a make -j200 build host opens ~200 at once
AUTH_FAILURE_WINDOW = 10.0  # seconds: one failed-handshake record per source address at most
LISTEN_BACKLOG = 1024  # make -j64 on a few workstations connects in bursts; 50 would drop SYNs (1 s retries)


def client_gone(session) -> bool:  # type: ignore[no-untyped-def]
    """The job's client has left: noticed already, or its FIN or RST waiting unread in the socket (as
    when this process was frozen meanwhile: the reactor has not seen it yet)."""
    if session.lost:
        return True
    handle = getattr(getattr(session, "transport", None), "getHandle", None)
    if handle is None:
        return False
    try:
        return handle().recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class _Refusal(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AclFile:
    """acl.yaml, re-read when it changes; a broken edit keeps the last good ACL.

    A version is loaded only when it parses whole and did not change while
    it was read, and (on a change seen by a job) once it is ``SETTLE``
    seconds old, so a non-atomic editor's half-written save is never used.
    Its age is judged by the file's change time or, where that lies ahead of
    this host's clock, by how long this server has seen it unchanged.
    """

    _log = Logger()

    def __init__(
        self,
        path: Path,
        on_reload: Callable[..., None] | None = None,
        steady_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.on_reload = on_reload
        self.acl: Acl = load_acl(path)  # a bad or changing file at start-up is fatal
        self._tried = self.acl.stamp  # the last version read, good or not
        self._steady_clock = steady_clock
        self._seen: tuple[FileStamp | None, float] = (self._tried, steady_clock())  # a version, and since when

    def current(self) -> Acl:
        """The ACL in force, re-read first if the file changed."""
        stamp = file_stamp(self.path)
        if stamp != self._tried:
            now = self._steady_clock()
            if stamp != self._seen[0]:
                self._seen = (stamp, now)
            self.reload(settle=SETTLE, steady_for=now - self._seen[1])
        return self.acl

    def reload(self, settle: float = 0.0, steady_for: float = 0.0) -> None:
        """Re-read the file (on change, and at once on SIGHUP); keep the last good ACL if it is broken."""
        stamp = file_stamp(self.path)
        try:
            self.acl = read_acl_stable(self.path, settle, steady_for=steady_for)
            self._tried = self.acl.stamp
            self._log.info("reloaded ACL {path}", path=str(self.path))
            outcome: dict[str, object] = {"accepted": True}
        except AclUnstable as e:
            self._log.debug("ACL not reloaded yet: {error}", error=str(e))
            return  # the next job tries again
        except AclError as e:
            self._tried = stamp  # a broken edit is not re-read on every job
            self._log.error("ACL not reloaded, keeping the previous one: {error}", error=str(e))
            outcome = {"accepted": False, "detail": str(e)}
        if self.on_reload:
            try:
                self.on_reload(event="acl-reload", acl=str(self.path), **outcome)
            except AuditError as e:
                self._log.critical("{error}", error=str(e))


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
    host: str = field(default_factory=socket.getfqdn)
    handler: HandlerLink = field(default_factory=HandlerLink)  # where jobs run (securecc.handler)
    hash_pool: ThreadPool = field(default_factory=lambda: ThreadPool(minthreads=0, maxthreads=2, name="hash"))
    caching: bool = False
    compiler_roots: tuple[str, ...] = ()
    stopping: bool = False
    auth_failures: dict[str, tuple[float, int]] = field(default_factory=dict)  # source -> last recorded, left out since
    running: set[Running] = field(default_factory=set)
    active: collections.Counter[str] = field(default_factory=collections.Counter)  # jobs per principal
    turned_away: dict[str, float] = field(default_factory=dict)  # principal -> when it was last told BUSY
    inflight: dict[str, list[defer.Deferred]] = field(default_factory=dict)  # key -> jobs waiting for its compile
    metrics: Metrics = field(default_factory=Metrics)
    jobs_now: dict[str, dict[str, object]] = field(default_factory=dict)  # job id -> who compiles what, since when
    _log = Logger()

    def auth_failed(self, peer: str, detail: str, **extra: str) -> None:
        """Record a failed handshake: the first from a source in ``AUTH_FAILURE_WINDOW`` seconds, with how
        many were left out before it, so unauthenticated peers cannot flood the log (and fill its disk)."""
        source, now = peer.rpartition(":")[0] or peer, self.clock.seconds()
        last, suppressed = self.auth_failures.get(source, (float("-inf"), 0))
        if now - last < AUTH_FAILURE_WINDOW:
            self.auth_failures[source] = (last, suppressed + 1)
            return
        if len(self.auth_failures) > 10000:  # forget the quiet ones
            self.auth_failures = {k: v for k, v in self.auth_failures.items() if now - v[0] < AUTH_FAILURE_WINDOW}
        self.auth_failures[source] = (now, 0)
        try:
            self.audit.write(**extra, event="auth", peer=peer, decision="refused", reason="denied:authentication-failed",
                             detail=detail[:500], **({"suppressed_before": suppressed} if suppressed else {}))  # fmt: skip
        except AuditError:
            pass  # logged by the caller; nothing ran

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
    def stop(self):  # type: ignore[no-untyped-def]
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
    def run(self, principal: str, peer: str, job: wire.Job, session, extra: dict | None = None):  # type: ignore[no-untyped-def]
        """Validate, authorize and run one job; returns the reply message.

        However it ends (refused, busy, compiled, killed, or an error of
        ours), the job gets exactly one audit record; a compile also gets a
        ``job-start`` record before it starts, so a crash leaves a trace.
        """
        job_id = secrets.token_hex(8)
        started = self.clock.seconds()
        record = dict(
            **(extra or {}), event="job", job_id=job_id, principal=principal, peer=peer,
            compiler=job.compiler, args=job.args, source=job.source_path, cwd=job.cwd, headers=len(job.include_paths),
            bytes_in=len(job.source) + len(job.original) + sum(map(len, job.includes)),
        )  # fmt: skip
        if self.config.sandbox.mode != "bwrap":
            record["sandbox"] = self.config.sandbox.mode
        try:
            reply = yield self._run(job_id, principal, job, session, record, started)
        except _Refusal as refusal:
            record.update(decision="refused", reason=refusal.reason, detail=str(refusal))
            self._record(record, started, session)
            return wire.Refused(refusal.reason, str(refusal), job_id)
        except Exception as e:  # ours, not the client's: still recorded, and the server goes on
            self._log.failure("job {job_id} failed", Failure(), job_id=job_id)
            record.update(decision="error", reason="server-error", detail=f"{type(e).__name__}: {e}"[:500])
            self._record(record, started, session)
            return wire.Refused("server-error", "internal server error; the job was not run", job_id)
        return reply

    @defer.inlineCallbacks
    def _run(self, job_id: str, principal: str, raw: wire.Job, session, record: dict, started: float):  # type: ignore[no-untyped-def]
        try:
            job = jobspec.validate(raw, self.compiler_roots)
        except jobspec.Invalid as e:
            raise _Refusal(e.reason, str(e)) from None
        if self.clock.seconds() >= session.expires:
            raise _Refusal("denied:session-expired", "the Kerberos ticket of this session has ended: reconnect")
        compiler = self._check_job(job)
        decision = yield self._authorize(principal, job)
        record.update(compiler_path=compiler.path, compiler_identity=job.compiler_identity, reason=decision.reason)
        if not decision.allowed:
            raise _Refusal(decision.reason, f"{principal} may not compile here ({decision.reason})")
        # Authorized: only now the large work (hashing the input, the cache key), off the reactor.
        record["input_sha256"], key = yield threads.deferToThreadPool(self.clock, self.hash_pool, self._digests, job)
        hit, owner = yield self._cached(key)
        stored = room = None
        try:
            if hit is not None:
                record.update(decision="allowed", cache="hit", cached_from=hit.producer.get("job_id"), exit_status=0,
                              output_sha256=sha256(hit.output), bytes_out=len(hit.output) + len(hit.stderr))  # fmt: skip
                if not self._record(record, started, session):
                    return wire.Refused("denied:audit-unavailable", AUDIT_DOWN, job_id)
                return wire.Result(0, hit.stdout, hit.stderr, hit.output, job_id)
            busy = self._admit(principal, decision.rule.max_jobs if decision.rule else None)
            if busy is not None:
                record.update(decision="busy", reason=busy.reason, load=busy.load)
                self._record(record, started, session)
                return busy
            start = {**record, "event": "job-start"}
            try:  # room for both of its records first: no compile runs that its record could not follow
                room = self.audit.reserve(start)
                self.audit.write(room, **start)
            except AuditError as e:
                self._log.critical("{error}; refusing jobs until it can be written", error=str(e))
                return wire.Refused("denied:audit-unavailable", AUDIT_DOWN, job_id)
            self.active[principal] += 1
            self.jobs_now[job_id] = {"principal": principal, "compiler": job.compiler, "source": job.source_path,
                                     "started": time.time(), "peer": record["peer"], "job_id": job_id}  # fmt: skip
            try:
                outcome = yield self._compile(job_id, compiler, job, session)
            finally:
                self.active[principal] -= 1
                self.jobs_now.pop(job_id, None)
            record.update(
                decision="allowed", exit_status=outcome.exit_status, ended_by=outcome.ended_by,
                output_sha256=sha256(outcome.output),
                bytes_out=len(outcome.output or b"") + len(outcome.dwo or b"") + len(outcome.stdout) + len(outcome.stderr),
            )  # fmt: skip
            entry = self._entry(key, outcome, {"job_id": job_id, "principal": principal})
            if entry is not None:
                record["cache"] = "stored"
            if not self._record(record, started, session, room):
                return wire.Refused("denied:audit-unavailable", AUDIT_DOWN, job_id)
            stored = entry  # recorded first: the cache never holds an unaudited result
        finally:
            if room is not None:
                self.audit.release(room)
            if owner:
                self._share(key, stored, hit)
        if outcome.ended_by == "timeout":
            return wire.Refused("timeout", f"compile killed after {compiler.timeout:g} s", job_id)
        return wire.Result(outcome.exit_status, outcome.stdout, outcome.stderr, outcome.output, job_id, outcome.dwo)

    def _digests(self, job: jobspec.ValidJob) -> tuple[str | None, str | None]:
        """The input's sha256 for the record and the cache key (None: not cached), in a thread."""
        # A key cannot carry the time of the compile; an entry holds one output, not a .dwo too.
        cacheable = self.caching and not expands_time(job.job) and not job.split_dwarf
        return sha256(job.source or job.original), cache_key(job.compiler_identity, job.job) if cacheable else None

    def _entry(self, key: str | None, outcome: sandbox.Outcome, producer: dict[str, str]) -> Entry | None:
        """A cache entry of a successful compile, or None."""
        if key and outcome.exit_status == 0 and outcome.output is not None and outcome.ended_by is None:
            return Entry(outcome.stdout, outcome.stderr, outcome.output, {**producer, "server": self.host, "time": now_rfc3339()})
        return None

    def _share(self, key: str, stored: Entry | None, hit: Entry | None) -> None:
        """Store a successful, recorded compile (the handler writes it); hand it, or the hit, to identical jobs."""
        if stored is not None:
            self.handler.cache_put(key, stored)
        for waiter in self.inflight.pop(key, []):
            waiter.callback(stored or hit)  # None: they compile for themselves

    @defer.inlineCallbacks
    def _cached(self, key: str | None):  # type: ignore[no-untyped-def]
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
        """A slot for this job, or BUSY: the server is full, the principal is at its ACL
        limit, or it holds its fair share while other principals were recently turned away."""
        now, slots = time.monotonic(), self.config.slots
        load = sum(self.active.values())
        waiting = {p for p, when in self.turned_away.items() if now - when < FAIR_SHARE_MEMORY and p != principal}
        reason = None
        if load >= slots:
            reason = "busy:full"
        elif max_jobs is not None and self.active[principal] >= max_jobs:
            reason = "busy:principal-limit"
        elif waiting:
            sharing = {p for p, n in self.active.items() if n} | waiting | {principal}
            if self.active[principal] >= max(1, slots // len(sharing)):
                reason = "busy:fair-share"
        if reason is None:
            self.turned_away.pop(principal, None)
            return None
        self.turned_away[principal] = now
        return wire.Busy(reason, load, slots)

    def _record(self, record: dict[str, object], started: float, session, room: Reservation | None = None) -> bool:  # type: ignore[no-untyped-def]
        """Write a job's audit record (into its ``room`` if it ran); False (and a log line) when the log cannot take it.

        ``delivered``: the reply goes to the client's open connection right
        after this record (the record comes first, so nothing unrecorded is
        ever delivered); false when the client had gone (a result computed
        for nobody, e.g. on a server frozen past the client's patience).
        """
        record["duration"] = round(self.clock.seconds() - started, 4)
        record["delivered"] = not client_gone(session)
        self.metrics.observe(record)
        try:
            self.audit.write(room, **record)
            return True
        except AuditError as e:
            self.metrics.audit_errors.inc()
            self._log.critical("{error}; refusing jobs until it can be written", error=str(e))
            return False

    def _check_job(self, job: jobspec.ValidJob) -> Compiler:
        """What this server adds to the job's grammar: its audit log, compilers and sandbox."""
        if not self.audit.healthy:
            try:
                self.audit.recover()
            except AuditError:
                raise _Refusal("denied:audit-unavailable", AUDIT_DOWN) from None
        compiler = self.config.compilers.get(job.compiler)
        if compiler is None:
            raise _Refusal("denied:compiler-not-offered", f"compiler {job.compiler!r} is not offered by this server")
        identity = self.identities.get(compiler.path)
        if job.compiler_identity != identity:
            raise _Refusal("denied:compiler-mismatch", f"this server's {job.compiler} is {identity}, yours is "
                           f"{job.compiler_identity[:200] or 'unknown'}; objects would differ")  # fmt: skip
        if self.config.sandbox.mode != "bwrap" and (job.preprocessing or job.split_dwarf):
            raise _Refusal("denied:unsupported", "this server runs without bubblewrap: it cannot preprocess, "
                           "nor write a -gsplit-dwarf .dwo")  # fmt: skip
        return compiler

    @defer.inlineCallbacks
    def _authorize(self, principal: str, job: jobspec.ValidJob):  # type: ignore[no-untyped-def]
        acl = self.acl.current()
        groups: frozenset[str] = frozenset()
        if split_principal(principal)[1] in acl.realms and acl.groups:
            try:
                membership = yield self.lookups.lookup(principal)
            except DirectoryUnavailable as e:
                self.metrics.ldap_errors.inc()
                raise _Refusal("denied:ldap-unavailable", str(e)) from None
            groups = membership.groups
            if membership.cached:
                self.metrics.ldap_cache_hits.inc()
        return decide(acl, principal, groups, job.compiler, job.input_size)

    @defer.inlineCallbacks
    def _compile(self, job_id: str, compiler: Compiler, job: jobspec.ValidJob, session):  # type: ignore[no-untyped-def]
        """Run the job in the handler's sandbox; only validated values cross to it."""
        files = {"input": job.source}
        mounts = []
        if job.original:
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
        }  # fmt: skip
        running = self.handler.run(job_id, spec, files, compiler.timeout, self.config.sandbox.limits.file_size)
        session.running = running
        self.running.add(running)
        if session.lost:  # the client left while the job was authorized and admitted: nobody to compile for
            running.kill("disconnect")
        try:
            outcome = yield running.result
        finally:
            session.running = None
            self.running.discard(running)
        return outcome


class JobProtocol(protocol.Protocol):
    """One client connection: handshake, then jobs one after another."""

    _log = Logger()

    def __init__(self, service: CompileService, acceptor: Acceptor) -> None:
        self.service = service
        self.config = service.config
        self.wire = wire.Connection(max_message=service.config.max_input + 1024 * 1024, defer_unpack=True)
        self.context = acceptor.new_context()
        self.principal: str | None = None
        self.expires = 0.0
        self.running: Running | None = None
        self.busy = False
        self.said_hello = False
        self.lost = False
        self.peer = "?"
        self._heartbeat: task.LoopingCall | None = None
        self._timer = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self._timer = self.service.clock.callLater(self.config.handshake_timeout, self._expired, "handshake")
        self._connected = time.monotonic()

    def _expired(self, phase: str) -> None:
        self._log.info("{peer}: {phase} timed out; dropping", peer=self.peer, phase=phase)
        self._timer = None
        self.transport.abortConnection()

    def _rearm(self, seconds: float | None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.service.clock.callLater(seconds, self._expired, "idle") if seconds else None

    def dataReceived(self, data: bytes) -> None:
        try:
            for event in self.wire.receive_data(data):
                if isinstance(event, wire.PackedMessageReceived):
                    self._unpack(event)
                else:
                    self._event(event)
        except wire.ProtocolError as e:
            self._protocol_error(e)

    def _protocol_error(self, e: wire.ProtocolError) -> None:
        self._log.info("{peer}: protocol error: {error}; dropping", peer=self.peer, error=str(e))
        self.transport.abortConnection()

    def _unpack(self, event: wire.PackedMessageReceived) -> None:
        """Decompress in a thread (a bomb cannot stall the reactor); nothing more is read meanwhile."""
        if self.busy:
            raise wire.ProtocolError("a message while a job runs")
        self.busy = True
        self.transport.pauseProducing()
        d = threads.deferToThreadPool(self.service.clock, self.service.hash_pool, wire.unpack_message, event)

        def unpacked(message: wire.MessageReceived) -> None:
            self.busy = False
            self.transport.resumeProducing()
            self._event(message)

        d.addCallback(unpacked)
        d.addErrback(lambda f: f.trap(wire.ProtocolError) and self._protocol_error(f.value))

    def _event(self, event: wire.Event) -> None:
        if isinstance(event, wire.HelloReceived) and not self.said_hello:
            version = wire.choose_version(event)
            if version is None:
                self.transport.write(wire.error("unsupported-version", f"this server speaks version {wire.VERSION}"))
                self.transport.loseConnection()
                return
            self.said_hello = True
            self.transport.write(wire.hello(version, version))
        elif isinstance(event, wire.TokenReceived) and self.said_hello and self.principal is None:
            self._authenticate(event.token)
        elif isinstance(event, wire.MessageReceived) and isinstance(event.message, wire.Job) and not self.busy:
            self._start_job(event.message)
        elif isinstance(event, wire.MessageReceived) and isinstance(event.message, wire.StatusRequest) and not self.busy:
            self._send_status()
        else:
            raise wire.ProtocolError(f"unexpected {type(event).__name__}")

    def _authenticate(self, token: bytes) -> None:
        try:
            reply = self.context.step(token)
        except GSSFailure as e:
            self._log.info("{peer}: authentication failed: {error}", peer=self.peer, error=str(e))
            self.service.auth_failed(self.peer, str(e))
            self.transport.write((wire.token(e.token) if e.token else b"") + wire.error("authentication-failed", str(e)))
            self.transport.loseConnection()
            return
        if reply:
            self.transport.write(wire.token(reply))
        if self.context.complete:
            self.principal = self.context.principal
            self.expires = self.service.clock.seconds() + self.context.lifetime  # a session ends with the ticket that opened it
            self.service.metrics.handshake.observe(time.monotonic() - self._connected)
            session = self.context.session()
            self.wire.secure(session.wrap, session.unwrap)
            self.authenticated()
            self._rearm(self.config.idle_timeout)

    def _start_job(self, job: wire.Job) -> None:
        assert self.principal is not None
        self.busy = True
        self._rearm(None)
        started = time.monotonic()
        self._heartbeat = task.LoopingCall(lambda: self.transport.write(self.wire.seal(wire.Alive(time.monotonic() - started))))
        self._heartbeat.clock = self.service.clock
        self._heartbeat.start(self.config.heartbeat, now=False)
        d = self.service.run(self.principal, self.peer, job, self)
        d.addBoth(self._stop_heartbeat)
        d.addCallback(self._reply)
        d.addErrback(self._failed)

    def _send_status(self) -> None:
        """For securecc-monitor: this server's status; principal names only for the ACL's admins."""
        assert self.principal is not None
        principal, acl = self.principal, self.service.acl.current()
        d = self.service.lookups.lookup(principal).addCallback(lambda membership: membership.groups)
        d.addErrback(lambda f: f.trap(DirectoryUnavailable) and frozenset())

        def send(groups: frozenset[str]) -> None:
            current = monitor_status(self.service)
            if not is_admin(acl, principal, groups):  # who compiles what is for admins only
                current["running"] = [{"principal": "(admins only)", "source": "(admins only)", "job_id": "", "peer": "",
                                       "compiler": job["compiler"], "started": job["started"]} for job in current["running"]]  # fmt: skip
            if not self.lost:
                self.transport.write(self.wire.seal(wire.Status(json.dumps(current))))

        d.addCallback(send)

    def _stop_heartbeat(self, result: object) -> object:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return result

    def _reply(self, message: wire.Message) -> None:
        self.busy = False
        if self.lost:
            return
        self.transport.write(self.wire.seal(message))
        self._rearm(self.config.idle_timeout)

    def _failed(self, failure: Failure) -> None:
        self._log.failure("{peer}: job failed", failure, peer=self.peer)
        self.busy = False
        if not self.lost:
            self.transport.write(self.wire.seal(wire.Refused("server-error", "internal server error")))
            self.transport.loseConnection()

    def authenticated(self) -> None:
        """Set by the factory: this connection no longer counts against the pre-auth caps."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        self.authenticated()
        self._rearm(None)
        self._stop_heartbeat(None)
        if self.running is not None:
            self._log.info("{peer}: client went away; killing its compile", peer=self.peer)
            self.running.kill("disconnect")


class DistccProtocol(protocol.Protocol):
    """A stock distcc 3.4 client: its GSS handshake, one v1/v2 job, the same stages as a native job.

    Refusals close the connection without a reply, as distccd does: the
    client then compiles locally.  The job stream is not wrapped (the stock
    client cannot), so records say ``payload: cleartext``.
    """

    _log = Logger()

    def __init__(self, service: CompileService, acceptor: Acceptor) -> None:
        self.service = service
        self.parser = distcc.Parser(service.config.max_input)
        self.context = acceptor.new_context(DISTCC_FLAGS)
        self.state = "star"
        self.principal: str | None = None
        self.expires = 0.0
        self.running: Running | None = None
        self.lost = False
        self.peer = "?"
        self._timer = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.transport.setTcpNoDelay(True)
        self._timer = self.service.clock.callLater(self.service.config.handshake_timeout, self._drop, "handshake timed out")

    def _drop(self, why: str) -> None:
        self._log.info("distcc {peer}: {why}; dropping", peer=self.peer, why=why)
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:  # the client's 12-byte headers come one write at a time: ACK at once, not after 40 ms
            self.transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except (AttributeError, OSError):
            pass
        try:
            self.parser.feed(data)
            self._advance()
        except (distcc.DistccError, GSSFailure) as e:
            if isinstance(e, GSSFailure):
                self._audit_auth_failure(str(e))
            self._drop(str(e))

    def _advance(self) -> None:
        if self.state == "star" and self.parser.handshake_byte():
            self.transport.write(b"*")  # at once: the client waits only 1 s
            self.state = "gss"
        while self.state == "gss":
            token = self.parser.gss_token()
            if token is None:
                return
            reply = self.context.step(token)
            out = distcc.item(b"TLEN", len(reply), reply) if reply else b""
            if self.context.complete:
                self.principal = self.context.principal
                self.expires = self.service.clock.seconds() + self.context.lifetime
                self.authenticated()
                self.transport.write(out + b"y")  # tokens and verdict in one write
                self.state = "request"
            elif out:
                self.transport.write(out)
        if self.state == "request":
            request = self.parser.request()
            if request is not None:
                self.state = "running"
                self._cancel_timer()
                self._run(request)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _audit_auth_failure(self, detail: str) -> None:
        self.service.auth_failed(self.peer, detail, protocol="distcc")

    def _run(self, request: distcc.Request) -> None:
        assert self.principal is not None
        extra = {"protocol": "distcc", "payload": "cleartext"}
        job = distcc_job(request, self.service)
        if isinstance(job, str):  # not something a server runs: refused and audited, like any job
            try:
                self.service.audit.write(**extra, event="job", principal=self.principal, peer=self.peer, args=request.argv,
                                         decision="refused", reason="denied:argument-refused", detail=job)  # fmt: skip
            except AuditError:
                pass
            self.transport.loseConnection()
            return
        d = self.service.run(self.principal, self.peer, job, self, extra)
        d.addCallback(self._reply, request.version)
        d.addErrback(lambda f: (self._log.failure("distcc job failed", f), self.transport.loseConnection()))

    def _reply(self, message: wire.Message, version: int) -> None:
        if self.lost:
            return
        if isinstance(message, wire.Result):
            self.transport.write(distcc.reply(version, distcc.wait_status(message.exit_status), message.stdout,
                                              message.stderr, message.output))  # fmt: skip
        self.transport.loseConnection()  # refused or busy: no reply, the client compiles locally

    def authenticated(self) -> None:
        """Set by the factory: this connection no longer counts against the pre-auth caps."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        self.authenticated()
        self._cancel_timer()
        if self.running is not None:
            self.running.kill("disconnect")


def distcc_job(request: distcc.Request, service: CompileService) -> wire.Job | str:
    """A native job from a distcc request, or why it cannot be one.

    distcc sends argv with the original names (``gcc -c x.c -o x.o``) and
    the fully preprocessed text; it rewrites ``gcc`` to ``<target>-gcc``.
    It cannot say which compiler version it has: the server's is assumed.
    """
    if not request.argv:
        return "empty argv"
    name = request.argv[0].removeprefix("/usr/bin/").removeprefix("/bin/")
    compilers = service.config.compilers
    if name not in compilers:
        name = next((n for n in compilers if name.endswith("-" + n) and n in compilers), name)
    try:
        plan = argpolicy.plan(request.argv[1:])
    except argpolicy.NotDistributable as e:
        return str(e)
    language = argpolicy.PREPROCESSED.get(plan.language, plan.language)
    identity = service.identities.get(compilers[name].path, "") if name in compilers else ""
    return wire.Job(name, plan.remote_args, language, plan.mode, "/build", plan.source, request.source,
                    compiler_identity=identity)  # fmt: skip


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


class ServiceFactory(protocol.Factory):
    """One listener: each connection gets a ``kind`` (JobProtocol or DistccProtocol) on the shared service."""

    def __init__(self, kind: type[JobProtocol] | type[DistccProtocol], service: CompileService, acceptor: Acceptor) -> None:
        self.kind = kind
        self.service = service
        self.acceptor = acceptor
        self.gate = PreauthGate()

    def buildProtocol(self, addr: object) -> protocol.Protocol | None:
        release = self.gate.admit(str(getattr(addr, "host", "?")))
        if release is None:  # None: Twisted closes the connection at once
            self.service.metrics.preauth_refused.inc()
            return None
        proto = self.kind(self.service, self.acceptor)
        proto.authenticated = release  # type: ignore[method-assign]
        return proto


def _bind(config: ServerConfig) -> dict[str, socket.socket]:
    """Every listening socket, bound before the privilege drop (a port below 1024 needs root)."""
    wanted = {"jobs": (config.listen_host, config.listen_port)}
    if config.monitor:
        wanted["monitor"] = (config.monitor.host, config.monitor.port)
    if config.distcc:
        wanted["distcc"] = (config.distcc.host, config.distcc.port)
    bound = {}
    for name, (host, port) in wanted.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        bound[name] = sock
    return bound


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved ids; no supplementary groups)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid):
        raise OSError("the privilege drop did not hold")


def start_handler(config: ServerConfig, reactor) -> HandlerLink:  # type: ignore[no-untyped-def]
    """The job handler, started before any secret is loaded; its ``ready`` fires after its sandbox self-test.

    The front makes the handler's directories (scratch, cache) and gives them
    to the handler's uid; it never looks inside them again.
    """
    uid, gid = config.sandbox.uid, config.sandbox.gid
    for directory in (config.scratch, *([config.cache.path] if config.cache else [])):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if uid is not None and gid is not None:
            os.chown(directory, uid, gid)
            for parent in directory.parents:
                if not os.stat(parent).st_mode & 0o001:
                    raise ConfigError(f"{directory} is out of the sandbox uid's reach ({parent} is closed to other "
                                      "users): choose one under /var/lib/securecc, or open that directory (chmod o+x)")  # fmt: skip
    probe = next(iter(config.compilers.values()))
    return handler_client.start(reactor, config.sandbox, {
        "scratch": str(config.scratch), "cache_path": str(config.cache.path) if config.cache else None,
        "cache_max": config.cache.max_bytes if config.cache else 0, "probe": probe.path, "probe_root": probe.root,
    })  # fmt: skip


def _check_private(path: Path) -> None:
    """A secret that others can read is a secret the job handler's uid (or anyone) can read: refuse it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: the loader says so in its own words
    if mode & 0o077:
        raise ConfigError(f"{path} is open to other users (mode {mode & 0o777:04o}): chmod 600 {path}, owned by the "
                          "server's user; the job handler must not be able to read it")  # fmt: skip


def build(config: ServerConfig, reactor, handler: HandlerLink) -> tuple[ServiceFactory, ThreadPool]:  # type: ignore[no-untyped-def]
    """Everything the listener needs, with secrets; fails (ConfigError, AclError, GSSFailure) before listening."""
    if config.ldap.bind == "gssapi":
        use_service_credentials(config.keytab)
    for secret in (Path(config.keytab), config.audit.key):
        _check_private(secret)
    acceptor = Acceptor(config.principal, config.keytab)
    try:
        key = load_private_key(config.audit.key)
    except (OSError, ValueError) as e:
        raise ConfigError(f"audit key {config.audit.key}: {e}; make one with: securecc-admin audit keygen "
                          f"--out {config.audit.key}") from None  # fmt: skip
    audit = AuditLog(config.audit.path, key, socket.getfqdn(), config.audit.rotate_bytes, config.audit.checkpoint_every,
                     config.audit.checkpoint_seconds, forwarder(config.audit.syslog))  # fmt: skip
    acl = AclFile(config.acl, on_reload=audit.write)
    try:
        identities = {c.path: toolchain.probe(c.path) for c in config.compilers.values()}
    except toolchain.ProbeError as e:
        raise ConfigError(str(e)) from None
    if config.sandbox.mode != "bwrap":
        Logger().critical(
            "SANDBOX DISABLED: sandbox.mode is {mode}: compilers run with rlimits and a separate uid only, and "
            "see this host's whole filesystem and network; every audit record says so", mode=config.sandbox.mode,
        )  # fmt: skip
    pool = ThreadPool(minthreads=0, maxthreads=LDAP_THREADS, name="ldap")
    service = CompileService(config, reactor, reactor, acl, Directory(config.ldap), pool, audit, identities, handler=handler,
                             caching=config.cache is not None,
                             compiler_roots=tuple(c.root for c in config.compilers.values() if c.root))  # fmt: skip
    handler.on_gone = lambda: service.handler_gone()
    return ServiceFactory(JobProtocol, service, acceptor), pool


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="securecc-server", description="Kerberos-secured compile server.")
    parser.add_argument("--config", required=True, type=Path, help="the server's YAML configuration")
    options = parser.parse_args(argv)
    if os.environ.get("KRB5RCACHETYPE") == "none" or os.environ.get("KRB5RCACHENAME", "").startswith("none"):
        sys.exit("securecc-server: KRB5RCACHETYPE/KRB5RCACHENAME=none would accept replayed authenticators; unset it")

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    try:
        config = load_config(options.config)
        handler = start_handler(config, reactor)  # root step 1: the job handler gets its own uid
        listeners = _bind(config)  # root step 2: ports, maybe below 1024
        if config.run_as:
            drop_privileges(*config.run_as)  # then never root again; the secrets are read after this
    except (ConfigError, OSError) as e:
        sys.exit(f"securecc-server: {e}")
    failed: list[str] = []
    reactor.callWhenRunning(_serve, config, reactor, handler, listeners, failed)
    reactor.run()
    if failed:
        sys.exit(f"securecc-server: {failed[0]}")


@defer.inlineCallbacks
def _serve(config: ServerConfig, reactor, handler: HandlerLink, listeners: dict[str, socket.socket], failed: list[str]):  # type: ignore[no-untyped-def]
    """Once the handler is ready: load the secrets, listen, record the start."""

    def adopt(name: str, factory: protocol.Factory):  # type: ignore[no-untyped-def]
        sock = listeners.pop(name)
        port = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        sock.close()
        return port

    try:
        yield handler.ready
        factory, pool = build(config, reactor, handler)
        port = adopt("jobs", factory)
        if config.monitor:
            monitor_site = monitor.site(factory.service, Acceptor(config.monitor.principal, config.keytab),
                                        config.monitor.scrapers)  # fmt: skip
            adopt("monitor", monitor_site)
        if config.distcc:
            adopt("distcc", ServiceFactory(DistccProtocol, factory.service, Acceptor(config.distcc.principal, config.keytab)))
            Logger().warn("distcc listener on {host}:{port} as {principal}: jobs from stock clients travel in the CLEAR "
                          "and can be changed on the way", host=config.distcc.host, port=config.distcc.port,
                          principal=config.distcc.principal)  # fmt: skip
    except (ConfigError, AclError, AuditError, GSSFailure, HandlerGone, OSError, error.CannotListenError) as e:
        failed.append(str(e))
        reactor.stop()
        return
    pool.start()
    factory.service.hash_pool.start()
    task.LoopingCall(factory.service.audit.tick).start(1.0, now=False)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(factory.service.acl.reload))
    reactor.addSystemEventTrigger("before", "shutdown", factory.service.stop)
    reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
    reactor.addSystemEventTrigger("before", "shutdown", factory.service.hash_pool.stop)
    audit = factory.service.audit
    audit.write(event="server-start", principal=config.principal, listen=f"{config.listen_host}:{port.getHost().port}",
                sandbox=config.sandbox.mode, compilers={n: factory.service.identities[c.path] for n, c in config.compilers.items()},
                **({"torn_line": audit.torn_line} if audit.torn_line else {}))  # fmt: skip
    if audit.previous_key and audit.previous_key != audit.key_id:
        audit.write(event="key-rotation", old_key=audit.previous_key, new_key=audit.key_id)
    if audit.torn_line:
        Logger().warn("the audit log's last line {line} was torn by a crash; the chain continues after it", line=audit.torn_line)
    Logger().info("securecc-server listening on {host}:{port} as {principal}",
                  host=config.listen_host, port=port.getHost().port, principal=config.principal)  # fmt: skip
