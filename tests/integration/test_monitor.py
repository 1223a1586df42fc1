"""Monitoring: Prometheus metrics, SPNEGO-protected status, the live dashboard in Chromium, securecc-monitor."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request

import gssapi
import pytest
from conftest import BIN, free_port, securecc
from prometheus_client.parser import text_string_to_metric_families
from test_acl import credentials_for
from test_job_path import authenticated_channel, slow_job, wait_until


@pytest.fixture(autouse=True)
def realm_config(realm, monkeypatch):
    """This process makes Negotiate tokens itself: it needs the realm's krb5.conf."""
    monkeypatch.setenv("KRB5_CONFIG", realm.info["env"]["KRB5_CONFIG"])


def metrics(server) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/metrics", timeout=5).read().decode()
    assert "alice" not in text and "bob" not in text  # no principal names
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def get(server, path: str, user: str | None = None, realm=None) -> tuple[int, dict, bytes]:
    return get_port(server.monitor_port, path, user, realm)


def get_port(port: int, path: str, user: str | None = None, realm=None) -> tuple[int, dict, bytes]:
    """GET with, for ``user``, a fresh Negotiate token for HTTP/localhost (a real Kerberos ticket)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if user:
        context = gssapi.SecurityContext(name=gssapi.Name("HTTP@localhost", gssapi.NameType.hostbased_service),
                                         creds=credentials_for(realm, user), usage="initiate",
                                         flags=[gssapi.RequirementFlag.mutual_authentication])
        request.add_header("Authorization", "Negotiate " + base64.b64encode(context.step()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_metrics_follow_jobs_refusals_and_timeouts(realm, own_server, workdir, monkeypatch):
    """Counters move as jobs run, are refused and time out; scrapes come only from listed addresses."""
    s = own_server(sandbox={"timeout": 1})
    (workdir / "a.c").write_text("int a;\n")
    securecc(realm, s, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
    securecc(realm, s, "bob", workdir, "gcc", "-c", "a.c", "-o", "b.o")
    channel = authenticated_channel(s, realm, monkeypatch)
    assert channel.call(slow_job(workdir, "20000000L")).reason == "timeout"
    channel.close()
    m = metrics(s)
    assert m[("securecc_jobs_total", (("decision", "allowed"), ("reason", "allowed:group:committers")))] == 2
    assert m[("securecc_jobs_total", (("decision", "refused"), ("reason", "denied:not-in-group")))] == 1
    assert m[("securecc_sandbox_kills_total", (("ended_by", "timeout"),))] == 1
    assert m[("securecc_handshake_seconds_count", ())] >= 3 and m[("securecc_slots", ())] == 16
    assert m[("securecc_bytes_in_total", ())] > 0 and m[("securecc_job_duration_seconds_count", ())] == 3
    closed = own_server(monitor={"scrape": ["192.0.2.1"]})
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{closed.monitor_port}/metrics", timeout=5)
        raise AssertionError("an unlisted address could scrape")
    except urllib.error.HTTPError as e:
        assert e.code == 403


def test_status_needs_negotiate_and_an_admin(realm, own_server, workdir):
    """Anonymous: 401 Negotiate. bob, authenticated but no admin: 403. alice (an admin): the JSON, mutually authenticated."""
    s = own_server()
    code, headers, _ = get(s, "/status")
    assert code == 401 and headers["WWW-Authenticate"] == "Negotiate"
    code, _, body = get(s, "/status", "bob", realm)
    assert code == 403 and b"bob@TEST.REALM is not a securecc admin" in body
    code, headers, body = get(s, "/status", "alice", realm)
    assert code == 200 and headers["WWW-Authenticate"].startswith("Negotiate ")
    status = json.loads(body)
    assert status["slots"] == 16 and status["running"] == []
    code, _, _ = get(s, "/", None)
    assert code == 401


class NegotiatingProxy:
    """Chromium here answers a Negotiate challenge with ERR_UNSUPPORTED_AUTH_SCHEME (flags and policies tried),
    so the browser reaches the dashboard through this relay, which adds a fresh SPNEGO token for alice to every
    request: the server-side authentication checked is the real one."""

    def __init__(self, server, realm) -> None:
        import http.server
        import threading

        target = server.monitor_port

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                code, headers, body = get_port(target, self.path, "alice", realm)
                self.send_response(code)
                self.send_header("Content-Type", headers.get("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_dashboard_shows_a_running_job_in_chromium(realm, own_server, workdir, monkeypatch, tmp_path):
    """Headless Chromium opens the dashboard (as alice) while a job runs: the page updates itself and shows it."""
    s = own_server()
    channel = authenticated_channel(s, realm, monkeypatch)
    channel.sock.sendall(channel.wire.seal(slow_job(workdir, "40000000L")))
    assert wait_until(lambda: json.loads(get(s, "/status", "alice", realm)[2])["running"], 10)
    proxy = NegotiatingProxy(s, realm)
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=5000", "--window-size=1280,800"]
    url = f"http://127.0.0.1:{proxy.port}/"
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
    screenshot = tmp_path / "dashboard.png"
    subprocess.run([*browser, f"--screenshot={screenshot}", url], capture_output=True, timeout=90)
    channel.close()
    proxy.httpd.shutdown()
    assert '<tr class="job"><td>alice@TEST.REALM</td><td>g++</td><td>slow.cc</td>' in dom, dom[-1500:]
    assert 'id="busy">1<' in dom and screenshot.stat().st_size > 10_000


def test_securecc_monitor_lists_every_server(realm, own_server, workdir, monkeypatch):
    """--once --json: each server with its slot count and running jobs; a down one marked; names for admins only."""
    a, b = own_server(slots=3), own_server(slots=5)
    down = f"127.0.0.1:{free_port()}"
    principal = ",principal=securecc/localhost@TEST.REALM"
    hosts = f"127.0.0.1:{a.port}{principal} 127.0.0.1:{b.port}{principal} {down}{principal}"
    channel = authenticated_channel(a, realm, monkeypatch)
    channel.sock.sendall(channel.wire.seal(slow_job(workdir, "40000000L")))
    time.sleep(0.5)

    def monitor(user: str) -> list[dict]:
        env = {**realm.user_env(user, workdir), "SECURECC_HOSTS": hosts, "XDG_CACHE_HOME": str(workdir / ".cache")}
        done = subprocess.run([BIN / "securecc-monitor", "--once", "--json"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    seen, redacted = monitor("alice"), monitor("bob")
    channel.close()
    assert [(r["ok"], r.get("slots")) for r in seen] == [(True, 3), (True, 5), (False, None)]
    assert [j["source"] for j in seen[0]["running"]] == ["slow.cc"] and seen[0]["running"][0]["principal"] == "alice@TEST.REALM"
    assert redacted[0]["running"][0]["principal"] == "(admins only)"  # bob is no admin
    assert "cannot connect" in seen[2]["error"]
