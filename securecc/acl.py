"""Who may compile: ``acl.yaml`` plus the LDAP groups that mirror commit rights.

:func:`decide` is the one authorization decision: pure, and readable in one
sitting.  Deny by default; a deny entry beats every allow rule; allow rules
are tried in order and the first that matches the principal and offers the
compiler decides, with its limits.  Every decision carries a stable,
machine-readable reason (``allowed:group:committers``,
``denied:not-in-group``...) that goes into the audit record.

:class:`Directory` answers "which groups is this principal in" from LDAP
(blocking: the server calls it on a bounded thread pool) with positive and
negative answers cached for separate TTLs; when LDAP cannot answer, an
answer younger than ``max_stale`` is used, otherwise the job is refused as
``denied:ldap-unavailable`` (fail closed).  An outage is noticed once: until a
background probe (every ``retry_down`` seconds) reaches LDAP again, lookups
do not wait for it.  A principal is an exact,
case-preserving ``name@REALM`` (:func:`principal_named`); its directory entry
must name it exactly (:meth:`Directory.identifies`), so ``ALICE@R``,
``alice/admin@R`` and ``alice@OTHER`` never get alice's groups.

:class:`MembershipLookups` is how the Twisted server asks: one query in
flight per principal, so one principal's jobs cannot fill the LDAP pool.
:func:`read_acl_stable` loads acl.yaml only from bytes that were not changing.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import ldap
import ldap.dn
import ldap.filter
import ldap.sasl
import yaml

if TYPE_CHECKING:  # Twisted is imported only by the server's use (MembershipLookups): lint and check stay light
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

# --- acl.yaml -----------------------------------------------------------------


class AclError(Exception):
    """acl.yaml is malformed; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class Rule:
    """One allow rule: who (a group or a principal) and with what limits."""

    kind: str  # "group" or "principal"
    name: str
    compilers: frozenset[str] | None = None  # None: every compiler the server offers
    max_jobs: int | None = None  # concurrent jobs per principal
    max_input: int | None = None  # bytes per job
    line: int = 0

    def matches(self, principal: str, groups: frozenset[str]) -> bool:
        return self.name in groups if self.kind == "group" else principal_named(self.name, principal)

    def describe(self) -> str:
        limits = [f"compilers {', '.join(sorted(self.compilers))}" if self.compilers is not None else "any compiler"]
        limits += [f"at most {self.max_jobs} jobs at once"] if self.max_jobs else []
        limits += [f"inputs up to {self.max_input} bytes"] if self.max_input else []
        return f"rule at line {self.line}: {self.kind} {self.name} ({'; '.join(limits)})"


@dataclass(frozen=True)
class Acl:
    realms: frozenset[str]
    allow: tuple[Rule, ...]
    deny_principals: frozenset[str] = frozenset()
    deny_groups: frozenset[str] = frozenset()
    admin_principals: frozenset[str] = frozenset()
    admin_groups: frozenset[str] = frozenset()
    path: str = ""
    stamp: FileStamp | None = field(default=None, compare=False)  # the file as it was when these bytes were read

    @property
    def groups(self) -> frozenset[str]:
        """Every group a decision may need to know membership of."""
        return self.deny_groups | self.admin_groups | {r.name for r in self.allow if r.kind == "group"}


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "allowed:group:committers", "denied:not-in-group", ...
    rule: Rule | None = None


def split_principal(principal: str) -> tuple[str, str]:
    """``alice@TEST.REALM`` → ``("alice", "TEST.REALM")``; no realm → ``(principal, "")``.

    Splits at the last ``@`` that Kerberos did not escape (``a\\@b@R`` is
    name ``a\\@b`` in realm ``R``), and changes no letter: case is identity.
    """
    at = len(principal)
    while (at := principal.rfind("@", 0, at)) > 0:
        backslashes = len(principal[:at]) - len(principal[:at].rstrip("\\"))
        if backslashes % 2 == 0:
            return principal[:at], principal[at + 1 :]
    return principal, ""


def principal_named(entry: str, principal: str) -> bool:
    """Whether an acl.yaml principal entry names ``principal``: the one rule for deny, allow and admins.

    Names compare exactly, case and all, as the KDC does: ``alice`` is not
    ``ALICE`` nor ``alice/admin``.  ``alice@REALM`` names that principal
    only; a bare ``alice`` names alice in each realm listed under ``realms``
    (the caller has checked the realm).  That is what a deny entry should
    do; an allow or admins entry may be bare only while one realm is listed
    (:func:`parse_acl`), since with two, another realm's admins could create
    the name and be granted its rights.
    """
    realm = split_principal(entry)[1]
    return entry == principal if realm else entry == split_principal(principal)[0]


def decide(acl: Acl, principal: str, groups: frozenset[str], compiler: str, input_size: int = 0) -> Decision:
    """May ``principal`` (a member of ``groups``) run ``compiler`` on ``input_size`` bytes here, and why."""
    if split_principal(principal)[1] not in acl.realms:
        return Decision(False, "denied:realm-not-accepted")
    if any(principal_named(entry, principal) for entry in acl.deny_principals):
        return Decision(False, "denied:principal-deny-list")
    denied = sorted(groups & acl.deny_groups)
    if denied:
        return Decision(False, f"denied:group-deny-list:{denied[0]}")
    matching = [rule for rule in acl.allow if rule.matches(principal, groups)]
    if not matching:
        return Decision(False, "denied:not-in-group")
    rule = next((r for r in matching if r.compilers is None or compiler in r.compilers), None)
    if rule is None:
        return Decision(False, "denied:compiler-not-allowed", matching[0])
    if rule.max_input is not None and input_size > rule.max_input:
        return Decision(False, "denied:input-too-large", rule)
    return Decision(True, f"allowed:{rule.kind}:{rule.name}", rule)


def is_admin(acl: Acl, principal: str, groups: frozenset[str]) -> bool:
    """Whether ``principal`` may see who compiles what (monitoring)."""
    if split_principal(principal)[1] not in acl.realms:
        return False
    return any(principal_named(entry, principal) for entry in acl.admin_principals) or bool(groups & acl.admin_groups)


class _Mapping(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers the line of each key."""

    line: int = 0
    lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping()
    mapping.line, mapping.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise AclError(f"line {key_node.start_mark.line + 1}: '{key}' appears twice")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_TOP = {"realms", "allow", "deny", "admins"}
_WHO = {"groups", "principals"}
_RULE = {"group", "principal", "compilers", "max_jobs", "max_input"}


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    changed_ns: int = field(default=0, compare=False)  # the later of mtime and ctime: utime cannot set ctime back

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, max(st.st_mtime_ns, st.st_ctime_ns))


class AclUnstable(AclError):
    """acl.yaml is being written: keep the previous ACL and try again later, quietly (not a broken edit)."""


SETTLE = 1.0  # seconds since its last change before a watched acl.yaml is trusted to be whole


def file_stamp(path: Path) -> FileStamp | None:
    """The file's stamp now, None if it cannot be stat'ed; compare with :attr:`Acl.stamp` to see a change."""
    try:
        return FileStamp.of(os.stat(path))
    except OSError:
        return None


def read_acl_stable(
    path: Path, settle: float = 0.0, now: Callable[[], float] = time.time, steady_for: float = 0.0
) -> Acl:
    """Load acl.yaml only from bytes that were not changing while read.

    An editor that writes in place (truncate, then write, maybe in several
    calls) leaves moments where the file is a prefix of the edit, and a
    prefix cut at a line end often parses: the rules without the deny list
    that followed.  So the file is stat'ed before and after, the open file
    fstat'ed around the read, and all four must agree (device, inode, size,
    mtime); the bytes read are the ones parsed, never a second read.

    That cannot see a reader that fell *between* two writes, so with
    ``settle`` (the server's hot reload uses :data:`SETTLE`) a file last
    changed less than ``settle`` seconds ago is not trusted yet: writes of
    one save come microseconds apart, far inside a second, while an admin
    waits a second for an edit without noticing.  "Changed" is the later of
    mtime and ctime, as the kernel keeps them.  A change time in the future
    (clock skew, NFS) cannot be judged by the clock: such a file is trusted
    only once the caller has seen it unchanged for ``settle`` seconds of its
    own steady clock (``steady_for``).  Both refusals are
    :class:`AclUnstable`; the caller keeps the previous ACL and retries.
    """
    where = str(path)
    try:
        before = FileStamp.of(os.stat(path))
        with open(path, "rb") as f:
            opened = FileStamp.of(os.fstat(f.fileno()))
            data = f.read()
            read = FileStamp.of(os.fstat(f.fileno()))
        after = FileStamp.of(os.stat(path))
    except OSError as e:
        raise AclError(f"{where}: {e}") from None
    if not (before == opened == read == after and len(data) == before.size):
        raise AclUnstable(f"{where}: changed while being read; keeping the previous ACL")
    age = now() - before.changed_ns / 1e9
    if age < settle and steady_for < settle:
        when = f"{age:.2f} s ago" if age >= 0 else f"{-age:.2f} s ahead of this host's clock"
        raise AclUnstable(f"{where}: changed {when}, maybe still being written; keeping the previous ACL")
    return replace(parse_acl(data, where), stamp=before)


def load_acl(path: Path) -> Acl:
    """Parse and validate acl.yaml now (start-up, SIGHUP, lint): :func:`read_acl_stable` without a settle time."""
    return read_acl_stable(path)


def parse_acl(text: bytes | str, where: str) -> Acl:
    """Parse and validate acl.yaml: unknown keys and wrong types are errors naming the line."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except AclError as e:
        raise AclError(f"{where}:{str(e).removeprefix('line ')}") from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 0
        raise AclError(f"{where}:{line}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise AclError(f"{where}: {e}") from None
    if not isinstance(data, _Mapping):
        raise AclError(f"{where}:1: expected a mapping with keys {', '.join(sorted(_TOP))}")

    def fail(mapping: _Mapping, key: str | None, message: str) -> AclError:
        line = mapping.lines.get(key, mapping.line) if key else mapping.line
        return AclError(f"{where}:{line}: {message}")

    def known(mapping: _Mapping, keys: set[str], what: str) -> None:
        for key in mapping:
            if key not in keys:
                raise fail(mapping, key, f"unknown key '{key}' in {what} (known: {', '.join(sorted(keys))})")

    def names(mapping: _Mapping, key: str) -> frozenset[str]:
        value = mapping.get(key)
        if value is None:
            return frozenset()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(mapping, key, f"'{key}' must be a list of names")
        return frozenset(value)

    def who(key: str) -> tuple[frozenset[str], frozenset[str]]:
        section = data.get(key)
        if section is None:
            return frozenset(), frozenset()
        if not isinstance(section, _Mapping):
            raise fail(data, key, f"'{key}' must be a mapping with groups and principals")
        known(section, _WHO, key)
        for entry in names(section, "principals"):
            principal(section, "principals", entry, grants=key != "deny")
        return names(section, "principals"), names(section, "groups")

    def principal(mapping: _Mapping, key: str, entry: str, grants: bool) -> None:
        """An entry that could never match (a realm not listed, mistyped or in the wrong case) is an error,
        and so is a bare name that grants while several realms are listed (see principal_named)."""
        name, realm = split_principal(entry)
        if name.startswith("@") or (entry != name and not realm) or (realm and realm not in realms):
            raise fail(mapping, key, f"principal '{entry}' must be NAME or NAME@REALM with a realm listed under "
                                     "'realms' (names and realms are case-sensitive)")  # fmt: skip
        if grants and not realm and len(realms) > 1:
            raise fail(mapping, key, f"principal '{entry}' has no realm, and several realms are listed: "
                                     f"write {entry}@REALM")  # fmt: skip

    def number(rule: _Mapping, key: str) -> int | None:
        value = rule.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise fail(rule, key, f"'{key}' must be a positive whole number")
        return value

    def allow_rule(rule: Any) -> Rule:
        if not isinstance(rule, _Mapping):
            raise fail(data, "allow", "each allow rule must be a mapping (group: NAME or principal: NAME, ...)")
        known(rule, _RULE, "an allow rule")
        kinds = [k for k in ("group", "principal") if k in rule]
        if len(kinds) != 1 or not isinstance(rule[kinds[0]], str) or not rule[kinds[0]]:
            raise fail(rule, None, "an allow rule names exactly one group or one principal")
        if kinds[0] == "principal":
            principal(rule, "principal", rule["principal"], grants=True)
        compilers = rule.get("compilers")
        if compilers is not None:
            compilers = names(rule, "compilers")
        return Rule(kinds[0], rule[kinds[0]], compilers, number(rule, "max_jobs"), number(rule, "max_input"), rule.line)

    known(data, _TOP, "acl.yaml")
    realms = data.get("realms")
    if not isinstance(realms, list) or not realms or not all(isinstance(r, str) and r for r in realms):
        raise fail(data, "realms", "'realms' must list at least one Kerberos realm")
    allow = data.get("allow") or []
    if not isinstance(allow, list):
        raise fail(data, "allow", "'allow' must be a list of rules")
    deny_principals, deny_groups = who("deny")
    admin_principals, admin_groups = who("admins")
    return Acl(frozenset(realms), tuple(allow_rule(r) for r in allow), deny_principals, deny_groups,
               admin_principals, admin_groups, where)  # fmt: skip


# --- LDAP -----------------------------------------------------------------------


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
    """Group membership from LDAP: one connection per pool thread, answers cached."""

    NESTING = 5

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._cache: dict[str, tuple[float, Membership]] = {}
        self._pending: dict[str, concurrent.futures.Future[Membership]] = {}
        self._lock = threading.Lock()
        self._down: str | None = None  # why LDAP is down, while it is: the circuit breaker (see _known_down)
        self._queries = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ldap-query")

    def groups_of(self, principal: str) -> frozenset[str]:
        return self.membership(principal).groups

    def fresh(self, principal: str) -> Membership | None:
        """The cached answer while within its TTL, else None; never blocks, so the reactor may ask."""
        with self._lock:
            cached = self._cache.get(principal)
        if cached is None:
            return None
        answer = cached[1]
        if time.monotonic() - cached[0] >= (self.config.positive_ttl if answer.groups else self.config.negative_ttl):
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
        now = time.monotonic()
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
        now = time.monotonic()
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
                                                  f"{cfg.home_realm or '(none: the base DN has no dc= parts)'}, must match exactly)"])  # fmt: skip
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


class MembershipSource(Protocol):
    """What :class:`MembershipLookups` needs of a :class:`Directory` (tests give it a fake)."""

    def fresh(self, principal: str) -> Membership | None: ...

    def membership(self, principal: str) -> Membership: ...


Submit = Callable[[Callable[[], Membership]], "Deferred[Membership]"]


class MembershipLookups:
    """The server's way to ask LDAP: fair to every principal while LDAP is slow.

    Asking :meth:`Directory.membership` on the LDAP thread pool once per job
    lets one principal's ``make -j64`` occupy every pool thread (each either
    querying or waiting for the query it joined) while LDAP hangs, and
    everyone else's jobs queue behind them.  Here, in the reactor thread,
    lookups for one principal are joined *before* they take a thread: each
    principal has at most one thread, and every other lookup for it waits
    for that answer.  A fresh cached answer takes no thread at all.
    """

    def __init__(self, directory: MembershipSource, submit: Submit) -> None:
        self._directory = directory
        self._submit = submit  # runs a blocking call on the pool; its Deferred fires in the reactor thread
        self._waiting: dict[str, list[Deferred[Membership]]] = {}

    @classmethod
    def on_pool(cls, directory: MembershipSource, reactor: Any, pool: Any) -> MembershipLookups:
        """Lookups run on a Twisted ``ThreadPool`` (``reactor`` delivers their answers)."""
        from twisted.internet import threads

        return cls(directory, lambda call: threads.deferToThreadPool(reactor, pool, call))

    def in_flight(self) -> int:
        """Principals with a query on the pool now (each holds at most one thread)."""
        return len(self._waiting)

    def lookup(self, principal: str) -> Deferred[Membership]:
        """The principal's :class:`Membership`; fails with :class:`DirectoryUnavailable` as the directory does."""
        from twisted.internet import defer

        fresh = self._directory.fresh(principal)
        if fresh is not None:
            return defer.succeed(fresh)
        answer: Deferred[Membership] = defer.Deferred()
        waiting = self._waiting.get(principal)
        if waiting is not None:
            waiting.append(answer)
            return answer
        self._waiting[principal] = [answer]
        self._submit(functools.partial(self._directory.membership, principal)).addBoth(self._answered, principal)
        return answer

    def _answered(self, result: Membership | Failure, principal: str) -> None:
        from twisted.python.failure import Failure

        for waiter in self._waiting.pop(principal):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


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
