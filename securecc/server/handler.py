"""The job handler: the unprivileged process that touches everything a job could influence.

``securecc-server`` starts it before it loads any secret (as root: under a
uid of its own, ``sandbox.uid``, via ``setpriv``), and talks to it over a
socketpair (:mod:`securecc.server.handler_link`).  It makes the scratch
directories, starts the sandboxes, reads their outputs (no links followed,
see :func:`securecc.sandbox.read_output`), and keeps the result cache's
files.  It holds no keytab, GSS context, audit key, config file or ACL and
cannot read them: their files belong to the front.  A compromised sandbox
or handler reaches the jobs in flight and the cache, nothing secret.

Run as ``python -I -m securecc.server.handler``; the link is file descriptor 3.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, threads
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from securecc import sandbox
from securecc.server.cache import Entry, ResultCache
from securecc.server.handler_link import LINK_FD, MAX_LINK_MESSAGE, LinkError, pack, unpack
from securecc.toolchain import HeaderDigests

_FILE_NAME = re.compile(r"[a-z0-9-]{1,32}")
_CACHE_KEY = re.compile(r"[0-9a-f]{64}")


def settings_from(data: dict[str, Any]) -> sandbox.Settings:
    return sandbox.Settings(sandbox.Limits(**data["limits"]), data["uid"], data["gid"], data["mode"])


def sandboxed(settings: sandbox.Settings, spec: sandbox.Spec, job_dir: Path, timeout: float, output_cap: int,
              split_dwarf: tuple[str, str] | None = None, memory: list[int] | None = None,
              probe: list[str] | None = None) -> sandbox.RunningJob:
    """A compile started as every job's is, the self-test's included: under bwrap, which waits on BLOCK_FD until
    RunningJob has set its rlimits (no prlimit exec) and filters the compile's system calls (SECCOMP_FD); a process
    group under prlimit in rlimits-only mode.
    ``memory``: the job's tree as :func:`securecc.sandbox.memory_files` (bwrap mode), else it is on the disk.
    ``probe``: the self-test's command instead of the compile."""
    contained = settings.mode == "bwrap"
    sizes = [os.fstat(fd).st_size for fd in memory] if memory is not None else None
    command = sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD if contained else None, memory=sizes,
                              seccomp_fd=sandbox.SECCOMP_FD if contained else None, probe=probe)
    return sandbox.RunningJob(reactor, reactor, command, job_dir, timeout, process_group=not contained, output_cap=output_cap,
                              limits=sandbox.rlimits(settings) if contained else None, split_dwarf=split_dwarf, files=memory,
                              seccomp=contained)


HANDLER_FAILED = "securecc: the server could not run this job (its error, not yours; its log names job {}): compile again\n"
SELF_TEST_FAILED = ("the sandbox cannot compile ({}); check that bubblewrap works here (or, knowing what it costs, set "
                    "sandbox.mode: rlimits-only) and that the scratch directory is reachable by the sandbox uid")
FILTER_FAILED = ("the sandbox's system call filter does not hold ({}): a compile could reach the network; check that this "
                 "bubblewrap loads --seccomp filters")
PROBE_FAILED = "the sandbox cannot run the handler's own interpreter ({}), which proves its system call filter at start"
# Run in the sandbox once the self-test's compile has passed: the filter is proven by what it refuses, not by its loading.
SOCKET_PROBE = """import socket
for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_NETLINK):
    try:
        socket.socket(family, socket.SOCK_DGRAM if family == socket.AF_NETLINK else socket.SOCK_STREAM).close()
    except OSError:
        continue
    raise SystemExit(f"a socket of {family.name} was made")
try:
    socket.socketpair()
except OSError:
    pass
else:
    raise SystemExit("a socket of AF_UNIX was made (socketpair)")
"""


def socket_probe() -> tuple[list[str], str | None]:
    """The handler's own interpreter, run in the sandbox on :data:`SOCKET_PROBE`, and what to bind for it outside /usr:
    the installation a venv's interpreter comes from (its ``python`` may be a copy, outside that installation)."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return [interpreter, "-I", "-S", "-c", SOCKET_PROBE], None if interpreter.startswith("/usr/") else sys.base_prefix


def _last_words(outcome: sandbox.Outcome | Failure) -> str:
    """What a failed self-test said last: bwrap's or the compiler's own words before ours."""
    lines = outcome.stderr.decode(errors="replace").strip().splitlines() if isinstance(outcome, sandbox.Outcome) else [str(outcome)]
    theirs = [line for line in lines if not line.startswith("securecc:")] or lines
    return theirs[-1] if theirs else str(getattr(outcome, "exit_status", "?"))


class HandlerProtocol(Int32StringReceiver):
    """The handler's side of the link: runs what the front asks, answers with outcomes."""

    MAX_LENGTH = MAX_LINK_MESSAGE

    def __init__(self) -> None:
        self.settings: sandbox.Settings | None = None
        self.scratch = Path("/nonexistent")
        self.cache: ResultCache | None = None
        self.running: dict[str, sandbox.RunningJob] = {}
        self.checking: dict[str, str | None] = {}  # jobs whose headers are being compared: id -> why killed
        self.digests = HeaderDigests()

    def stringReceived(self, data: bytes) -> None:
        try:
            header, blobs = unpack(data)
            getattr(self, "_" + header.pop("op").replace("-", "_"))(blobs, **header)
        except (LinkError, KeyError, TypeError, ValueError, OSError) as e:
            print(f"securecc-handler: dropping the link: {e!r}", file=sys.stderr)
            self.transport.loseConnection()

    def _start(self, blobs: list[bytes | None], settings: dict[str, Any]) -> None:
        try:
            self.settings = settings_from(settings)
            self.scratch = Path(settings["scratch"])
            sandbox.prepare_scratch(self.scratch)
            if settings.get("cache_path"):
                self.cache = ResultCache(Path(settings["cache_path"]), settings["cache_max"])
            job_dir = sandbox.make_job_dir(self.scratch, "self-test", {"input": b"int securecc_probe;\n"})
            spec = sandbox.Spec(settings["probe"], ["-x", "c", "-c"], job_dir, "/build", "probe.c", {}, compiler_root=settings["probe_root"])
            test = sandboxed(self.settings, spec, job_dir, 60, self.settings.limits.file_size)
        except Exception as e:  # a start that fails in any way says so: the front would wait for ever
            self.sendString(pack("fatal", error=str(e)))
            return
        test.result.addBoth(self._tested, job_dir)

    def _tested(self, outcome: sandbox.Outcome | Failure, job_dir: Path) -> None:
        """The self-test compiled a trivial file once, so a broken setup fails at start-up; then, with bubblewrap, it
        tries to make sockets in the sandbox (:data:`SOCKET_PROBE`): ready, or fatal."""
        assert self.settings is not None
        sandbox.remove_job_dir(job_dir)
        if not (isinstance(outcome, sandbox.Outcome) and outcome.exit_status == 0 and outcome.output):
            self.sendString(pack("fatal", error=SELF_TEST_FAILED.format(_last_words(outcome))))
            return
        if self.settings.mode != "bwrap":  # no filter to prove: the server says so at start and in every record
            self.sendString(pack("ready"))
            return
        try:
            probe, root = socket_probe()
            job_dir = sandbox.make_job_dir(self.scratch, "socket-probe", {})
            spec = sandbox.Spec(probe[0], [], job_dir, "/build", "probe", {}, compiler_root=root)
            test = sandboxed(self.settings, spec, job_dir, 60, 0, probe=probe)
        except OSError as e:
            self.sendString(pack("fatal", error=str(e)))
            return
        test.result.addBoth(self._probed, job_dir)

    def _probed(self, outcome: sandbox.Outcome | Failure, job_dir: Path) -> None:
        sandbox.remove_job_dir(job_dir)
        if isinstance(outcome, sandbox.Outcome) and outcome.exit_status == 0:
            self.sendString(pack("ready"))
            return
        made = isinstance(outcome, sandbox.Outcome) and b" was made" in outcome.stderr
        self.sendString(pack("fatal", error=(FILTER_FAILED if made else PROBE_FAILED).format(_last_words(outcome))))

    def _run(self, blobs: list[bytes | None], id: str, spec: dict[str, Any], files: list[str], timeout: float,
             output_cap: int) -> None:
        """Compare the job's system headers with this host's (in a thread: reading them may take a while
        the first time), then start its sandbox."""
        if not all(_FILE_NAME.fullmatch(name) for name in files) or len(files) != len(blobs):
            raise LinkError("bad job file names")
        headers, digest = spec.pop("system_headers"), spec.pop("system_digest")
        self.checking[id] = None
        d = threads.deferToThread(self.digests.of, headers) if headers or digest else defer.succeed(digest)
        d.addCallback(self._checked, digest, id, spec, {n: b or b"" for n, b in zip(files, blobs)}, timeout, output_cap)
        d.addErrback(self._done, id, self.scratch / id)

    def _checked(self, ours: str, theirs: str, id: str, spec: dict[str, Any], files: dict[str, bytes], timeout: float,
                 output_cap: int) -> None:
        assert self.settings is not None
        killed = self.checking.pop(id)
        if killed is not None:
            self._done(sandbox.Outcome(1, b"", b"", None, killed), id, self.scratch / id)
            return
        if ours != theirs:
            message = b"securecc: this server's system headers differ from the client's: objects would differ\n"
            self._done(sandbox.Outcome(1, b"", message, None, "system-headers-differ"), id, self.scratch / id)
            return
        split = spec.pop("split_dwarf")
        spec["split_dwarf"] = tuple(split) if split else None
        spec["directories"] = tuple(spec["directories"])
        mounts = tuple((name, target) for name, target in spec.pop("mounts"))
        job_spec = sandbox.Spec(job_dir=self.scratch / id, mounts=mounts, **spec)
        in_memory = self.settings.mode == "bwrap" and sandbox.tree_in_memory(job_spec, self.settings.limits)
        memory = None
        try:
            job_dir = sandbox.make_job_dir(self.scratch, id, files, job_spec, in_memory)
            memory = sandbox.memory_files(job_spec, files) if in_memory else None
        except OSError as e:  # a full disk (or memory) fails this job, not the handler
            self._done(sandbox.Outcome(1, b"", f"securecc: the server cannot store the job ({e.strerror})\n".encode(),
                                       None, "handler-error"), id, self.scratch / id)
            return
        try:
            job = sandboxed(self.settings, job_spec, job_dir, timeout, output_cap,
                            (os.path.basename(split[1]), os.path.basename(split[2])) if split else None, memory)
        except BaseException:
            sandbox.remove_job_dir(job_dir)
            raise
        finally:
            for fd in memory or []:
                os.close(fd)
        self.running[id] = job
        job.result.addBoth(self._done, id, job_dir)

    def _done(self, outcome: sandbox.Outcome, id: str, job_dir: Path) -> None:
        self.running.pop(id, None)
        self.checking.pop(id, None)
        if not isinstance(outcome, sandbox.Outcome):  # ours, not the client's: the details go to the server's log only
            print(f"securecc-handler: job {id} failed: {outcome.getTraceback() if isinstance(outcome, Failure) else outcome!r}",
                  file=sys.stderr)
            outcome = sandbox.Outcome(1, b"", HANDLER_FAILED.format(id).encode(), None, "handler-error")
        self.sendString(pack("done", [outcome.stdout, outcome.stderr, outcome.output, outcome.dwo], id=id,
                             exit_status=outcome.exit_status, ended_by=outcome.ended_by))
        threads.deferToThread(sandbox.remove_job_dir, job_dir)  # while the answer goes: nobody waits for the unlinks

    def _kill(self, blobs: list[bytes | None], id: str, why: str) -> None:
        if id in self.checking:
            self.checking[id] = self.checking[id] or why
        job = self.running.get(id)
        if job is not None:
            job.kill(why)

    def _cache_get(self, blobs: list[bytes | None], id: str, key: str) -> None:
        def send(entry: Entry | None) -> None:
            if entry is None:
                self.sendString(pack("cache-entry", id=id, producer=None))
            else:
                self.sendString(pack("cache-entry", [entry.stdout, entry.stderr, entry.output], id=id, producer=entry.producer))

        d = threads.deferToThread(self.cache.get, key) if self.cache else defer.succeed(None)
        d.addErrback(lambda f: print(f"securecc-handler: cache read failed: {f.value!r}", file=sys.stderr))
        d.addCallback(send)

    def _cache_put(self, blobs: list[bytes | None], key: str, producer: dict[str, str]) -> None:
        stdout, stderr, output = blobs
        if self.cache and output is not None:
            d = threads.deferToThread(self.cache.put, key, Entry(stdout or b"", stderr or b"", output, producer))
            d.addErrback(lambda f: print(f"securecc-handler: cache write failed: {f.value!r}", file=sys.stderr))

    def _cache_drop(self, blobs: list[bytes | None], key: str) -> None:
        if self.cache and _CACHE_KEY.fullmatch(key):
            threads.deferToThread(self.cache.drop, key).addErrback(
                lambda f: print(f"securecc-handler: cache drop failed: {f.value!r}", file=sys.stderr))

    def connectionLost(self, reason: object = None) -> None:
        for job in list(self.running.values()):  # the front is gone: nobody to compile for
            job.kill("shutdown")
        reactor.callLater(0.5, reactor.stop)


def main() -> None:
    os.umask(0o077)
    link = socket.socket(fileno=LINK_FD)
    link.setblocking(False)
    factory = protocol.Factory.forProtocol(HandlerProtocol)
    reactor.adoptStreamConnection(link.fileno(), socket.AF_UNIX, factory)
    link.close()
    reactor.run()


if __name__ == "__main__":
    main()
