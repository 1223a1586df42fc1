"""securecc-server: wiring from the config to listening sockets, and the order of the privilege drop.

Per connection: handshake under a deadline (:mod:`securecc.protocol`,
:mod:`securecc.gss`) → principal → per job, :mod:`securecc.server.service`'s
stages → sandboxed compile in the job handler → sealed reply → one audit
record.  This module holds no policy: it builds the parts and starts them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from securecc import toolchain
from securecc.acl import AclError
from securecc.audit import AuditError, load_private_key
from securecc.gss import Acceptor, GSSFailure
from securecc.server import handler_client, monitor
from securecc.server.aclfile import AclFile
from securecc.server.admission import PreauthGate
from securecc.server.auditlog import AuditLog, forwarder
from securecc.server.clock import MONOTONIC
from securecc.server.config import ConfigError, ServerConfig, load_config
from securecc.server.directory import Directory, use_service_credentials
from securecc.server.distcc_listener import DistccProtocol
from securecc.server.handler_client import HandlerGone, HandlerLink
from securecc.server.listener import JobProtocol
from securecc.server.service import REVOCATION_CHECK, CompileService

LDAP_THREADS = 4
LISTEN_BACKLOG = 1024  # make -j64 on a few workstations connects in bursts; 50 would drop SYNs (1 s retries)


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
        proto.authenticated = release
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


def start_handler(config: ServerConfig, reactor) -> HandlerLink:
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
                                      "users): choose one under /var/lib/securecc, or open that directory (chmod o+x)")
    probe = next(iter(config.compilers.values()))
    return handler_client.start(reactor, config.sandbox, {
        "scratch": str(config.scratch), "cache_path": str(config.cache.path) if config.cache else None,
        "cache_max": config.cache.max_bytes if config.cache else 0, "probe": probe.path, "probe_root": probe.root,
    })


def _check_private(path: Path, handler_uid: int | None) -> None:
    """A secret that others can read, or that the job handler's uid owns, is a secret the job handler can read: refuse it."""
    try:
        st = os.stat(path)
    except OSError:
        return  # missing: the loader says so in its own words
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is open to other users (mode {st.st_mode & 0o777:04o}): chmod 600 {path}, owned by the "
                          "server's user; the job handler must not be able to read it")
    if handler_uid is not None and st.st_uid == handler_uid:
        raise ConfigError(f"{path} is owned by the job handler's uid {handler_uid}, which can read it: chown it to the "
                          "server's user")


def _key(path: Path, area: str) -> Ed25519PrivateKey:
    """One of the server's Ed25519 keys (``area``: audit or signing, as securecc-admin names them)."""
    try:
        return load_private_key(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{area} key {path}: {e}; make one with: securecc-admin {area} keygen --out {path}") from None


def build(config: ServerConfig, reactor, handler: HandlerLink) -> tuple[ServiceFactory, ThreadPool]:
    """Everything the listener needs, with secrets; fails (ConfigError, AclError, GSSFailure) before listening."""
    if config.ldap.bind == "gssapi":
        use_service_credentials(config.keytab)
    for secret in (Path(config.keytab), config.audit.key, config.signing_key):
        _check_private(secret, config.sandbox.uid)
    acceptor = Acceptor(config.principal, config.keytab)
    key, signer = _key(config.audit.key, "audit"), _key(config.signing_key, "signing")
    audit = AuditLog(config.audit.path, key, socket.getfqdn(), config.audit.rotate_bytes, config.audit.checkpoint_every,
                     config.audit.checkpoint_seconds, forwarder(config.audit.syslog), clock=reactor)
    # The reactor is the service's clock (deadlines, sessions, checkpoints); LDAP answers' TTLs and acl.yaml's settle
    # time are timed on a monotonic one instead, which no step of the wall clock stretches (securecc.server.clock).
    acl, directory = AclFile(config.acl, MONOTONIC, on_reload=audit.write), Directory(config.ldap, MONOTONIC)
    try:
        identities = {c.path: toolchain.probe(c.path) for c in config.compilers.values()}
    except toolchain.ProbeError as e:
        raise ConfigError(str(e)) from None
    if config.sandbox.mode != "bwrap":
        Logger().critical(
            "SANDBOX DISABLED: sandbox.mode is {mode}: compilers run with rlimits and a separate uid only, and "
            "see this host's whole filesystem and network; every audit record says so", mode=config.sandbox.mode,
        )
    pool = ThreadPool(minthreads=0, maxthreads=LDAP_THREADS, name="ldap")
    service = CompileService(config, reactor, reactor, acl, directory, pool, audit, identities, signer, handler=handler,
                             caching=config.cache is not None,
                             compiler_roots=tuple(c.root for c in config.compilers.values() if c.root))
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
def _serve(config: ServerConfig, reactor, handler: HandlerLink, listeners: dict[str, socket.socket], failed: list[str]):
    """Once the handler is ready: load the secrets, listen, record the start."""

    def adopt(name: str, factory: protocol.Factory):
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
                                        config.monitor.scrapers)
            adopt("monitor", monitor_site)
        if config.distcc:
            adopt("distcc", ServiceFactory(DistccProtocol, factory.service, Acceptor(config.distcc.principal, config.keytab)))
            Logger().warn("distcc listener on {host}:{port} as {principal}: jobs from stock clients travel in the CLEAR "
                          "and can be changed on the way", host=config.distcc.host, port=config.distcc.port,
                          principal=config.distcc.principal)
    except (ConfigError, AclError, AuditError, GSSFailure, HandlerGone, OSError, error.CannotListenError) as e:
        failed.append(str(e))
        reactor.stop()
        return
    pool.start()
    factory.service.hash_pool.start()
    task.LoopingCall(factory.service.audit.tick).start(1.0, now=False)
    task.LoopingCall(factory.service.recheck).start(REVOCATION_CHECK, now=False)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(factory.service.acl.reload))
    reactor.addSystemEventTrigger("before", "shutdown", factory.service.stop)
    reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
    reactor.addSystemEventTrigger("before", "shutdown", factory.service.hash_pool.stop)
    audit = factory.service.audit
    audit.write(event="server-start", principal=config.principal, listen=f"{config.listen_host}:{port.getHost().port}",
                sandbox=config.sandbox.mode, compilers={n: factory.service.identities[c.path] for n, c in config.compilers.items()},
                **({"torn_line": audit.torn_line} if audit.torn_line else {}))
    if audit.previous_key and audit.previous_key != audit.key_id:
        audit.write(event="key-rotation", old_key=audit.previous_key, new_key=audit.key_id)
    if audit.torn_line:
        Logger().warn("the audit log's last line {line} was torn by a crash; the chain continues after it", line=audit.torn_line)
    Logger().info("securecc-server listening on {host}:{port} as {principal}",
                  host=config.listen_host, port=port.getHost().port, principal=config.principal)
