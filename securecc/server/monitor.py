"""Monitoring over HTTP: Prometheus ``/metrics``, and ``/status`` plus a live dashboard behind SPNEGO.

``/metrics`` carries no principal names (who compiles what is personal
data) and answers only the scrape addresses in the config.  ``/status``
(JSON) and ``/`` (the dashboard, which polls ``/status``) need HTTP
Negotiate with a real Kerberos ticket for the monitoring principal
(``HTTP/<host>``) and membership in the ACL's ``admins``; anyone else gets
401 with ``WWW-Authenticate: Negotiate``, or 403.

The metrics are :mod:`securecc.server.metrics`'s; the status is the service's own.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

from twisted.web import resource, server

from securecc.acl import is_admin
from securecc.gss import Acceptor, GSSFailure
from securecc.server.directory import DirectoryUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from securecc.server.service import CompileService


class _Authenticated(resource.Resource):
    """A page for admins only, authenticated with HTTP Negotiate (SPNEGO/Kerberos)."""

    isLeaf = True

    def __init__(self, service: CompileService, acceptor: Acceptor) -> None:
        super().__init__()
        self.service = service
        self.acceptor = acceptor

    def render_GET(self, request: server.Request) -> bytes | int:
        header = (request.getHeader("authorization") or "").split(None, 1)
        if len(header) != 2 or header[0].lower() != "negotiate":
            return self._challenge(request)
        try:
            context = self.acceptor.new_context(frozenset())  # HTTP: authentication only, nothing is wrapped
            reply = context.step(base64.b64decode(header[1], validate=True))
        except (GSSFailure, ValueError):
            return self._challenge(request)
        if not context.complete or context.principal is None:
            return self._challenge(request)
        if reply:
            request.setHeader("WWW-Authenticate", "Negotiate " + base64.b64encode(reply).decode())
        principal = context.principal
        acl = self.service.acl.current()
        d = self.service.lookups.lookup(principal).addCallback(lambda membership: membership.groups)
        d.addErrback(lambda f: f.trap(DirectoryUnavailable) and frozenset())
        d.addCallback(lambda groups: self._answer(request, principal, is_admin(acl, principal, groups)))
        return server.NOT_DONE_YET

    def _challenge(self, request: server.Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader("WWW-Authenticate", "Negotiate")
        return b"Kerberos (HTTP Negotiate) required\n"

    def _answer(self, request: server.Request, principal: str, admin: bool) -> None:
        if not admin:
            request.setResponseCode(403)
            request.write(f"{principal} is not a securecc admin (acl.yaml: admins)\n".encode())
        else:
            content_type, body = self.page()
            request.setHeader("Content-Type", content_type)
            request.setHeader("Cache-Control", "no-store")
            request.write(body)
        request.finish()

    def page(self) -> tuple[str, bytes]:
        raise NotImplementedError


class StatusPage(_Authenticated):
    def page(self) -> tuple[str, bytes]:
        return "application/json", json.dumps(self.service.status()).encode()


class DashboardPage(_Authenticated):
    def page(self) -> tuple[str, bytes]:
        return "text/html; charset=utf-8", DASHBOARD


class MetricsPage(resource.Resource):
    isLeaf = True

    def __init__(self, service: CompileService, scrapers: frozenset[str]) -> None:
        super().__init__()
        self.service = service
        self.scrapers = scrapers

    def render_GET(self, request: server.Request) -> bytes:
        if getattr(request.getClientAddress(), "host", None) not in self.scrapers:
            request.setResponseCode(403)
            return b"not a configured scrape address\n"
        self.service.metrics.running.set(len(self.service.jobs_now))
        self.service.metrics.slots.set(self.service.config.slots)
        request.setHeader("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        return self.service.metrics.text()


def site(service: CompileService, acceptor: Acceptor, scrapers: frozenset[str]) -> server.Site:
    root = DashboardPage(service, acceptor)
    root.isLeaf = False
    root.putChild(b"", DashboardPage(service, acceptor))
    root.putChild(b"status", StatusPage(service, acceptor))
    root.putChild(b"metrics", MetricsPage(service, scrapers))
    return server.Site(root)


DASHBOARD = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>securecc</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
 h1{font-size:1.3em} .slots{font-size:1.1em;margin:.5em 0}
 table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd}
 th{background:#f4f4f4} .bar{display:inline-block;height:.8em;background:#3a7;vertical-align:middle}
 .muted{color:#888}
</style></head>
<body>
<h1>securecc on <span id="server">?</span></h1>
<div class="slots">slots in use: <b id="busy">0</b> / <b id="slots">0</b> <span id="bar" class="bar"></span></div>
<div class="muted">jobs allowed <b id="allowed">0</b>, refused <b id="refused">0</b>, turned away <b id="turned">0</b>;
 last minute: <b id="rate">0</b> jobs/min</div>
<h2>Compiling now</h2>
<table><thead><tr><th>principal</th><th>compiler</th><th>source</th><th>running</th><th>peer</th></tr></thead>
<tbody id="running"><tr><td colspan="5" class="muted">nothing</td></tr></tbody></table>
<p class="muted">updated <span id="updated">never</span></p>
<script>
const history = [];
function cell(text){const td=document.createElement('td');td.textContent=text;return td;}
async function refresh(){
  try{
    const r = await fetch('status', {credentials:'include', cache:'no-store'});
    if(!r.ok){document.getElementById('updated').textContent='error '+r.status;return;}
    const s = await r.json();
    document.getElementById('server').textContent = s.server;
    document.getElementById('slots').textContent = s.slots;
    document.getElementById('busy').textContent = s.running.length;
    document.getElementById('bar').style.width = (200*s.running.length/Math.max(1,s.slots))+'px';
    const t = s.totals;
    document.getElementById('allowed').textContent = t.allowed||0;
    document.getElementById('refused').textContent = t.refused||0;
    document.getElementById('turned').textContent = t.busy||0;
    history.push([s.time, (t.allowed||0)+(t.refused||0)+(t.busy||0)]);
    while(history.length>1 && s.time-history[0][0]>60) history.shift();
    document.getElementById('rate').textContent = history.length>1 ? Math.round(history[history.length-1][1]-history[0][1]) : 0;
    const body = document.getElementById('running');
    body.replaceChildren();
    if(!s.running.length){const tr=document.createElement('tr');
      const td=cell('nothing');td.colSpan=5;td.className='muted';tr.append(td);body.append(tr);}
    for(const j of s.running){
      const tr=document.createElement('tr'); tr.className='job';
      tr.append(cell(j.principal),cell(j.compiler),cell(j.source),cell(Math.round(s.time-j.started)+' s'),cell(j.peer));
      body.append(tr);
    }
    document.getElementById('updated').textContent = new Date(s.time*1000).toLocaleTimeString();
  }catch(e){document.getElementById('updated').textContent='error: '+e;}
}
refresh(); setInterval(refresh, 2000);
</script>
</body></html>
"""
