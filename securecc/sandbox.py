"""Running one compile: scratch directory, bubblewrap command line, limits, kill.

:func:`command` is the one place the sandbox is defined; read it whole.  The
compiler sees a read-only ``/usr`` (and the ``/lib``, ``/bin`` links of a
merged-/usr system), a fresh ``/proc``, a minimal ``/dev``, an empty ``/tmp``,
the job directory at ``/job`` (``input``, the text to compile; ``output``),
and it runs in the client's working directory, recreated empty, where the
client's unpreprocessed main file (and, for jobs the server preprocesses,
its project headers) are mounted read-only at their own paths: debug info
then names the same directories as a local build and diagnostics quote the
same lines.  No network, no other pids, no capabilities, a clean
environment, rlimits, and - when the server runs as root - an unprivileged
uid taken before bubblewrap starts (``bwrap --uid`` as root would map to
root outside; see notes/infra.md).  Nothing else of the host is there: no
keytab, config, ACL, audit log, home directory or other job.

Killing the top process (bwrap) tears down the pid namespace, so a timeout or
a vanished client takes every child with it.  Where bubblewrap cannot run,
an admin may choose ``rlimits-only``: uid, rlimits, a clean environment and
a process group, and nothing more, which the server says at start and in
every audit record.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.python.failure import Failure

# Sandbox paths a client-chosen path may neither be, nor lie under.
_RESERVED = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/dev", "/job", "/sys", "/run")
_INPUT = "/job/input"
_OUTPUT = "/job/output"
MAX_STREAM = 4 * 1024 * 1024
"""Bytes of compiler stdout/stderr kept; the rest is dropped."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 1200.0  # wall clock, seconds
    cpu_seconds: int = 1200
    address_space: int = 4 << 30
    file_size: int = 256 << 20
    open_files: int = 256
    processes: int = 256  # RLIMIT_NPROC of the sandbox uid: every job together; enforced when root (setpriv)


def check_client_path(path: str) -> str | None:
    """Why ``path`` cannot be a mount point inside the sandbox, or None if it can."""
    if not path.startswith("/") or "\0" in path or "\n" in path:
        return "not an absolute path"
    if posixpath.normpath(path) != path.rstrip("/") and path != "/":
        return "not a normalized path"
    if len(path) > 4096:
        return "path too long"
    for reserved in _RESERVED:
        if path == reserved or path.startswith(reserved + "/"):
            return f"inside the sandbox's {reserved}"
    return None


def mount_point(cwd: str, source_path: str) -> str:
    """Where the client's source lives, as an absolute normalized path."""
    return posixpath.normpath(posixpath.join(cwd, source_path))


def _system_binds() -> list[str]:
    """Read-only /usr plus /lib*, /bin, /sbin as links (merged /usr) or binds."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


@dataclass(frozen=True)
class Settings:
    """How this server sandboxes every job (from its config)."""

    limits: Limits
    uid: int | None  # None: run as ourselves (a non-root server)
    gid: int | None
    mode: str = "bwrap"  # or "rlimits-only": no filesystem, network or pid isolation


@dataclass(frozen=True)
class Spec:
    """One compile.  Client-chosen paths must have passed :func:`check_client_path`."""

    compiler: str  # absolute path from the server's allowlist
    args: list[str]  # vetted by securecc.args; no input or output names
    job_dir: Path
    cwd: str
    source_path: str  # as the client wrote it, maybe relative to cwd
    environment: dict[str, str]  # vetted by securecc.args.check_environment
    mounts: tuple[tuple[str, str], ...] = ()  # (file in job_dir, absolute path inside), read-only
    preprocessed: bool = True  # compile job_dir/input; else the client's files at their paths
    compiler_root: str | None = None  # directory bound read-only for a compiler outside /usr


def command(spec: Spec, settings: Settings) -> list[str]:
    """The complete command line for one sandboxed compile.

    A ``preprocessed`` job compiles ``/job/input`` (named back to
    ``source_path`` in debug info); otherwise the compiler reads the
    client's files at their own paths and preprocesses them itself.
    """
    limits = settings.limits
    drop: list[str] = []
    if settings.uid is not None and settings.gid is not None:
        drop = ["setpriv", f"--reuid={settings.uid}", f"--regid={settings.gid}", "--clear-groups",
                "--no-new-privs", "--"]  # fmt: skip
    rlimits = [
        "prlimit",
        f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",  # SIGXCPU names the limit; SIGKILL a second later
        f"--as={limits.address_space}",
        f"--fsize={limits.file_size}",
        f"--nofile={limits.open_files}",
        "--core=0",
        *([f"--nproc={limits.processes}"] if drop else []),
        "--",
    ]
    environment = {"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp", "LC_ALL": "C", **spec.environment}
    if settings.mode == "rlimits-only":
        # Degraded: a process group to kill, a clean environment, the job
        # directory as cwd; the whole host filesystem stays visible.
        job = str(spec.job_dir)
        names = [f"-fdebug-prefix-map={job}/input={spec.source_path}", "-o", f"{job}/output", f"{job}/input"]
        env = ["env", "-i", *[f"{k}={v}" for k, v in environment.items() if k != "TMPDIR"], f"TMPDIR={job}"]
        return [*drop, *rlimits, "setsid", *env, spec.compiler, *spec.args, *names]
    bwrap = [
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        *_system_binds(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--tmpfs", "/tmp",
        *(["--ro-bind", spec.compiler_root, spec.compiler_root] if spec.compiler_root else []),
        "--bind", str(spec.job_dir), "/job",
        "--dir", spec.cwd,
        *[arg for name, target in spec.mounts for arg in ("--ro-bind", str(spec.job_dir / name), target)],
        "--chdir", spec.cwd,
        "--clearenv",
        *[arg for key, value in environment.items() for arg in ("--setenv", key, value)],
        "--",
    ]  # fmt: skip
    if spec.preprocessed:
        names = [f"-fdebug-prefix-map={_INPUT}={spec.source_path}", "-o", _OUTPUT, _INPUT]
    else:
        names = ["-o", _OUTPUT, spec.source_path]
    return [*drop, *rlimits, *bwrap, spec.compiler, *spec.args, *names]


# Signals and messages by which a limit ends a compile (the driver reports its cc1's death).
_LIMIT_SIGNALS = {signal.SIGXCPU: "cpu-limit", signal.SIGXFSZ: "file-size-limit"}
_LIMIT_MESSAGES = (
    (b"CPU time limit exceeded", "cpu-limit"),
    (b"File size limit exceeded", "file-size-limit"),
    (b"virtual memory exhausted", "memory-limit"),
    (b"out of memory", "memory-limit"),
    (b"Cannot allocate memory", "memory-limit"),
    (b"Resource temporarily unavailable", "process-limit"),
)


def limit_reached(exit_status: int, stderr: bytes) -> str | None:
    """Which rlimit ended a compile, as far as its status and messages tell."""
    if exit_status > 128 and exit_status - 128 in _LIMIT_SIGNALS:
        return _LIMIT_SIGNALS[signal.Signals(exit_status - 128)]
    if exit_status != 0:
        for message, limit in _LIMIT_MESSAGES:
            if message in stderr:
                return limit
    return None


@dataclass
class Outcome:
    exit_status: int  # the compiler's status; 128+N when killed by signal N
    stdout: bytes
    stderr: bytes
    output: bytes | None
    ended_by: str | None = None  # timeout / disconnect / shutdown (we killed it), or the rlimit that did


class _Collector(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred[int]) -> None:
        self.done = done
        self.streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        stream = self.streams.get(fd)
        if stream is not None and len(stream) < MAX_STREAM:
            stream += data[: MAX_STREAM - len(stream)]

    def processEnded(self, reason: Failure) -> None:
        status = getattr(reason.value, "status", None)
        code = 0
        if status is not None:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        self.done.callback(code)


class RunningJob:
    """A compile in progress: ``result`` fires with an :class:`Outcome`."""

    def __init__(
        self, reactor: IReactorProcess, clock: IReactorTime, argv: list[str], job_dir: Path, timeout: float,
        process_group: bool = False,
    ) -> None:  # fmt: skip
        self._job_dir = job_dir
        self._process_group = process_group
        self.ended_by: str | None = None
        done: defer.Deferred[int] = defer.Deferred()
        self._collector = _Collector(done)
        self._process = reactor.spawnProcess(
            self._collector, shutil.which(argv[0]) or argv[0], argv, env={"PATH": "/usr/bin:/bin"},
            path=str(job_dir), childFDs={0: "w", 1: "r", 2: "r"},
        )  # fmt: skip
        self._process.closeStdin()
        self._timer = clock.callLater(timeout, self.kill, "timeout")
        self.result: defer.Deferred[Outcome] = done.addCallback(self._finished)

    def kill(self, why: str) -> None:
        """Kill the whole sandbox: the pid namespace dies with bwrap (rlimits-only: the process group)."""
        if self.ended_by is None:
            self.ended_by = why
        try:
            if self._process_group and self._process.pid:
                os.killpg(self._process.pid, signal.SIGKILL)
            else:
                self._process.signalProcess(signal.SIGKILL)
        except (OSError, error.ProcessExitedAlready):
            pass

    def _finished(self, code: int) -> Outcome:
        if self._timer.active():
            self._timer.cancel()
        output = None
        path = self._job_dir / "output"
        if code == 0 and self.ended_by is None and path.is_file():
            output = path.read_bytes()
        stdout, stderr = bytes(self._collector.streams[1]), bytes(self._collector.streams[2])
        return Outcome(code, stdout, stderr, output, self.ended_by or limit_reached(code, stderr))


def make_job_dir(scratch: Path, job_id: str, files: dict[str, bytes], uid: int | None, gid: int | None) -> Path:
    """A private directory holding only this job's files; owned by the sandbox uid."""
    job_dir = scratch / job_id
    job_dir.mkdir(mode=0o700)
    for name, data in files.items():
        (job_dir / name).write_bytes(data)
        if uid is not None and gid is not None:
            os.chown(job_dir / name, uid, gid)
    if uid is not None and gid is not None:
        os.chown(job_dir, uid, gid)
    return job_dir


def prepare_scratch(scratch: Path, sandbox_uid: int | None) -> None:
    """The scratch root: traversable (not listable) by the sandbox uid only."""
    scratch.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch, 0o711 if sandbox_uid is not None else 0o700)
    if sandbox_uid is not None:
        for parent in scratch.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise PermissionError(
                    f"scratch directory {scratch} is out of the sandbox uid's reach ({parent} is closed to "
                    "other users): choose one under /var/lib/securecc, or open that directory (chmod o+x)"
                )
    for stale in scratch.iterdir():  # left behind by a crash
        shutil.rmtree(stale, ignore_errors=True)


def remove_job_dir(job_dir: Path) -> None:
    shutil.rmtree(job_dir, ignore_errors=True)

