"""Running one compile: scratch directory, bubblewrap command line, limits, kill.

:func:`command` is the one place the sandbox is defined; read it whole.  The
compiler sees a read-only ``/usr`` (and the ``/lib``, ``/bin`` links of a
merged-/usr system), a minimal ``/dev``, an empty ``/tmp``,
the job directory at ``/job`` (``input``, the text to compile; ``output``),
and it runs in the client's working directory, recreated empty, where the
client's unpreprocessed main file (and, for jobs the server preprocesses,
its project headers) are at their own paths in a read-only tree: debug info
then names the same directories as a local build and diagnostics quote the
same lines.  No network (no socket of any kind: a system call allowlist, :data:`ALLOWED_SYSCALLS`), no other
pids, no capabilities, no user namespace of its own, a clean
environment, rlimits, and - when the server runs as root - the unprivileged
uid of the job handler (:mod:`securecc.server.handler`), which starts bubblewrap
(``bwrap --uid`` as root would map to root outside; see notes/infra.md).
Only ``/job/output`` is writable, and it is one file bound in place: the
compile cannot replace it with a link, create files, or fill a tmpfs.  Nothing else of the host is there: no
keytab, config, ACL, audit log, home directory or other job, and no ``/proc`` or ``/sys``:
a compiler needs neither (the client expands ``-march=native``; clang finds itself from its
path when ``/proc/self/exe`` is missing), and ``/proc/self/mountinfo`` names the scratch
directory.  It also saves bwrap a mount: ~0.3 ms of wall and of CPU a job (bench/README.md).

Killing the top process (bwrap) tears down the pid namespace, so a timeout or
a vanished client takes every child with it.  Where bubblewrap cannot run,
an admin may choose ``rlimits-only``: uid, rlimits, a clean environment and
a process group, and nothing more, which the server says at start and in
every audit record.

Why one file of ~830 lines: the sandbox's command line, its system call filter, its limits, the
reading of its outputs and the removal of what a job leaves are one security decision, reviewed together.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import mmap
import os
import resource
import shutil
import signal
import stat
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.python.failure import Failure

_INPUT = "/job/input"
_OUTPUT = "/job/output"
MAX_STREAM = 4 * 1024 * 1024
"""Bytes of compiler stdout/stderr kept; the rest is dropped."""
OUTPUT = "output"
"""The one file of the job directory a compile may write: created empty, bound writable at /job/output."""
SPLIT_DIR = "out"
"""With ``-gsplit-dwarf``, an empty directory bound writable at the object's own directory instead:
gcc's ``objcopy --strip-dwo`` rewrites the object through a temporary file beside it, and the object
names its ``.dwo`` by path.  The job's files in it are bound read-only on top; the outputs are read from it
as from ``output`` (no links, own, one link, capped).  Such a job can create files there, on the
scratch disk, each capped by RLIMIT_FSIZE but not their number or total: until its timeout a hostile job can
take the scratch file system's space or inodes, which is why etc/securecc-server.service gives scratch a
capped file system of its own; nothing else is writable."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 1200.0  # wall clock, seconds
    cpu_seconds: int = 1200
    address_space: int = 4 << 30
    file_size: int = 256 << 20
    open_files: int = 256
    processes: int = 256  # RLIMIT_NPROC of the sandbox uid: every job together; enforced when root (setpriv)


DEVICES = ["--dir", "/dev", *[arg for name in ("null", "zero", "urandom") for arg in ("--dev-bind", f"/dev/{name}", f"/dev/{name}")]]
"""A /dev of the three devices a compile may open (cc1 seeds itself from urandom), in the read-only root: not bwrap's
``--dev``, a tmpfs of its own without a size, with /dev/shm, /dev/pts and a tty besides."""


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
    uid: int | None  # the job handler's own uid, which its sandboxes run as; None: a non-root server's
    gid: int | None
    mode: str = "bwrap"  # or "rlimits-only": no filesystem, network or pid isolation


@dataclass(frozen=True)
class Spec:
    """One compile.  Client-chosen paths must have passed :func:`securecc.jobspec.validate`."""

    compiler: str  # absolute path from the server's allowlist
    args: list[str]  # vetted by securecc.args; no input or output names
    job_dir: Path
    cwd: str
    source_path: str  # as the client wrote it, maybe relative to cwd
    environment: dict[str, str]  # vetted by securecc.args.check_environment
    mounts: tuple[tuple[str, str], ...] = ()  # (job file, absolute path inside): in the job's TREE, read-only
    preprocessed: bool = True  # compile job_dir/input; else the client's files at their paths
    compiler_root: str | None = None  # directory bound read-only for a compiler outside /usr
    # -gsplit-dwarf: the object as the client names it, its path and its .dwo's, in one directory
    # (SPLIT_DIR): the object names the .dwo (DW_AT_dwo_name), so both go where the client has them
    split_dwarf: tuple[str, str, str] | None = None
    directories: tuple[str, ...] = ()  # created empty (validated mount points): a path like empty/../inc resolves

    @functools.cached_property
    def laid_out(self) -> Tree:
        """:func:`tree`, worked out once per job (asked ~7 times a job, 0.12 ms each at 100 headers) and
        kept as long as the job's Spec, not beyond: a job's paths may take megabytes."""
        return _lay_out(self)


INFO_FD = 3  # bwrap writes the sandbox's inner pid here (--info-fd), for RunningJob.kill
KILL_WAIT = 0.25  # seconds a kill waits for bwrap to name its inner process (it takes milliseconds)


BLOCK_FD = 4  # with command(block_fd=...), bwrap waits on it, set up, before it runs the compiler (RunningJob)
SECCOMP_FD = 5  # with command(seccomp_fd=...), bwrap reads the compile's system call filter here (RunningJob)

ALLOWED_SYSCALLS = (
    # A process's own life: start, threads, children (within the sandbox's pid namespace), signals, limits, time.
    "execve", "execveat", "exit", "exit_group", "clone", "clone3", "fork", "vfork", "wait4", "waitid", "kill", "tkill",
    "tgkill", "getpid", "getppid", "gettid", "getpgrp", "getpgid", "setpgid", "getsid", "setsid", "set_tid_address",
    "set_robust_list", "get_robust_list", "rseq", "futex", "arch_prctl", "sched_yield", "sched_getaffinity",
    "sched_setaffinity", "sched_getparam", "sched_getscheduler", "getpriority", "setpriority", "rt_sigaction",
    "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait", "sigaltstack", "pause",
    "alarm", "getitimer", "setitimer", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun",
    "timer_delete", "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time", "times",
    "getrusage", "getrlimit", "setrlimit", "prlimit64", "umask", "uname", "sysinfo", "getrandom", "membarrier",
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "capget",
    # Memory.
    "brk", "mmap", "munmap", "mprotect", "mremap", "msync",
    # Files, in the sandbox's own tree: read-only but for the output, which rlimits cap.  Not fallocate (ext4 lets
    # FALLOC_FL_KEEP_SIZE past RLIMIT_FSIZE), mkdir, chmod or links (a directory of mode 0 or thousands deep in
    # -gsplit-dwarf's writable directory), flock (a lock on a host file in /usr), fadvise64, readahead or mincore
    # (which of /usr's files other jobs read, from the page cache): no compile makes them.
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "lseek",
    "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3", "fsync", "fdatasync",
    "ftruncate", "truncate", "sendfile", "copy_file_range", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs",
    "fstatfs", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents", "getdents64", "getcwd",
    "chdir", "fchdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "fchmod", "utimensat", "getxattr",
    "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr", "pipe", "pipe2", "poll", "ppoll", "select",
    "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2",
)
"""The system calls a compile may make (ioctl, fcntl, prctl, madvise: :data:`ALLOWED_REQUESTS`): what gcc, clang and the tools
they run need (and bash and Python, which the tests' compilers are), on the process itself and the files of its
tree.  Any other call fails with ENOSYS, as on a kernel without it, so that glibc's fallbacks from newer calls still
run: no socket of any kind nor io_uring (which makes sockets without socket(2)), so the sandbox needs no network
namespace of its own; no bpf, userfaultfd, perf_event_open, keyctl, ptrace, process_vm_*, pidfd_*, mount or
namespace call, none of the calls kernel exploits most often reach, and none the kernel adds later.  A call of
another ABI (i386's ``int 0x80``, x32) kills the process (SIGSYS), so none of them is reachable by another number."""
ALLOWED_REQUESTS = {
    # Only these values of one argument (its index first) of these calls.  ioctl: a terminal's questions (there is
    # none: isatty, its size) and descriptor flags, no file system's own ioctls (btrfs would make a subvolume the
    # handler cannot remove).  fcntl: dup and flags, no locks, leases or signals on descriptors.
    "ioctl": (1, (termios.TCGETS, termios.TIOCGWINSZ, termios.TIOCGPGRP, termios.FIONREAD, termios.FIOCLEX,
                  termios.FIONCLEX)),
    "fcntl": (1, (fcntl.F_DUPFD, fcntl.F_DUPFD_CLOEXEC, fcntl.F_GETFD, fcntl.F_SETFD, fcntl.F_GETFL, fcntl.F_SETFL)),
    # prctl: its parent-death signal, dumpability, a thread's name, and read-only questions (PR_SET/GET_PDEATHSIG 1-2,
    # PR_GET/SET_DUMPABLE 3-4, PR_SET/GET_NAME 15-16, PR_CAPBSET_READ 23, PR_GET_SECUREBITS 27, PR_SET/GET_NO_NEW_PRIVS
    # 38-39).  Not PR_SET_MEMORY_MERGE, nor madvise's MADV_MERGEABLE: with KSM on, merged pages would tell by their
    # timing what memory other jobs hold.  madvise: the advice an allocator gives, not hole punching or poisoning.
    "prctl": (0, (1, 2, 3, 4, 15, 16, 23, 27, 38, 39)),
    "madvise": (2, (mmap.MADV_NORMAL, mmap.MADV_RANDOM, mmap.MADV_SEQUENTIAL, mmap.MADV_WILLNEED, mmap.MADV_DONTNEED,
                    mmap.MADV_FREE, mmap.MADV_DONTFORK, mmap.MADV_DOFORK, mmap.MADV_HUGEPAGE, mmap.MADV_NOHUGEPAGE,
                    mmap.MADV_DONTDUMP, mmap.MADV_DODUMP)),
}


@functools.cache
def seccomp_program() -> bytes:
    """:data:`ALLOWED_SYSCALLS` as the BPF program bwrap loads before it runs the compile (libseccomp, through
    pyseccomp); computed once, at the job handler's start, which fails without libseccomp.  A name this
    architecture does not have (x86-64's legacy calls elsewhere) stays refused."""
    import errno

    import pyseccomp

    arch = pyseccomp.system_arch()
    program = pyseccomp.SyscallFilter(pyseccomp.ERRNO(errno.ENOSYS))
    program.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    program.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)  # a binary tree of the calls, not a list (bench/README.md)
    for name in ALLOWED_SYSCALLS:
        if pyseccomp.resolve_syscall(arch, name) >= 0:
            program.add_rule(pyseccomp.ALLOW, name)
    for name, (argument, requests) in ALLOWED_REQUESTS.items():  # compared in full (64 bits)
        for request in requests:
            program.add_rule(pyseccomp.ALLOW, name, pyseccomp.Arg(argument, pyseccomp.EQ, request))
    out = os.memfd_create("securecc-seccomp", os.MFD_CLOEXEC)
    try:
        with open(out, "wb", closefd=False) as f:
            program.export_bpf(f)
        return os.pread(out, os.fstat(out).st_size, 0)
    finally:
        os.close(out)


def seccomp_file() -> int:
    """A memory file holding :func:`seccomp_program`, for bwrap to read from the start (one per sandbox)."""
    fd = os.memfd_create("securecc-seccomp", os.MFD_CLOEXEC)
    os.write(fd, seccomp_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass(frozen=True)
class Rlimit:
    resource: int  # resource.RLIMIT_*
    option: str  # prlimit(1)'s name for it
    soft: int
    hard: int


def rlimits(settings: Settings) -> tuple[Rlimit, ...]:
    """Every rlimit a compile runs under: the one list, set by prlimit(1) in front of the sandbox or by
    :class:`RunningJob` on bwrap's inner process before it may go on."""
    limits = settings.limits
    return (
        Rlimit(resource.RLIMIT_CPU, "cpu", limits.cpu_seconds, limits.cpu_seconds + 1),  # SIGXCPU names it; SIGKILL 1 s later
        Rlimit(resource.RLIMIT_AS, "as", limits.address_space, limits.address_space),
        Rlimit(resource.RLIMIT_FSIZE, "fsize", limits.file_size, limits.file_size),
        Rlimit(resource.RLIMIT_NOFILE, "nofile", limits.open_files, limits.open_files),
        Rlimit(resource.RLIMIT_CORE, "core", 0, 0),
        *([Rlimit(resource.RLIMIT_NPROC, "nproc", limits.processes, limits.processes)] if settings.uid is not None else []),  # the uid's
    )


def command(spec: Spec, settings: Settings, info_fd: int | None = INFO_FD, block_fd: int | None = None,
            memory: list[int] | None = None, seccomp_fd: int | None = None, probe: list[str] | None = None) -> list[str]:
    """The complete command line for one sandboxed compile.

    A ``preprocessed`` job compiles ``/job/input`` (named back to
    ``source_path`` in debug info); otherwise the compiler reads the
    client's files at their own paths and preprocesses them itself.

    The rlimits (:func:`rlimits`) come from ``prlimit`` in front of bwrap,
    except with ``block_fd`` (bwrap mode, and ``info_fd`` given): then bwrap
    sets the sandbox up and waits, before it runs anything of the job, for
    :class:`RunningJob` to set them on its inner process, which saves an exec
    a job (0.9 ms).  ``memory``: the sizes of the tree's files, which come
    from :func:`memory_files` at :data:`FILE_FD` and after (bwrap mode).
    ``seccomp_fd``: where bwrap reads :func:`seccomp_program`; the filter then
    keeps the compile off every network, so the sandbox keeps the host's
    network namespace (empty of any socket it could make), else it gets one of
    its own.  ``probe``: a command run instead of the compile, in the same
    sandbox (the job handler's start-up check that the filter holds).
    """
    blocked = block_fd is not None and info_fd is not None and settings.mode != "rlimits-only"
    rlimit_argv = [] if blocked else \
        ["prlimit", *(f"--{r.option}={r.soft}:{r.hard}" for r in rlimits(settings)), "--"]
    environment = {"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp", "LC_ALL": "C", **spec.environment}
    if settings.mode == "rlimits-only":
        # Degraded: a process group to kill, a clean environment, the job
        # directory as cwd; the whole host filesystem stays visible.
        job = str(spec.job_dir)
        names = [f"-fdebug-prefix-map={job}/input={spec.source_path}", "-o", f"{job}/{OUTPUT}", f"{job}/input"]
        env = ["env", "-i", *[f"{k}={v}" for k, v in environment.items() if k != "TMPDIR"], f"TMPDIR={job}"]
        return [*rlimit_argv, "setsid", *env, spec.compiler, "-pipe", *spec.args, *names]
    bwrap = [
        "bwrap",
        "--unshare-all",
        *(["--share-net", "--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),  # no socket(2): ALLOWED_SYSCALLS
        "--unshare-user", "--disable-userns",  # no user namespace of its own: no tmpfs of its choosing, less kernel to reach
        "--die-with-parent",
        "--new-session",
        *(["--info-fd", str(info_fd)] if info_fd is not None else []),
        *(["--block-fd", str(block_fd)] if blocked else []),
        "--cap-drop", "ALL",
        *_system_binds(),
        *DEVICES,
        "--size", str(_TMP_SIZE + _tmp_bytes(spec, memory)), "--tmpfs", "/tmp",
        "--ro-bind", str(spec.job_dir), "/job",
        "--bind", str(spec.job_dir / OUTPUT), _OUTPUT,
        *_job_binds(spec, memory is not None),
        # Nothing else is writable: not /tmp (gcc -pipe needs no temporary files), not /dev (its devices aside), not the job's
        # input, not the root the mounts were made in.  The output is one file capped by RLIMIT_FSIZE.
        "--remount-ro", "/tmp",
        "--remount-ro", "/",
        "--chdir", spec.cwd,
        "--clearenv",
        *[arg for key, value in environment.items() for arg in ("--setenv", key, value)],
        "--",
    ]
    output = spec.split_dwarf[0] if spec.split_dwarf else _OUTPUT
    if probe is not None:
        return [*rlimit_argv, *bwrap, *probe]
    if spec.preprocessed:
        names = [f"-fdebug-prefix-map={_INPUT}={spec.source_path}", "-o", output, _INPUT]
    else:
        names = ["-o", output, spec.source_path]
    return [*rlimit_argv, *bwrap, spec.compiler, "-pipe", *spec.args, *names]


# Signals and messages by which a limit or the system call filter ends a compile (the driver reports its cc1's death).
_LIMIT_SIGNALS = {signal.SIGXCPU: "cpu-limit", signal.SIGXFSZ: "file-size-limit",
                  signal.SIGSYS: "system-call-refused"}  # a call by another ABI's number (ALLOWED_SYSCALLS)
_LIMIT_MESSAGES = (
    (b"CPU time limit exceeded", "cpu-limit"),
    (b"File size limit exceeded", "file-size-limit"),
    (b"virtual memory exhausted", "memory-limit"),
    (b"out of memory", "memory-limit"),
    (b"Cannot allocate memory", "memory-limit"),
    (b"Resource temporarily unavailable", "process-limit"),
    (b"Bad system call", "system-call-refused"),  # gcc's driver, of its cc1 or as killed so
)


TREE = "tree"
"""The job's files at their own paths (``tree/ABS/PATH``), made by :func:`make_job_dir` and bound
read-only where they lie: one mount per top-level directory, not one per header (a bind costs ~0.25 ms
of bwrap's start; a header-heavy job sends dozens)."""


MEMORY_FILES = 512
"""A job with at most this many files in its tree (and see :func:`most_memory_files`) gives them to bwrap as
memory files (``--file FD PATH``), which bwrap writes into the sandbox's own root tmpfs, read-only with the rest
of ``/`` once it is set up: on ext4 a header's data blocks cost more (``bench/sandbox_overhead.py --tree 100``:
40.9 ms of CPU a job against 31.8 ms).  A job with more (jobspec allows 20,000) has its tree on the scratch
disk: each descriptor stays open in the handler until bwrap has started, under the handler's open-file limit."""
FILE_FD = 6  # the first of the memory files' descriptors in bwrap, one per tree file in tree_files() order
_SETUP_FDS = 32  # what bwrap opens besides, as it sets the sandbox up (uid map, mountinfo, each file it writes)


@dataclass(frozen=True)
class Tree:
    """Where a job's tree is bound, and what else lies inside it."""

    roots: tuple[str, ...]  # per top-level name, the deepest directory holding all its files
    singles: tuple[str, ...]  # files bound one by one: directly under /, or under the -gsplit-dwarf directory
    directories: tuple[str, ...]  # made inside the tree: a later mount's point, or a directory the job names
    elsewhere: tuple[str, ...]  # directories the job names outside the tree, made by bwrap (--dir)


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + "/") for root in roots)


def tree(spec: Spec) -> Tree:
    """How :func:`command` binds ``spec``'s files and directories, and :func:`make_job_dir` lays them out.

    A directory bound over the tree hides what the tree has there, so files under the writable
    ``-gsplit-dwarf`` directory are bound one by one on top of it, as is a file directly under ``/``
    (the tree is never bound at ``/``)."""
    return spec.laid_out


def _lay_out(spec: Spec) -> Tree:
    split = os.path.dirname(spec.split_dwarf[1]) if spec.split_dwarf else None
    singles = tuple(t for _, t in spec.mounts if os.path.dirname(t) == "/" or (split and _inside(t, (split,))))
    groups: dict[str, list[str]] = {}
    for _, target in spec.mounts:
        if target not in singles:
            groups.setdefault(target.split("/")[1], []).append(os.path.dirname(target))
    roots = tuple(sorted(os.path.commonpath(parents) for parents in groups.values()))
    named = (spec.cwd, *spec.directories)
    points = tuple(p for p in (split, spec.compiler_root) if p)
    return Tree(roots, singles, tuple(d for d in (*named, *points) if _inside(d, roots)),
                tuple(d for d in named if not _inside(d, roots)))


def tree_files(spec: Spec) -> list[tuple[str, str]]:
    """(job file, path inside) of the files that make up the tree: every mount but the singles."""
    singles = set(tree(spec).singles)
    return [(name, target) for name, target in spec.mounts if target not in singles]


_TMP_SIZE = 65536  # the empty /tmp's tmpfs, read-only once set up, holds only what bwrap itself puts there


def _tmp_bytes(spec: Spec, memory: list[int] | None) -> int:
    """What the memory files under /tmp (a client that builds in /tmp) take of its tmpfs, in whole pages."""
    page = resource.getpagesize()
    return sum(-(-size // page) * page for size, (_, target) in zip(memory or [], tree_files(spec)) if target.startswith("/tmp/"))


def most_memory_files(limits: Limits) -> int:
    """The most tree files a job gives bwrap as memory files: :data:`MEMORY_FILES`, and few enough for the
    compile's open-file limit, which RunningJob sets on bwrap's inner process as soon as it is named, while
    bwrap still holds every memory file and opens more to set the sandbox up (256: 219 files)."""
    return min(MEMORY_FILES, limits.open_files - FILE_FD - _SETUP_FDS)


def tree_in_memory(spec: Spec, limits: Limits) -> bool:
    """Whether bwrap makes the tree from memory files rather than binding it from the disk."""
    return len(tree_files(spec)) <= most_memory_files(limits)


def memory_files(spec: Spec, files: dict[str, bytes]) -> list[int]:
    """A memory file per tree file, in :func:`tree_files` order, for bwrap to read from the start; the
    caller closes them once bwrap has started."""
    fds: list[int] = []
    try:
        for name, _ in tree_files(spec):
            fd = os.memfd_create("securecc-job-file", os.MFD_CLOEXEC)
            fds.append(fd)
            with memoryview(files[name]) as view:
                while view:
                    view = view[os.write(fd, view) :]
            os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _job_binds(spec: Spec, in_memory: bool = False) -> list[str]:
    """The job's part of the command line: ancestors before what is mounted inside them, then the
    directories outside the tree.  ``in_memory``: the tree's directories and files are made by bwrap in
    its root (:func:`memory_files`), before any bind, so a bind inside the tree lies on top as before."""
    laid = tree(spec)
    made = [*[arg for d in laid.directories for arg in ("--dir", d)],
            *[arg for n, (_, target) in enumerate(tree_files(spec)) for arg in ("--file", str(FILE_FD + n), target)]] \
        if in_memory else []
    split = [(os.path.dirname(spec.split_dwarf[1]), "--bind", str(spec.job_dir / SPLIT_DIR))] if spec.split_dwarf else []
    binds = sorted([
        *([] if in_memory else [(root, "--ro-bind", f"{spec.job_dir / TREE}{root}") for root in laid.roots]),
        *[(single, "--ro-bind", f"{spec.job_dir / TREE}{single}") for single in laid.singles],
        *split,
        *([(spec.compiler_root, "--ro-bind", spec.compiler_root)] if spec.compiler_root else []),
    ])
    return [*made, *[arg for target, how, source in binds for arg in (how, source, target)],
            *[arg for directory in laid.elsewhere for arg in ("--dir", directory)]]


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
    dwo: bytes | None = None  # -gsplit-dwarf's second output


class _Collector(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred[int], on_info: Callable[[bytes], None] | None = None) -> None:
        self.done = done
        self.streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray(), INFO_FD: bytearray()}
        self._on_info = on_info

    def childDataReceived(self, fd: int, data: bytes) -> None:
        stream = self.streams.get(fd)
        if stream is not None and len(stream) < MAX_STREAM:
            stream += data[: MAX_STREAM - len(stream)]

    def childConnectionLost(self, fd: int) -> None:
        if fd == INFO_FD and self._on_info is not None:
            self._on_info(bytes(self.streams[INFO_FD]))

    def processEnded(self, reason: Failure) -> None:
        status = getattr(reason.value, "status", None)
        code = 0
        if status is not None:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        self.done.callback(code)


def _block_pipe() -> tuple[int, int]:
    """(bwrap's end, ours) of the pipe bwrap waits on with --block-fd.  bwrap goes on at end of file as at a byte
    (it ignores what read() returns), so its end is the pipe reopened read-write: the pipe always has a writer,
    and closing ours unwritten (a handler that dies, a kill, a failure) leaves the sandbox waiting, never running
    the compile without its limits."""
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        both = os.open(f"/proc/self/fd/{read}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        os.close(write)
        raise
    finally:
        os.close(read)
    return both, write


@contextlib.contextmanager
def _nproc_for_new_namespaces(limits: tuple[Rlimit, ...] | None) -> Iterator[None]:
    """RLIMIT_NPROC counts a process in every user namespace up to the first: in the sandbox's own namespace
    against its own limit (set later, on the inner process), and as one of the uid's against the limit of
    whoever created that namespace, taken at its creation: bwrap's, a copy of ours.  So bwrap is started under
    the job's soft limit, or the uid's cap over every job together would not hold; ours is put back at once."""
    nproc = next((r for r in limits or () if r.resource == resource.RLIMIT_NPROC), None)
    if nproc is None:
        yield
        return
    saved = resource.getrlimit(resource.RLIMIT_NPROC)
    hard = saved[1]
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc.soft if hard == resource.RLIM_INFINITY else min(nproc.soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, saved)


class RunningJob:
    """A compile in progress: ``result`` fires with an :class:`Outcome`."""

    def __init__(
        self, reactor: IReactorProcess, clock: IReactorTime, argv: list[str], job_dir: Path, timeout: float,
        process_group: bool = False, output_cap: int = Limits().file_size, split_dwarf: tuple[str, str] | None = None,
        limits: tuple[Rlimit, ...] | None = None, files: list[int] | None = None, seccomp: bool = False,
    ) -> None:
        self._limits = limits  # to set on bwrap's inner process before it goes on (argv made with command(block_fd=BLOCK_FD))
        self._inner_pid: int | None = None
        self._job_dir = job_dir
        self._split_dwarf = split_dwarf  # the object's and the .dwo's names in SPLIT_DIR
        self._output_cap = output_cap
        self._process_group = process_group
        self.ended_by: str | None = None
        self._inner: int | None = None  # a pidfd of bwrap's inner process, once --info-fd named it
        self._named = process_group  # bwrap has said who its inner process is (or closed --info-fd unsaid)
        self._clock = clock
        self._pending_kill: IDelayedCall | None = None
        self._go: int | None = None  # the write end of the pipe bwrap waits on at BLOCK_FD
        done: defer.Deferred[int] = defer.Deferred()
        self._collector = _Collector(done, None if process_group else self._inner_started)
        blocked = _block_pipe() if limits else None
        fds: dict[int, str | int] = {0: "w", 1: "r", 2: "r", **({} if process_group else {INFO_FD: "r"})}
        if blocked is not None:
            fds[BLOCK_FD], self._go = blocked
        fds.update({FILE_FD + n: fd for n, fd in enumerate(files or [])})  # memory_files(): bwrap closes each once read
        program = seccomp_file() if seccomp else None  # argv made with command(seccomp_fd=SECCOMP_FD)
        if program is not None:
            fds[SECCOMP_FD] = program
        # No working directory in bwrap mode (bwrap --chdir sets the compile's): with one, Twisted forks
        # and runs Python in the child rather than posix_spawn, ~5 ms of the handler's CPU a job.
        try:
            with _nproc_for_new_namespaces(limits):
                self._process = reactor.spawnProcess(
                    self._collector, shutil.which(argv[0]) or argv[0], argv, env={"PATH": "/usr/bin:/bin"},
                    path=str(job_dir) if process_group else None, childFDs=fds,
                )
        except BaseException:
            self._close_go()
            raise
        finally:
            if blocked is not None:
                os.close(blocked[0])
            if program is not None:
                os.close(program)
        self._process.closeStdin()
        self._timer = clock.callLater(timeout, self.kill, "timeout")
        self.result: defer.Deferred[Outcome] = done.addCallback(self._finished)

    def kill(self, why: str) -> None:
        """Kill the whole sandbox (rlimits-only: the process group).

        bwrap's inner process first, the pid namespace's init (killed, it
        takes the namespace with it), then the outer one.  An outer killed
        between its clone and its --info-fd report leaves the inner unnamed,
        blocked for ever on the outer's go-ahead and not yet set to die with
        it (measured: a leftover init holding the job's pipes, so the job
        never ended).  So a kill that comes before bwrap has named its inner
        process waits until it does (milliseconds), or KILL_WAIT.
        """
        if self.ended_by is None:
            self.ended_by = why
        if self._process_group:
            try:
                if self._process.pid:
                    os.killpg(self._process.pid, signal.SIGKILL)
            except OSError:
                pass
            return
        if not self._named:
            if self._pending_kill is None:
                self._pending_kill = self._clock.callLater(KILL_WAIT, self._kill_now)
            return
        self._kill_now()

    def _kill_now(self) -> None:
        if self._inner is None:
            self._kill_children()
        self._kill_inner()
        try:
            self._process.signalProcess(signal.SIGKILL)
        except (OSError, error.ProcessExitedAlready):
            pass

    def _kill_children(self) -> None:
        """The outer's children, killed before it: its inner process, when bwrap did not name it within KILL_WAIT (a
        loaded host).  Left alive it waits for ever on the outer's go-ahead or on BLOCK_FD, holding the job's pipes,
        so the job would never end.  The outer is stopped first, and its list read once it is: a clone under way has
        then finished and no other can start; and no pid in the list can have been reused while the outer lives."""
        pid = self._process.pid
        try:
            os.kill(pid, signal.SIGSTOP)
            for _ in range(200):  # microseconds as a rule; at most 0.1 s, on this rare path only
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] in ("T", "t", "Z", "X"):
                        break
                time.sleep(0.0005)
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(child) for child in f.read().split()]
        except (OSError, ValueError, TypeError, IndexError):
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass

    def _inner_started(self, info: bytes) -> None:
        """Pin bwrap's inner process by a pidfd, then finish a kill that waited for it, or let the compile go on."""
        self._named = True
        try:
            self._pin_inner(info)
        finally:
            if self.ended_by is None and self._limits is not None:
                self._release()
            if self.ended_by is not None:
                if self._pending_kill is not None and self._pending_kill.active():
                    self._pending_kill.cancel()
                self._kill_now()

    def _release(self) -> None:
        """Set the rlimits on the pinned inner process, which waits on BLOCK_FD, then let it run the compiler; a
        sandbox whose limits cannot be set never runs it (ended_by: handler-error)."""
        assert self._limits is not None
        if self._inner is None or self._inner_pid is None:  # bwrap failed before naming it (its message says why)
            self.ended_by = "handler-error"
            return
        try:
            for limit in self._limits:
                resource.prlimit(self._inner_pid, limit.resource, (limit.soft, limit.hard))
            signal.pidfd_send_signal(self._inner, 0)  # still the process pinned: its pid was not reused meanwhile
            assert self._go is not None
            os.write(self._go, b"1")
            self._close_go()
        except (OSError, ValueError) as e:
            self._collector.streams[2] += f"securecc: the sandbox's limits could not be set ({e})\n".encode()
            self.ended_by = "handler-error"

    def _close_go(self) -> None:
        if self._go is not None:
            os.close(self._go)
            self._go = None

    def _pin_inner(self, info: bytes) -> None:
        """The pidfd, provided the pid is still the init of the sandbox's own pid namespace (not a pid
        reused meanwhile by another process of this uid)."""
        try:
            named = json.loads(info)
            pid, namespace = named["child-pid"], named["pid-namespace"]
            if not (isinstance(pid, int) and pid > 1):
                return
            pidfd = os.pidfd_open(pid)
        except (ValueError, KeyError, TypeError, OSError):  # no info (bwrap failed early) or the process is gone
            return
        try:
            if os.stat(f"/proc/{pid}/ns/pid").st_ino != namespace:
                raise OSError("another process")
        except OSError:
            os.close(pidfd)
            return
        self._inner, self._inner_pid = pidfd, pid

    def _kill_inner(self) -> None:
        if self._inner is not None:
            try:
                signal.pidfd_send_signal(self._inner, signal.SIGKILL)
            except OSError:
                pass

    def _finished(self, code: int) -> Outcome:
        for timer in (self._timer, self._pending_kill):
            if timer is not None and timer.active():
                timer.cancel()
        if self._inner is not None:
            os.close(self._inner)
            self._inner = None
        self._close_go()
        output = dwo = None
        if code == 0 and self.ended_by is None:
            try:
                if self._split_dwarf:
                    output, dwo = (read_output(self._job_dir / SPLIT_DIR, self._output_cap, n) for n in self._split_dwarf)
                else:
                    output = read_output(self._job_dir, self._output_cap)
            except OutputError as e:
                code, self.ended_by, output = 1, "bad-output", None
                self._collector.streams[2] += f"securecc: {e}\n".encode()
        stdout, stderr = bytes(self._collector.streams[1]), bytes(self._collector.streams[2])
        return Outcome(code, stdout, stderr, output, self.ended_by or limit_reached(code, stderr), dwo)


class OutputError(Exception):
    """The compile left something other than a plain file of its own as its output."""


def read_output(job_dir: Path, cap: int, name: str = OUTPUT) -> bytes:
    """The job's output file ``name``, opened without following links, checked to be a regular file
    of ours (the handler's uid, which the sandbox writes as) and at most ``cap`` bytes."""
    try:  # the directory too: -gsplit-dwarf's is the compile's, which may have set its mode to 0
        directory = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=directory)
        finally:
            os.close(directory)
    except OSError as e:
        raise OutputError(f"the compile's output cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise OutputError("the compile's output is not a plain file of its own")
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise OutputError(f"the compile's output exceeds {cap} bytes")
    return data


def make_job_dir(scratch: Path, job_id: str, files: dict[str, bytes], spec: Spec | None = None,
                 in_memory: bool = False) -> Path:
    """A directory (0700) holding only this job's files and its empty output, made by the handler,
    whose uid bwrap and the sandbox run as: no other uid can enter it.  The files ``spec`` mounts go
    into its :data:`TREE` at their paths (validated by :mod:`securecc.server.jobspec`; checked again here, as
    they become names in this directory), with the directories :func:`tree` puts there; ``in_memory``,
    only the singles (the rest is :func:`memory_files`')."""
    if "/" in job_id or job_id in ("", ".", ".."):
        raise ValueError(f"bad job id {job_id!r}")
    job_dir = scratch / job_id
    job_dir.mkdir(mode=0o700)
    placed = {name: _tree_path(target) for name, target in spec.mounts} if spec else {}
    elsewhere = {name for name, _ in tree_files(spec)} if spec and in_memory else set()
    inside = [_tree_path(d) for d in tree(spec).directories] if spec else []  # checked either way
    top = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    made: set[str] = set()

    def make(directory: str) -> None:  # and its parents: a fresh tree of ours, with no links in it
        if directory and directory not in made:
            make(os.path.dirname(directory))
            os.mkdir(directory, 0o700, dir_fd=top)
            made.add(directory)

    try:
        if spec:
            for directory in [SPLIT_DIR] * bool(spec.split_dwarf) + inside * (not in_memory):
                make(directory)
        for name, data in {**files, OUTPUT: b""}.items():
            if name in elsewhere:
                continue
            path = placed.get(name, name)
            make(os.path.dirname(path))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=top)
            try:
                with memoryview(data) as view:
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
    finally:
        os.close(top)
    return job_dir


def _tree_path(target: str) -> str:
    """``target``'s name in the job directory (relative to it)."""
    if not target.startswith("/") or target.startswith("//") or os.path.normpath(target) != target or target == "/":
        raise ValueError(f"bad path in the job's tree: {target!r}")
    return TREE + target


def prepare_scratch(scratch: Path) -> None:
    """The handler's scratch root, emptied of what a crash left behind (never followed through links)."""
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(scratch, 0o700)
    for stale in scratch.iterdir():
        if stale.is_dir() and not stale.is_symlink():
            remove_job_dir(stale)
        else:
            stale.unlink(missing_ok=True)


def remove_job_dir(job_dir: Path) -> None:
    """The job directory and everything in it, whatever the compile made of its writable part (``-gsplit-dwarf``'s
    :data:`SPLIT_DIR`, which it may set to mode 0): each directory is made ours again (0700) before it is entered,
    and the walk holds one descriptor and no recursion, however deep.  No link is followed.  The compile has ended:
    nothing changes under the walk.  What cannot be removed stays, for the handler's next start."""
    with contextlib.suppress(OSError):
        _remove_tree(job_dir)


def _remove_tree(top: Path) -> None:
    below: list[str] = []  # the names from top down to fd's directory
    if stat.S_ISDIR(os.lstat(top).st_mode):
        os.chmod(top, 0o700)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        while True:
            directory = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        directory = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)  # a file or a link, as it is met
            if directory is not None:
                os.chmod(directory, 0o700, dir_fd=fd)  # a directory, not a link (is_dir above): ours, so this works
                child = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
                below.append(directory)
            elif below:
                parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = parent
                os.rmdir(below.pop(), dir_fd=fd)
            else:
                break
    finally:
        os.close(fd)
    os.rmdir(top)

