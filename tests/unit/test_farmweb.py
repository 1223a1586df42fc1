"""securecc-monitor --web's access rules: loopback only, the token on every route, the security headers, safe events."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from securecc.client.farmview import State
from securecc.client.farmweb import (
    COOKIE,
    SESSION_COOKIE,
    FarmMetrics,
    FarmSite,
    Negotiate,
    Poller,
    WebError,
    authorized,
    loopback_host,
    parse_listen,
    presented_token,
    sse_event,
)
from securecc.client.hosts import Host, HostState
from securecc.testing import MemoryAcceptor, MemoryInitiator

TOKEN = "k3y-Of-The-Test_abcdefghijklmnopqrstuvwxyz0"
PORT = 8637


def test_only_loopback_addresses_are_served() -> None:
    assert parse_listen("127.0.0.1:8637") == ("127.0.0.1", 8637)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9000") == ("::1", 9000) and parse_listen("127.0.0.2:1") == ("127.0.0.2", 1)
    for wide in ("0.0.0.0:8637", "[::]:8637", "192.0.2.1:80", "build1.example.org:80"):
        with pytest.raises(WebError, match="beyond loopback the page needs a Kerberos login: give --keytab"):
            parse_listen(wide)
        assert parse_listen(wide, negotiate=True)[1] in (8637, 80)
    for bad in ("8637", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(WebError, match="say HOST:PORT"):
            parse_listen(bad)


def test_the_token_from_query_bearer_or_cookie_compared_whole() -> None:
    assert presented_token({b"token": [b"q"]}, b"c", b"Bearer b") == b"q"
    assert presented_token({}, b"c", b"bearer b ") == b"b" and presented_token({}, b"c", b"Negotiate x") == b"c"
    assert presented_token({}, None, None) == b""
    assert authorized(TOKEN.encode(), TOKEN)
    assert not authorized(b"", TOKEN) and not authorized(TOKEN.encode()[:-1], TOKEN) and not authorized(TOKEN.encode() + b"x", TOKEN)


def test_the_host_header_must_name_the_loopback_address() -> None:
    assert loopback_host(b"127.0.0.1:8637", PORT) and loopback_host(b"LOCALHOST:8637", PORT) and loopback_host(b"[::1]:8637", PORT)
    assert not loopback_host(b"evil.example:8637", PORT) and not loopback_host(b"127.0.0.1:1", PORT) and not loopback_host(None, PORT)


def test_an_event_cannot_be_ended_or_forged_from_inside_its_data() -> None:
    event = sse_event("view", "<p>a</p>\r\nevent: x\rdata: y\n\nretry: 1")
    assert event == b"event: view\ndata: <p>a</p>\ndata: event: x\ndata: data: y\ndata: \ndata: retry: 1\n\n"


class Request(DummyRequest):
    """DummyRequest with the parts of twisted.web's Request the site uses."""

    def __init__(self, path: bytes, token: str | None = None, cookie: str | None = None, host: bytes = b"127.0.0.1:8637",
                 session: str | None = None, **headers: bytes) -> None:
        super().__init__(path.lstrip(b"/").split(b"/"))
        self.path = path
        self.requestHeaders = Headers({b"host": [host], **{k.encode(): [v] for k, v in headers.items()}})
        if token is not None:
            self.args = {b"token": [token.encode()]}
        self.cookies_in = {COOKIE.encode(): cookie.encode()} if cookie else {}
        if session:
            self.cookies_in[SESSION_COOKIE.encode()] = session.encode()
        self.cookies_out: list[tuple[str, str, dict[str, Any]]] = []

    def getCookie(self, name: bytes) -> bytes | None:  # noqa: N802 - Twisted's name
        return self.cookies_in.get(name)

    def addCookie(self, name: str, value: str, **options: Any) -> None:  # noqa: N802 - Twisted's name
        self.cookies_out.append((name, value, options))


NO_STATE = "/dev/null/hosts.json"  # a host state that reads nothing and can write nowhere, not even as root


def site(state: HostState | None = None, negotiate: Negotiate | None = None) -> FarmSite:
    poller = Poller([Host("build1")], lambda h, t: {}, lambda h, i, d: {}, "", FarmMetrics(),
                    clock=lambda: 100.0, host_state=lambda: state or HostState(NO_STATE))
    return FarmSite(poller, TOKEN, PORT, negotiate)


def render(request: Request, farm: FarmSite | None = None) -> tuple[int, bytes]:
    body = (farm or site()).render_GET(request)
    return request.responseCode or 200, body if isinstance(body, bytes) else b"".join(request.written)


@pytest.mark.parametrize("path", [b"/", b"/events", b"/metrics", b"/nothing"])
def test_every_route_needs_the_token(path: bytes) -> None:
    code, body = render(Request(path))
    assert code == 403 and body.startswith(b"securecc-monitor: ")
    assert render(Request(path, token=TOKEN[:-1] + "1"))[0] == 403
    assert render(Request(path, cookie="not-it"))[0] == 403
    assert render(Request(path, cookie=TOKEN))[0] == (404 if path == b"/nothing" else 200)


def test_the_first_visit_sets_a_strict_cookie_and_drops_the_token_from_the_url() -> None:
    request = Request(b"/", token=TOKEN)
    assert render(request)[0] == 303 and request.responseHeaders.getRawHeaders(b"location") == [b"/"]
    assert request.cookies_out == [(COOKIE, TOKEN, {"path": "/", "httpOnly": True, "sameSite": "strict"})]


def test_answers_carry_the_security_headers_with_the_pages_nonce() -> None:
    request = Request(b"/", cookie=TOKEN)
    _, body = render(request)
    headers = {k.decode().lower(): v[0].decode() for k, v in request.responseHeaders.getAllRawHeaders()}
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    policy = headers["content-security-policy"]
    assert policy.startswith("default-src 'none'; script-src 'nonce-")
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">'.encode() in body
    refused = Request(b"/metrics")
    render(refused)
    assert refused.responseHeaders.getRawHeaders(b"x-content-type-options") == [b"nosniff"]  # on refusals too


def test_a_rebound_dns_name_is_refused_even_with_the_cookie() -> None:
    assert render(Request(b"/", cookie=TOKEN, host=b"attacker.example:8637"))[0] == 421


def test_metrics_take_a_bearer_token_and_show_the_farm() -> None:
    farm = site()
    farm.poller.series[0].probe_received({"ok": True, "latency_ms": 42.0}, 99.0)
    farm.poller.metrics.probed("build1:3637", {"ok": True, "latency_ms": 42.0})
    farm.poller.publish()
    code, body = render(Request(b"/metrics", authorization=b"Bearer " + TOKEN.encode()), farm)
    assert code == 200
    assert b'securecc_monitor_probe_seconds_count{host="build1:3637"} 1.0' in body
    assert b'securecc_monitor_host_state{host="build1:3637",state="down"} 1.0' in body  # never polled: not up


def test_the_event_stream_starts_with_the_view_and_gets_each_update() -> None:
    farm = site()
    request = Request(b"/events", cookie=TOKEN)
    assert farm.render_GET(request) is NOT_DONE_YET
    assert request.written[0].startswith(b"retry: 3000\n\nevent: view\ndata: ")
    farm.poller.publish()
    assert len(request.written) == 2 and b'data-state="down"' in request.written[1]
    request.finish()
    assert not farm.streams  # a closed tab is forgotten


def test_a_quarantined_host_is_shown_so() -> None:
    assert site().poller.view().hosts[0].quarantine is None
    state = HostState(NO_STATE)
    state.quarantine(Host("build1"), "diverged", "j1")
    quarantined = site(state).poller.view().hosts[0]
    assert quarantined.state is State.QUARANTINED and quarantined.quarantine == {"since": pytest.approx(time.time(), abs=60),
                                                                                 "why": "diverged", "job_id": "j1"}


# --- --keytab: a Kerberos login, for alice (who runs the monitor) alone ------------------------------------


def kerberos_site(now: list[float]) -> FarmSite:
    acceptor = MemoryAcceptor("HTTP/build1.example.org@TEST.REALM", frozenset({"alice@TEST.REALM", "bob@TEST.REALM"}))
    return site(negotiate=Negotiate(acceptor.new_context, "alice@TEST.REALM", frozenset({"build1.example.org"}), clock=lambda: now[0]))


def negotiate_header(client: str, lifetime: float = 3600.0) -> bytes:
    token = MemoryInitiator(client, "HTTP/build1.example.org@TEST.REALM", lifetime).step()
    assert token is not None
    return b"Negotiate " + base64.b64encode(token)


def test_with_a_keytab_only_the_monitors_own_principal_logs_in_and_its_session_ends_with_its_ticket() -> None:
    now = [1000.0]
    farm = kerberos_site(now)
    challenge = Request(b"/", host=b"build1.example.org:8637")
    assert render(challenge, farm)[0] == 401 and challenge.responseHeaders.getRawHeaders(b"www-authenticate") == [b"Negotiate"]
    bob = Request(b"/", host=b"build1.example.org:8637", authorization=negotiate_header("bob@TEST.REALM"))
    code, body = render(bob, farm)
    assert code == 403 and b"alone" in body and b"alice" not in body and not bob.cookies_out
    garbage = Request(b"/", host=b"build1.example.org:8637", authorization=b"Negotiate !!!")
    assert render(garbage, farm)[0] == 401
    alice = Request(b"/", host=b"build1.example.org:8637", authorization=negotiate_header("alice@TEST.REALM", lifetime=600))
    code, body = render(alice, farm)
    assert code == 200 and b"<article" in body
    [(name, session, options)] = alice.cookies_out
    assert name == SESSION_COOKIE and options == {"path": "/", "httpOnly": True, "sameSite": "strict"} and session != TOKEN
    assert render(Request(b"/events", host=b"build1.example.org:8637", session=session), farm)[0] == 200
    assert render(Request(b"/metrics", host=b"build1.example.org:8637", session=session + "x"), farm)[0] == 401
    now[0] += 601
    assert render(Request(b"/metrics", host=b"build1.example.org:8637", session=session), farm)[0] == 401, "ended with the ticket"


def test_with_a_keytab_the_token_still_opens_every_route() -> None:
    farm = kerberos_site([0.0])
    code, _ = render(Request(b"/metrics", host=b"build1.example.org:8637", authorization=b"Bearer " + TOKEN.encode()), farm)
    assert code == 200


@pytest.mark.parametrize("variable, value", [("KRB5RCACHETYPE", "none"), ("KRB5RCACHENAME", "none:")])
def test_a_keytab_login_refuses_to_run_without_a_replay_cache(monkeypatch, variable: str, value: str) -> None:
    from securecc.client.farmweb import kerberos_login

    monkeypatch.setenv(variable, value)
    with pytest.raises(WebError, match="replayed Negotiate login"):
        kerberos_login("/nonexistent.keytab", None, "127.0.0.1")


def test_with_a_keytab_the_host_header_must_still_name_this_page() -> None:
    farm = kerberos_site([0.0])
    bearer = b"Bearer " + TOKEN.encode()
    assert render(Request(b"/metrics", host=b"build1.example.org:8637", authorization=bearer), farm)[0] == 200
    assert render(Request(b"/metrics", host=b"127.0.0.1:8637", authorization=bearer), farm)[0] == 200
    assert render(Request(b"/metrics", host=b"attacker.example:8637", authorization=bearer), farm)[0] == 421
