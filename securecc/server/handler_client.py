"""The front's side of the job handler (:mod:`securecc.server.handler`): start it, send it jobs.

The front holds the secrets and never opens a path a job could influence:
it hands validated values to the handler and gets bytes back.  A handle per
job gives the server what it needs of a running compile: ``result`` (an
:class:`securecc.sandbox.Outcome`) and ``kill(why)``.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from securecc.sandbox import Outcome, Settings
from securecc.server.cache import Entry
from securecc.server.handler_link import LINK_FD, MAX_LINK_MESSAGE, LinkError, pack, unpack


class HandlerGone(Exception):
    """The job handler exited: no job can run until the server is restarted."""


class Running:
    """A compile in the handler: ``result`` fires with its :class:`Outcome`."""

    def __init__(self, link: HandlerLink, job_id: str) -> None:
        self._link, self.job_id = link, job_id
        self.result: defer.Deferred[Outcome] = defer.Deferred()

    def kill(self, why: str) -> None:
        self._link.send(pack("kill", id=self.job_id, why=why))


class HandlerLink(Int32StringReceiver):
    """The front's end of the socketpair."""

    MAX_LENGTH = MAX_LINK_MESSAGE
    _log = Logger()

    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.jobs: dict[str, Running] = {}
        self.lookups: dict[str, defer.Deferred[Entry | None]] = {}
        self.gone = False
        self.on_gone = lambda: None
        self._next = 0

    def send(self, message: bytes) -> None:
        if not self.gone:
            self.sendString(message)

    def run(self, job_id: str, spec: dict[str, Any], files: dict[str, bytes], timeout: float, output_cap: int) -> Running:
        """Start one sandboxed compile of validated values."""
        if self.gone:
            raise HandlerGone("the job handler has exited")
        running = self.jobs[job_id] = Running(self, job_id)
        self.send(pack("run", list(files.values()), id=job_id, spec=spec, files=list(files), timeout=timeout,
                       output_cap=output_cap))
        return running

    def cache_get(self, key: str) -> defer.Deferred[Entry | None]:
        if self.gone:
            return defer.succeed(None)
        self._next += 1
        request = str(self._next)
        d = self.lookups[request] = defer.Deferred()
        self.send(pack("cache-get", id=request, key=key))
        return d

    def cache_put(self, key: str, entry: Entry) -> None:
        self.send(pack("cache-put", [entry.stdout, entry.stderr, entry.output], key=key, producer=entry.producer))

    def cache_drop(self, key: str) -> None:
        """Remove an entry (a client reported its object diverged)."""
        if not self.gone:
            self.send(pack("cache-drop", key=key))

    def stringReceived(self, data: bytes) -> None:
        try:
            header, blobs = unpack(data)
            op = header["op"]
            if op == "ready":
                self.ready.callback(None)
            elif op == "fatal":
                self.ready.errback(HandlerGone(header["error"]))
            elif op == "done":
                stdout, stderr, output, dwo = blobs
                self.jobs.pop(header["id"]).result.callback(
                    Outcome(header["exit_status"], stdout or b"", stderr or b"", output, header["ended_by"], dwo))
            elif op == "cache-entry":
                producer = header["producer"]
                entry = Entry(blobs[0] or b"", blobs[1] or b"", blobs[2] or b"", producer) if producer else None
                self.lookups.pop(header["id"]).callback(entry)
            else:
                raise LinkError(f"unexpected {op}")
        except (LinkError, KeyError, ValueError) as e:
            self._log.critical("job handler sent a bad message ({error}); dropping it", error=repr(e))
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.gone = True
        gone = HandlerGone("the job handler has exited")
        if not self.ready.called:
            self.ready.errback(gone)
        for running in self.jobs.values():
            running.result.errback(gone)
        for lookup in self.lookups.values():
            lookup.callback(None)
        self.jobs, self.lookups = {}, {}
        self.on_gone()


class _Process(protocol.ProcessProtocol):
    def processEnded(self, reason: object) -> None:
        Logger().info("job handler exited: {reason}", reason=str(getattr(reason, "value", reason)))


def start(reactor: Any, settings: Settings, handler_settings: dict[str, Any]) -> HandlerLink:
    """Spawn the handler (as root: under the sandbox uid, its groups cleared) and connect to it.

    This is the server's one root step for jobs: ``setpriv`` drops to the
    handler's uid before Python starts, so nothing of the front is inherited.
    """
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-I", "-m", "securecc.server.handler"]
    if settings.uid is not None and settings.gid is not None:
        argv = ["/usr/bin/setpriv", f"--reuid={settings.uid}", f"--regid={settings.gid}", "--clear-groups",
                "--no-new-privs", "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}  # the admin's, for bwrap and setpriv
    reactor.spawnProcess(_Process(), argv[0], argv, env=env, path="/", childFDs={0: "w", 1: 2, 2: 2, LINK_FD: back.fileno()})
    back.close()
    link = HandlerLink()
    front.setblocking(False)
    reactor.adoptStreamConnection(front.fileno(), socket.AF_UNIX, protocol.Factory.forProtocol(lambda: link))
    front.close()
    link.send(pack("start", settings={**handler_settings, "limits": asdict(settings.limits), "uid": settings.uid,
                                      "gid": settings.gid, "mode": settings.mode}))
    return link
