"""The first step of a handshake, bounded: the one that may ask the KDC for a service ticket.

libkrb5 gives a KDC that does not answer about 27 s per request, and MIT
krb5 1.20 (Debian 12) has no setting that shortens it (``request_timeout``
came later).  So the step runs in a daemon thread and the job waits at most
its deadline; a job that gives up compiles locally.  While a request for
a server's ticket is still out, the next job does not start another one
(nor pile up threads): it waits for that one (:func:`bounded`).

A ticket already in the ccache answers in about a millisecond, so a short
deadline during a KDC outage keeps cached tickets working and costs a job
that needs a new one almost nothing.  No TCP connection is open meanwhile:
the caller connects only once it holds the token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from securecc.gss import GSSFailure, Initiator
from securecc.handshake import InitiatorContext

T = TypeVar("T")


class NoAnswer(Exception):
    """The KDC did not answer within the deadline, or (``pending``) a request for this server is still out."""

    def __init__(self, message: str, pending: bool = False) -> None:
        super().__init__(message)
        self.pending = pending


class _Request:
    def __init__(self, gives_up: float, deadline: float) -> None:
        self.done = threading.Event()
        self.gives_up = gives_up  # when the job that started it stops waiting (monotonic)
        self.deadline = deadline


_pending: dict[str, _Request] = {}  # requests that have not returned (in this process), by what they ask for
_lock = threading.Lock()


def bounded(key: str, request: Callable[[], T], deadline: float) -> T:
    """``request()``'s result, or NoAnswer after ``deadline`` seconds; what ``request`` raises is raised here.

    The request runs on in its thread after a timeout, and meanwhile no
    second request for ``key`` starts.  A job that finds one out waits for
    it as long as its starter does (a healthy KDC answers in milliseconds,
    and then the ticket is cached for everyone; a loaded one may take
    longer, and a job that gave up early would compile here for nothing),
    and not at all once its starter gave up: the KDC is not answering.  So
    an outage costs the jobs under way when it begins one deadline, once.
    """
    now = time.monotonic()
    end = now + deadline
    while True:
        with _lock:
            running = _pending.get(key)
            if running is None:
                mine = _pending[key] = _Request(end, deadline)
                break
        if not running.done.wait(max(0.0, min(end, running.gives_up) - time.monotonic())):
            if time.monotonic() >= running.gives_up:  # its starter gave up: that is an unanswered request
                raise NoAnswer(f"the Kerberos KDC did not answer within {running.deadline:g} s")
            raise NoAnswer(f"a ticket request for {key} is still waiting for the KDC", pending=True)
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(request())
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting job, which raises it
            outcome.append(e)
        finally:
            with _lock:
                del _pending[key]
            mine.done.set()

    threading.Thread(target=run, name=f"ticket request {key}", daemon=True).start()
    if not mine.done.wait(max(0.0, end - time.monotonic())):
        raise NoAnswer(f"the Kerberos KDC did not answer within {deadline:g} s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def first_token(initiator: InitiatorContext, deadline: float) -> bytes:
    """``initiator.step()`` within ``deadline`` (NoAnswer); GSSFailure as the step raises it."""
    return bounded(initiator.principal, lambda: initiator.step() or b"", deadline)


def obtainable(target: str, deadline: float) -> bool:
    """Whether a ticket for ``target`` is had within ``deadline``: during a KDC outage, whether one is
    cached.  Asked before a job is preprocessed, so a job that cannot go remote does not pay for it."""
    try:
        first_token(Initiator(target), deadline)
        return True
    except (NoAnswer, GSSFailure):
        return False
