"""``securecc-monitor --web``: the farm as one client sees it, as a live page and as Prometheus metrics.

The monitor polls every server the client knows over the authenticated
compile port (``probe.server_status``, every ``--interval`` seconds, with the
user's own ticket, so principal names appear only where the user is an ACL
admin) and times a trivial compile on each (``probe.check_host``, every
``--probe-interval``).  :mod:`~securecc.client.farmview` keeps the history,
:mod:`~securecc.client.farmpage` draws it; this module is the HTTP glue.

Twisted web rather than ``http.server``: the page is pushed to every open
tab as server-sent events, and polls run in threads while the answers land
on one thread, so the model needs no locks; Twisted is a dependency already.

Access is for the user running the monitor only: the page shows every
server's status as that user's ticket sees it.  Every route, ``/metrics``
and the event stream included, needs the token of the URL it prints, from
the query string, an ``Authorization: Bearer`` header (for Prometheus) or
the cookie set by the first visit (HttpOnly, SameSite=Strict), and the Host
header must name the page (no DNS rebinding): a loopback address, or with
``--keytab`` also its principal's host and its address.  Without ``--keytab``
it binds loopback addresses only.  With ``--keytab`` (an ``HTTP/<host>`` key) it may
listen beyond loopback, and a browser may also log in by HTTP Negotiate
(SPNEGO): only as the principal running the monitor, to a session cookie
that ends with its ticket (:class:`Negotiate`).  The page itself travels
unencrypted, as the servers' own dashboards do: beyond a trusted network,
put TLS in front or use ``ssh -L``.  Every answer carries a nonce-based
Content-Security-Policy, ``nosniff``, ``no-referrer`` and ``no-store``.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet import defer, task, threads
from twisted.web import resource, server

from securecc.client import farmpage
from securecc.client.farmview import FarmView, HostSeries, State
from securecc.client.hosts import Host, HostState, host_key
from securecc.handshake import AcceptorContext, AuthenticationFailure

COOKIE = "securecc_monitor"
SESSION_COOKIE = "securecc_monitor_session"  # a Kerberos login's (Negotiate)
MAX_STREAMS = 32  # open event streams; more tabs than that is a leak, not a user
PROBE_DEADLINE = 5.0


class WebError(Exception):
    """A user error of ``--web``: one line."""


def parse_listen(text: str, negotiate: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to bind; anything but a loopback address is refused unless the page
    has a Kerberos login (``negotiate``)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not port.isdigit() or int(port) > 65535:
        raise WebError(f"--listen {text}: say HOST:PORT, e.g. 127.0.0.1:8637")
    host = "127.0.0.1" if host == "localhost" else host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not negotiate:
        raise WebError(f"--listen {text}: beyond loopback the page needs a Kerberos login: give --keytab with an HTTP/<host> key, "
                       "or reach it with ssh -L")
    return host, int(port)


def presented_token(query: Mapping[bytes, list[bytes]], cookie: bytes | None, authorization: bytes | None) -> bytes:
    """The token a request offers: ``?token=``, else ``Authorization: Bearer``, else the cookie (b"": none)."""
    if query.get(b"token"):
        return query[b"token"][0]
    if authorization and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    return cookie or b""


def authorized(offered: bytes, token: str) -> bool:
    """Constant-time: how much of a guess matched must not show in the answer's timing."""
    return bool(offered) and hmac.compare_digest(offered, token.encode())


def loopback_host(header: bytes | None, port: int, names: frozenset[str] = frozenset()) -> bool:
    """A Host header naming this server by a loopback address, or by one of ``names`` (with --keytab: the page's
    principal's host, the address it listens on): a page of another origin that rebinds its DNS name to this
    server's address sends its own name here."""
    allowed = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", *names)}
    return header is not None and header.decode("latin-1").lower() in allowed


def security_headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                   "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
    }


def sse_event(name: str, data: str) -> bytes:
    """One server-sent event; every line of ``data`` (CR, LF or CRLF) gets its ``data:`` prefix, so no string
    inside it can end the event or start another."""
    lines = re.split(r"\r\n|\r|\n", data)
    return (f"event: {name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


class FarmMetrics:
    """The farm on the monitor's own ``/metrics``, in a registry of its own: what Prometheus sees is what
    this client sees (its ticket, its network path, its back-off)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.up = Gauge("securecc_monitor_host_up", "1 when the host's status could be read", ["host"], registry=r)
        self.state = Gauge("securecc_monitor_host_state", "1 for the host's current state", ["host", "state"], registry=r)
        self.slots = Gauge("securecc_monitor_slots", "Job slots the host has", ["host"], registry=r)
        self.running = Gauge("securecc_monitor_running_jobs", "Jobs running on the host", ["host"], registry=r)
        self.divergences = Gauge("securecc_monitor_divergences", "Divergent results the host reports", ["host"], registry=r)
        self.job_seconds = Gauge("securecc_monitor_job_seconds", "Job duration percentile over the last 10 minutes",
                                 ["host", "quantile"], registry=r)
        self.probe = Histogram("securecc_monitor_probe_seconds", "Latency of a trivial compile, connect to object",
                               ["host"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.probe_failures = Counter("securecc_monitor_probe_failures", "Trivial compiles that failed", ["host"], registry=r)

    def probed(self, host: str, result: Mapping[str, Any]) -> None:
        if result.get("ok"):
            self.probe.labels(host).observe(float(result["latency_ms"]) / 1000)
        else:
            self.probe_failures.labels(host).inc()

    def update(self, view: FarmView) -> None:
        for h in view.hosts:
            self.up.labels(h.key).set(0 if State.DOWN in h.flags else 1)
            for state in State:
                self.state.labels(h.key, state.value).set(1 if h.state == state else 0)
            self.slots.labels(h.key).set(h.slots)
            self.running.labels(h.key).set(h.in_use)
            self.divergences.labels(h.key).set(h.divergences)
            for quantile, value in (("0.5", h.p50), ("0.95", h.p95)):
                self.job_seconds.labels(h.key, quantile).set(float("nan") if value is None else value)


StatusFunction = Callable[[Host, float], dict[str, Any]]
ProbeFunction = Callable[[Host, str, float], dict[str, Any]]


@dataclass
class Poller:
    """Polls every host in threads; the answers are folded into the model on the reactor's thread."""

    hosts: list[Host]
    status: StatusFunction
    probe: ProbeFunction
    identity: str
    metrics: FarmMetrics
    clock: Callable[[], float] = time.time
    host_state: Callable[[], HostState] = HostState  # read afresh for each view: the agent changes it

    def __post_init__(self) -> None:
        self.series = [HostSeries(host_key(h)) for h in self.hosts]
        self.in_flight: set[tuple[str, int]] = set()
        self.listeners: list[Callable[[FarmView], None]] = []

    def view(self) -> FarmView:
        now, state = self.clock(), self.host_state()
        return FarmView(now, tuple(series.view(now, state.backed_off(h, now), state.quarantined(h))
                                   for h, series in zip(self.hosts, self.series)))

    def _run(self, kind: str, index: int, call: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], None]) -> defer.Deferred[None]:
        """``call`` in a thread unless the last one for this host is still out (a hung host holds one thread)."""
        if (kind, index) in self.in_flight:
            return defer.succeed(None)
        self.in_flight.add((kind, index))

        def landed(answer: dict[str, Any]) -> None:
            self.in_flight.discard((kind, index))
            done(answer)

        def failed(failure: Any) -> None:  # a bug of ours in a poll must not stop the others
            self.in_flight.discard((kind, index))
            done({"ok": False, "error": f"monitor error: {failure.getErrorMessage()}"})

        d: defer.Deferred[dict[str, Any]] = threads.deferToThread(call)
        return d.addCallbacks(landed, failed)

    def poll(self) -> defer.Deferred[None]:
        """One round of statuses; the page is published when every host polled this round has answered."""
        rounds = [self._run("status", i, lambda h=h: self.status(h, 3.0),  # type: ignore[misc]
                            lambda a, s=s: s.status_received(a, self.clock()))  # type: ignore[misc]
                  for i, (h, s) in enumerate(zip(self.hosts, self.series))]
        return defer.gatherResults(rounds).addCallback(lambda _: self.publish())

    def probe_all(self) -> defer.Deferred[None]:
        def probed(series: HostSeries, result: dict[str, Any]) -> None:
            series.probe_received(result, self.clock())
            self.metrics.probed(series.key, result)

        rounds = [self._run("probe", i, lambda h=h: self.probe(h, self.identity, PROBE_DEADLINE),  # type: ignore[misc]
                            lambda r, s=s: probed(s, r))  # type: ignore[misc]
                  for i, (h, s) in enumerate(zip(self.hosts, self.series))]
        return defer.gatherResults(rounds).addCallback(lambda _: None)

    def start(self, interval: float, probe_interval: float) -> None:
        """Poll on a steady rhythm: a round is not waited for, so a silent host (whose call holds its thread
        until the channel's timeouts) delays only its own tile, never the page's next update."""
        def status_round() -> None:
            self.poll()

        def probe_round() -> None:
            self.probe_all()

        task.LoopingCall(status_round).start(interval)
        task.LoopingCall(probe_round).start(probe_interval)

    def publish(self) -> None:
        view = self.view()
        self.metrics.update(view)
        for listener in list(self.listeners):
            listener(view)


class Negotiate:
    """HTTP Negotiate (SPNEGO) for ``--keytab``: the principal running the monitor, and no one else, gets a session
    cookie that ends with the ticket it showed (the page shows what that principal's own ticket sees)."""

    def __init__(self, contexts: Callable[[], AcceptorContext], owner: str, names: frozenset[str] = frozenset(),
                 clock: Callable[[], float] = time.time) -> None:
        self.contexts, self.owner, self.names, self.clock = contexts, owner, names, clock  # names: the Host names served
        self.sessions: dict[str, float] = {}  # cookie -> when it ends

    def session(self, cookie: bytes | None) -> bool:
        now = self.clock()
        self.sessions = {k: end for k, end in self.sessions.items() if end > now}
        return cookie is not None and any(hmac.compare_digest(cookie, k.encode()) for k in self.sessions)

    def login(self, authorization: bytes | None) -> tuple[int, str, str | None, bytes | None]:
        """(status, message, new session cookie or None, the acceptor's reply token) for one ``Authorization``."""
        scheme, _, value = (authorization or b"").partition(b" ")
        if scheme.lower() != b"negotiate":
            return 401, "log in with Kerberos (HTTP Negotiate), or open the URL securecc-monitor printed", None, None
        try:
            context = self.contexts()
            reply = context.step(base64.b64decode(value.strip(), validate=True))
        except (AuthenticationFailure, ValueError):
            return 401, "the Kerberos login failed", None, None
        if not context.complete or context.principal != self.owner:
            return 403, "this page is its monitor's user's alone", None, None  # naming that user would tell any ticket holder
        cookie = secrets.token_urlsafe(32)
        self.sessions[cookie] = self.clock() + max(60.0, context.lifetime)
        return 200, "", cookie, reply


def header(request: server.Request, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


class FarmSite(resource.Resource):
    """Every route behind the token: ``/`` (the page), ``/events`` (its updates), ``/metrics``."""

    isLeaf = True

    def __init__(self, poller: Poller, token: str, port: int, negotiate: Negotiate | None = None) -> None:
        super().__init__()
        self.poller, self.token, self.port, self.negotiate = poller, token, port, negotiate
        self.streams: set[server.Request] = set()
        poller.listeners.append(self._push)

    def render_GET(self, request: server.Request) -> bytes | int:  # noqa: N802 - Twisted's name
        nonce = secrets.token_urlsafe(16)
        for name, value in security_headers(nonce).items():
            request.setHeader(name, value)
        if not loopback_host(header(request, b"host"), self.port, self.negotiate.names if self.negotiate else frozenset()):
            return self._error(request, 421, "this page answers only to its own names")
        offered = presented_token(request.args or {}, request.getCookie(COOKIE.encode()), header(request, b"authorization"))
        if not authorized(offered, self.token):
            refused = self._login(request)
            if refused is not None:
                return refused
        if request.args and b"token" in request.args and request.path == b"/":  # keep the token out of the address bar
            request.addCookie(COOKIE, self.token, path="/", httpOnly=True, sameSite="strict")
            request.setResponseCode(303)
            request.setHeader("Location", "/")
            return b""
        if request.path == b"/":
            request.setHeader("Content-Type", "text/html; charset=utf-8")
            return farmpage.page(self.poller.view(), nonce).encode()
        if request.path == b"/events":
            return self._stream(request)
        if request.path == b"/metrics":
            request.setHeader("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            return generate_latest(self.poller.metrics.registry)
        return self._error(request, 404, "no such page")

    def _login(self, request: server.Request) -> bytes | None:
        """Without the token: a Kerberos session, or a Negotiate login to one (None: let it in); else the refusal."""
        if self.negotiate is None:
            return self._error(request, 403, "securecc-monitor: open the URL securecc-monitor --web printed (with its ?token=)")
        if self.negotiate.session(request.getCookie(SESSION_COOKIE.encode())):
            return None
        code, message, cookie, reply = self.negotiate.login(header(request, b"authorization"))
        if reply:
            request.setHeader("WWW-Authenticate", "Negotiate " + base64.b64encode(reply).decode())
        if cookie is None:
            if code == 401:
                request.setHeader("WWW-Authenticate", "Negotiate")
            return self._error(request, code, f"securecc-monitor: {message}")
        request.addCookie(SESSION_COOKIE, cookie, path="/", httpOnly=True, sameSite="strict")
        return None

    def _error(self, request: server.Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return (message + "\n").encode()

    def _stream(self, request: server.Request) -> bytes | int:
        if len(self.streams) >= MAX_STREAMS:
            return self._error(request, 503, "too many open pages")
        request.setHeader("Content-Type", "text/event-stream; charset=utf-8")
        request.write(b"retry: 3000\n\n" + sse_event("view", farmpage.fragment(self.poller.view())))
        self.streams.add(request)
        request.notifyFinish().addBoth(lambda _: self.streams.discard(request))
        return server.NOT_DONE_YET

    def _push(self, view: FarmView) -> None:
        if self.streams:
            event = sse_event("view", farmpage.fragment(view))
            for request in list(self.streams):
                request.write(event)


def serve(hosts: list[Host], status: StatusFunction, probe: ProbeFunction, listen: str, interval: float, probe_interval: float,
          keytab: str | None = None, principal: str | None = None) -> None:
    """Run until interrupted, polling with ``status`` and ``probe`` (securecc-monitor's own); user errors end as one
    ``securecc-monitor:`` line."""
    from twisted.internet import error, reactor

    from securecc.toolchain import ProbeError, cached_identity

    try:
        address, port = parse_listen(listen, negotiate=keytab is not None)
        if not (interval >= 0.2 and probe_interval >= 1):
            raise WebError(f"--interval {interval:g} / --probe-interval {probe_interval:g}: at least 0.2 s and 1 s")
        negotiate = kerberos_login(keytab, principal, f"[{address}]" if ":" in address else address) if keytab else None
    except WebError as e:
        sys.exit(f"securecc-monitor: {e}")
    try:
        identity = cached_identity("/usr/bin/gcc")
    except (ProbeError, OSError):
        identity = ""
    poller = Poller(hosts, status, probe, identity, FarmMetrics())
    token = secrets.token_urlsafe(32)
    site = FarmSite(poller, token, 0, negotiate)
    try:
        listening = reactor.listenTCP(port, server.Site(site), interface=address)  # type: ignore[arg-type]
    except error.CannotListenError as e:
        sys.exit(f"securecc-monitor: cannot listen on {listen}: {e.socketError}")
    site.port = listening.getHost().port  # type: ignore[attr-defined]
    reactor.suggestThreadPoolSize(max(10, 2 * len(hosts) + 2))  # type: ignore[attr-defined]
    shown = f"[{address}]" if ":" in address else address
    print(f"http://{shown}:{site.port}/?token={token}", flush=True)
    poller.start(interval, probe_interval)
    reactor.run()


def kerberos_login(keytab: str, principal: str | None, address: str) -> Negotiate:
    """The Negotiate login of ``--keytab``: its ``HTTP/`` key, and the principal of this user's own ticket, the one
    principal it lets in."""
    import os

    if os.environ.get("KRB5RCACHETYPE") == "none" or os.environ.get("KRB5RCACHENAME", "").startswith("none"):
        # the page travels unencrypted: a Negotiate token seen on the wire must not log in twice
        raise WebError("--keytab: KRB5RCACHETYPE/KRB5RCACHENAME=none would accept a replayed Negotiate login; unset it")
    import gssapi
    from gssapi.raw.misc import GSSError

    from securecc.gss import Acceptor, GSSFailure

    try:
        owner = str(gssapi.Credentials(usage="initiate").name)
    except GSSError:
        raise WebError("--keytab lets in only you, by your Kerberos ticket, and there is none: run kinit") from None
    try:
        principal = principal or f"HTTP/{socket.getfqdn()}"
        acceptor = Acceptor(principal, keytab)
    except GSSFailure as e:
        raise WebError(str(e)) from None
    names = frozenset({principal.partition("/")[2].partition("@")[0].lower(), address.lower()} - {""})
    return Negotiate(lambda: acceptor.new_context(frozenset()), owner, names)  # authentication only: nothing is wrapped over HTTP
