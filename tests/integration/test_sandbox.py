"""Attacks on the sandbox, against the real server, bubblewrap and gcc.

Most attacks use a test-only allowlisted "compiler" (a bash script bound in
with the config's ``root``) that does what the first line of its input says.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import local, make_job, securecc
from test_job_path import authenticated_channel, sandbox_processes, wait_until

from securecc import protocol as wire

EVIL_IDENTITY = "evilcc version 1.0; target x86_64-linux-gnu"
EVILCC = r"""#!/bin/bash
if [ "$1" = -v ]; then echo "evilcc version 1.0" >&2; echo "Target: x86_64-linux-gnu" >&2; exit 0; fi
input="${@: -1}"
read -r action argument < "$input"
echo "evilcc: $action" >&2
case "$action" in
  connect) exec 3<>"/dev/tcp/127.0.0.1/$argument" && echo connected ;;
  read) cat "$argument" ;;
  write) echo pwned > "$argument" && echo wrote ;;
  kill) kill -9 "$argument"; kill -9 -1; echo "still here" ;;
  forkbomb) bomb() { bomb | bomb & }; bomb; sleep 60 ;;
  bigfile) exec head -c 10G /dev/zero > /job/output ;;
  spin) while :; do :; done ;;
  daemon) setsid sleep 600 & disown; exit 0 ;;
  whoami) id -u; id -g; ls /; exec python3 -I -S -c 'import ctypes
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
assert ctypes.CDLL(None).capget(header, data) == 0
print("CapEff: %016x" % (data[0] | data[3] << 32), "CapPrm: %016x" % (data[1] | data[4] << 32), sep="\n")' ;;
  fds) exec python3 -I -S -c 'import os, stat
for fd in range(4096):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        continue
    print(fd, "socket" if stat.S_ISSOCK(mode) else "pipe" if stat.S_ISFIFO(mode) else stat.filemode(mode))' ;;
  limits) exec python3 -I -S -c 'import resource
for name in ("CPU", "FSIZE", "AS", "NOFILE", "CORE", "NPROC"):
    print(name, *resource.getrlimit(getattr(resource, "RLIMIT_" + name)))' ;;
  userns) unshare -Urm sh -c 'mount -t tmpfs none /tmp && echo mounted' ;;
  unix) exec python3 -I -S -c 'import socket, sys
listener = socket.socket(socket.AF_UNIX)
listener.connect("\0" + sys.argv[1])
print("connected")' "$argument" ;;
  uring) exec python3 -I -S -c 'import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(425, 4, ctypes.create_string_buffer(120))  # io_uring_setup(4, &params) on x86-64
print("io_uring", "made" if fd >= 0 else os.strerror(ctypes.get_errno()))' ;;
  syscall) exec python3 -I -S -c 'import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
print("call", "returned" if libc.syscall(int(sys.argv[1]), 0, 0, 0, 0, 0, 0) >= 0 else os.strerror(ctypes.get_errno()))' "$argument" ;;
  requests) exec python3 -I -S -c 'import fcntl, os
fd = os.open("/usr/bin/gcc", os.O_RDONLY)
def attempt(name, call):
    try:
        call()
        print(name, "allowed")
    except OSError as e:
        print(name, os.strerror(e.errno))
attempt("F_GETFD", lambda: fcntl.fcntl(fd, fcntl.F_GETFD))
attempt("F_SETLK", lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
attempt("FS_IOC_GETFLAGS", lambda: fcntl.ioctl(fd, 0x80086601, bytes(8)))
attempt("TCGETS", lambda: os.isatty(0) or fcntl.ioctl(0, 0x5401, bytes(60)))
import ctypes, mmap
libc = ctypes.CDLL(None, use_errno=True)
def prctl(*args):
    if libc.prctl(*args, 0, 0, 0) < 0:
        raise OSError(ctypes.get_errno(), "")
attempt("PR_SET_NAME", lambda: prctl(15, b"cc1"))
attempt("PR_SET_MEMORY_MERGE", lambda: prctl(67, 1))
memory = mmap.mmap(-1, 1 << 16)
attempt("MADV_DONTNEED", lambda: memory.madvise(mmap.MADV_DONTNEED))
attempt("MADV_MERGEABLE", lambda: memory.madvise(mmap.MADV_MERGEABLE))' ;;
  i386) "$(dirname "$0")/i386-socket"; echo "status $?" ;;
  i386exec) exec "$(dirname "$0")/i386-socket" ;;
esac
exit 3
"""


# socket(AF_INET, SOCK_STREAM, 0) by i386's system call number (359), through int 0x80 from a 64-bit process.
I386_SOCKET = b"""#include <stdio.h>
int main(void) {
    long fd;
    __asm__ volatile ("int $0x80" : "=a"(fd) : "a"(359L), "b"(2L), "c"(1L), "d"(0L) : "memory");
    printf("i386 socket: %ld\\n", fd);
    return 0;
}
"""


@pytest.fixture(scope="module")
def evil(realm, tmp_path_factory):
    """A server whose allowlist holds the evil compiler, with small limits."""
    from conftest import start_server

    root = evil_root(realm)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    script = root / "bin" / "evilcc"
    script.write_text(EVILCC)
    script.chmod(0o755)
    subprocess.run(["gcc", "-O2", "-o", root / "bin" / "i386-socket", "-x", "c", "-"], input=I386_SOCKET, check=True)
    compilers = {"gcc": "/usr/bin/gcc", "evilcc": {"path": str(script), "root": str(root), "timeout": 4}}
    s = start_server(realm, realm.dir / "evil-server", compilers=compilers,
                     limits={"cpu_seconds": 2, "file_size": 10 << 20, "processes": 64})
    yield s
    s.stop()


def run_evil(evil, realm, monkeypatch, workdir, action: str) -> wire.Message:
    channel = authenticated_channel(evil, realm, monkeypatch)
    try:
        job = make_job("evilcc", [], "c", "-c", str(workdir), "x.c", f"{action}\n".encode(),
                       compiler_identity=EVIL_IDENTITY)
        reply = channel.call(job)
    finally:
        channel.close()
    if isinstance(reply, wire.Result):  # proof that the attack really ran
        assert f"evilcc: {action.split()[0]}".encode() in reply.stderr, reply.stderr
    else:
        assert isinstance(reply, wire.Refused) and reply.reason == "timeout", reply
    return reply


def assert_contained(evil, reply: wire.Message) -> None:
    """The attack did not succeed, nothing of the job survives, the server still serves."""
    assert isinstance(reply, (wire.Result, wire.Refused))
    assert wait_until(lambda: not sandbox_processes(), 10), sandbox_processes()
    assert evil.alive()
    scratch = Path(yaml_scratch(evil))  # removed while the answer goes (handler.py): soon after, not before it
    assert wait_until(lambda: not list(scratch.iterdir()), 10), "scratch not cleaned"


def yaml_scratch(server) -> str:
    import yaml

    return yaml.safe_load(server.config_path.read_text())["sandbox"]["scratch"]


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_no_network(evil, realm, monkeypatch, workdir, family):
    """No connection to a listener on the host: TCP on its loopback, nor an abstract Unix socket. The sandbox shares
    the host's network namespace but can make no socket (a namespace of its own would have hidden that one too)."""
    with socket.socket(socket.AF_INET if family == "tcp" else socket.AF_UNIX) as listener:
        if family == "tcp":
            listener.bind(("127.0.0.1", 0))
            action = f"connect {listener.getsockname()[1]}"
        else:
            name = f"securecc-test-{os.getpid()}-{time.monotonic_ns()}"
            listener.bind("\0" + name)
            action = f"unix {name}"
        listener.listen()
        listener.settimeout(0.5)
        reply = run_evil(evil, realm, monkeypatch, workdir, action)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and b"connected" not in reply.stdout
    assert b"Function not implemented" in reply.stderr, reply.stderr  # socket(2) itself, not the connection
    assert_contained(evil, reply)


def test_no_io_uring(evil, realm, monkeypatch, workdir):
    """io_uring makes sockets without socket(2): the filter refuses io_uring_setup as well."""
    reply = run_evil(evil, realm, monkeypatch, workdir, "uring")
    assert isinstance(reply, wire.Result) and reply.stdout == b"io_uring Function not implemented\n", reply.stdout


# x86-64's numbers of calls a compile never makes: two that exploits reach; four newer than libseccomp 2.5, which the
# filter's former denylist therefore let through; and what an attack on the allowlist used: fallocate (ext4 lets
# FALLOC_FL_KEEP_SIZE past RLIMIT_FSIZE: the output filled the scratch disk), mkdir and chmod (a directory of mode 0,
# or 3,000 deep, that the handler could not remove), flock (a host file in /usr locked), fadvise64 and mincore
# (which headers other jobs read, from the page cache).
NOT_ALLOWED = {"bpf": 321, "userfaultfd": 323, "statmount": 457, "listmount": 458, "mseal": 462, "open_tree_attr": 467,
               "fallocate": 285, "mkdir": 83, "chmod": 90, "link": 86, "symlink": 88, "flock": 73, "fadvise64": 221,
               "mincore": 27}


@pytest.mark.parametrize("name", NOT_ALLOWED)
def test_a_call_off_the_allowlist_does_not_exist_in_the_sandbox(evil, realm, monkeypatch, workdir, name):
    """Whatever the call, and however new: refused as a kernel without it would (ENOSYS), so glibc's fallbacks run."""
    import ctypes

    if platform.machine() != "x86_64":
        pytest.skip("the call numbers here are x86-64's")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(NOT_ALLOWED[name], 0, 0, 0, 0, 0, 0) < 0 and ctypes.get_errno() == errno.ENOSYS:
        pytest.skip(f"this kernel has no {name}: nothing for the filter to refuse")
    reply = run_evil(evil, realm, monkeypatch, workdir, f"syscall {NOT_ALLOWED[name]}")
    assert isinstance(reply, wire.Result) and reply.stdout == b"call Function not implemented\n", reply.stdout


def test_only_some_requests_of_fcntl_ioctl_prctl_and_madvise(evil, realm, monkeypatch, workdir):
    """Descriptor flags and a terminal's questions, not locks on host files nor a file system's own ioctls; a thread's
    name and an allocator's advice, not KSM's merging of pages with other processes'."""
    reply = run_evil(evil, realm, monkeypatch, workdir, "requests")
    assert isinstance(reply, wire.Result) and reply.stdout.splitlines() == [
        b"F_GETFD allowed", b"F_SETLK Function not implemented", b"FS_IOC_GETFLAGS Function not implemented",
        b"TCGETS Inappropriate ioctl for device", b"PR_SET_NAME allowed", b"PR_SET_MEMORY_MERGE Function not implemented",
        b"MADV_DONTNEED allowed", b"MADV_MERGEABLE Function not implemented"], reply.stdout


def test_a_system_call_of_another_abi_kills_the_compile(evil, realm, monkeypatch, workdir):
    """socket(2) by i386's number through int 0x80, which a filter of x86-64's numbers alone would let by: killed."""
    here = subprocess.run([Path(evil_root(realm)) / "bin" / "i386-socket"], capture_output=True)
    if here.returncode != 0 or not here.stdout.startswith(b"i386 socket: 3"):
        pytest.skip(f"this kernel runs no i386 system calls (IA32 emulation off): {here.returncode}, {here.stdout!r}")
    reply = run_evil(evil, realm, monkeypatch, workdir, "i386")
    assert isinstance(reply, wire.Result) and b"i386 socket" not in reply.stdout, reply.stdout
    assert reply.stdout.endswith(b"status 159\n"), reply.stdout  # 128 + SIGSYS
    assert_contained(evil, reply)


def test_a_compile_the_filter_kills_is_recorded_so(evil, realm, monkeypatch, workdir):
    """The compiler itself killed by the filter: its record says so, not "it ended by itself"."""
    here = subprocess.run([Path(evil_root(realm)) / "bin" / "i386-socket"], capture_output=True)
    if here.returncode != 0:
        pytest.skip(f"this kernel runs no i386 system calls (IA32 emulation off): {here.returncode}")
    reply = run_evil(evil, realm, monkeypatch, workdir, "i386exec")
    assert isinstance(reply, wire.Result) and reply.exit_status == 128 + signal.SIGSYS, reply
    assert evil.jobs(cwd=str(workdir))[-1]["ended_by"] == "system-call-refused"
    assert_contained(evil, reply)


def evil_root(realm) -> Path:
    return realm.dir / "evilroot"


@pytest.mark.parametrize("target", ["keytab", "config", "acl", "audit", "shadow", "root", "home"])
def test_secrets_are_invisible(evil, realm, monkeypatch, workdir, target):
    """Keytab, server config, ACL, audit log, /etc/shadow, /root and homes do not exist inside."""
    path = {
        "keytab": realm.dir / "service.keytab", "config": evil.config_path, "acl": realm.dir / "acl.yaml",
        "audit": evil.audit_path, "shadow": Path("/etc/shadow"), "root": Path("/root/.bashrc"),
        "home": Path("/home"),
    }[target]
    reply = run_evil(evil, realm, monkeypatch, workdir, f"read {path}")
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and reply.stdout == b""
    assert b"No such file or directory" in reply.stderr
    assert_contained(evil, reply)


def test_writes_outside_the_job_vanish(evil, realm, monkeypatch, workdir):
    """Writing a host path either fails or lands in the sandbox's throwaway tree: the host file never appears."""
    target = workdir / "pwned"
    for path in (target, Path("/usr/pwned"), Path("/tmp/pwned-by-sandbox")):
        reply = run_evil(evil, realm, monkeypatch, workdir, f"write {path}")
        assert not path.exists(), path
        assert_contained(evil, reply)


def test_the_jobs_own_files_are_read_only(evil, realm, monkeypatch, workdir):
    """bwrap writes the job's tree from memory into its root, then remounts the root read-only: the compile can
    neither change its own source nor add a file beside it."""
    for path in (workdir / "x.c", workdir / "beside.h"):
        reply = run_evil(evil, realm, monkeypatch, workdir, f"write {path}")
        assert isinstance(reply, wire.Result) and b"wrote" not in reply.stdout, reply
        assert b"Read-only file system" in reply.stderr, reply.stderr


def test_no_user_namespace_of_its_own(evil, realm, monkeypatch, workdir):
    """Inside one the compile could mount a tmpfs of its choosing (half the host's memory) and reach more of
    the kernel; bwrap --disable-userns refuses it."""
    reply = run_evil(evil, realm, monkeypatch, workdir, "userns")
    assert isinstance(reply, wire.Result) and b"mounted" not in reply.stdout and reply.exit_status != 0, reply


def test_cannot_see_or_kill_the_server(evil, realm, monkeypatch, workdir):
    """kill -9 of the server's pid and of every process it can see: the server survives."""
    reply = run_evil(evil, realm, monkeypatch, workdir, f"kill {evil.process.pid}")
    assert isinstance(reply, wire.Result)
    assert_contained(evil, reply)


def test_no_descriptor_of_the_server_reaches_the_compile(evil, realm, monkeypatch, workdir):
    """The compile holds its stdin, stdout and stderr and its own script, nothing the job handler had open
    (its socket to the front, other jobs' pipes and files): however the sandbox is spawned."""
    reply = run_evil(evil, realm, monkeypatch, workdir, "fds")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0, reply
    fds = dict(line.split() for line in reply.stdout.decode().splitlines())  # every open descriptor: its kind
    assert set(fds) == {"0", "1", "2"}, fds
    assert_contained(evil, reply)


def test_unprivileged_and_capability_free(evil, realm, monkeypatch, workdir):
    """The compiler runs with no capabilities, and as root servers' unprivileged uid; it sees only /usr and its job."""
    reply = run_evil(evil, realm, monkeypatch, workdir, "whoami")
    assert isinstance(reply, wire.Result), reply
    lines = reply.stdout.decode().splitlines()
    if os.geteuid() == 0:
        assert lines[:2] == ["65534", "65534"]
    else:
        assert lines[0] != "0"
    assert lines[-2:] == ["CapEff: 0000000000000000", "CapPrm: 0000000000000000"]
    listing = set(lines[2:-2])
    assert {"usr", "job", "dev", "tmp"} <= listing
    assert not listing & {"root", "home", "etc", "var", "srv", "opt", "proc", "sys", "run"}  # no /proc: see sandbox.py


def test_the_compile_runs_under_every_limit(evil, realm, monkeypatch, workdir):
    """The compiler itself holds the configured rlimits, whichever way the sandbox sets them."""
    from securecc.sandbox import Limits

    reply = run_evil(evil, realm, monkeypatch, workdir, "limits")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0, reply
    rows = {name: values for name, *values in map(str.split, reply.stdout.decode().splitlines())}  # soft, hard
    defaults = Limits()
    assert rows["CPU"] == ["2", "3"]
    assert rows["FSIZE"] == [str(10 << 20)] * 2
    assert rows["AS"] == [str(defaults.address_space)] * 2
    assert rows["NOFILE"] == [str(defaults.open_files)] * 2
    assert rows["CORE"] == ["0", "0"]
    if os.geteuid() == 0:  # a root server's sandboxes have a uid of their own, whose processes it counts
        assert rows["NPROC"] == ["64", "64"]
    assert_contained(evil, reply)


@pytest.mark.parametrize(
    ("action", "ended_by"),
    [("spin", "cpu-limit"), ("bigfile", "file-size-limit"), ("forkbomb", "timeout")],
)
def test_limits_end_runaway_compiles(evil, realm, monkeypatch, workdir, action, ended_by):
    """CPU, file size and a fork bomb are each ended by the right limit; nothing of them survives."""
    started = time.monotonic()
    reply = run_evil(evil, realm, monkeypatch, workdir, action)
    assert time.monotonic() - started < 15
    record = evil.jobs(job_id=reply.job_id)[0]
    assert record["ended_by"] == ended_by, record
    assert_contained(evil, reply)


def test_daemonized_child_dies_with_the_job(evil, realm, monkeypatch, workdir):
    """A compiler that leaves a setsid'd child behind: the child dies with the sandbox."""
    reply = run_evil(evil, realm, monkeypatch, workdir, "daemon")
    assert isinstance(reply, wire.Result)
    assert_contained(evil, reply)


@pytest.mark.parametrize("target", ["keytab", "config", "shadow", "other-job"])
def test_incbin_finds_nothing(evil, realm, monkeypatch, workdir, target):
    """The assembler's .incbin of the keytab, the config, /etc/shadow or another job's input fails."""
    if target == "other-job":
        blocker = threading.Thread(target=run_evil, args=(evil, realm, pytest.MonkeyPatch(), workdir, "spin"))
        blocker.start()
        scratch = Path(yaml_scratch(evil))
        assert wait_until(lambda: any(scratch.iterdir()), 10)
        path = next(scratch.iterdir()) / "input"
    else:
        blocker = None
        path = {"keytab": realm.dir / "service.keytab", "config": evil.config_path, "shadow": "/etc/shadow"}[target]
    channel = authenticated_channel(evil, realm, monkeypatch)
    source = f'asm(".section .rodata\\n.incbin \\"{path}\\"\\n.previous");\n'.encode()
    reply = channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), "steal.c", source))
    channel.close()
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and reply.output is None
    assert f"file not found: {path}".encode() in reply.stderr
    if blocker:
        blocker.join(30)


def test_client_with_another_compiler_version_compiles_locally(realm, server, workdir):
    """A client whose gcc is not the server's is refused with the reason and builds locally."""
    fake = workdir / "bin"
    fake.mkdir()
    (fake / "gcc").write_text(
        '#!/bin/sh\nif [ "$1" = -v ]; then echo "gcc version 99.1.0 (Imaginary)" >&2; '
        'echo "Target: x86_64-linux-gnu" >&2; exit 0; fi\nexec /usr/bin/gcc "$@"\n'
    )
    (fake / "gcc").chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", "a.c", "-o", "a.o",
                    PATH=f"{fake}:{os.environ['PATH']}")
    assert done.returncode == 0 and (workdir / "a.o").exists()
    err = done.stderr.decode()
    assert err.startswith("securecc: a.c: 127.0.0.1 refused the job: this server's gcc is gcc version 12")
    assert "yours is gcc version 99.1.0 (Imaginary); target x86_64-linux-gnu" in err and err.endswith("compiling locally\n")
    assert server.jobs(cwd=str(workdir))[-1]["reason"] == "denied:compiler-mismatch"


def test_the_compiler_version_is_told_only_to_an_allowed_principal(realm, server, workdir, monkeypatch):
    """bob, authenticated but allowed nothing, sends a job with another compiler identity: he is refused by the ACL,
    and learns nothing of the server's gcc (the mismatch named its version and target to anyone)."""
    channel = authenticated_channel(server, realm, monkeypatch, user="bob")
    try:
        reply = channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), "a.c", b"int a;\n",
                                      compiler_identity="gcc version 99.1.0 (Imaginary); target x86_64-linux-gnu"))
    finally:
        channel.close()
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:not-in-group", reply
    assert "gcc version 12" not in reply.message and "x86_64" not in reply.message, reply.message
    assert server.jobs(cwd=str(workdir))[-1]["reason"] == "denied:not-in-group"


def test_rlimits_only_mode_is_explicit_and_marked(realm, own_server, workdir):
    """Without bubblewrap an admin may choose rlimits-only: it works, warns at start, and marks every record.

    It compiles preprocessed input only (.i files, stock distcc jobs): a job
    of source files needs them at their own paths, which takes namespaces.
    """
    s = own_server(sandbox={"mode": "rlimits-only"})
    (workdir / "a.c").write_text("int a(void) { return 1; }\n")
    done = securecc(realm, s, "alice", workdir, "gcc", "-O2", "-c", "a.c", "-o", "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"runs without bubblewrap: it cannot preprocess" in done.stderr
    assert s.jobs(cwd=str(workdir))[-1]["reason"] == "denied:unsupported"
    assert local(workdir, "gcc", "-E", "a.c", "-o", "a.i").returncode == 0
    done = securecc(realm, s, "alice", workdir, "gcc", "-O2", "-c", "a.i", "-o", "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled a.i" in done.stderr
    local(workdir, "gcc", "-O2", "-c", "a.i", "-o", "l.o")
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    assert "SANDBOX DISABLED" in s.log_path.read_text()
    assert s.jobs(cwd=str(workdir))[-1]["sandbox"] == "rlimits-only"
    assert s.audit()[0]["event"] == "server-start" and s.audit()[0]["sandbox"] == "rlimits-only"


def refused_start_with_bwrap(realm, workdir, script: str, name: str) -> str:
    """What the server says as it refuses to start with ``script`` as the bwrap it finds first in PATH."""
    from conftest import start_server

    fake = workdir / "bin"  # reachable by the sandbox uid, which looks bwrap up in PATH
    fake.mkdir()
    (fake / "bwrap").write_text(script)
    (fake / "bwrap").chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{fake}:{old}"
    try:
        started = start_server(realm, realm.dir / name)
    except RuntimeError as refused:
        return str(refused)
    finally:
        os.environ["PATH"] = old
    started.stop()  # a server that should not have started does not outlive the test
    pytest.fail("the server started")


def test_server_refuses_to_start_when_bubblewrap_fails(realm, workdir):
    """bwrap mode with a bwrap that cannot run: the server says why and does not listen."""
    said = refused_start_with_bwrap(realm, workdir, "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n",
                                    "no-bwrap")
    assert re.search("the sandbox cannot compile .*bwrap: No permissions", said), said


def test_server_refuses_to_start_when_the_system_call_filter_does_not_hold(realm, workdir):
    """A bubblewrap that ignores --seccomp compiles the self-test as well as any; its sandbox can make sockets in the
    host's network namespace, and the handler's probe of that stops the server's start."""
    said = refused_start_with_bwrap(realm, workdir, '#!/bin/bash\nargs=()\nwhile [ $# -gt 0 ]; do\n'
                                    '  if [ "$1" = --seccomp ]; then shift 2; continue; fi\n  args+=("$1"); shift\ndone\n'
                                    'exec /usr/bin/bwrap "${args[@]}"\n', "no-filter")
    assert "system call filter does not hold (a socket of AF_INET was made)" in said, said


TREE_ROOT = str(Path(__file__).resolve().parents[2])


def run_script(script: str, *args: object, timeout: float = 30, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """``script`` in an isolated Python (``-I``) that imports securecc from this source tree."""
    code = f"import sys; sys.path.insert(0, {TREE_ROOT!r})\n" + script
    return subprocess.run([*(user or []), sys.executable, "-I", "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


KILL_SCRIPT = """
import sys
from pathlib import Path
from twisted.internet import reactor
from securecc import sandbox

job_dir = sandbox.make_job_dir(Path(sys.argv[1]), "j", {"input": b""})
spec = sandbox.Spec("/bin/sh", ["-c", "sleep 120 & sleep 120"], job_dir, "/tmp/w", "a.c", {})
argv = sandbox.command(spec, sandbox.Settings(sandbox.Limits(), None, None))
argv.remove("--die-with-parent")  # as if the kill came before the inner process had asked to die with its parent
job = sandbox.RunningJob(reactor, reactor, argv, job_dir, 120)
reactor.callLater(1.0, job.kill, "disconnect")
job.result.addBoth(lambda outcome: (print(outcome.ended_by), reactor.stop()))
reactor.run()
"""


def test_a_kill_takes_the_whole_sandbox_even_where_die_with_parent_did_not(tmp_path):
    """RunningJob.kill kills bwrap's inner process (the pid namespace's init, in its own session) as well as
    the outer one, so the namespace and everything in it die even when the inner would outlive its parent."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    done = run_script(KILL_SCRIPT, scratch, timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "disconnect", done.stderr
    assert wait_until(lambda: not [p for p in sandbox_processes() if str(scratch) in p], 5), sandbox_processes()


UNLIMITED_SCRIPT = """
import dataclasses, resource, sys
from pathlib import Path
from twisted.internet import reactor
from securecc import sandbox

job_dir = sandbox.make_job_dir(Path(sys.argv[1]), "j", {"input": b""})
spec = sandbox.Spec("/bin/sh", ["-c", "echo ran > /job/output"], job_dir, "/tmp/w", "a.c", {})
settings = sandbox.Settings(sandbox.Limits(), None, None)
limits = sandbox.rlimits(settings)
if sys.argv[2] == "unsettable":  # a hard limit above what this process may raise: prlimit(2) refuses it
    limits = (*limits, sandbox.Rlimit(resource.RLIMIT_NOFILE, "nofile", 1 << 40, 1 << 40))
argv = sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD)
assert "prlimit" not in argv and "--block-fd" in argv
job = sandbox.RunningJob(reactor, reactor, argv, job_dir, 20, limits=limits)
job.result.addBoth(lambda outcome: (print(outcome.ended_by, (job_dir / "output").read_bytes()), reactor.stop()))
reactor.run()
"""


@pytest.mark.parametrize("limits", ["settable", "unsettable"])
def test_bwrap_waits_for_its_rlimits_and_a_sandbox_without_them_never_runs_the_compile(tmp_path, limits):
    """The handler's sandboxes get their rlimits from RunningJob while bwrap waits on --block-fd: when they cannot
    all be set, the compile is never started (its output stays empty) and the job ends as a handler error."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    done = run_script(UNLIMITED_SCRIPT, scratch, limits)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("None b'ran\\n'" if limits == "settable" else "handler-error b''"), done.stdout
    assert wait_until(lambda: not [p for p in sandbox_processes() if str(scratch) in p], 5), sandbox_processes()


GIVE_UP_SCRIPT = """
import os, sys, time
from pathlib import Path
from twisted.internet import reactor
from securecc import sandbox

job_dir = sandbox.make_job_dir(Path(sys.argv[1]), "j", {"input": b""})
spec = sandbox.Spec("/bin/sh", ["-c", "echo ran > /job/output"], job_dir, "/tmp/w", "a.c", {})
settings = sandbox.Settings(sandbox.Limits(), None, None)

def give_up(job):  # the handler closes its end of the block pipe unwritten, after bwrap named its inner process
    print(job._inner_pid, flush=True)
    close = getattr(job, "_close_go", None) or (lambda: job._process.closeChildFD(sandbox.BLOCK_FD))
    close()
    reactor.callLater(1.0, lambda: (print((job_dir / "output").read_bytes(), flush=True), job.kill("test")))

sandbox.RunningJob._release = give_up
job = sandbox.RunningJob(reactor, reactor, sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD), job_dir, 20,
                         limits=sandbox.rlimits(settings))
job.result.addBoth(lambda outcome: reactor.stop())
reactor.run()
"""


def test_a_block_pipe_closed_unwritten_never_lets_the_compile_run(tmp_path):
    """bwrap goes on at end of file on --block-fd as at a byte: the handler's end closing unwritten (a failure, a
    handler that gives up) must leave the sandbox waiting, never run the compile without its rlimits."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    done = run_script(GIVE_UP_SCRIPT, scratch)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["b''"], f"the compile ran without its limits: {done.stdout}"
    assert wait_until(lambda: not [p for p in sandbox_processes() if str(scratch) in p], 5), sandbox_processes()


NPROC_SCRIPT = """
import subprocess, sys
from pathlib import Path
from twisted.internet import reactor
from securecc import sandbox

# the uid's processes, other jobs' say, beyond the cap of 16
others = [subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(24)]
job_dir = sandbox.make_job_dir(Path(sys.argv[1]), "j", {"input": b""})
spec = sandbox.Spec("/bin/sh", ["-c", "(true) && echo forked > /job/output || echo refused > /job/output"], job_dir, "/tmp/w",
                    "a.c", {})
settings = sandbox.Settings(sandbox.Limits(processes=16), int(sys.argv[2]), int(sys.argv[2]))
try:
    job = sandbox.RunningJob(reactor, reactor, sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD), job_dir, 20,
                             limits=sandbox.rlimits(settings))
except BlockingIOError:  # EAGAIN: bwrap itself is one process too many (the handler reports a handler error)
    print("refused at spawn", (job_dir / "output").read_bytes())
    for other in others:
        other.kill()
    sys.exit(0)

def finished(outcome):
    print(outcome.ended_by, (job_dir / "output").read_bytes())
    for other in others:
        other.kill()
    reactor.stop()

job.result.addBoth(finished)
reactor.run()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC is set for a server running as root (setpriv to another uid)")
def test_the_process_limit_caps_the_sandbox_uid_over_every_job_not_per_sandbox():
    """RLIMIT_NPROC of the sandbox uid caps every job together.  Set on bwrap's inner process alone it would count
    only the processes of that sandbox's own user namespace: a uid already over the cap must not fork in a job."""
    nobody = 65534
    scratch = Path(tempfile.mkdtemp(prefix="securecc-nproc-"))  # pytest's own directory is its user's alone
    try:
        os.chown(scratch, nobody, nobody)
        done = run_script(NPROC_SCRIPT, scratch, nobody, user=["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert "forked" not in done.stdout, done.stdout


EARLY_KILL_SCRIPT = """
import sys
from pathlib import Path
from twisted.internet import reactor
from securecc import sandbox

sandbox.KILL_WAIT = 0.0  # as on a host so loaded that bwrap names its inner process only after the wait
scratch, ended = Path(sys.argv[1]), []
settings = sandbox.Settings(sandbox.Limits(), None, None)

def start(n):
    if n == 40:
        print(len(ended), "of 40 ended")
        reactor.stop()
        return
    job_dir = sandbox.make_job_dir(scratch, f"j{n}", {"input": b""})
    spec = sandbox.Spec("/bin/sh", ["-c", "sleep 60"], job_dir, "/tmp/w", "a.c", {})
    job = sandbox.RunningJob(reactor, reactor, sandbox.command(spec, settings, block_fd=sandbox.BLOCK_FD), job_dir, 60,
                             limits=sandbox.rlimits(settings))
    reactor.callLater(n % 8 * 0.0005, job.kill, "disconnect")  # while bwrap starts: before or after it names its inner
    timer = reactor.callLater(5, lambda: (print(f"job {n} never ended"), reactor.stop()))
    job.result.addBoth(lambda _: (ended.append(n), timer.cancel(), start(n + 1)))

reactor.callWhenRunning(start, 0)
reactor.run()
"""


def test_a_kill_while_bwrap_starts_ends_the_job_whether_or_not_its_inner_process_was_named(tmp_path):
    """A kill that waited KILL_WAIT for bwrap to name its inner process, in vain, kills the inner all the same (the
    outer's child): left alive, it held the job's pipes, so the job never ended and kept its slot."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    done = run_script(EARLY_KILL_SCRIPT, scratch, timeout=120)
    assert done.stdout.strip() == "40 of 40 ended", done.stdout + done.stderr
    assert wait_until(lambda: not [p for p in sandbox_processes() if str(scratch) in p], 5), sandbox_processes()
