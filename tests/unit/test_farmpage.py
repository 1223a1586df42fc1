"""securecc-monitor --web's page: what a server says is shown as text, never as markup; the SVG is drawn here."""

from __future__ import annotations

from html.parser import HTMLParser

from securecc.client.farmpage import fragment, page, slot_bar, sparkline
from securecc.client.farmview import WINDOW, FarmView, HostSeries

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


class Elements(HTMLParser):
    """The elements and text of a document, as a browser's parser sees them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def hostile_view() -> FarmView:
    s = HostSeries(f"evil{HOSTILE}:3637")
    s.status_received({"ok": True, "server": HOSTILE, "slots": 2, "time": 100, "totals": {"allowed": 1},
                       "refusals": {HOSTILE: 2},
                       "running": [{"principal": HOSTILE, "compiler": HOSTILE, "source": f"src/{HOSTILE}.c", "started": 90}]}, now=100)
    down = HostSeries("down:3637")
    down.status_received({"ok": False, "error": f"bad reply: {HOSTILE}"}, now=100)
    quarantine = {"since": 50.0, "why": HOSTILE, "job_id": HOSTILE}
    return FarmView(100, (s.view(100, quarantine=quarantine), down.view(100)))


def test_a_servers_script_in_a_source_path_shows_as_text() -> None:
    """Server name, principal, compiler, source path, refusal reason, error and quarantine reason all carry
    markup: the fragment has no script, no img and no event handler, and the text reads as the server sent it."""
    parsed = Elements(fragment(hostile_view()))
    assert not [tag for tag, _ in parsed.tags if tag in ("script", "img")]
    assert not [attrs for _, attrs in parsed.tags if any(name.startswith("on") for name in attrs)]
    text = "".join(parsed.text)
    assert f"src/{HOSTILE}.c" in text and text.count(HOSTILE) >= 8
    hosts = [attrs["data-host"] for tag, attrs in parsed.tags if tag == "article"]
    assert hosts == [f"evil{HOSTILE}:3637", "down:3637"]  # attribute values come back intact


def test_tiles_name_their_state_and_are_focusable() -> None:
    parsed = Elements(fragment(hostile_view()))
    tiles = [attrs for tag, attrs in parsed.tags if tag == "article"]
    assert [(t["data-state"], t["tabindex"], t["id"]) for t in tiles] == [("quarantined", "0", "host-0"), ("down", "0", "host-1")]
    assert all(t["aria-labelledby"] == f"{t['id']}-name" for t in tiles)


def test_the_page_loads_nothing_from_elsewhere_and_its_script_carries_the_nonce() -> None:
    document = page(hostile_view(), "N0nce")
    parsed = Elements(document)
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert scripts == [{"nonce": "N0nce"}]  # one script, ours
    assert [attrs for tag, attrs in parsed.tags if tag == "style"] == [{"nonce": "N0nce"}]
    assert not [attrs for _, attrs in parsed.tags if {"src", "href"} & set(attrs)] and "http" not in document.replace("http-equiv", "")
    assert not [attrs for _, attrs in parsed.tags if "style" in attrs]  # inline style attributes would need 'unsafe-inline'


def test_a_sparkline_is_drawn_across_the_window_with_gaps() -> None:
    now = 1000.0
    svg = sparkline([(now - WINDOW, 1.0), (now - WINDOW / 2, 2.0), (now - 100, None), (now - 10, 4.0), (now, 2.0)], now, "jobs/s")
    parsed = Elements(svg)
    lines = [attrs["points"] for tag, attrs in parsed.tags if tag == "polyline"]
    assert lines == ["0.0,20.2 75.0,14.0", "147.5,1.5 150.0,14.0"]  # the gap splits the line; x from age, y from the peak (4)
    label = next(attrs["aria-label"] for tag, attrs in parsed.tags if tag == "svg")
    assert label == "jobs/s: now 2, peak 4 in 10 minutes"
    assert "no data yet" in sparkline([], now, "probe", " ms")
    single = Elements(sparkline([(now, 3.0)], now, "x"))
    assert [tag for tag, _ in single.tags].count("circle") == 1  # one point is a dot, not an invisible line


def test_the_slot_bar_fills_by_the_share_of_slots_in_use() -> None:
    def used(in_use: int, slots: int) -> str | None:
        return [attrs for tag, attrs in Elements(slot_bar(in_use, slots)).tags if tag == "rect"][1]["width"]

    assert used(1, 4) == "37.5" and used(4, 4) == "150.0" and used(5, 4) == "150.0" and used(0, 0) == "0.0"


def test_without_a_ticket_the_page_says_so_once_instead_of_a_dead_farm() -> None:
    def view(*errors: str) -> FarmView:
        hosts = []
        for n, error in enumerate(errors):
            series = HostSeries(f"build{n}:3637")
            series.status_received({"ok": False, "error": error}, now=100)
            hosts.append(series.view(100))
        return FarmView(100, tuple(hosts))

    no_ticket = "no Kerberos ticket: run kinit (or point KRB5_CLIENT_KTNAME at a keytab)"
    assert 'id="alert"' in fragment(view(no_ticket, no_ticket)) and "run kinit" in fragment(view(no_ticket, no_ticket))
    assert 'id="alert"' not in fragment(view(no_ticket, "cannot connect to build1:3637: Connection refused"))
