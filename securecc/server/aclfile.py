"""acl.yaml as the server sees it: re-read when it changes, the last good version kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger

from securecc.acl import SETTLE, Acl, AclError, AclUnstable, FileStamp, file_stamp, load_acl, read_acl_stable
from securecc.audit import AuditError
from securecc.server.clock import TimeSource


class AclFile:
    """acl.yaml, re-read when it changes; a broken edit keeps the last good ACL.

    A version is loaded only when it parses whole and did not change while
    it was read, and (on a change seen by a job) once it is ``SETTLE``
    seconds old, so a non-atomic editor's half-written save is never used.
    Its age is the wall-clock time since its change time (the kernel's
    stamp) or, where that lies ahead of this host's clock, how long this
    server has seen it unchanged, on ``clock`` (:mod:`securecc.server.clock`).
    """

    _log = Logger()

    def __init__(self, path: Path, clock: TimeSource, on_reload: Callable[..., None] | None = None) -> None:
        self.path = path
        self.clock = clock
        self.on_reload = on_reload
        self.acl: Acl = load_acl(path)  # a bad or changing file at start-up is fatal
        self._tried = self.acl.stamp  # the last version read, good or not
        self._seen: tuple[FileStamp | None, float] = (self._tried, clock.seconds())  # a version, and since when

    def current(self) -> Acl:
        """The ACL in force, re-read first if the file changed."""
        stamp = file_stamp(self.path)
        if stamp != self._tried:
            now = self.clock.seconds()
            if stamp != self._seen[0]:
                self._seen = (stamp, now)
            self.reload(settle=SETTLE, steady_for=now - self._seen[1])
        return self.acl

    def reload(self, settle: float = 0.0, steady_for: float = 0.0) -> None:
        """Re-read the file (on change, and at once on SIGHUP); keep the last good ACL if it is broken."""
        stamp = file_stamp(self.path)
        try:
            self.acl = read_acl_stable(self.path, settle, steady_for=steady_for)
            self._tried = self.acl.stamp
            self._log.info("reloaded ACL {path}", path=str(self.path))
            outcome: dict[str, object] = {"accepted": True}
        except AclUnstable as e:
            self._log.debug("ACL not reloaded yet: {error}", error=str(e))
            return  # the next job tries again
        except AclError as e:
            self._tried = stamp  # a broken edit is not re-read on every job
            self._log.error("ACL not reloaded, keeping the previous one: {error}", error=str(e))
            outcome = {"accepted": False, "detail": str(e)}
        if self.on_reload:
            try:
                self.on_reload(event="acl-reload", acl=str(self.path), **outcome)
            except AuditError as e:
                self._log.critical("{error}", error=str(e))
