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
``denied:ldap-unavailable`` (fail closed).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap
import ldap.dn
import ldap.filter
import ldap.sasl
import yaml

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

    def matches(self, principal: str, name: str, groups: frozenset[str]) -> bool:
        return self.name in groups if self.kind == "group" else self.name in (principal, name)

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
    """``alice@TEST.REALM`` → ``("alice", "TEST.REALM")``."""
    name, _, realm = principal.rpartition("@")
    return (name, realm) if name else (principal, "")


def decide(acl: Acl, principal: str, groups: frozenset[str], compiler: str, input_size: int = 0) -> Decision:
    """May ``principal`` (a member of ``groups``) run ``compiler`` on ``input_size`` bytes here, and why."""
    name, realm = split_principal(principal)
    if realm not in acl.realms:
        return Decision(False, "denied:realm-not-accepted")
    if principal in acl.deny_principals or name in acl.deny_principals:
        return Decision(False, "denied:principal-deny-list")
    denied = sorted(groups & acl.deny_groups)
    if denied:
        return Decision(False, f"denied:group-deny-list:{denied[0]}")
    matching = [rule for rule in acl.allow if rule.matches(principal, name, groups)]
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
    name, realm = split_principal(principal)
    if realm not in acl.realms:
        return False
    return principal in acl.admin_principals or name in acl.admin_principals or bool(groups & acl.admin_groups)


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


def load_acl(path: Path) -> Acl:
    """Parse and validate acl.yaml: unknown keys and wrong types are errors naming the line."""
    where = str(path)
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except AclError as e:
        raise AclError(f"{where}:{str(e).removeprefix('line ')}") from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else 0
        raise AclError(f"{where}:{line}: {e.problem}") from None
    except (OSError, yaml.YAMLError) as e:
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
        return names(section, "principals"), names(section, "groups")

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


@dataclass
class Membership:
    """What LDAP said of a principal, for decisions and for ``securecc-admin acl check``."""

    user_dn: str | None
    groups: frozenset[str]
    facts: list[str] = field(default_factory=list)
    cached: bool = False


class Directory:
    """Group membership from LDAP: one connection per pool thread, answers cached."""

    NESTING = 5

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._cache: dict[str, tuple[float, Membership]] = {}
        self._pending: dict[str, concurrent.futures.Future[Membership]] = {}
        self._lock = threading.Lock()

    def groups_of(self, principal: str) -> frozenset[str]:
        return self.membership(principal).groups

    def membership(self, principal: str) -> Membership:
        """The principal's groups (cn), from the cache while fresh, else from LDAP."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(principal)
        if cached:
            age, answer = now - cached[0], cached[1]
            if age < (self.config.positive_ttl if answer.groups else self.config.negative_ttl):
                return Membership(answer.user_dn, answer.groups, answer.facts, cached=True)
        with self._lock:  # concurrent misses for one principal share one query
            pending = self._pending.get(principal)
            leader = pending is None
            if pending is None:
                pending = self._pending[principal] = concurrent.futures.Future()
        if not leader:
            return pending.result()
        try:
            try:
                answer = self._query(principal)
                with self._lock:
                    self._cache[principal] = (now, answer)
            except DirectoryUnavailable:
                if not (cached and now - cached[0] < self.config.max_stale):
                    raise
                answer = Membership(cached[1].user_dn, cached[1].groups, [*cached[1].facts, "LDAP down: cached answer"], True)
        except BaseException as e:
            pending.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._pending[principal]
        pending.set_result(answer)
        return answer

    def _query(self, principal: str) -> Membership:
        errors: list[Exception] = []
        for _attempt in range(2):  # a kept connection may have gone stale
            try:
                return self._lookup(self._connection(), principal)
            except (ldap.LDAPError, OSError) as e:
                self._local.conn = None
                errors.append(e)
        raise DirectoryUnavailable(f"LDAP unavailable: {_ldap_message(errors[-1])}")

    def _lookup(self, conn: ldap.ldapobject.LDAPObject, principal: str) -> Membership:
        cfg, escape = self.config, ldap.filter.escape_filter_chars
        name = principal.rpartition("@")[0] or principal
        user_filter = cfg.user_filter.format(user=escape(name), principal=escape(principal))
        found = [(dn, attrs) for dn, attrs in conn.search_s(cfg.users, ldap.SCOPE_SUBTREE, user_filter, ["uid", "memberOf"]) if dn]
        if len(found) != 1:
            return Membership(None, frozenset(), [f"{user_filter} under {cfg.users}: {len(found)} entries"])
        user_dn, attrs = found[0]
        uid = attrs.get("uid", [name.encode()])[0].decode()
        facts = [f"user {user_dn}"]
        clauses = []
        if "member" in cfg.membership:
            clauses += [f"(member={escape(user_dn)})", f"(uniqueMember={escape(user_dn)})"]
        if "memberUid" in cfg.membership:
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
