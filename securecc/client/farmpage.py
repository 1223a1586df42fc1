"""The page of ``securecc-monitor --web``: a :class:`~securecc.client.farmview.FarmView` as HTML and inline SVG.

Pure functions, strings in and out.  Every string a server sent (its name,
a principal, a source path, a refusal reason) and every host name goes
through :func:`escape` here, the one place, so a hostile server shows its
markup as text.  The page loads nothing from elsewhere: the sparklines are
SVG drawn here and the script is the few lines in :data:`SCRIPT`, which
replaces ``<main>`` with each fragment the event stream sends (and puts the
keyboard focus back on the tile that had it).  The Content-Security-Policy
the HTTP glue sends allows only this script and this style, by nonce.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping

from securecc.client.farmview import WINDOW, FarmView, HostView, Point, State

SPARK_WIDTH, SPARK_HEIGHT = 150, 28
BAR_WIDTH = 150


def escape(text: object) -> str:
    """Text for HTML content and quoted attributes (``&<>"'`` escaped)."""
    return html.escape(str(text), quote=True)


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def sparkline(points: Iterable[Point], now: float, label: str, unit: str = "") -> str:
    """The last ``WINDOW`` seconds of ``points`` as an SVG line, gaps where a value is missing; the
    accessible name says the latest value and the peak, which is what the eye reads off it."""
    kept = [(t, v) for t, v in points if t >= now - WINDOW]
    values = [v for _, v in kept if v is not None]
    peak = max(values, default=0.0)
    scale = (SPARK_HEIGHT - 3) / peak if peak > 0 else 0.0
    segments: list[list[tuple[float, float]]] = [[]]
    for t, v in kept:
        if v is None:
            segments.append([])
        else:
            segments[-1].append((SPARK_WIDTH * (1 - (now - t) / WINDOW), SPARK_HEIGHT - 1.5 - v * scale))
    lines = "".join(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in s)}"/>' if len(s) > 1 else
                    f'<circle cx="{s[0][0]:.1f}" cy="{s[0][1]:.1f}" r="1.5"/>' for s in segments if s)
    last = next((v for _, v in reversed(kept) if v is not None), None)
    said = f"{label}: now {number(last)}{unit}, peak {number(peak)}{unit} in 10 minutes" if values else f"{label}: no data yet"
    shown = f"{number(last)}{unit}" if last is not None else "–"
    return (f'<figure class="spark"><figcaption>{escape(label)} <b>{escape(shown)}</b></figcaption>'
            f'<svg role="img" aria-label="{escape(said)}" width="{SPARK_WIDTH}" height="{SPARK_HEIGHT}" '
            f'viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}"><title>{escape(said)}</title>'
            f'<line class="axis" x1="0" y1="{SPARK_HEIGHT - 1}" x2="{SPARK_WIDTH}" y2="{SPARK_HEIGHT - 1}"/>'
            f'<g class="line">{lines}</g></svg></figure>')


def number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2f}"


def slot_bar(in_use: int, slots: int) -> str:
    """Slots in use as a bar: the filled part is the share of slots taken."""
    filled = BAR_WIDTH * min(1.0, in_use / slots) if slots else 0.0
    return (f'<svg class="bar" role="img" aria-label="{in_use} of {slots} slots in use" width="{BAR_WIDTH}" height="10">'
            f'<rect class="free" width="{BAR_WIDTH}" height="10" rx="2"/><rect class="used" width="{filled:.1f}" height="10" rx="2"/></svg>')


def badges(host: HostView) -> str:
    if not host.flags:
        return '<span class="badge ok">ok</span>'
    return "".join(f'<span class="badge {flag.value}">{escape(flag.value)}</span>' for flag in host.flags)


def reasons(counts: Mapping[str, float]) -> str:
    if not counts:
        return '<p class="muted">no refusals</p>'
    items = "".join(f"<li><code>{escape(reason)}</code> {count:.0f}</li>" for reason, count in sorted(counts.items(), key=lambda rc: -rc[1]))
    return f'<ul class="reasons">{items}</ul>'


def tile(index: int, host: HostView, now: float) -> str:
    """One host: name, state badges, slots, latency, sparklines, refusals by reason."""
    heading = f"host-{index}-name"
    detail = []
    if host.error:
        detail.append(f'<p class="why">{escape(host.error)}</p>')
    if host.backed_off:
        detail.append(f'<p class="why">backed off for {host.backed_off:.0f} s more</p>')
    if host.quarantine is not None:
        q = host.quarantine
        since = time.strftime("%H:%M:%S", time.localtime(float(q.get("since", 0))))
        detail.append(f'<p class="why">quarantined since {since}: {escape(q.get("why", ""))} (job {escape(q.get("job_id", ""))})</p>')
    probe = f"{host.last_probe_ms:.0f} ms" if host.last_probe_ms is not None else escape(host.probe_error or "–")
    total = host.totals
    return (
        f'<article class="tile {host.state.value}" id="host-{index}" tabindex="0" aria-labelledby="{heading}" '
        f'data-host="{escape(host.key)}" data-state="{host.state.value}">'
        f'<h2 id="{heading}">{escape(host.key)}</h2>'
        f'<p class="server">{escape(host.server) if host.server else "&nbsp;"}</p>'
        f'<p class="badges">{badges(host)}</p>{"".join(detail)}'
        f'<p class="slots">slots <b class="in-use">{host.in_use}</b> / <b class="slot-count">{host.slots}</b> {slot_bar(host.in_use, host.slots)}</p>'
        f'<dl class="numbers"><dt>jobs done</dt><dd class="count-allowed">{total.get("allowed", 0):.0f}</dd>'
        f'<dt>refused</dt><dd class="count-refused">{total.get("refused", 0):.0f}</dd>'
        f'<dt>BUSY answers</dt><dd class="count-busy">{total.get("busy", 0):.0f}</dd>'
        f'<dt>job p50 / p95</dt><dd class="latency">{seconds(host.p50)} / {seconds(host.p95)}</dd>'
        f'<dt>probe compile</dt><dd class="probe">{probe}</dd>'
        f'<dt>divergences</dt><dd class="divergences{" alarm" if host.divergences else ""}">{host.divergences}</dd></dl>'
        f'<div class="sparks">{sparkline(host.jobs_per_s, now, "jobs/s")}{sparkline(host.refusals_per_s, now, "refusals/s")}'
        f'{sparkline(host.busy_per_s, now, "BUSY/s")}{sparkline(host.probe_ms, now, "probe", " ms")}</div>'
        f'<h3>refusals by reason</h3>{reasons(host.refusals)}'
        "</article>"
    )


def running(view: FarmView) -> str:
    rows = "".join(f'<tr class="job"><td>{escape(h.key)}</td><td>{escape(j.principal)}</td><td>{escape(j.compiler)}</td>'
                   f"<td>{escape(j.source)}</td><td>{j.seconds:.0f} s</td></tr>" for h in view.hosts for j in h.jobs)
    if not rows:
        rows = '<tr><td colspan="5" class="muted">nothing</td></tr>'
    return ('<section aria-labelledby="now-h"><h2 id="now-h">Compiling now</h2><table><thead><tr><th scope="col">host</th>'
            '<th scope="col">principal</th><th scope="col">compiler</th><th scope="col">source</th><th scope="col">running</th></tr>'
            f'</thead><tbody id="running">{rows}</tbody></table>'
            '<p class="muted">Principals and sources are shown by the servers where you are an ACL admin.</p></section>')


def refusals(view: FarmView) -> str:
    farm: dict[str, float] = {}
    for host in view.hosts:
        for reason, count in host.refusals.items():
            farm[reason] = farm.get(reason, 0) + count
    return f'<section aria-labelledby="refusals-h"><h2 id="refusals-h">Refusals by reason, whole farm</h2>{reasons(farm)}</section>'


def fragment(view: FarmView) -> str:
    """What ``<main>`` holds, sent again on every update."""
    counts = ", ".join(f"{view.count(state)} {state.value}" for state in State if view.count(state))
    stamp = time.strftime("%H:%M:%S", time.localtime(view.time))
    tiles = "".join(tile(i, h, view.time) for i, h in enumerate(view.hosts))
    return (f'<p class="summary"><span id="counts">{len(view.hosts)} hosts: {counts}</span> · updated '
            f'<time id="updated">{stamp}</time></p>{alert(view)}<section class="tiles" aria-label="hosts">{tiles}</section>'
            f"{running(view)}{refusals(view)}")


def alert(view: FarmView) -> str:
    """One line for what is wrong on this side, not the farm's: without a ticket every host looks down."""
    if view.hosts and all("kinit" in h.error for h in view.hosts):
        return '<p class="why" id="alert" role="alert">No Kerberos ticket: every host is unreachable from here until you run kinit.</p>'
    return ""


STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:1em 1.5em;color:#1f2328;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.05em;margin:.2em 0} h3{font-size:.9em;margin:.6em 0 .2em}
.summary{margin:.2em 0 1em;color:#424a53}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1em}
.tile{border:2px solid #d0d7de;border-left-width:8px;border-radius:6px;padding:.6em .8em}
.tile:focus{outline:3px solid #0969da;outline-offset:2px}
.tile.ok{border-left-color:#1a7f37} .tile.busy{border-left-color:#9a6700} .tile.down{border-left-color:#cf222e}
.tile.backed-off{border-left-color:#57606a} .tile.quarantined{border-left-color:#8250df}
.server{color:#424a53;margin:0;font-size:.85em;overflow-wrap:anywhere} .why{color:#a40e26;margin:.2em 0;overflow-wrap:anywhere}
.badge{display:inline-block;color:#fff;border-radius:3px;padding:0 .45em;margin-right:.3em;font-size:.85em;font-weight:600}
.badge.ok{background:#1a7f37} .badge.busy{background:#9a6700} .badge.down{background:#cf222e}
.badge.backed-off{background:#57606a} .badge.quarantined{background:#8250df}
.bar{vertical-align:middle} .bar .free{fill:#eaeef2} .bar .used{fill:#0969da}
.numbers{display:grid;grid-template-columns:auto 1fr;gap:0 .8em;margin:.4em 0} .numbers dt{color:#424a53} .numbers dd{margin:0}
.alarm{color:#a40e26;font-weight:700}
.sparks{display:grid;grid-template-columns:1fr 1fr;gap:.3em}
.spark{margin:0} .spark figcaption{font-size:.8em;color:#424a53}
.spark .line{fill:none;stroke:#0969da;stroke-width:1.5} .spark circle{fill:#0969da} .spark .axis{stroke:#d0d7de}
.reasons{margin:0;padding-left:1.2em;font-size:.9em} code{overflow-wrap:anywhere}
.muted{color:#57606a}
table{border-collapse:collapse;width:100%;margin:.3em 0} th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #d0d7de}
th{background:#f6f8fa} td{overflow-wrap:anywhere}
section{margin-top:1.2em}
"""

# The whole client side: apply each fragment the stream sends, keep the focus where it was.
SCRIPT = """
const farm = document.getElementById('farm'), live = document.getElementById('live');
const events = new EventSource('events');
events.addEventListener('view', (e) => {
  const focused = document.activeElement ? document.activeElement.id : '';
  farm.innerHTML = e.data;
  const again = focused && document.getElementById(focused);
  if (again) again.focus({preventScroll: true});
  live.textContent = 'live';
});
events.onerror = () => { live.textContent = 'reconnecting'; };
"""


def page(view: FarmView, nonce: str) -> str:
    """The whole document, with the current fragment in it (a page read without its script is still complete)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>securecc farm</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<style nonce="{nonce}">{STYLE}</style></head><body>'
        '<header><h1>securecc farm <small class="muted" id="live">connecting</small></h1></header>'
        f'<main id="farm">{fragment(view)}</main>'
        f'<script nonce="{nonce}">{SCRIPT}</script></body></html>'
    )
