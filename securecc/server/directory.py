"""Group membership from LDAP, the group source behind the ACL's groups.

:class:`Directory` answers "which groups is this principal in" from LDAP
(blocking: the server calls it on a bounded thread pool) with positive and
negative answers cached for separate TTLs; when LDAP cannot answer, an
answer younger than ``max_stale`` is used, otherwise the job is refused as
``denied:ldap-unavailable`` (fail closed).  An outage is noticed once: until a
background probe (every ``retry_down`` seconds) reaches LDAP again, lookups
do not wait for it.  A principal is an exact,
case-preserving ``name@REALM`` (:func:`securecc.acl.principal_named`); its directory entry
must name it exactly (:meth:`Directory.identifies`), so ``ALICE@R``,
``alice/admin@R`` and ``alice@OTHER`` never get alice's groups.

It blocks and knows no Twisted, so ``securecc-admin acl check`` uses it as
it is; the server asks through :mod:`securecc.server.lookups`.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ldap
import ldap.dn
import ldap.filter
import ldap.sasl

from securecc.acl import split_principal
from securecc.server.clock import TimeSource


def use_service_credentials(keytab: str) -> None:
    """Bind to LDAP (SASL GSSAPI) as the service itself, from its own keytab.

    Into a private in-memory cache: never a user's ccache inherited from a shell.
    """
    os.environ["KRB5_CLIENT_KTNAME"] = keytab
    os.environ["KRB5CCNAME"] = "MEMORY:securecc-ldap"


class DirectoryUnavailable(Exception):
    """LDAP could not answer and no fresh-enough cached answer exists."""


@dataclass(frozen=True)
class LdapConfig:
    uris: tuple[str, ...]
    base: str
    users: str
    groups: str
    bind: str = "gssapi"  # gssapi (the server's keytab), external (ldapi://), simple (password file), none
    bind_dn: str = ""
    password_file: str = ""
    starttls: bool = False
    ca_file: str = ""
    timeout: float = 5.0
    user_filter: str = "(uid={user})"  # {user}: the principal without its realm; {principal}: all of it
    membership: tuple[str, ...] = ("member", "memberUid")  # and/or "memberOf" (on the user entry)
    nested: bool = True  # groups that are members of groups (resolved here, at most 5 levels)
    positive_ttl: float = 60.0
    negative_ttl: float = 10.0
    max_stale: float = 300.0  # how old a cached answer may be when LDAP is down
    retry_down: float = 5.0  # while LDAP is down, how often it is tried again (in the background)
    realm: str = ""  # whose principals an entry's uid names; "": the realm spelled by base's dc= parts

    @property
    def home_realm(self) -> str:
        """The one realm whose ``name@REALM`` an entry's bare ``uid`` stands for ("" if none can be told)."""
        if self.realm:
            return self.realm
        try:
            rdns = ldap.dn.str2dn(self.base)
        except ldap.DECODING_ERROR:
            return ""
        return ".".join(value for rdn in rdns for attr, value, _ in rdn if attr.lower() == "dc").upper()


@dataclass
class Membership:
    """What LDAP said of a principal, for decisions and for ``securecc-admin acl check``."""

    user_dn: str | None
    groups: frozenset[str]
    facts: list[str] = field(default_factory=list)
    cached: bool = False


STALE_WAIT = 0.5  # seconds a job with a cached answer waits for LDAP before it takes that answer


class Directory:
    """Group membership from LDAP: one connection per pool thread, answers cached.

    Answers are timed on ``clock`` (:mod:`securecc.server.clock`): their TTLs
    and ``max_stale``.  A thread's own waits stay real time: a job's
    STALE_WAIT for a slow LDAP and the probe's pause between reconnects each
    block their thread, are compared with no stored time, and must work
    where no reactor runs (``securecc-admin``).
    """

    NESTING = 5

    def __init__(self, config: LdapConfig, clock: TimeSource) -> None:
        self.config = config
        self.clock = clock
        self._local = threading.local()
        self._cache: dict[str, tuple[float, Membership]] = {}
        self._pending: dict[str, concurrent.futures.Future[Membership]] = {}
        self._lock = threading.Lock()
        self._down: str | None = None  # why LDAP is down, while it is: the circuit breaker (see _known_down)
        self._queries = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ldap-query")

    def groups_of(self, principal: str) -> frozenset[str]:
        return self.membership(principal).groups

    def forget(self, principal: str) -> None:
        """Drop ``principal``'s cached answer: its next lookup asks LDAP (after a revocation)."""
        with self._lock:
            self._cache.pop(principal, None)

    def fresh(self, principal: str) -> Membership | None:
        """The cached answer while within its TTL, else None; never blocks, so the reactor may ask."""
        with self._lock:
            cached = self._cache.get(principal)
        if cached is None:
            return None
        answer = cached[1]
        if self.clock.seconds() - cached[0] >= (self.config.positive_ttl if answer.groups else self.config.negative_ttl):
            return None
        return Membership(answer.user_dn, answer.groups, answer.facts, cached=True)

    def membership(self, principal: str) -> Membership:
        """The principal's groups (cn), from the cache while fresh, else from LDAP.

        Concurrent misses for one principal share one query.  A caller with
        a cached answer younger than ``max_stale`` waits at most STALE_WAIT
        for it, then takes the cached answer while the query goes on: a
        healthy LDAP answers in milliseconds (so a revoked member is refused
        once the TTL is over, as before), and a hung one costs no job more
        than STALE_WAIT (the query's failure opens the breaker).
        """
        fresh = self.fresh(principal)
        if fresh is not None:
            return fresh
        now = self.clock.seconds()
        if self._down is not None:
            return self._stale(principal, now, self._down)
        with self._lock:
            cached = self._cache.get(principal)
            query = self._pending.get(principal)
            if query is None:
                query = self._pending[principal] = concurrent.futures.Future()
                self._queries.submit(self._refresh, principal, query)
        usable = cached is not None and now - cached[0] < self.config.max_stale
        try:
            return query.result(timeout=STALE_WAIT if usable else None)
        except concurrent.futures.TimeoutError:
            return self._stale(principal, now, "LDAP is slow to answer")

    def _refresh(self, principal: str, query: concurrent.futures.Future[Membership]) -> None:
        """Ask LDAP (on a query thread, with its own connection), keep the answer, hand it to the waiters."""
        now = self.clock.seconds()
        try:
            try:
                answer = self._query(principal)
                with self._lock:
                    self._cache[principal] = (now, answer)
            except DirectoryUnavailable as e:
                self._known_down(str(e))
                answer = self._stale(principal, now, str(e))
        except BaseException as e:  # noqa: BLE001 -- handed to every waiter
            query.set_exception(e)
        else:
            query.set_result(answer)
        finally:
            with self._lock:
                if self._pending.get(principal) is query:
                    del self._pending[principal]

    def _stale(self, principal: str, now: float, why: str) -> Membership:
        """LDAP is down: the cached answer while younger than ``max_stale``, else DirectoryUnavailable."""
        with self._lock:
            cached = self._cache.get(principal)
        if not (cached and now - cached[0] < self.config.max_stale):
            raise DirectoryUnavailable(why)
        return Membership(cached[1].user_dn, cached[1].groups, [*cached[1].facts, "LDAP down: cached answer"], True)

    def _known_down(self, why: str) -> None:
        """Open the breaker: until a background probe reaches LDAP again, no job waits for it (each would
        pay the LDAP timeout), and they are answered from the cache or refused at once."""
        with self._lock:
            if self._down is not None:
                return
            self._down = f"{why} (down; retried every {self.config.retry_down:g} s in the background)"
        threading.Thread(target=self._probe, name="ldap-probe", daemon=True).start()

    def _probe(self) -> None:
        while True:
            time.sleep(self.config.retry_down)
            try:
                self._connection()  # binds, after a root DSE read: LDAP answers again
            except (ldap.LDAPError, OSError):
                self._local.conn = None
                continue
            with self._lock:
                self._down = None
            return

    def _query(self, principal: str) -> Membership:
        errors: list[Exception] = []
        for _attempt in range(2):  # a kept connection may have gone stale
            try:
                return self._lookup(self._connection(), principal)
            except (ldap.LDAPError, OSError) as e:
                self._local.conn = None
                errors.append(e)
                if isinstance(e, ldap.TIMEOUT):  # not a stale connection: a server that does not answer
                    break
        raise DirectoryUnavailable(f"LDAP unavailable: {_ldap_message(errors[-1])}")

    def identifies(self, attrs: dict[str, list[bytes]], principal: str) -> bool:
        """Whether a user entry found by ``user_filter`` is ``principal``'s own, exactly.

        LDAP matched it loosely (``uid`` compares case-insensitively) and on
        the name alone, so ``ALICE@R`` or ``alice@OTHER`` would find alice's
        entry.  It is the principal's only if one of its ``krbPrincipalName``
        values is the whole principal, byte for byte; or, on an entry with no
        ``krbPrincipalName``, if its ``uid`` is exactly the name, the name is
        a single component (``alice/admin`` is another principal), and the
        realm is the directory's own (:attr:`LdapConfig.home_realm`).
        """
        name, realm = split_principal(principal)
        values = {key.lower(): value for key, value in attrs.items()}  # attribute names are case-insensitive
        if "krbprincipalname" in values:
            return principal.encode() in values["krbprincipalname"]
        single = bool(name) and not any(c in name for c in "/\\")
        return single and realm == self.config.home_realm and name.encode() in values.get("uid", [])

    def _lookup(self, conn: ldap.ldapobject.LDAPObject, principal: str) -> Membership:
        cfg, escape = self.config, ldap.filter.escape_filter_chars
        name = split_principal(principal)[0]
        user_filter = cfg.user_filter.format(user=escape(name), principal=escape(principal))
        wanted = ["uid", "memberOf", "krbPrincipalName"]
        found = [(dn, attrs) for dn, attrs in conn.search_s(cfg.users, ldap.SCOPE_SUBTREE, user_filter, wanted) if dn]
        if len(found) != 1:
            return Membership(None, frozenset(), [f"{user_filter} under {cfg.users}: {len(found)} entries"])
        user_dn, attrs = found[0]
        if not self.identifies(attrs, principal):
            return Membership(None, frozenset(), [f"{user_filter} under {cfg.users}: {user_dn} is not {principal} "
                                                  f"(principal-mismatch: krbPrincipalName, else uid in realm "
                                                  f"{cfg.home_realm or '(none: the base DN has no dc= parts)'}, must match exactly)"])
        uids = attrs.get("uid", [])
        uid = name if name.encode() in uids else (uids[0].decode() if uids else None)  # for posixGroup memberUid
        facts = [f"user {user_dn}"]
        clauses = []
        if "member" in cfg.membership:
            clauses += [f"(member={escape(user_dn)})", f"(uniqueMember={escape(user_dn)})"]
        if "memberUid" in cfg.membership and uid:
            clauses.append(f"(memberUid={escape(uid)})")
        groups: dict[str, str] = {}  # dn -> cn
        if clauses:
            for dn, group in conn.search_s(cfg.groups, ldap.SCOPE_SUBTREE, f"(|{''.join(clauses)})", ["cn"]):
                if dn and group.get("cn"):
                    groups[dn] = group["cn"][0].decode()
                    facts.append(f"member of {dn}")
        if "memberOf" in cfg.membership:
            for dn in (v.decode() for v in attrs.get("memberOf", [])):
                rdn = ldap.dn.str2dn(dn)[0][0]
                if rdn[0].lower() == "cn" and dn.lower().endswith(cfg.groups.lower()):
                    groups[dn] = rdn[1]
                    facts.append(f"memberOf {dn}")
        frontier = set(groups)
        for _level in range(self.NESTING if cfg.nested else 0):
            if not frontier:
                break
            nested = "".join(f"(member={escape(dn)})(uniqueMember={escape(dn)})" for dn in frontier)
            frontier = set()
            for dn, group in conn.search_s(cfg.groups, ldap.SCOPE_SUBTREE, f"(|{nested})", ["cn"]):
                if dn and dn not in groups and group.get("cn"):
                    groups[dn], frontier = group["cn"][0].decode(), frontier | {dn}
                    facts.append(f"member of {dn} (nested)")
        return Membership(user_dn, frozenset(groups.values()), facts)

    def _connection(self) -> ldap.ldapobject.LDAPObject:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        cfg = self.config
        last: Exception | None = None
        for uri in cfg.uris:
            try:
                conn = ldap.initialize(uri)
                conn.set_option(ldap.OPT_REFERRALS, 0)
                conn.set_option(ldap.OPT_NETWORK_TIMEOUT, cfg.timeout)
                conn.set_option(ldap.OPT_TIMEOUT, cfg.timeout)
                conn.set_option(ldap.OPT_X_SASL_NOCANON, 1)
                if cfg.ca_file:
                    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, cfg.ca_file)
                    conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
                    conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
                if cfg.starttls and not uri.startswith("ldaps:"):
                    conn.start_tls_s()
                if cfg.bind in ("gssapi", "external"):
                    _alive(conn, cfg.timeout)
                if cfg.bind == "gssapi":
                    conn.sasl_interactive_bind_s("", ldap.sasl.gssapi())
                elif cfg.bind == "external":
                    conn.sasl_interactive_bind_s("", ldap.sasl.external())
                elif cfg.bind == "simple":
                    conn.simple_bind_s(cfg.bind_dn, Path(cfg.password_file).read_text().strip())
                self._local.conn = conn
                return conn
            except (ldap.LDAPError, OSError) as e:
                last = e
        raise last or OSError("no LDAP URIs configured")


def _alive(conn: ldap.ldapobject.LDAPObject, timeout: float) -> None:
    """Read the root DSE first: python-ldap holds the GIL through a SASL bind, so a
    server that accepts connections but never answers would freeze the whole
    server (its reactor too) for the bind's timeout.  This read waits without
    the GIL, and any answer, even a refusal, shows the server is alive."""
    try:
        conn.result(conn.search_ext("", ldap.SCOPE_BASE, "(objectClass=*)", ["1.1"]), all=1, timeout=timeout)
    except (ldap.TIMEOUT, ldap.SERVER_DOWN, ldap.CONNECT_ERROR):
        raise
    except ldap.LDAPError:
        pass


def _ldap_message(error: Exception) -> str:
    info = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    desc = info.get("desc") or str(error) or ("timed out" if isinstance(error, ldap.TIMEOUT) else type(error).__name__)
    return desc + (f" ({info['info']})" if info.get("info") else "")
