"""Who may compile: ``acl.yaml`` plus the LDAP groups that mirror commit rights.

:func:`decide` is the one authorization decision: pure, and readable in one
sitting.  Deny by default; a deny entry beats every allow rule; allow rules
are tried in order and the first that matches the principal and offers the
compiler decides, with its limits.  Every decision carries a stable,
machine-readable reason (``allowed:group:committers``,
``denied:not-in-group``...) that goes into the audit record.

:func:`read_acl_stable` loads acl.yaml only from bytes that were not changing.  Group membership
comes from :mod:`securecc.server.directory`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from securecc.yamlfile import YamlError, YamlList, YamlMapping, get_mapping, get_names, get_positive_int, load, refuse_unknown


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
    """Parse and validate acl.yaml: unknown keys, repeated keys and wrong types are errors naming the line."""
    try:
        return _acl(load(text, where, expected=f"a mapping with keys {', '.join(sorted(_TOP))}"))
    except YamlError as e:
        raise AclError(str(e)) from None


def _acl(data: YamlMapping) -> Acl:
    """The policy in ``data``; a key left out or left empty (``deny:``) grants or denies nothing."""

    def names(mapping: YamlMapping, key: str) -> frozenset[str]:
        return frozenset(get_names(mapping, key)) if mapping.get(key) is not None else frozenset()

    def who(key: str) -> tuple[frozenset[str], frozenset[str]]:
        section = get_mapping(data, key, message=f"'{key}' must be a mapping with groups and principals")
        refuse_unknown(section, _WHO, within=key)
        for entry in names(section, "principals"):
            principal(section, "principals", entry, grants=key != "deny")
        return names(section, "principals"), names(section, "groups")

    def principal(mapping: YamlMapping, key: str, entry: str, grants: bool) -> None:
        """An entry that could never match (a realm not listed, mistyped or in the wrong case) is an error,
        and so is a bare name that grants while several realms are listed (see principal_named)."""
        name, realm = split_principal(entry)
        if name.startswith("@") or (entry != name and not realm) or (realm and realm not in realms):
            raise mapping.error(key, f"principal '{entry}' must be NAME or NAME@REALM with a realm listed under "
                                     "'realms' (names and realms are case-sensitive)")
        if grants and not realm and len(realms) > 1:
            raise mapping.error(key, f"principal '{entry}' has no realm, and several realms are listed: "
                                     f"write {entry}@REALM")

    def number(rule: YamlMapping, key: str) -> int | None:
        return get_positive_int(rule, key) if rule.get(key) is not None else None

    def allow_rule(rules: YamlList, index: int) -> Rule:
        rule = rules[index]
        if not isinstance(rule, YamlMapping):
            raise rules.error(index, "each allow rule must be a mapping (group: NAME or principal: NAME, ...)")
        refuse_unknown(rule, _RULE, within="an allow rule")
        kinds = [k for k in ("group", "principal") if k in rule]
        if len(kinds) != 1 or not isinstance(rule[kinds[0]], str) or not rule[kinds[0]]:
            raise rule.error(None, "an allow rule names exactly one group or one principal")
        if kinds[0] == "principal":
            principal(rule, "principal", rule["principal"], grants=True)
        compilers = names(rule, "compilers") if rule.get("compilers") is not None else None
        return Rule(kinds[0], rule[kinds[0]], compilers, number(rule, "max_jobs"), number(rule, "max_input"), rule.line)

    refuse_unknown(data, _TOP, within="acl.yaml")
    realms = get_names(data, "realms", at_least_one=True, message="'realms' must list at least one Kerberos realm")
    allow = data.get("allow") or YamlList(data.where, data.line)
    if not isinstance(allow, YamlList):
        raise data.error("allow", "'allow' must be a list of rules")
    deny_principals, deny_groups = who("deny")
    admin_principals, admin_groups = who("admins")
    return Acl(frozenset(realms), tuple(allow_rule(allow, i) for i in range(len(allow))), deny_principals, deny_groups,
               admin_principals, admin_groups, data.where)
