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

Access is for the local user only.  The server binds loopback addresses and
nothing else: a wider ``--listen`` is refused, because this page has no
HTTP Negotiate (SPNEGO) login of its own and would show every server's
status, as this user sees it, to anyone who can reach it; use ``ssh -L``.
Every route, ``/metrics`` and the event stream included, needs the token of
the URL it prints, from the query string, an ``Authorization: Bearer``
header (for Prometheus) or the cookie set by the first visit (HttpOnly,
SameSite=Strict); the Host header must name a loopback address (no DNS
rebinding).  Every answer carries a nonce-based Content-Security-Policy,
``nosniff``, ``no-referrer`` and ``no-store``.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
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

COOKIE = "securecc_monitor"
MAX_STREAMS = 32  # open event streams; more tabs than that is a leak, not a user
PROBE_DEADLINE = 5.0


class WebError(Exception):
    """A user error of ``--web``: one line."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to bind; anything but a loopback address is refused."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not port.isdigit() or int(port) > 65535:
        raise WebError(f"--listen {text}: say HOST:PORT, e.g. 127.0.0.1:8637")
    host = "127.0.0.1" if host == "localhost" else host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise WebError(f"--listen {text}: only a loopback address is served (the page has no Kerberos login); "
                       "reach it from elsewhere with ssh -L")
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


def loopback_host(header: bytes | None, port: int) -> bool:
    """A Host header naming this server by a loopback address: a page of another origin that rebinds
    its DNS name to 127.0.0.1 sends its own name here."""
    allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
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


def header(request: server.Request, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


class FarmSite(resource.Resource):
    """Every route behind the token: ``/`` (the page), ``/events`` (its updates), ``/metrics``."""

    isLeaf = True

    def __init__(self, poller: Poller, token: str, port: int) -> None:
        super().__init__()
        self.poller, self.token, self.port = poller, token, port
        self.streams: set[server.Request] = set()
        poller.listeners.append(self._push)

    def render_GET(self, request: server.Request) -> bytes | int:  # noqa: N802 - Twisted's name
        nonce = secrets.token_urlsafe(16)
        for name, value in security_headers(nonce).items():
            request.setHeader(name, value)
        if not loopback_host(header(request, b"host"), self.port):
            return self._error(request, 421, "this page answers only to its loopback address")
        offered = presented_token(request.args or {}, request.getCookie(COOKIE.encode()), header(request, b"authorization"))
        if not authorized(offered, self.token):
            return self._error(request, 403, "securecc-monitor: open the URL securecc-monitor --web printed (with its ?token=)")
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


def serve(hosts: list[Host], listen: str, interval: float, probe_interval: float) -> None:
    """Run until interrupted; user errors end as one ``securecc-monitor:`` line."""
    from twisted.internet import error, reactor

    from securecc.client.probe import check_host, server_status
    from securecc.toolchain import ProbeError, cached_identity

    try:
        address, port = parse_listen(listen)
        if not (interval >= 0.2 and probe_interval >= 1):
            raise WebError(f"--interval {interval:g} / --probe-interval {probe_interval:g}: at least 0.2 s and 1 s")
    except WebError as e:
        sys.exit(f"securecc-monitor: {e}")
    try:
        identity = cached_identity("/usr/bin/gcc")
    except (ProbeError, OSError):
        identity = ""
    poller = Poller(hosts, server_status, check_host, identity, FarmMetrics())
    token = secrets.token_urlsafe(32)
    site = FarmSite(poller, token, 0)
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
