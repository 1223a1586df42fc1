"""The per-user securecc agent: does the compiles the ``securecc`` shim hands it, over kept sessions.

The shim (``bin/securecc``) runs once per compile and can afford only a bare
interpreter start; this process pays the imports once and keeps each
server's authenticated connection open across jobs: one GSS-API handshake
per connection per ticket lifetime instead of one per job.  The server
still authorizes and audits every job, with the session's principal.

One agent per user and Kerberos environment (the shim names it by a hash
of the KRB5* variables, so terminals with different ccaches never share
one), started by the shim on first use, exiting after SECURECC_AGENT_IDLE
seconds (600) without a job.  Its socket lives in a directory that only
the user can enter, and both ends check the peer's uid (SO_PEERCRED).

Tickets are looked at for every job: a principal that changed gets its own
sessions, a destroyed or expired ticket closes every session and the job
is compiled locally with the usual message, and a renewed ticket is used
by the next handshake (a session is dropped a minute before its ticket
ends).

It also keeps the counters of ``securecc stats`` (:mod:`securecc.client.stats`)
and, once in its lifetime, tells the user when most compiles stayed local.

Run by the shim as ``python -I -m securecc.client.agent DIR NAME``.
"""

from __future__ import annotations

import functools
import io
import os
import select
import socket
import sys
import threading
import time
import traceback
from typing import cast

from securecc import protocol as wire
from securecc.client import agent_wire
from securecc.client import job as client
from securecc.client import stats as counters
from securecc.client.channel import Cancelled, Channel, HostFailure, KdcUnavailable, RemoteFailure, Timeouts
from securecc.client.hosts import Host, host_key


def _idle_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("SECURECC_AGENT_IDLE") or 600))
    except ValueError:
        return 600.0


IDLE = _idle_seconds()
MARGIN = 60.0  # seconds: a session this close to its ticket's end is not given another job
MAX_IDLE_SESSIONS = 32  # per server and principal: what a make -j32 keeps busy


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} securecc-agent[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


class SessionPool:
    """Authenticated channels to servers, kept between jobs, per server and principal."""

    def __init__(self, stats: counters.Stats | None = None) -> None:
        self._idle: dict[tuple[str, str], list[Channel]] = {}
        self._lock = threading.Lock()
        self._ticket: tuple[object, str, float] | None = None  # (ccache state, principal, ticket's end)
        self.handshakes = 0
        self.stats = stats or counters.Stats()

    def principal(self, deadline: float) -> str:
        """Whose ticket the next handshake would use; RemoteFailure if there is none.

        Asked of the ccache for every job (1.5 ms), except that a FILE ccache
        unchanged since the last job (same inode, size and mtime) and a ticket
        not yet ended give the same answer without asking.  With a client
        keytab and no ticket yet, asking means asking the KDC: bounded by
        ``deadline`` (:mod:`securecc.client.tickets`).
        """
        import gssapi
        from gssapi.raw.misc import GSSError

        from securecc.client import tickets
        from securecc.gss import explain, kdc_down

        state = ccache_state()
        cached = self._ticket
        if cached is not None and state is not None and cached[0] == state and time.time() < cached[2]:
            return cached[1]
        try:
            credentials = tickets.bounded("an initial ticket", lambda: gssapi.Credentials(usage="initiate"), deadline)
            principal, lifetime = str(credentials.name), credentials.lifetime
        except tickets.NoAnswer as e:
            raise KdcUnavailable(str(e), pending=e.pending) from None
        except GSSError as e:
            if kdc_down(e):
                raise KdcUnavailable(explain(e)) from None
            self._ticket = None
            self.close_all()  # kdestroy or an expired ticket: no job goes out on the old sessions
            raise RemoteFailure(explain(e)) from None
        if lifetime is not None and lifetime <= 0:
            self._ticket = None
            self.close_all()
            raise RemoteFailure("Kerberos ticket expired: run kinit")
        self._ticket = (state, principal, time.time() + (lifetime or 0))
        return principal

    def call(self, inv: client.Invocation, host: Host, job: wire.Job, timeouts: Timeouts) -> wire.Message:
        principal = self.principal(timeouts.kdc)
        key = (host_key(host), principal)
        channel = self._take(key)
        if channel is not None:
            channel.timeouts = timeouts
            try:
                reply = channel.call(job, inv.watch)
            except HostFailure as e:
                channel.close()
                if e.timed_out:
                    raise
                reply = None  # the server closed this idle session meanwhile: a fresh one below
            except BaseException:
                channel.close()
                raise
            if reply is not None:
                if not (isinstance(reply, wire.Refused) and reply.reason == wire.Reason.SESSION_EXPIRED):
                    self._give(key, channel)
                    return reply
                channel.close()
        channel = CountedChannel(host, self.stats, timeouts)
        try:
            channel.authenticate()  # its own credentials: MIT krb5 serializes the ticket requests made on one
            self.handshakes += 1
            self.stats.add("handshakes")
            reply = channel.call(job, inv.watch)
        except BaseException:
            channel.close()
            raise
        self._give(key, channel)
        return reply

    def _take(self, key: tuple[str, str]) -> Channel | None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                channel = idle.pop()
                if channel.expires - now > MARGIN and channel.idle_and_open():
                    return channel
                channel.close()
        return None

    def _give(self, key: tuple[str, str], channel: Channel) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE_SESSIONS:
                idle.append(channel)
                return
        channel.close()

    def close_all(self) -> None:
        with self._lock:
            channels = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for channel in channels:
            channel.close()


class CountingSocket:
    """A socket that adds the bytes it moves to the stats (``securecc stats``); the rest is the socket's."""

    def __init__(self, sock: socket.socket, stats: counters.Stats) -> None:
        self._sock, self._stats = sock, stats

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        self._stats.add("bytes", "sent", len(data))

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        self._stats.add("bytes", "received", len(data))
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


class CountedChannel(Channel):
    """A channel whose traffic (handshake, jobs, replies, heartbeats) the stats count."""

    def __init__(self, host: Host, stats: counters.Stats, timeouts: Timeouts) -> None:
        super().__init__(host, timeouts=timeouts)
        self.stats = stats

    def _connect(self) -> socket.socket:
        return cast(socket.socket, CountingSocket(super()._connect(), self.stats))  # a socket in all Channel uses


class JobSessions:
    """The pool as one job sees it: also notes whether a server returned a Result (the job went remote)."""

    def __init__(self, pool: SessionPool) -> None:
        self.pool = pool
        self.answered = False

    def call(self, inv: client.Invocation, host: Host, job: wire.Job, timeouts: Timeouts) -> wire.Message:
        reply = self.pool.call(inv, host, job, timeouts)
        self.answered = self.answered or isinstance(reply, wire.Result)
        return reply

    def __getattr__(self, name: str) -> object:
        return getattr(self.pool, name)


def ccache_state() -> tuple[int, int, int] | None:
    """Identity of a FILE ccache's current contents; None for other cache types (always asked)."""
    name = os.environ.get("KRB5CCNAME", "")
    if name.startswith("FILE:"):
        name = name[5:]
    if not name.startswith("/"):
        return None
    try:
        st = os.stat(name)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@functools.cache  # the one it started with, fixed for its life; sorting the environment cost 0.4 ms a job
def kerberos_environment() -> bytes:
    """The agent serves only the Kerberos environment it was started in (:mod:`securecc.client.agent_wire`)."""
    return agent_wire.kerberos_environment(os.environ)


@functools.cache
def kerberos_entries() -> dict[str, str]:
    """The same, entry by entry: KRB5ENV's newlines can join two environments alike (agent_wire.kerberos_entries)."""
    return agent_wire.kerberos_entries(os.environ)


def invocation(data: bytes, watch: socket.socket, out: io.BytesIO, err: io.BytesIO) -> client.Invocation | None:
    """The shim's request as an Invocation writing to ``out`` and ``err``; None if it is not for us (version,
    Kerberos environment)."""
    request = agent_wire.parse_request(data)
    if request is None or request.kerberos != kerberos_environment() or agent_wire.kerberos_entries(request.environ) != kerberos_entries():
        return None
    return client.Invocation(request.argv, request.environ, request.cwd, request.tty, out, err, request.umask, watch)


class Agent:
    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, name + ".sock")
        self.pid_path = os.path.join(directory, name + ".pid")
        self.stats = counters.Stats()
        self.pool = SessionPool(self.stats)
        self.active = 0
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def serve(self, ready: int) -> None:
        """Listen (we hold the name's lock, so a socket already there is a dead agent's), then serve until idle."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(256)
        inode = os.stat(self.path).st_ino
        with open(self.pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.close(ready)
        log(f"listening on {self.path}")
        import gssapi  # noqa: F401  (paid now, not by the first job)

        while True:
            if select.select([listener], [], [], min(5.0, IDLE))[0]:
                conn, _ = listener.accept()
                with self._lock:
                    self.active += 1
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
                continue
            with self._lock:
                idle = self.active == 0 and time.monotonic() - self.last > IDLE
            try:
                moved = os.stat(self.path).st_ino != inode
            except OSError:
                moved = True
            if idle or moved:
                break
        if not moved:
            os.unlink(self.path)
        listener.close()
        self.pool.close_all()
        log(f"exiting ({'idle' if idle else 'socket removed'}); {self.pool.handshakes} handshakes made")
        sys.stderr.write(self.stats.report())  # the counters die with us: their last state, in the log

    def handle(self, conn: socket.socket) -> None:
        try:
            peer = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            if int.from_bytes(peer[4:8], sys.byteorder) != os.getuid():
                log("refused a connection from another uid")
                return
            out, err = io.BytesIO(), io.BytesIO()
            try:
                inv = invocation(agent_wire.receive_request(conn), conn, out, err)
            except (ValueError, IndexError):
                inv = None
            if inv is None:
                conn.sendall(agent_wire.DIRECT)  # not ours to do: direct mode
                return
            if counters.is_command(inv.argv):
                said, complaint, status = counters.command(self.stats, inv.argv[2:])
                conn.sendall(agent_wire.result(status, said, complaint))
                return
            sessions = JobSessions(self.pool)
            try:
                outcome = client.run(inv, sessions)
            except Cancelled:
                return  # the shim is gone; closing its job's connection killed the compile
            except Exception:
                log(f"job failed inside the agent:\n{traceback.format_exc()}")
                conn.sendall(agent_wire.DIRECT)
                return
            self.count(inv, outcome, sessions.answered)
            if isinstance(outcome, client.LocalCompile):
                conn.sendall(agent_wire.run_locally(err.getvalue(), outcome.path, outcome.argv))
            else:
                conn.sendall(agent_wire.result(outcome, out.getvalue(), err.getvalue()))
        except OSError:
            pass  # the shim went away
        finally:
            conn.close()
            with self._lock:
                self.active -= 1
                self.last = time.monotonic()

    def count(self, inv: client.Invocation, outcome: int | client.LocalCompile, answered: bool) -> None:
        """Count the job; if it is the one that shows most compiles stay local, say so on its stderr (once)."""
        try:
            counted = counters.outcome_of(inv, outcome, answered)
            notice = self.stats.job(counted) if counted else None
        except Exception:  # the counters must never cost a job
            log(f"counting a job failed:\n{traceback.format_exc()}")
            return
        if notice:
            inv.say(notice)
            log(notice)


def daemonize() -> int:
    """Detach from the shim and its terminal; returns the write end of the readiness pipe.

    The shim waits for our first process, which exits once the agent
    listens (or has given up), so the shim then finds the socket.
    """
    os.closerange(3, 1 << 16)  # make's jobserver pipe and whatever else the shim inherited
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        os.read(ready_r, 1)
        os._exit(0)
    os.close(ready_r)
    os.setsid()
    os.chdir("/")
    return ready_w


def main(argv: list[str] | None = None) -> None:
    directory, name = (argv or sys.argv)[1:3]
    ready = daemonize()
    import fcntl

    lock = os.open(os.path.join(directory, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another agent of this name is running or starting: the shim will find it
    Agent(directory, name).serve(ready)


if __name__ == "__main__":
    main()
