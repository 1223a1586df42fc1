"""securecc-monitor --web against three real servers (one busy, one working, one stopped), read in headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

from chromium import Chromium
from conftest import BIN, REPO, make_job, securecc
from test_job_path import SLOW_CXX, SLOW_FLAGS, authenticated_channel, wait_until

HOSTILE_SOURCE = "<script>alert(1)</script>.cc"  # a path some server reports: must show as text

TILES = """[...document.querySelectorAll('article.tile')].map(t => ({host: t.dataset.host, state: t.dataset.state,
  allowed: +t.querySelector('.count-allowed').textContent, busy: +t.querySelector('.count-busy').textContent,
  inUse: +t.querySelector('.in-use').textContent, probe: t.querySelector('.probe').textContent}))"""


def start_monitor(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    monitor = subprocess.Popen([BIN / "securecc-monitor", "--web", "--interval", "1", "--probe-interval", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = monitor.stdout.readline().strip() if monitor.stdout else ""
    assert url.startswith("http://127.0.0.1:") and "/?token=" in url, (url, monitor.stderr and monitor.stderr.read())
    return monitor, url


def test_the_farm_page_in_chromium(realm, own_server, workdir, monkeypatch, tmp_path):
    """Every host is a tile in the right state (busy: its one slot taken; ok; down: stopped), the counts move
    between two reads of the same page, the running job's hostile source path is text, focus survives an update,
    and the monitor's /metrics needs the token and shows the probe latency."""
    busy, working, stopped = own_server(slots=1), own_server(), own_server()
    stopped.stop()
    hosts = [busy, working, stopped]
    keys = [f"127.0.0.1:{s.port}" for s in hosts]
    channel = authenticated_channel(busy, realm, monkeypatch)  # occupies busy's only slot for the whole test
    source = SLOW_CXX.replace("SPIN", "400000000L").encode()
    channel.sock.sendall(channel.wire.seal(make_job("g++", SLOW_FLAGS, "c++", "-c", str(workdir), HOSTILE_SOURCE, source)))
    assert wait_until(lambda: busy.started() == 1, 20)
    env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": " ".join(s.hosts for s in hosts),
           "XDG_CACHE_HOME": str(workdir / ".cache")}
    monitor, url = start_monitor(env)
    keep = os.environ.get("SECURECC_SCREENSHOTS")  # where the README's pictures come from: SECURECC_SCREENSHOTS=docs
    browser = Chromium(tmp_path / "profile", 1280, 1000)
    stop = threading.Event()

    def build() -> None:  # quick compiles on the working server while the page is watched
        (workdir / "a.c").write_text("int a;\n")
        securecc(realm, working, "bob", workdir, "gcc", "-c", "a.c", "-o", "b.o")  # refused: not in the group
        while not stop.is_set():
            securecc(realm, working, "alice", workdir, "gcc", "-c", "a.c", "-o", "a.o")
            time.sleep(0.3)

    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    try:
        port, token = url.split(":")[2].split("/")[0], url.split("token=")[1]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            raise AssertionError("/metrics answered without the token")
        except urllib.error.HTTPError as e:
            assert e.code == 403
        browser.open(url)
        assert wait_until(lambda: browser.evaluate("document.getElementById('live')?.textContent") == "live", 20)

        def tiles() -> list[dict]:
            return browser.evaluate(TILES)

        def settled() -> bool:
            now = tiles()
            return [t["state"] for t in now] == ["busy", "ok", "down"] and now[1]["allowed"] > 0 and "ms" in now[1]["probe"]

        assert wait_until(settled, 30), tiles()
        first = tiles()
        browser.evaluate("window.samePage = true; document.getElementById('host-1').focus()")
        browser.screenshot(tmp_path / "first.png")
        assert wait_until(lambda: tiles()[1]["allowed"] > first[1]["allowed"] and tiles()[0]["busy"] > first[0]["busy"], 30), (first, tiles())
        second = tiles()
        assert browser.evaluate("window.samePage") is True  # updated in place, not reloaded
        assert browser.evaluate("document.activeElement.id") == "host-1"  # the keyboard focus survived the updates
        assert [t["host"] for t in second] == keys
        # busy's one slot stays taken; the working server's quick compiles come and go (0.3 s apart), so one sample
        # may catch one in flight
        assert wait_until(lambda: [t["inUse"] for t in tiles()] == [1, 0, 0], 10), tiles()
        running = browser.evaluate("[...document.querySelectorAll('#running tr.job')].map(r => [...r.cells].map(c => c.textContent))")
        assert running[0][:4] == [keys[0], "alice@TEST.REALM", "g++", HOSTILE_SOURCE]  # alice is an admin: names shown
        assert browser.evaluate("document.scripts.length") == 1  # the page's own, nothing injected
        refusals = browser.evaluate("document.querySelector('#refusals-h').parentElement.textContent")
        assert "denied:not-in-group 1" in refusals, refusals
        assert "cannot connect" in browser.evaluate("document.querySelector('#host-2 .why').textContent")
        if keep:  # the README's picture: give the sparklines half a minute of history first
            time.sleep(30)
        browser.screenshot(tmp_path / "farm.png")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"})
        metrics = urllib.request.urlopen(request, timeout=5).read().decode()
        assert f'securecc_monitor_host_state{{host="{keys[2]}",state="down"}} 1.0' in metrics
        assert f'securecc_monitor_host_state{{host="{keys[0]}",state="busy"}} 1.0' in metrics
        assert f'securecc_monitor_probe_seconds_count{{host="{keys[1]}"}}' in metrics
        tui = subprocess.run([BIN / "securecc-monitor", "--once"], env=env, capture_output=True, text=True, timeout=60).stdout
        (tmp_path / "tui.html").write_text(tui_page(tui))
        browser.send("Emulation.setDeviceMetricsOverride", width=980, height=40 + 19 * len(tui.splitlines()), deviceScaleFactor=1,
                     mobile=False, session=True)
        browser.open((tmp_path / "tui.html").as_uri())
        time.sleep(0.5)
        browser.screenshot(tmp_path / "tui.png")
        assert (tmp_path / "farm.png").stat().st_size > 20_000 and "DOWN" in tui
    finally:
        stop.set()
        browser.close()
        monitor.terminate()
        monitor.wait(15)
        channel.close()
        builder.join(60)
    if keep:
        for name in ("farm.png", "tui.png"):
            shutil.copy(tmp_path / name, REPO / keep / f"monitor-{name}")


def tui_page(text: str) -> str:
    """The terminal monitor's screen as a page, to photograph it as a terminal would show it."""
    import html

    return ('<!doctype html><meta charset="utf-8"><body style="margin:0;background:#1e1e1e">'
            '<pre style="margin:0;padding:12px;color:#e6e6e6;font:14px/1.35 monospace">'
            f"{html.escape(text)}</pre>")



def test_a_frozen_host_turns_down_without_holding_the_page_and_a_quarantined_one_is_marked(realm, own_server, workdir, tmp_path):
    """A server stopped with SIGSTOP accepts connections and answers nothing: its tile turns down within the status
    deadline while the others' keep moving, and comes back once it runs again; a host this user quarantined says so."""
    from securecc.client.hosts import Host, HostState

    working, frozen, distrusted = own_server(), own_server(), own_server()
    keys = [f"127.0.0.1:{s.port}" for s in (working, frozen, distrusted)]
    HostState(str(workdir / ".cache" / "securecc" / "hosts.json")).quarantine(Host("127.0.0.1", distrusted.port), "its object differs", "j1")
    env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": " ".join(s.hosts for s in (working, frozen, distrusted)),
           "XDG_CACHE_HOME": str(workdir / ".cache")}
    monitor, url = start_monitor(env)
    browser = Chromium(tmp_path / "profile", 1280, 1000)

    def tiles() -> list[dict]:
        return browser.evaluate(TILES)

    try:
        browser.open(url)  # read the tiles once the stream has replaced them: the page may still be parsing before
        assert wait_until(lambda: browser.evaluate("document.getElementById('live')?.textContent") == "live", 20)
        assert wait_until(lambda: [t["state"] for t in tiles()] == ["ok", "ok", "quarantined"], 30), tiles()
        assert "its object differs" in browser.evaluate("document.getElementById('host-2').textContent")
        os.kill(frozen.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            assert wait_until(lambda: tiles()[1]["state"] == "down", 15), tiles()
            took = time.monotonic() - stopped
            assert "did not answer" in browser.evaluate("document.querySelector('#host-1 .why').textContent")
            updated = browser.evaluate("document.getElementById('updated').textContent")
            assert wait_until(lambda: browser.evaluate("document.getElementById('updated').textContent") != updated, 5), \
                "the page stopped updating while a host was frozen"
            assert tiles()[0]["state"] == "ok"
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
        assert took < 3.0 + 2 * 1 + 2, f"a frozen host took {took:.1f} s to show as down"  # the status deadline, two polls, slack
        assert wait_until(lambda: tiles()[1]["state"] == "ok", 15), tiles()
        assert [t["host"] for t in tiles()] == keys
        browser.screenshot(tmp_path / "frozen.png")
    finally:
        browser.close()
        monitor.terminate()
        monitor.wait(15)


def test_with_a_keytab_the_page_takes_a_real_kerberos_login_from_its_user_alone(realm, server, workdir, monkeypatch):
    """--keytab: HTTP Negotiate against the real KDC; alice runs the monitor, so alice gets in and bob does not."""
    from test_monitor import get_port

    monkeypatch.setenv("KRB5_CONFIG", realm.info["env"]["KRB5_CONFIG"])  # this process makes the tokens
    env = {**realm.user_env("alice", workdir), "SECURECC_HOSTS": server.hosts, "XDG_CACHE_HOME": str(workdir / ".cache")}
    monitor = subprocess.Popen([BIN / "securecc-monitor", "--web", "--keytab", realm.info["service_keytab"],
                                "--principal", "HTTP/localhost@TEST.REALM"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = monitor.stdout.readline().strip() if monitor.stdout else ""
        assert url.startswith("http://127.0.0.1:"), monitor.stderr and monitor.stderr.read()
        port = int(url.split(":")[2].split("/")[0])
        code, headers, _ = get_port(port, "/")
        assert code == 401 and headers["WWW-Authenticate"] == "Negotiate"
        code, _, body = get_port(port, "/", "bob", realm)
        assert code == 403 and b"alone" in body and b"alice" not in body
        code, headers, body = get_port(port, "/", "alice", realm)
        assert code == 200 and b'<article class="tile' in body, body[:300]
        assert "securecc_monitor_session=" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    finally:
        monitor.terminate()
        monitor.wait(15)
    without = subprocess.run([BIN / "securecc-monitor", "--web", "--listen", "0.0.0.0:0"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert without.returncode != 0 and without.stderr.startswith("securecc-monitor: --listen 0.0.0.0:0: beyond loopback"), without.stderr
    assert without.stderr.count("\n") == 1
