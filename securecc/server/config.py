"""The server configuration file (YAML): loaded once, validated strictly.

Unknown keys, repeated keys and wrong types are errors that name the file,
the line and the key, so a typo never silently turns a setting off.  The
loader and the checks are :mod:`securecc.yamlfile`'s, shared with acl.yaml.
See ``etc/securecc.yaml``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from securecc.sandbox import Limits, Settings
from securecc.server.directory import LdapConfig
from securecc.yamlfile import (
    YamlError,
    YamlMapping,
    get_bool,
    get_int,
    get_mapping,
    get_names,
    get_positive_int,
    get_seconds,
    get_str,
    load,
    refuse_unknown,
)


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
    signing_key: Path  # Ed25519 private key that signs every result (securecc-admin signing keygen; securecc.attest)
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


_TOP = {"listen", "principal", "keytab", "acl", "audit", "signing_key", "ldap", "compilers", "sandbox", "limits", "timeouts", "slots",
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


def _section(data: YamlMapping, name: str, keys: set[str]) -> YamlMapping:
    """An optional section whose keys are all known; left out when false or empty (``monitor: false``, ``cache: {}``)."""
    if not data.get(name):
        return YamlMapping(data.where, data.line_of(name))
    section = get_mapping(data, name, message=f"'{name}' must be a mapping")
    refuse_unknown(section, keys, prefix=f"{name}.")
    return section


def _host_port(mapping: YamlMapping, key: str, default: str | None = None, *, name: str) -> tuple[str, int]:
    host, _, port = get_str(mapping, key, default, name=name).rpartition(":")
    if not host or not port.isdigit():
        raise mapping.error(key, f"'{name}' must be HOST:PORT")
    return host, int(port)


def _compiler(compilers: YamlMapping, name: object, default_timeout: float) -> Compiler:
    """``gcc: /usr/bin/gcc`` or ``armcc: {path: ..., timeout: 3600, root: /opt/cross}``."""
    value = compilers[name]
    if not isinstance(name, str) or not (isinstance(value, str) or (isinstance(value, YamlMapping) and set(value) <= _COMPILER)):
        raise compilers.error(name, f"compiler '{name}' must be a path or a mapping with keys {sorted(_COMPILER)}")

    def fail(message: str) -> YamlError:
        return compilers.error(name, f"compiler '{name}': {message}")

    path, root = (value, None) if isinstance(value, str) else (value.get("path"), value.get("root"))
    if not isinstance(path, str) or not os.path.isabs(path) or not os.access(path, os.X_OK):
        raise fail(f"{path!r} is not an executable absolute path")
    if root is not None and not (isinstance(root, str) and os.path.isabs(root) and path.startswith(root.rstrip("/") + "/")):
        raise fail(f"root must be an absolute directory holding {path}")
    if root is not None:
        why = _unsafe_root(root)
        if why:
            raise fail(f"root {root} {why}; give the toolchain's own directory")
    if root is None and not path.startswith("/usr/"):
        raise fail(f"{path} is outside /usr; give the directory to bind as 'root'")
    real = os.path.realpath(path)  # Debian's /usr/bin/clang leads to /usr/lib/llvm-14/bin/clang: still in the sandbox
    if not real.startswith(("/usr/", *([root.rstrip("/") + "/"] if root else []))):
        raise fail(f"{path} leads to {real}, which the sandbox does not have (only /usr and the compiler's root)")
    if isinstance(value, str):
        return Compiler(path, default_timeout, root)
    return Compiler(path, get_seconds(value, "timeout", default_timeout, name=f"compilers.{name}.timeout"), root)


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
    paths = [Path(config.keytab), config.audit.key, config.signing_key, config.audit.path, config.acl, config.scratch,
             *([config.cache.path] if config.cache else [])]
    return next((p for p in paths if str(p).startswith(root.rstrip("/") + "/")), None)


def load_config(path: Path) -> ServerConfig:
    """Read and check the server configuration: each problem is a ConfigError naming the file and the line."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return _server_config(load(text, str(path)), path.parent)
    except YamlError as e:
        raise ConfigError(str(e)) from None


def _server_config(data: YamlMapping, base: Path) -> ServerConfig:
    """The configuration ``data`` describes; relative paths are relative to ``base``, the file's directory."""
    refuse_unknown(data, _TOP)
    for key in ("listen", "principal", "keytab", "acl", "audit", "signing_key", "compilers"):
        if key not in data:
            raise data.error(None, f"missing '{key}'")
    host, port = _host_port(data, "listen", name="listen")

    def resolve(mapping: YamlMapping, key: str, default: str | None = None, *, name: str) -> Path:
        return (base / get_str(mapping, key, default, name=name)).resolve()

    ldap = _section(data, "ldap", _LDAP)
    uris = get_names(ldap, "uris", at_least_one=True, message="'ldap.uris' must list at least one LDAP URI")
    for key in ("base", "users", "groups"):
        get_str(ldap, key, name=f"ldap.{key}")
    if ldap.get("bind", "gssapi") not in ("gssapi", "external", "simple", "none"):
        raise ldap.error("bind", "'ldap.bind' must be gssapi, external, simple or none")
    if ldap.get("bind") == "simple" and not ("bind_dn" in ldap and "password_file" in ldap):
        raise ldap.error("bind", "'ldap.bind: simple' needs bind_dn and password_file")
    models = "'ldap.membership' lists member, memberUid and/or memberOf"
    membership = get_names(ldap, "membership", ["member", "memberUid"], at_least_one=True, message=models)
    if not set(membership) <= {"member", "memberUid", "memberOf"}:
        raise ldap.error("membership", models)
    user_filter = get_str(ldap, "user_filter", "(uid={user})", name="ldap.user_filter")
    if "{user}" not in user_filter and "{principal}" not in user_filter:
        raise ldap.error("user_filter", "'ldap.user_filter' must contain {user} or {principal}")

    def ldap_seconds(key: str, default: float) -> float:
        return get_seconds(ldap, key, default, name=f"ldap.{key}")

    ldap_config = LdapConfig(
        uris=tuple(uris),
        base=ldap["base"],
        users=ldap["users"],
        groups=ldap["groups"],
        bind=ldap.get("bind", "gssapi"),
        bind_dn=get_str(ldap, "bind_dn", "", name="ldap.bind_dn"),
        password_file=str(resolve(ldap, "password_file", name="ldap.password_file")) if "password_file" in ldap else "",
        starttls=get_bool(ldap, "starttls", False, name="ldap.starttls"),
        ca_file=str(resolve(ldap, "ca_file", name="ldap.ca_file")) if "ca_file" in ldap else "",
        timeout=ldap_seconds("timeout", 5),
        user_filter=user_filter,
        membership=tuple(membership),
        nested=get_bool(ldap, "nested", True, name="ldap.nested"),
        positive_ttl=ldap_seconds("positive_ttl", 60),
        negative_ttl=ldap_seconds("negative_ttl", 10),
        max_stale=ldap_seconds("max_stale", 300),
        retry_down=ldap_seconds("retry_down", 5),
    )

    distcc = _section(data, "distcc", _DISTCC)
    if distcc and distcc.get("cleartext") is not True:
        raise distcc.error("cleartext", "the distcc listener carries sources and objects in the clear (stock clients "
                           "never wrap the stream); say so with 'distcc.cleartext: true' to enable it")
    if distcc:
        distcc_host, distcc_port = _host_port(distcc, "listen", name="distcc.listen")
    monitor = _section(data, "monitor", _MONITOR)
    if monitor:
        monitor_host, monitor_port = _host_port(monitor, "listen", "127.0.0.1:3638", name="monitor.listen")
    audit = _section(data, "audit", _AUDIT)
    cache = _section(data, "cache", _CACHE)
    if cache and "path" not in cache:
        raise cache.error(None, "'cache' needs a path")
    sandbox = _section(data, "sandbox", _SANDBOX)
    default_timeout = get_seconds(sandbox, "timeout", Limits().timeout, name="sandbox.timeout")
    compiler_section = get_mapping(data, "compilers")
    compilers = {name: _compiler(compiler_section, name, default_timeout) for name in compiler_section}
    if not compilers:
        raise data.error("compilers", "'compilers' must name at least one compiler")
    mode = sandbox.get("mode", "bwrap")
    if mode not in ("bwrap", "rlimits-only"):
        raise sandbox.error("mode", "'sandbox.mode' must be bwrap or rlimits-only")
    limits = _section(data, "limits", _LIMITS)
    timeouts = _section(data, "timeouts", _TIMEOUTS)
    root = os.geteuid() == 0
    uid = get_int(sandbox, "uid", 65534, name="sandbox.uid")
    gid = get_int(sandbox, "gid", 65534, name="sandbox.gid")
    if root and (uid == 0 or gid == 0):
        raise sandbox.error("uid" if uid == 0 else "gid", "the sandbox must not run as uid or gid 0")
    slots = get_positive_int(data, "slots", os.cpu_count() or 1, name="slots")
    # RLIMIT_NPROC counts every process of the sandbox uid, so it caps all jobs together: 16 per slot
    # (a gcc job runs ~5), else a full server's compiles fail to fork instead of being turned away.
    defaults = replace(Limits(), processes=max(Limits().processes, 16 * slots))
    run_as = None
    if data.get("run_as") is not None:
        run_as = _account(data, get_str(data, "run_as", name="run_as"))
        if run_as[0] in (0, uid):
            raise data.error("run_as", "'run_as' must be a user of its own, neither root nor the sandbox uid")
    config = ServerConfig(
        run_as=run_as if root else None,
        listen_host=host,
        listen_port=port,
        principal=get_str(data, "principal", name="principal"),
        keytab=str(resolve(data, "keytab", name="keytab")),
        acl=resolve(data, "acl", name="acl"),
        audit=AuditConfig(
            path=resolve(audit, "path", name="audit.path"),
            key=resolve(audit, "key", name="audit.key"),
            rotate_bytes=get_int(audit, "rotate_bytes", 100 << 20, name="audit.rotate_bytes") or None,
            checkpoint_every=get_positive_int(audit, "checkpoint_every", 100, name="audit.checkpoint_every"),
            checkpoint_seconds=get_seconds(audit, "checkpoint_seconds", 5, name="audit.checkpoint_seconds"),
            syslog=get_str(audit, "syslog", name="audit.syslog") if audit.get("syslog") else None,
        ),
        signing_key=resolve(data, "signing_key", name="signing_key"),
        ldap=ldap_config,
        compilers=compilers,
        scratch=resolve(sandbox, "scratch", "scratch", name="sandbox.scratch"),
        sandbox=Settings(
            limits=Limits(
                timeout=default_timeout,
                **{k: get_positive_int(limits, k, getattr(defaults, k), name=f"limits.{k}") for k in _LIMITS - {"max_input"}},
            ),
            uid=uid if root else None,
            gid=gid if root else None,
            mode=mode,
        ),
        slots=slots,
        monitor=MonitorConfig(monitor_host, monitor_port,
                              get_str(monitor, "principal", f"HTTP/{socket.getfqdn()}", name="monitor.principal"),
                              frozenset(get_names(monitor, "scrape", ["127.0.0.1", "::1"], name="monitor.scrape",
                                                  message="'monitor.scrape' must be a list of addresses")))
        if monitor else None,
        distcc=DistccConfig(distcc_host, distcc_port, get_str(distcc, "principal", data["principal"], name="distcc.principal"))
        if distcc else None,
        cache=CacheConfig(resolve(cache, "path", name="cache.path"), get_positive_int(cache, "max_bytes", 10 << 30, name="cache.max_bytes"))
        if cache else None,
        handshake_timeout=get_seconds(timeouts, "handshake", 10, name="timeouts.handshake"),
        heartbeat=get_seconds(timeouts, "heartbeat", 2, name="timeouts.heartbeat"),
        idle_timeout=get_seconds(timeouts, "idle", 60, name="timeouts.idle"),
        max_input=get_positive_int(limits, "max_input", 128 << 20, name="limits.max_input"),
    )
    for name, compiler in compilers.items():
        secret = _contains_secrets(compiler.root, config) if compiler.root else None
        if secret:
            raise compiler_section.error(name, f"compiler '{name}': root {compiler.root} holds {secret}; every sandbox would see it")
    return config


def _account(data: YamlMapping, name: str) -> tuple[int, int]:
    """A user's uid and gid, by name."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise data.error("run_as", f"'run_as': no user {name!r} (create it: adduser --system {name})") from None
    return entry.pw_uid, entry.pw_gid
