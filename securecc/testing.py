"""In-memory twins of the outside world, for unit tests that need no KDC, no slapd and no network.

Each one has the interface the code asks of the real component (the GSS
contexts of :mod:`securecc.handshake`,
:class:`~securecc.server.lookups.MembershipSource`, the pool's ``submit``
of :class:`~securecc.server.lookups.MembershipLookups`, slapd's answers to
:class:`~securecc.server.directory.Directory`), so a test drives the real code,
not a copy of it, and decides itself when an answer arrives.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import ldap
from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from securecc import protocol as wire
from securecc.acl import split_principal
from securecc.audit import generate_key, load_private_key
from securecc.handshake import AuthenticationFailure
from securecc.sandbox import Limits, Outcome, Settings
from securecc.server.aclfile import AclFile
from securecc.server.auditlog import AuditLog
from securecc.server.cache import Entry
from securecc.server.clock import TimeSource
from securecc.server.config import AuditConfig, Compiler, ServerConfig
from securecc.server.directory import Directory, DirectoryUnavailable, LdapConfig, Membership
from securecc.server.handler_client import HandlerGone, HandlerLink
from securecc.server.service import CompileService
from securecc.server.session import Session

# --- GSS ---------------------------------------------------------------------
#
# Not Kerberos: a two-token exchange (a request naming client, server and a nonce; a reply echoing the nonce),
# then frames with a sequence number and an HMAC.  Integrity and order are checked as GSS checks them, so a
# tampered, replayed or reordered frame fails as it does against a real context; nothing is secret.

_REQUEST, _REPLY, _ERROR = b"MEMORY-REQ ", b"MEMORY-REP ", b"MEMORY-ERR "
_SEQ = struct.Struct(">Q")


class MemorySealing:
    """Wrap and unwrap of a completed in-memory context: numbered, authenticated frames (not encrypted)."""

    def __init__(self, key: bytes, sends: bytes, receives: bytes) -> None:
        self._key, self._sends, self._receives = key, sends, receives
        self._sent = self._received = 0

    def _tag(self, direction: bytes, seq: int, data: bytes) -> bytes:
        return hmac.new(self._key, direction + _SEQ.pack(seq) + data, hashlib.sha256).digest()

    def wrap(self, data: bytes) -> bytes:
        seq, self._sent = self._sent, self._sent + 1
        return _SEQ.pack(seq) + self._tag(self._sends, seq, data) + data

    def unwrap(self, data: bytes) -> bytes:
        seq, tag, body = _SEQ.unpack_from(data)[0] if len(data) >= 40 else -1, data[8:40], data[40:]
        if seq != self._received or not hmac.compare_digest(tag, self._tag(self._receives, seq, body)):
            raise AuthenticationFailure("frame failed its integrity or sequence check")
        self._received += 1
        return body


@dataclass
class MemoryInitiator:
    """A client's context for ``principal`` (the server), as ``client``; fails as the peer's error token says."""

    client: str
    principal: str
    lifetime: float = 3600.0
    complete: bool = False
    _nonce: bytes = b""

    def step(self, in_token: bytes | None = None) -> bytes | None:
        if in_token is None:
            self._nonce = os.urandom(16)
            return _REQUEST + json.dumps({"client": self.client, "server": self.principal, "nonce": self._nonce.hex(),
                                          "lifetime": self.lifetime}).encode()
        if in_token.startswith(_ERROR):
            raise AuthenticationFailure(in_token[len(_ERROR):].decode())
        if in_token != _REPLY + self._nonce or self.complete:
            raise AuthenticationFailure("the server's reply does not answer our request")
        self.complete = True
        return None

    def session(self) -> MemorySealing:
        return MemorySealing(self._nonce, b"initiator", b"acceptor")

    @property
    def server(self) -> str:
        return self.principal


@dataclass
class MemoryAcceptorContext:
    """One connection's context of a :class:`MemoryAcceptor`."""

    acceptor: MemoryAcceptor
    principal: str | None = None
    lifetime: float = 0.0
    server: str = ""
    _nonce: bytes = b""

    @property
    def complete(self) -> bool:
        return self.principal is not None

    def step(self, in_token: bytes) -> bytes | None:
        try:
            request: Any = json.loads(in_token.removeprefix(_REQUEST)) if in_token.startswith(_REQUEST) else None
        except ValueError:
            request = None
        try:  # anything but a request as MemoryInitiator makes one fails as a bad token fails GSS: never otherwise
            client, server, nonce = request["client"], request["server"], bytes.fromhex(request["nonce"])
            lifetime = request["lifetime"]
            if not (isinstance(client, str) and isinstance(lifetime, (int, float)) and not isinstance(lifetime, bool)) or self.complete:
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise AuthenticationFailure("not an authentication request", token=_ERROR + b"malformed request") from None
        if server != self.acceptor.principal or client not in self.acceptor.clients:
            why = f"{client} may not authenticate to {self.acceptor.principal}"
            raise AuthenticationFailure(why, token=_ERROR + why.encode())
        self._nonce = nonce
        self.principal, self.lifetime, self.server = client, float(lifetime), self.acceptor.principal
        return _REPLY + self._nonce

    def session(self) -> MemorySealing:
        return MemorySealing(self._nonce, b"acceptor", b"initiator")


@dataclass
class MemoryAcceptor:
    """A server's credentials for ``principal``: accepts the ``clients`` named, as a KDC that knows them would."""

    principal: str
    clients: frozenset[str] = frozenset()

    def new_context(self) -> MemoryAcceptorContext:
        return MemoryAcceptorContext(self)


# --- LDAP and pools ----------------------------------------------------------


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


PEOPLE, GROUPS = "ou=people,dc=test,dc=realm", "ou=groups,dc=test,dc=realm"


@dataclass
class MemoryLdap:
    """slapd from a dict, under a real :class:`~securecc.server.directory.Directory` (its cache, TTLs and breaker).

    Each principal's entry names its groups as ``memberOf``; ``down`` makes
    connecting fail as an unreachable slapd does; ``connects`` and
    ``searches`` count what came to it (the breaker's probe connects too).
    The Directory still asks on its own query threads, answered at once.
    """

    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    down: bool = False
    connects: int = 0
    searches: int = 0

    def directory(self, clock: TimeSource, **settings: Any) -> Directory:
        """A Directory on ``clock`` whose every connection is this one; ``settings``: LdapConfig's (TTLs, retry_down)."""
        settings = {"membership": ("memberOf",), "nested": False, **settings}  # one search per lookup
        config = LdapConfig(("ldap://memory/",), "dc=test,dc=realm", PEOPLE, GROUPS, **settings)
        return _DirectoryOver(self, config, clock)

    def connect(self) -> MemoryLdap:
        self.connects += 1
        if self.down:
            raise ldap.SERVER_DOWN({"desc": "Can't contact LDAP server"})
        return self

    def search_s(self, base: str, scope: int, filterstr: str, attrlist: list[str]) -> list[tuple[str, dict[str, list[bytes]]]]:
        self.searches += 1
        for principal, groups in self.groups.items():
            name = split_principal(principal)[0]
            if base == PEOPLE and filterstr == f"(uid={name})":
                entry = {"uid": [name.encode()], "krbPrincipalName": [principal.encode()],
                         "memberOf": [f"cn={group},{GROUPS}".encode() for group in sorted(groups)]}
                return [(f"uid={name},{PEOPLE}", entry)]
        return []


class _DirectoryOver(Directory):
    """The real Directory with one seam: its connection is a MemoryLdap; above it, all is Directory's own code."""

    def __init__(self, server: MemoryLdap, config: LdapConfig, clock: TimeSource) -> None:
        super().__init__(config, clock)
        self._server = server

    def _connection(self) -> Any:
        return self._server.connect()


# --- the service ------------------------------------------------------------


class InstantReactor(Clock):
    """The service's reactor and clock in one: what a pool computes comes back through :meth:`callFromThread` at once."""

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        f(*args, **kwargs)


class InlinePool:
    """The hash pool: each call runs at once, in the test's thread."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, object], None], f: Callable[..., object], *args: object) -> None:
        try:
            result = f(*args)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class HandlerRun:
    """A compile in :class:`MemoryHandler`: it ends when the test says, or when it is killed (as the sandbox ends it)."""

    def __init__(self) -> None:
        self.result: defer.Deferred[Outcome] = defer.Deferred()

    def finish(self, outcome: Outcome) -> None:
        self.result.callback(outcome)

    def kill(self, why: str) -> None:
        if not self.result.called:
            self.result.callback(Outcome(128 + 9, b"", b"", None, why))


@dataclass
class MemoryHandler:
    """The job handler as the service sees it (:class:`~securecc.server.handler_link.HandlerLink`): no process, no sandbox."""

    runs: list[HandlerRun] = field(default_factory=list)
    cache: dict[str, Entry] = field(default_factory=dict)
    gone: bool = False

    def run(self, job_id: str, spec: dict[str, Any], files: dict[str, bytes], timeout: float, output_cap: int) -> HandlerRun:
        if self.gone:
            raise HandlerGone("the job handler has exited")
        self.runs.append(HandlerRun())
        return self.runs[-1]

    def cache_get(self, key: str) -> defer.Deferred[Entry | None]:
        return defer.succeed(self.cache.get(key))

    def cache_put(self, key: str, entry: Entry) -> None:
        self.cache[key] = entry

    def cache_drop(self, key: str) -> None:
        self.cache.pop(key, None)


GCC_IDENTITY = "gcc (GCC) 12.2.0; target x86_64-linux-gnu"
"""What the memory service's one compiler, ``gcc`` at /usr/bin/gcc, says of itself."""


def replied(d: defer.Deferred[Any]) -> Any:
    """What a finished job replied (the job must have finished: twins answer at once or when told)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the job has not finished"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@dataclass
class MemoryService:
    """A real :class:`~securecc.server.service.CompileService` over twins, writing a real audit log."""

    service: CompileService
    handler: MemoryHandler
    clock: IReactorTime
    log: Path

    def compile(self, job: wire.Job, output: bytes, principal: str = "alice@TEST.REALM") -> Any:
        """``job`` run to its reply, its compile (if it gets one) finishing with ``output`` as the object."""
        runs = len(self.handler.runs)
        d = self.service.run(Session(principal, "127.0.0.1:40000", 3600.0), job)
        if len(self.handler.runs) > runs:
            self.handler.runs[-1].finish(Outcome(0, b"", b"", output))
        return replied(d)


def memory_service(directory: Path, *, mode: str = "bwrap", slots: int = 2, caching: bool = False,
                   clock: IReactorTime | None = None, acl: str = "realms: [TEST.REALM]\nallow:\n  - principal: alice\n") -> MemoryService:
    """The service of a server named securecc/localhost@TEST.REALM whose ACL allows alice, its files in ``directory``
    (a fresh audit key and log), its jobs run by a :class:`MemoryHandler`; on ``clock``, an :class:`InstantReactor` by default."""
    key, signing, acl_path, log = directory / "audit.key", directory / "signing.key", directory / "acl.yaml", directory / "audit.jsonl"
    generate_key(key)
    generate_key(signing)
    acl_path.write_text(acl)
    config = ServerConfig("127.0.0.1", 0, "securecc/localhost@TEST.REALM", str(directory / "keytab"), acl_path, AuditConfig(log, key),
                          signing, LdapConfig((), "dc=test", "ou=users", "ou=groups", bind="none"), {"gcc": Compiler("/usr/bin/gcc", 60.0)},
                          directory / "scratch", Settings(Limits(), None, None, mode), slots=slots)
    clock = clock if clock is not None else InstantReactor()
    handler = MemoryHandler()
    service = CompileService(config, cast(IReactorProcess, clock), clock, AclFile(acl_path, clock), Directory(config.ldap, clock),
                             ThreadPool(), AuditLog(log, load_private_key(key), "test", clock=clock), {"/usr/bin/gcc": GCC_IDENTITY},
                             load_private_key(signing),
                             handler=cast(HandlerLink, handler), hash_pool=cast(ThreadPool, InlinePool()), caching=caching)
    return MemoryService(service, handler, clock, log)
