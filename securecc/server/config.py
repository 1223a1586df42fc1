"""The server configuration file (YAML): loaded once, validated strictly.

Unknown keys and wrong types are errors that name the file and the key, so
a typo never silently turns a setting off.  See ``etc/securecc.yaml``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from securecc.sandbox import Limits, Settings
from securecc.server.directory import LdapConfig


class ConfigError(Exception):
    """The configuration is unusable; the message says where and why."""


@dataclass(frozen=True)
class Compiler:
    """One compiler a client may name; nothing else ever runs."""

    path: str  # absolute
    timeout: float  # wall clock, seconds
    root: str | None = None  # bound read-only into the sandbox, for compilers outside /usr


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    key: Path  # Ed25519 private key (securecc-admin audit keygen)
    rotate_bytes: int | None = 100 << 20
    checkpoint_every: int = 100
    checkpoint_seconds: float = 5.0
    syslog: str | None = None  # "/dev/log" or "HOST:PORT" (UDP): a copy of each checkpoint off the box


@dataclass(frozen=True)
class CacheConfig:
    path: Path
    max_bytes: int = 10 << 30


@dataclass(frozen=True)
class DistccConfig:
    """The optional listener for stock distcc clients (authenticated, but cleartext)."""

    host: str
    port: int
    principal: str  # what the clients' DISTCC_PRINCIPAL@<host> names; must be in the keytab


@dataclass(frozen=True)
class MonitorConfig:
    host: str
    port: int
    principal: str  # HTTP/<host>@REALM, for SPNEGO; must be in the keytab
    scrapers: frozenset[str]  # addresses that may read /metrics


@dataclass(frozen=True)
class ServerConfig:
    listen_host: str
    listen_port: int
    principal: str
    keytab: str
    acl: Path
    audit: AuditConfig
    ldap: LdapConfig
    compilers: dict[str, Compiler]
    scratch: Path
    sandbox: Settings
    cache: CacheConfig | None = None  # the shared result cache; None: off
    distcc: DistccConfig | None = None  # the stock-distcc listener; None: off (the default)
    monitor: MonitorConfig | None = None  # the HTTP stats endpoint; None: off
    slots: int = 1  # jobs at once; beyond, BUSY (the client tries another server)
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    heartbeat: float = 2.0  # seconds between Alive messages while a job runs (clients give up after 8 s)
    max_input: int = 128 << 20
    run_as: tuple[int, int] | None = None  # (uid, gid) the front drops to after its root steps; None: stay


_TOP = {"listen", "principal", "keytab", "acl", "audit", "ldap", "compilers", "sandbox", "limits", "timeouts", "slots",
        "cache", "distcc", "monitor", "run_as"}
_CACHE = {"path", "max_bytes"}
_DISTCC = {"listen", "principal", "cleartext"}
_MONITOR = {"listen", "principal", "scrape"}
_LDAP = {"uris", "base", "users", "groups", "bind", "bind_dn", "password_file", "starttls", "ca_file", "timeout",
         "user_filter", "membership", "nested", "positive_ttl", "negative_ttl", "max_stale", "retry_down"}
_SANDBOX = {"scratch", "uid", "gid", "timeout", "mode"}
_COMPILER = {"path", "timeout", "root"}
_AUDIT = {"path", "key", "rotate_bytes", "checkpoint_every", "checkpoint_seconds", "syslog"}
_LIMITS = {"cpu_seconds", "address_space", "file_size", "open_files", "processes", "max_input"}
_TIMEOUTS = {"handshake", "idle", "heartbeat"}


def _section(data: dict[str, Any], name: str, keys: set[str], where: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{name}' must be a mapping")
    unknown = set(value) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown key '{name}.{sorted(unknown)[0]}' (known: {', '.join(sorted(keys))})")
    return value


def _typed(value: Any, kind: type | tuple[type, ...], where: str, key: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _compiler(name: object, value: object, default_timeout: float, where: str) -> Compiler:
    """``gcc: /usr/bin/gcc`` or ``armcc: {path: ..., timeout: 3600, root: /opt/cross}``."""
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(name, str) or not isinstance(value, dict) or not set(value) <= _COMPILER:
        raise ConfigError(f"{where}: compiler '{name}' must be a path or a mapping with keys {sorted(_COMPILER)}")
    path, root = value.get("path"), value.get("root")
    if not isinstance(path, str) or not os.path.isabs(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"{where}: compiler '{name}': {path!r} is not an executable absolute path")
    if root is not None and not (isinstance(root, str) and os.path.isabs(root) and path.startswith(root.rstrip("/") + "/")):
        raise ConfigError(f"{where}: compiler '{name}': root must be an absolute directory holding {path}")
    if root is not None:
        why = _unsafe_root(root)
        if why:
            raise ConfigError(f"{where}: compiler '{name}': root {root} {why}; give the toolchain's own directory")
    if root is None and not path.startswith("/usr/"):
        raise ConfigError(f"{where}: compiler '{name}': {path} is outside /usr; give the directory to bind as 'root'")
    real = os.path.realpath(path)  # Debian's /usr/bin/clang leads to /usr/lib/llvm-14/bin/clang: still in the sandbox
    if not real.startswith(("/usr/", *([root.rstrip("/") + "/"] if root else []))):
        raise ConfigError(f"{where}: compiler '{name}': {path} leads to {real}, which the sandbox does not have "
                          "(only /usr and the compiler's root)")
    timeout = _typed(value.get("timeout", default_timeout), (int, float), where, f"compilers.{name}.timeout")
    return Compiler(path, float(timeout), root)


# Directories a compiler root may not be, nor contain: the sandbox would see the host's own tree.
_SYSTEM_TREES = ("/", "/etc", "/home", "/root", "/var", "/srv", "/run", "/proc", "/sys", "/dev", "/tmp", "/boot", "/opt", "/usr")


def _unsafe_root(root: str) -> str | None:
    """Why ``root`` cannot be bound read-only into every sandbox, or None."""
    if os.path.normpath(root) != root or root in _SYSTEM_TREES:
        return "is not a normalized toolchain directory of its own"
    if os.path.realpath(root) != root or not os.path.isdir(root):
        return "is not a directory (or is reached through a link)"
    st = os.stat(root)
    if st.st_mode & 0o002 or st.st_uid not in (0, os.geteuid()):
        return "is writable by others than root"
    return None


def _contains_secrets(root: str, config: ServerConfig) -> Path | None:
    """A secret of the server's (keytab, keys, config, ACL, audit log, scratch, cache) under ``root``."""
    paths = [Path(config.keytab), config.audit.key, config.audit.path, config.acl, config.scratch,
             *([config.cache.path] if config.cache else [])]
    return next((p for p in paths if str(p).startswith(root.rstrip("/") + "/")), None)


def load_config(path: Path) -> ServerConfig:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = set(data) - _TOP
    if unknown:
        raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(_TOP))})")
    for key in ("listen", "principal", "keytab", "acl", "audit", "compilers"):
        if key not in data:
            raise ConfigError(f"{where}: missing '{key}'")
    host, _, port = _typed(data["listen"], str, where, "listen").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where}: 'listen' must be HOST:PORT")
    base = path.parent

    def resolve(value: Any, key: str) -> Path:
        return (base / _typed(value, str, where, key)).resolve()

    ldap = _section(data, "ldap", _LDAP, where)
    uris = ldap.get("uris", [])
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
        raise ConfigError(f"{where}: 'ldap.uris' must list at least one LDAP URI")
    for key in ("base", "users", "groups"):
        _typed(ldap.get(key), str, where, f"ldap.{key}")
    if ldap.get("bind", "gssapi") not in ("gssapi", "external", "simple", "none"):
        raise ConfigError(f"{where}: 'ldap.bind' must be gssapi, external, simple or none")
    if ldap.get("bind") == "simple" and not ("bind_dn" in ldap and "password_file" in ldap):
        raise ConfigError(f"{where}: 'ldap.bind: simple' needs bind_dn and password_file")
    membership = _typed(ldap.get("membership", ["member", "memberUid"]), list, where, "ldap.membership")
    if not membership or not set(membership) <= {"member", "memberUid", "memberOf"}:
        raise ConfigError(f"{where}: 'ldap.membership' lists member, memberUid and/or memberOf")
    user_filter = _typed(ldap.get("user_filter", "(uid={user})"), str, where, "ldap.user_filter")
    if "{user}" not in user_filter and "{principal}" not in user_filter:
        raise ConfigError(f"{where}: 'ldap.user_filter' must contain {{user}} or {{principal}}")

    def seconds(key: str, default: float) -> float:
        return float(_typed(ldap.get(key, default), (int, float), where, f"ldap.{key}"))

    ldap_config = LdapConfig(
        uris=tuple(uris),
        base=ldap["base"],
        users=ldap["users"],
        groups=ldap["groups"],
        bind=ldap.get("bind", "gssapi"),
        bind_dn=_typed(ldap.get("bind_dn", ""), str, where, "ldap.bind_dn"),
        password_file=str(resolve(ldap["password_file"], "ldap.password_file")) if "password_file" in ldap else "",
        starttls=_typed(ldap.get("starttls", False), bool, where, "ldap.starttls"),
        ca_file=str(resolve(ldap["ca_file"], "ldap.ca_file")) if "ca_file" in ldap else "",
        timeout=seconds("timeout", 5),
        user_filter=user_filter,
        membership=tuple(membership),
        nested=_typed(ldap.get("nested", True), bool, where, "ldap.nested"),
        positive_ttl=seconds("positive_ttl", 60),
        negative_ttl=seconds("negative_ttl", 10),
        max_stale=seconds("max_stale", 300),
        retry_down=seconds("retry_down", 5),
    )

    distcc = _section(data, "distcc", _DISTCC, where)
    if distcc and distcc.get("cleartext") is not True:
        raise ConfigError(f"{where}: the distcc listener carries sources and objects in the clear (stock clients never "
                          "wrap the stream); say so with 'distcc.cleartext: true' to enable it")
    if distcc:
        distcc_host, _, distcc_port = _typed(distcc.get("listen"), str, where, "distcc.listen").rpartition(":")
        if not distcc_host or not distcc_port.isdigit():
            raise ConfigError(f"{where}: 'distcc.listen' must be HOST:PORT")
    monitor = _section(data, "monitor", _MONITOR, where)
    if monitor:
        monitor_host, _, monitor_port = _typed(monitor.get("listen", "127.0.0.1:3638"), str, where, "monitor.listen").rpartition(":")
        if not monitor_host or not monitor_port.isdigit():
            raise ConfigError(f"{where}: 'monitor.listen' must be HOST:PORT")
    audit = _section(data, "audit", _AUDIT, where)
    cache = _section(data, "cache", _CACHE, where)
    if cache and "path" not in cache:
        raise ConfigError(f"{where}: 'cache' needs a path")
    sandbox = _section(data, "sandbox", _SANDBOX, where)
    default_timeout = float(_typed(sandbox.get("timeout", Limits().timeout), (int, float), where, "sandbox.timeout"))
    compilers = {
        name: _compiler(name, value, default_timeout, where)
        for name, value in _typed(data["compilers"], dict, where, "compilers").items()
    }
    if not compilers:
        raise ConfigError(f"{where}: 'compilers' must name at least one compiler")
    mode = sandbox.get("mode", "bwrap")
    if mode not in ("bwrap", "rlimits-only"):
        raise ConfigError(f"{where}: 'sandbox.mode' must be bwrap or rlimits-only")
    limits = _section(data, "limits", _LIMITS, where)
    timeouts = _section(data, "timeouts", _TIMEOUTS, where)
    root = os.geteuid() == 0
    uid = _typed(sandbox.get("uid", 65534), int, where, "sandbox.uid")
    gid = _typed(sandbox.get("gid", 65534), int, where, "sandbox.gid")
    if root and (uid == 0 or gid == 0):
        raise ConfigError(f"{where}: the sandbox must not run as uid or gid 0")
    slots = _typed(data.get("slots", os.cpu_count() or 1), int, where, "slots")
    # RLIMIT_NPROC counts every process of the sandbox uid, so it caps all jobs together: 16 per slot
    # (a gcc job runs ~5), else a full server's compiles fail to fork instead of being turned away.
    defaults = replace(Limits(), processes=max(Limits().processes, 16 * slots))
    run_as = None
    if data.get("run_as") is not None:
        run_as = _account(_typed(data["run_as"], str, where, "run_as"), where)
        if run_as[0] in (0, uid):
            raise ConfigError(f"{where}: 'run_as' must be a user of its own, neither root nor the sandbox uid")
    config = ServerConfig(
        run_as=run_as if root else None,
        listen_host=host,
        listen_port=int(port),
        principal=_typed(data["principal"], str, where, "principal"),
        keytab=str(resolve(data["keytab"], "keytab")),
        acl=resolve(data["acl"], "acl"),
        audit=AuditConfig(
            path=resolve(audit.get("path"), "audit.path"),
            key=resolve(audit.get("key"), "audit.key"),
            rotate_bytes=_typed(audit.get("rotate_bytes", 100 << 20), int, where, "audit.rotate_bytes") or None,
            checkpoint_every=_typed(audit.get("checkpoint_every", 100), int, where, "audit.checkpoint_every"),
            checkpoint_seconds=float(_typed(audit.get("checkpoint_seconds", 5), (int, float), where, "audit.checkpoint_seconds")),
            syslog=_typed(audit["syslog"], str, where, "audit.syslog") if audit.get("syslog") else None,
        ),
        ldap=ldap_config,
        compilers=compilers,
        scratch=resolve(sandbox.get("scratch", "scratch"), "sandbox.scratch"),
        sandbox=Settings(
            limits=Limits(
                timeout=default_timeout,
                **{k: _typed(limits.get(k, getattr(defaults, k)), int, where, f"limits.{k}") for k in _LIMITS - {"max_input"}},
            ),
            uid=uid if root else None,
            gid=gid if root else None,
            mode=mode,
        ),
        slots=slots,
        monitor=MonitorConfig(monitor_host, int(monitor_port),
                              _typed(monitor.get("principal", f"HTTP/{socket.getfqdn()}"), str, where, "monitor.principal"),
                              frozenset(_typed(monitor.get("scrape", ["127.0.0.1", "::1"]), list, where, "monitor.scrape")))
        if monitor else None,
        distcc=DistccConfig(distcc_host, int(distcc_port), _typed(distcc.get("principal", data["principal"]), str, where,
                            "distcc.principal")) if distcc else None,
        cache=CacheConfig(resolve(cache["path"], "cache.path"),
                          _typed(cache.get("max_bytes", 10 << 30), int, where, "cache.max_bytes")) if cache else None,
        handshake_timeout=float(_typed(timeouts.get("handshake", 10), (int, float), where, "timeouts.handshake")),
        heartbeat=float(_typed(timeouts.get("heartbeat", 2), (int, float), where, "timeouts.heartbeat")),
        idle_timeout=float(_typed(timeouts.get("idle", 60), (int, float), where, "timeouts.idle")),
        max_input=_typed(limits.get("max_input", 128 << 20), int, where, "limits.max_input"),
    )
    for name, compiler in compilers.items():
        secret = _contains_secrets(compiler.root, config) if compiler.root else None
        if secret:
            raise ConfigError(f"{where}: compiler '{name}': root {compiler.root} holds {secret}; every sandbox would see it")
    return config


def _account(name: str, where: str) -> tuple[int, int]:
    """A user's uid and gid, by name."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"{where}: 'run_as': no user {name!r} (create it: adduser --system {name})") from None
    return entry.pw_uid, entry.pw_gid
