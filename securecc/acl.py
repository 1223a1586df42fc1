"""Who may compile: ``acl.yaml`` plus the LDAP group that mirrors commit rights.

:func:`decide` is the one authorization decision; it is pure and reads in one
sitting.  Deny by default: a principal from a realm that is not listed, or
in no allowed group and not allowed by name, is refused; a deny rule beats
any allow rule.  :class:`Directory` answers "which groups is this user in"
from LDAP (blocking; the server calls it on a bounded thread pool) with a
TTL cache; when LDAP is unreachable and nothing fresh is cached the job is
refused (fail closed).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ldap
import ldap.filter
import ldap.sasl
import yaml

_ACL_KEYS = {"realms", "allow", "deny"}
_RULE_KEYS = {"groups", "principals"}


class AclError(Exception):
    """acl.yaml is malformed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Acl:
    realms: frozenset[str]
    allow_groups: frozenset[str]
    allow_principals: frozenset[str]
    deny_groups: frozenset[str]
    deny_principals: frozenset[str]

    @property
    def groups(self) -> frozenset[str]:
        """Every group a decision may need to know membership of."""
        return self.allow_groups | self.deny_groups


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # stable code, e.g. "group:committers" or "not-in-allowed-group"


def load_acl(path: Path) -> Acl:
    """Parse and validate acl.yaml; unknown keys and wrong types are errors."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AclError(f"{path}: {e}") from None
    if not isinstance(data, dict) or not set(data) <= _ACL_KEYS:
        raise AclError(f"{path}: top level must be a mapping with keys {sorted(_ACL_KEYS)}")

    def names(section: str, key: str) -> frozenset[str]:
        rule = data.get(section) or {}
        if not isinstance(rule, dict) or not set(rule) <= _RULE_KEYS:
            raise AclError(f"{path}: '{section}' must be a mapping with keys {sorted(_RULE_KEYS)}")
        value = rule.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise AclError(f"{path}: '{section}.{key}' must be a list of names")
        return frozenset(value)

    realms = data.get("realms") or []
    if not isinstance(realms, list) or not realms or not all(isinstance(r, str) for r in realms):
        raise AclError(f"{path}: 'realms' must list at least one Kerberos realm")
    return Acl(
        realms=frozenset(realms),
        allow_groups=names("allow", "groups"),
        allow_principals=names("allow", "principals"),
        deny_groups=names("deny", "groups"),
        deny_principals=names("deny", "principals"),
    )


def split_principal(principal: str) -> tuple[str, str]:
    """``alice@TEST.REALM`` → ``("alice", "TEST.REALM")``."""
    name, _, realm = principal.rpartition("@")
    return (name, realm) if name else (principal, "")


def decide(acl: Acl, principal: str, groups: frozenset[str]) -> Decision:
    """May ``principal`` (a member of ``groups``) compile here, and why."""
    name, realm = split_principal(principal)
    if realm not in acl.realms:
        return Decision(False, "realm-not-accepted")
    if principal in acl.deny_principals or name in acl.deny_principals:
        return Decision(False, "denied-principal")
    denied = sorted(groups & acl.deny_groups)
    if denied:
        return Decision(False, f"denied-group:{denied[0]}")
    if principal in acl.allow_principals or name in acl.allow_principals:
        return Decision(True, "principal")
    allowed = sorted(groups & acl.allow_groups)
    if allowed:
        return Decision(True, f"group:{allowed[0]}")
    return Decision(False, "not-in-allowed-group")


class DirectoryUnavailable(Exception):
    """LDAP could not answer and no fresh cached answer exists."""


@dataclass(frozen=True)
class LdapConfig:
    uris: tuple[str, ...]
    base: str
    users: str
    groups: str
    bind: str = "gssapi"  # "gssapi" (the server's keytab), "simple", "none"
    bind_dn: str = ""
    password_file: str = ""
    timeout: float = 5.0
    cache_ttl: float = 60.0


class Directory:
    """Group membership from LDAP, one connection per pool thread, cached."""

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def groups_of(self, user: str) -> frozenset[str]:
        """Names (cn) of the groups under the groups base that hold ``user``."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(user)
        if cached and now - cached[0] < self.config.cache_ttl:
            return cached[1]
        groups = self._query(user)
        with self._lock:
            self._cache[user] = (now, groups)
        return groups

    def _query(self, user: str) -> frozenset[str]:
        errors: list[Exception] = []
        for _attempt in range(2):  # a cached connection may have gone stale
            try:
                conn = self._connection()
                quoted = ldap.filter.escape_filter_chars(user)
                found = conn.search_s(self.config.users, ldap.SCOPE_SUBTREE, f"(uid={quoted})", ["1.1"])
                dns = [dn for dn, _ in found if dn]
                clauses = [f"(memberUid={quoted})"]
                for dn in dns:
                    d = ldap.filter.escape_filter_chars(dn)
                    clauses += [f"(member={d})", f"(uniqueMember={d})"]
                results = conn.search_s(self.config.groups, ldap.SCOPE_SUBTREE, f"(|{''.join(clauses)})", ["cn"])
                return frozenset(
                    cn.decode() for _dn, attrs in results if _dn for cn in attrs.get("cn", [])
                )
            except (ldap.LDAPError, OSError) as e:
                self._local.conn = None
                errors.append(e)
        raise DirectoryUnavailable(f"LDAP unavailable: {_ldap_message(errors[-1])}")

    def _connection(self) -> ldap.ldapobject.LDAPObject:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        last: Exception | None = None
        for uri in self.config.uris:
            try:
                conn = ldap.initialize(uri)
                conn.set_option(ldap.OPT_REFERRALS, 0)
                conn.set_option(ldap.OPT_NETWORK_TIMEOUT, self.config.timeout)
                conn.set_option(ldap.OPT_TIMEOUT, self.config.timeout)
                conn.set_option(ldap.OPT_X_SASL_NOCANON, 1)
                if self.config.bind == "gssapi":
                    conn.sasl_interactive_bind_s("", ldap.sasl.gssapi())
                elif self.config.bind == "simple":
                    password = Path(self.config.password_file).read_text().strip()
                    conn.simple_bind_s(self.config.bind_dn, password)
                self._local.conn = conn
                return conn
            except (ldap.LDAPError, OSError) as e:
                last = e
        raise last or OSError("no LDAP URIs configured")


def _ldap_message(error: Exception) -> str:
    info = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    return str(info.get("desc", error)) + (f" ({info['info']})" if info.get("info") else "")
