"""The compile servers: where the list comes from, which are backed off, in what order to try them.

``SECURECC_HOSTS`` is a whitespace-separated list of ``host[:port][/limit][,option...]``
(``#`` starts a comment).  ``localhost`` (without a port) means "compile
here".  Options: ``principal=NAME`` names the server's Kerberos principal
when it is not ``securecc/<host>`` in the default realm (e.g. a server
reached by address).  Without the variable: ``~/.config/securecc/hosts``,
then ``/etc/securecc/hosts``, then DNS SRV ``_securecc._tcp.<domain>``
(``SECURECC_DOMAIN``, else the resolver's search list; the principal is
``securecc/<target>``).

A host that fails (unreachable, silent, gone mid-job) is skipped for a
back-off period that doubles with each failure up to ``MAX_BACKOFF``; the
state lives in ``~/.cache/securecc/hosts.json`` (``securecc --show-hosts``
prints it).  Hosts are tried in a random order weighted by their job limit
and recent latency, so many clients do not stampede the same server.

A host whose object a check contradicted (:mod:`securecc.client.verify`) is
*quarantined*: no job goes to it, whatever its health, until the user clears
it with ``securecc-hosts --clear HOST``.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from securecc.files import cache_path, write_atomically
from securecc.protocol import JOB_ID

T = TypeVar("T")

DEFAULT_PORT = 3637
DEFAULT_LIMIT = 4


class HostsError(ValueError):
    """A host specification that cannot be understood."""


@dataclass(frozen=True)
class Host:
    name: str
    port: int = DEFAULT_PORT
    limit: int = DEFAULT_LIMIT
    principal: str | None = None

    @property
    def is_local(self) -> bool:
        return self.name == "localhost" and self.port == 0

    @property
    def target(self) -> str:
        """The server's Kerberos principal: the explicit one, or ``securecc/<host>`` in the default realm
        (never canonicalized through DNS)."""
        return self.principal or f"securecc/{self.name}"

    @property
    def realm(self) -> str:
        """The realm of the server's principal, "" for the default one: whose KDC gives its tickets."""
        return self.target.rpartition("@")[2] if "@" in self.target else ""


def parse_host(spec: str) -> Host:
    head, *options = spec.split(",")
    limit = DEFAULT_LIMIT
    if "/" in head:
        head, _, limit_text = head.partition("/")
        if not limit_text.isdigit() or int(limit_text) < 1:
            raise HostsError(f"bad job limit in {spec!r}")
        limit = int(limit_text)
    if head == "localhost":
        return Host("localhost", 0, limit)
    name, port = head, DEFAULT_PORT
    if head.startswith("["):  # [v6addr]:port
        name, _, rest = head[1:].partition("]")
        if rest:
            port_text = rest.removeprefix(":")
            if not port_text.isdigit():
                raise HostsError(f"bad port in {spec!r}")
            port = int(port_text)
    elif head.count(":") == 1:
        name, _, port_text = head.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise HostsError(f"bad port in {spec!r}")
        port = int(port_text)
    if not name:
        raise HostsError(f"no host name in {spec!r}")
    principal = None
    for option in options:
        key, _, value = option.partition("=")
        if key == "principal" and value:
            principal = value
        else:
            raise HostsError(f"unknown host option {option!r} in {spec!r}")
    return Host(name, port, limit, principal)


def parse_hosts(text: str) -> list[Host]:
    """Parse a host list; '#' starts a comment (as in distcc's hosts files)."""
    specs = []
    for line in text.splitlines():
        specs += line.split("#", 1)[0].split()
    return [parse_host(spec) for spec in specs]


def _backoff(env: Mapping[str, str]) -> float:
    """Seconds after a first failure (SECURECC_BACKOFF)."""
    try:
        return max(0.1, float(env.get("SECURECC_BACKOFF", "15")))
    except ValueError:
        return 15.0


MAX_BACKOFF = 300.0  # distcc's back-off never gives up on a host; ours waits at most 5 minutes
SRV_MIN_TTL = 60.0


def configured_hosts(state: HostState | None = None, env: Mapping[str, str] = os.environ) -> tuple[list[Host], str]:
    """The hosts and where they came from: the variable, a hosts file, or DNS SRV."""
    text = env.get("SECURECC_HOSTS")
    if text is not None:
        return parse_hosts(text), "SECURECC_HOSTS"
    home = env.get("HOME") or os.path.expanduser("~")
    for path in (os.path.join(home, ".config/securecc/hosts"), "/etc/securecc/hosts"):
        try:
            with open(path) as f:
                return parse_hosts(f.read()), path
        except OSError:
            continue
    return srv_hosts(state, env)


def srv_hosts(state: HostState | None = None, env: Mapping[str, str] = os.environ) -> tuple[list[Host], str]:
    """``_securecc._tcp.<domain>`` SRV records, priority and weight honoured (RFC 2782); cached for their TTL."""
    domain = env.get("SECURECC_DOMAIN")
    name = f"_securecc._tcp.{domain}." if domain else None
    cached = state.srv_answer(name) if state else None
    if cached is not None:
        return cached, f"DNS SRV {name} (cached)"
    try:
        import dns.exception
        import dns.resolver
    except ImportError:  # pragma: no cover - dnspython is a dependency
        return [], "SECURECC_HOSTS or the hosts files (dnspython is missing for SRV)"
    resolver = dns.resolver.Resolver()
    if env.get("SECURECC_DNS"):  # HOST:PORT of the DNS server to ask (tests, split-horizon setups)
        host, _, port = env["SECURECC_DNS"].rpartition(":")
        resolver.nameservers, resolver.port = [host], int(port)
    resolver.lifetime = 2.0
    domains = [d for d in (resolver.search or [resolver.domain]) if str(d) not in (".", "")]
    names = [name] if name else [f"_securecc._tcp.{d}" for d in domains]
    if not names:
        return [], "SECURECC_HOSTS, the hosts files or DNS SRV (no DNS domain: set SECURECC_DOMAIN)"
    for candidate in names:
        try:
            answer = resolver.resolve(candidate, "SRV")
        except dns.exception.DNSException:
            continue
        records = sorted(answer, key=lambda r: r.priority)
        hosts = []
        for priority in sorted({r.priority for r in records}):
            group = [r for r in records if r.priority == priority]
            while group:  # weighted random order within a priority
                pick = random.choices(group, weights=[r.weight + 0.01 for r in group])[0]
                group.remove(pick)
                target = str(pick.target).rstrip(".")
                hosts.append(Host(target, pick.port, DEFAULT_LIMIT, f"securecc/{target}"))
        if state:
            state.remember_srv(str(candidate), hosts, max(SRV_MIN_TTL, answer.rrset.ttl if answer.rrset else 0))
        return hosts, f"DNS SRV {candidate}"
    return [], f"SECURECC_HOSTS, ~/.config/securecc/hosts, /etc/securecc/hosts or SRV {' '.join(map(str, names))}"




def _printable(value: object) -> str:
    return "".join(c if c.isprintable() else "?" for c in value) if isinstance(value, str) else ""


def host_key(host: Host) -> str:
    return f"{host.name}:{host.port}"


class HostState:
    """Per-user memory of hosts: back-off after failures, recent latency, SRV answers."""

    def __init__(self, path: str | None = None, env: Mapping[str, str] = os.environ) -> None:
        self.path = path or cache_path("hosts.json", env)
        self.base_backoff = _backoff(env)
        try:
            with open(self.path) as f:
                self.data = json.load(f)
            if not isinstance(self.data, dict):
                raise ValueError
        except (OSError, ValueError):
            self.data = {}
        if not isinstance(self.data.get("hosts"), dict):
            self.data["hosts"] = {}  # a malformed entry: no hosts known, the pinned keys kept
        self.hosts: dict[str, dict[str, Any]] = self.data["hosts"]
        self._changed: set[str] = set()  # what this process changed: the entries save() writes back

    def backed_off(self, host: Host, now: float | None = None) -> float:
        """Seconds this host is still skipped for (0: usable)."""
        until = float(self.hosts.get(host_key(host), {}).get("until", 0))
        return max(0.0, until - (now or time.time()))

    def failed(self, host: Host, why: str) -> int:
        """Back ``host`` off; the number of failures in a row, counted across every writer of the file."""
        return self._fail(host_key(host), why)

    def _fail(self, key: str, why: str) -> int:
        def count(current: dict[str, Any]) -> int:
            entry = current["hosts"].setdefault(key, {})
            if not isinstance(entry, dict):
                entry = current["hosts"][key] = {}
            entry["failures"] = failures = int(entry.get("failures", 0)) + 1
            entry["until"] = time.time() + min(MAX_BACKOFF, self.base_backoff * 2 ** (failures - 1))
            entry["why"] = why
            return failures

        failures = self.save(count)
        return failures if failures is not None else count(self.data)

    # The KDC of a realm ("" for the default one) is remembered like a host: an outage is said once, and
    # while it lasts only cached tickets are tried (tickets.py).
    @staticmethod
    def _kdc_key(realm: str) -> str:
        return f"kdc {realm}".rstrip()

    def kdc_backed_off(self, realm: str) -> bool:
        return float(self.hosts.get(self._kdc_key(realm), {}).get("until", 0)) > time.time()

    def kdc_failed(self, realm: str, why: str) -> bool:
        """Note an unanswered ticket request; True for the first of an outage (the one to tell the user)."""
        return self._fail(self._kdc_key(realm), why) == 1

    def kdc_answered(self, realm: str) -> None:
        key = self._kdc_key(realm)
        if self.hosts.get(key, {}).get("failures"):
            self.hosts[key] = {"failures": 0, "until": 0}
            self._changed.add(key)
            self.save()

    def succeeded(self, host: Host, latency: float) -> None:
        """Clear a back-off and fold in the latency; written only when that changes the picture (every
        job rewriting the file would cost the agent ~1 ms per job)."""
        entry = self.hosts.setdefault(host_key(host), {})
        previous = entry.get("latency")
        smoothed = latency if previous is None else 0.7 * previous + 0.3 * latency
        material = previous is None or entry.get("failures") or abs(smoothed - previous) > 0.25 * previous
        entry.update(failures=0, until=0, latency=smoothed)
        entry.pop("why", None)
        self._changed.add(host_key(host))
        if material:
            self.save()

    # Quarantines live beside the hosts, like the pinned keys, and change only under the file's lock (save's update):
    # a process that loaded the file before a host was quarantined cannot write the host back as it was.
    def quarantined(self, host: Host) -> dict[str, Any] | None:
        """Why no job goes to ``host``, or None: ``since`` (a time, or None if the file says none that is one), ``why``
        and ``job_id`` (one printable line each, whatever the file or the server that named the job said)."""
        entry = self._quarantine(self.data).get(host_key(host))
        if entry is None:
            return None
        entry = entry if isinstance(entry, dict) else {}  # still quarantined: the file said so, if not why
        since = entry.get("since")
        job_id = entry.get("job_id")
        return {"since": float(since) if isinstance(since, (int, float)) and 0 <= since < 2**33 else None,
                "why": _printable(entry.get("why"))[:500] or "no reason recorded",
                "job_id": job_id if isinstance(job_id, str) and job_id and JOB_ID.fullmatch(job_id) else "?"}

    def quarantine(self, host: Host, why: str, job_id: str) -> None:
        entry = {"since": time.time(), "why": why, "job_id": job_id}

        def mark(current: dict[str, Any]) -> bool:
            self._quarantine(current)[host_key(host)] = entry
            return True

        if not self.save(mark):
            mark(self.data)  # an unwritable file: this process at least stops

    def clear(self, host: Host) -> bool:
        """Lift ``host``'s quarantine and back-off; False if it had neither."""
        key = host_key(host)

        def lift(current: dict[str, Any]) -> bool:
            quarantined = self._quarantine(current).pop(key, None) is not None
            return bool(current["hosts"].pop(key, None)) or quarantined

        return bool(self.save(lift))

    @staticmethod
    def _quarantine(data: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(data.get("quarantine"), dict):
            data["quarantine"] = {}
        return data["quarantine"]  # type: ignore[no-any-return]

    def order(self, hosts: list[Host]) -> list[Host]:
        """Usable hosts, weighted-random by job limit over recent latency (herds spread out)."""
        usable = [h for h in hosts if not h.is_local and not self.backed_off(h) and not self.quarantined(h)]
        weights = [h.limit / (0.05 + self.hosts.get(host_key(h), {}).get("latency", 0.1)) for h in usable]
        ordered = []
        while usable:
            pick = random.choices(range(len(usable)), weights=weights)[0]
            ordered.append(usable.pop(pick))
            weights.pop(pick)
        return ordered

    def with_affinity(self, ordered: list[Host], key: str) -> list[Host]:
        """Rendezvous hashing: the host that owns ``key`` first (it may hold the cached result), then the rest.

        Every client ranks hosts the same way for the same job, without a
        shared store; when that host is busy the job falls through to the
        load-based order.
        """
        if not ordered:
            return ordered
        import hashlib

        owner = max(ordered, key=lambda h: hashlib.sha256(f"{key}|{host_key(h)}".encode()).digest())
        return [owner, *(h for h in ordered if h is not owner)]

    def srv_answer(self, name: str | None) -> list[Host] | None:
        entry = self.data.get("srv", {})
        if entry.get("expires", 0) > time.time() and (name is None or entry.get("name") == name):
            return [Host(n, p, DEFAULT_LIMIT, pr) for n, p, pr in entry.get("hosts", [])]
        return None

    def pin(self, principal: str, key: str) -> bool:
        """Whether ``key`` is the result signing key pinned for ``principal``: the first one met is pinned (written
        at once, under the file's lock, so parallel jobs pin one key).  An unwritable state file pins nothing."""
        known = self.data.get("keys", {}).get(principal) if isinstance(self.data.get("keys"), dict) else None
        if known is not None:
            return bool(known == key)

        def first(current: dict[str, Any]) -> bool:
            if not isinstance(current.get("keys"), dict):
                current["keys"] = {}
            return bool(current["keys"].setdefault(principal, key) == key)

        pinned = self.save(first)
        return pinned if pinned is not None else True

    def remember_srv(self, name: str, hosts: list[Host], ttl: float) -> None:
        self.data["srv"] = {"name": name, "expires": time.time() + ttl, "hosts": [[h.name, h.port, h.principal] for h in hosts]}
        self._changed.add("srv")
        self.save()

    def save(self, update: Callable[[dict[str, Any]], T] | None = None) -> T | None:
        """Write back what this process changed, merged into the file as it is now.

        Parallel compiles (processes, and the agent's threads) share the
        file: under an exclusive lock each re-reads it, replaces only the
        entries it changed, applies ``update`` (a read-modify-write, such
        as counting a failure) and renames a temporary file of its own
        over it, so no writer drops another's back-off.  Returns what
        ``update`` returned; None when the file could not be written.
        """
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(f"{self.path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    with open(self.path) as f:
                        current = json.load(f)
                    if not isinstance(current, dict):
                        raise ValueError
                except (OSError, ValueError):
                    current = {"hosts": {}}
                if not isinstance(current.get("hosts"), dict):
                    current["hosts"] = {}  # only the hosts start afresh: the result keys pinned beside them stay
                for key in self._changed:
                    if key == "srv":
                        current["srv"] = self.data["srv"]
                    else:
                        current["hosts"][key] = self.hosts[key]
                result = update(current) if update else None
                write_atomically(self.path, json.dumps(current).encode())
            self.data, self.hosts = current, current["hosts"]
            self._changed.clear()
            return result
        except OSError:
            return None
