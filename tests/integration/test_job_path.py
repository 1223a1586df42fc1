"""The secure job path end to end: real KDC, slapd, server, sandbox, gcc and CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, local, make_job, processes_of_uid, securecc

from securecc import protocol as wire
from securecc.client.channel import Channel
from securecc.client.hosts import parse_host
from securecc.sandbox import MEMORY_FILES, Limits, most_memory_files

SOURCE = """\
#include <stdio.h>
#include "util.h"
#define SQUARE(x) ((x) * (x))
int main(void) { int v = SQUARE(SCALE) + twice(WIDTH); printf("%d\\n", v); return v > 0 ? 0 : 1; }
"""
HEADER = "#define WIDTH 21\nstatic inline int twice(int x) { return 2 * x; }\n"
CXX_SOURCE = """\
#include <vector>
#include <numeric>
#define N 10
int total() { std::vector<int> v(N); std::iota(v.begin(), v.end(), 1); return std::accumulate(v.begin(), v.end(), 0); }
"""
SLOW_CXX = """\
constexpr long spin(long n) { long s = 0; for (long i = 0; i < n; ++i) s += i % 7; return s; }
constexpr long value = spin(SPIN);
long get() { return value; }
"""
SLOW_FLAGS = ["-fconstexpr-ops-limit=4000000000", "-fconstexpr-loop-limit=2000000000"]


def write_project(directory: Path) -> None:
    (directory / "src").mkdir(exist_ok=True)
    (directory / "src" / "main.c").write_text(SOURCE)
    (directory / "util.h").write_text(HEADER)
    (directory / "lib.cc").write_text(CXX_SOURCE)


def sandbox_processes(cwd: Path | None = None) -> list[str]:
    """Compiler sandboxes still alive (bwrap's own argv names /job/output); with ``cwd``, only those
    compiling there (``--chdir CWD``), so that other servers' sandboxes on this machine do not count."""
    uid_procs = processes_of_uid(65534) if os.geteuid() == 0 and cwd is None else []
    uid_procs = [p for p in uid_procs if "securecc.server.handler" not in p]  # the job handlers themselves
    others = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"/job/output" in cmdline and (cwd is None or b"\0--chdir\0%s\0" % os.fsencode(cwd) in cmdline):
            others.append(cmdline.replace(b"\0", b" ").decode())
    return uid_procs + others


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("flags", [["-O2"], ["-g", "-O2"], ["-g", "-O0", "-Wall"]], ids=["O2", "g-O2", "g-O0"])
def test_remote_object_is_byte_identical_and_audited(realm, server, workdir, flags):
    """alice's compile runs remotely, its object equals a local gcc's byte for byte, and it is audited."""
    write_project(workdir)
    args = [*flags, "-DSCALE=3", "-I.", "-c", "src/main.c", "-o", "remote.o"]
    done = securecc(realm, server, "alice", workdir, "gcc", *args, SECURECC_VERBOSE="1")
    assert done.returncode == 0, done.stderr
    assert b"compiled src/main.c on 127.0.0.1" in done.stderr
    assert local(workdir, "gcc", *args[:-1], "local.o").returncode == 0
    remote = (workdir / "remote.o").read_bytes()
    assert remote == (workdir / "local.o").read_bytes()
    records = server.jobs(principal="alice@TEST.REALM", cwd=str(workdir), args=args[:-4])
    assert records and records[-1]["decision"] == "allowed" and records[-1]["exit_status"] == 0
    assert records[-1]["output_sha256"] == hashlib.sha256(remote).hexdigest()
    assert records[-1]["reason"] == "allowed:group:committers"


def test_cxx_assembler_and_dependency_files(realm, server, workdir):
    """g++ objects and -S output are identical too; -MD files are made locally, as gcc makes them."""
    write_project(workdir)
    for compiler, args, out in (
        ("g++", ["-g", "-O2", "-c", "lib.cc", "-o", "{}"], "lib.o"),
        ("gcc", ["-O2", "-DSCALE=2", "-I.", "-S", "src/main.c", "-o", "{}"], "main.s"),
        ("gcc", ["-O2", "-DSCALE=2", "-I.", "-MD", "-c", "src/main.c", "-o", "{}"], "main.o"),
    ):
        remote_args = [a.replace("{}", f"r-{out}") for a in args]
        done = securecc(realm, server, "alice", workdir, compiler, *remote_args, SECURECC_VERBOSE="1")
        assert done.returncode == 0 and b"compiled" in done.stderr, done.stderr
        assert local(workdir, compiler, *[a.replace("{}", f"l-{out}") for a in args]).returncode == 0
        assert (workdir / f"r-{out}").read_bytes() == (workdir / f"l-{out}").read_bytes(), out
    deps = (workdir / "r-main.d").read_text()
    assert deps.startswith("r-main.o:") and "util.h" in deps
    assert deps.replace("r-main.o", "l-main.o") == (workdir / "l-main.d").read_text()


MOST_IN_MEMORY = most_memory_files(Limits())  # the main file is one of them


@pytest.mark.parametrize(("headers", "size"), [
    (MOST_IN_MEMORY - 1, 40), (MOST_IN_MEMORY, 40), (300, 40), (MEMORY_FILES + 1, 40), (24, 8000),
], ids=["most-in-memory", "one-more", "past-open-files", "more-than-memory", "big-in-tmp"])
def test_header_heavy_jobs_compile_remotely_from_memory_or_the_disk(realm, server, workdir, headers, size):
    """As many headers as bwrap is given as memory files under the compile's open-file limit, and more (the
    tree is then on the scratch disk, as before: bwrap would run out of descriptors setting up).  A tree under
    /tmp (this workdir) bigger than the empty /tmp's 64 KiB: that tmpfs is sized to hold it."""
    assert str(workdir).startswith("/tmp/")
    (workdir / "inc").mkdir()
    for n in range(headers):
        (workdir / "inc" / f"h{n}.h").write_text(f"static const char h{n}[] = \"{'x' * size}\";\n")
    (workdir / "many.c").write_text("".join(f'#include "h{n}.h"\n' for n in range(headers)) +
                                     f"int total(void) {{ return sizeof h0 + sizeof h{headers - 1}; }}\n")
    args = ["-O2", "-Iinc", "-c", "many.c", "-o"]
    done = securecc(realm, server, "alice", workdir, "gcc", *args, "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled" in done.stderr, done.stderr
    assert local(workdir, "gcc", *args, "l.o").returncode == 0
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()


FALLTHROUGH = """\
#define STEP 2
int f(int x) {
  int r = 0;
  switch (x) {
  case 1:
    r += STEP;
    /* fall through */
  case 2:
    r += STEP * 2;
    break;
  }
  return r;
}
"""


def test_pedantic_werror_build_keeps_gccs_diagnostics(realm, server, workdir):
    """-pedantic -Wextra -Werror with a fall-through comment: remote, silent, identical object."""
    (workdir / "ft.c").write_text(FALLTHROUGH)
    args = ["-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", "-c", "ft.c", "-o"]
    done = securecc(realm, server, "alice", workdir, "gcc", *args, "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0
    assert done.stderr.decode().startswith("securecc: compiled ft.c on 127.0.0.1"), done.stderr
    assert local(workdir, "gcc", *args, "l.o").returncode == 0
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()


COUNTER_IN_IF = """\
#if defined __COUNTER__ && __COUNTER__ != __COUNTER__
# define UNIQUE(x) x ## __COUNTER__
#else
# define UNIQUE(x) x ## __LINE__
#endif
#define CHECK(c) extern int (*UNIQUE(check_))[(c) ? 1 : -1]
CHECK(sizeof(int) >= 2);
int value(void) { return 42; }
"""


@pytest.mark.parametrize(
    "flags", [["-O2"], ["-g", "-O2"], ["-g", "-O2", "-std=c99", "-pedantic"]], ids=["O2", "g", "g-pedantic"]
)
def test_sources_directives_only_cannot_carry(realm, server, workdir, flags):
    """__COUNTER__ in #if (gnulib's verify.h), -pedantic -g: remote all the same, objects identical.

    The server preprocesses the original files, project headers shipped at
    their own paths, as it does every job.
    """
    (workdir / "inc").mkdir()
    (workdir / "inc" / "verify.h").write_text(COUNTER_IN_IF.split("CHECK(sizeof")[0])
    (workdir / "src").mkdir()
    (workdir / "src" / "v.c").write_text(
        '#include "verify.h"\n#warning checked\nCHECK(sizeof(int) >= 2);\nint value(void) { return 42; }\n'
    )
    args = [*flags, "-Wall", "-Iinc", "-c", "src/v.c", "-o"]
    done = securecc(realm, server, "alice", workdir, "gcc", *args, "r.o", SECURECC_VERBOSE="1")
    here = local(workdir, "gcc", *args, "l.o")
    assert done.returncode == 0 and here.returncode == 0
    lines = done.stderr.decode().splitlines()
    assert lines[-1].startswith("securecc: compiled src/v.c on 127.0.0.1"), lines
    messages = "\n".join(line for line in lines if not line.startswith("securecc:"))
    assert messages == here.stderr.decode().strip()  # the #warning, exactly once
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    assert server.jobs(cwd=str(workdir))[-1]["headers"] == 1


def test_source_date_epoch_reaches_the_compiler(realm, server, workdir):
    """Debian builds export SOURCE_DATE_EPOCH: __DATE__ and __TIME__ expand remotely as they do here."""
    (workdir / "d.c").write_text('const char *built = __DATE__ " " __TIME__;\n')
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", "d.c", "-o", "r.o",
                    SOURCE_DATE_EPOCH="86400", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled d.c" in done.stderr
    assert local(workdir, "gcc", "-O2", "-c", "d.c", "-o", "l.o", SOURCE_DATE_EPOCH="86400").returncode == 0
    assert b"Jan  2 1970 00:00:00" in (workdir / "r.o").read_bytes()
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()


def test_push_macro_and_redefinition_messages(realm, server, workdir):
    """#pragma push_macro (which -fdirectives-only mangles) compiles remotely and right; a redefinition warns once."""
    (workdir / "pm.c").write_text(
        '#define X 1\n#pragma push_macro("X")\n#undef X\n#define X 2\nint a = X;\n#pragma pop_macro("X")\nint b = X;\n'
    )
    (workdir / "rd.c").write_text("#define Y 1\n#define Y 2\nint y = Y;\n")
    for name in ("pm", "rd"):
        done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-c", f"{name}.c", "-o", f"r-{name}.o",
                        SECURECC_VERBOSE="1")
        here = local(workdir, "gcc", "-O2", "-c", f"{name}.c", "-o", f"l-{name}.o")
        assert done.returncode == 0 and f"compiled {name}.c".encode() in done.stderr, done.stderr
        messages = b"".join(line for line in done.stderr.splitlines(keepends=True) if not line.startswith(b"securecc:"))
        assert messages == here.stderr
        assert (workdir / f"r-{name}.o").read_bytes() == (workdir / f"l-{name}.o").read_bytes()


def test_base_file_macro(realm, server, workdir):
    """__BASE_FILE__ names the main file: the server preprocesses, so it expands as it does here."""
    (workdir / "b.c").write_text('const char *name = __BASE_FILE__;\n')
    done = securecc(realm, server, "alice", workdir, "gcc", "-c", "b.c", "-o", "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled b.c on" in done.stderr
    local(workdir, "gcc", "-c", "b.c", "-o", "l.o")
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()


def test_masquerade_symlink(realm, server, workdir):
    """A symlink named gcc runs securecc with gcc as the compiler (and never finds itself)."""
    write_project(workdir)
    bindir = workdir / "masq"
    bindir.mkdir()
    (bindir / "gcc").symlink_to(BIN / "securecc")
    env = realm.user_env("alice", workdir)
    env.update(SECURECC_HOSTS=server.hosts, PATH=f"{bindir}:{os.environ['PATH']}", PWD=str(workdir), SECURECC_VERBOSE="1")
    done = subprocess.run(["gcc", "-DSCALE=1", "-I.", "-c", "src/main.c", "-o", "m.o"], cwd=workdir, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert b"compiled src/main.c" in done.stderr and (workdir / "m.o").exists()


def test_bob_is_refused_audited_and_still_builds(realm, server, workdir):
    """bob is not a committer: refused with a clear line, audited, and his object is built locally."""
    write_project(workdir)
    args = ["-O2", "-DSCALE=3", "-I.", "-c", "src/main.c", "-o", "bob.o"]
    done = securecc(realm, server, "bob", workdir, "gcc", *args)
    assert done.returncode == 0
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("securecc: ") and "denied:not-in-group" in lines[0]
    assert lines[0].endswith("compiling locally")
    local(workdir, "gcc", *args[:-1], "local.o")
    assert (workdir / "bob.o").read_bytes() == (workdir / "local.o").read_bytes()
    refused = server.jobs(principal="bob@TEST.REALM", cwd=str(workdir))
    assert refused and refused[-1]["decision"] == "refused" and refused[-1]["reason"] == "denied:not-in-group"


def test_no_ticket_compiles_locally_with_clear_message(realm, server, workdir):
    """Without any Kerberos credentials the client says 'run kinit' once and compiles locally."""
    write_project(workdir)
    done = securecc(realm, server, None, workdir, "gcc", "-DSCALE=1", "-I.", "-c", "src/main.c", "-o", "n.o")
    assert done.returncode == 0 and (workdir / "n.o").exists()
    assert done.stderr.decode() == (
        "securecc: src/main.c: no Kerberos ticket: run kinit (or point KRB5_CLIENT_KTNAME at a keytab); compiling locally\n"
    )


def test_compile_error_is_returned_not_retried(realm, server, workdir):
    """A syntax error comes back as gcc printed it, with its status; no local retry, no securecc line."""
    (workdir / "bad.c").write_text("#define ZERO 0\nint main(void) { return ZERO }\n")
    done = securecc(realm, server, "alice", workdir, "gcc", "-c", "bad.c", "-o", "bad.o", LANG="C.UTF-8")
    assert done.returncode == 1
    err = done.stderr.decode()
    here = local(workdir, "gcc", "-c", "bad.c", "-o", "bad.o", LANG="C.UTF-8")
    assert err == here.stderr.decode()  # same text, same quotes, the same source line quoted
    assert "return ZERO }" in err and err.count("error:") == 1 and "securecc:" not in err
    assert not (workdir / "bad.o").exists()
    assert server.jobs(principal="alice@TEST.REALM", cwd=str(workdir))[-1]["exit_status"] == 1


def test_unreachable_server_compiles_locally(realm, workdir):
    """Nothing listening: one clear line, then the local compile."""
    write_project(workdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = securecc(realm, None, "alice", workdir, "gcc", "-DSCALE=1", "-I.", "-c", "src/main.c", "-o", "u.o",
                    hosts=f"127.0.0.1:{port},principal=securecc/localhost@TEST.REALM")
    assert done.returncode == 0 and (workdir / "u.o").exists()
    assert done.stderr.decode().startswith(f"securecc: src/main.c: cannot connect to 127.0.0.1:{port}")


def test_server_killed_mid_job_falls_back_locally(realm, own_server, workdir):
    """The server dies while compiling: the client compiles locally and no sandbox survives."""
    s = own_server()
    (workdir / "slow.cc").write_text(SLOW_CXX)
    result: dict = {}

    def run() -> None:
        result["done"] = securecc(realm, s, "alice", workdir, "g++", "-DSPIN=1000000L", *SLOW_FLAGS,
                                  "-c", "slow.cc", "-o", "slow.o")

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_until(lambda: bool(sandbox_processes(workdir)), 20), "the remote compile never started"
    s.process.kill()
    thread.join(120)
    done = result["done"]
    assert done.returncode == 0 and (workdir / "slow.o").exists()
    assert "closed the connection; compiling locally" in done.stderr.decode()
    assert wait_until(lambda: not sandbox_processes(workdir), 10), sandbox_processes(workdir)


def authenticated_channel(server, realm, monkeypatch, user: str = "alice") -> Channel:
    """Authenticate as ``user`` with the real client code, in this process."""
    for key, value in realm.user_env(user, realm.dir).items():
        monkeypatch.setenv(key, value)
    channel = Channel(parse_host(server.hosts))
    channel.authenticate()
    return channel


def slow_job(workdir: Path, spin: str) -> wire.Job:
    source = SLOW_CXX.replace("SPIN", spin).encode()
    return make_job("g++", SLOW_FLAGS, "c++", "-c", str(workdir), "slow.cc", source)


def test_timeout_kills_the_compile_and_its_children(realm, own_server, workdir, monkeypatch):
    """A compile running past the server's timeout is killed with its whole tree and reported."""
    s = own_server(sandbox={"timeout": 1})
    channel = authenticated_channel(s, realm, monkeypatch)
    started = time.monotonic()
    reply = channel.call(slow_job(workdir, "20000000L"))
    channel.close()
    assert isinstance(reply, wire.Refused) and reply.reason == "timeout"
    assert time.monotonic() - started < 5
    assert wait_until(lambda: not sandbox_processes(workdir), 5), sandbox_processes(workdir)
    record = s.jobs(principal="alice@TEST.REALM")[-1]
    assert record["ended_by"] == "timeout"


def test_client_disconnect_kills_its_job(realm, own_server, workdir, monkeypatch):
    """Closing the connection mid-compile kills the sandbox at once and is audited as such."""
    s = own_server()
    channel = authenticated_channel(s, realm, monkeypatch)
    channel.sock.sendall(channel.wire.seal(slow_job(workdir, "20000000L")))
    assert wait_until(lambda: bool(sandbox_processes(workdir)), 10)
    channel.close()
    assert wait_until(lambda: not sandbox_processes(workdir), 5), sandbox_processes(workdir)
    assert wait_until(lambda: bool(s.jobs(ended_by="disconnect")), 5)


def test_no_sandbox_outlives_a_kill_at_any_moment_of_its_start(realm, own_server, workdir, monkeypatch):
    """Clients that leave as their job starts (^C on a make): the kill lands at every moment of bwrap's start,
    including before its inner process (the pid namespace's init, in a session of its own) has asked to die
    with its parent.  No sandbox is left alive."""
    s = own_server()
    channels = [authenticated_channel(s, realm, monkeypatch) for _ in range(24)]
    for n, channel in enumerate(channels):
        channel.sock.sendall(channel.wire.seal(slow_job(workdir, f"{1000000 + n}L")))
        time.sleep(0.002 * n)  # later and later into the start
        channel.close()
    assert wait_until(lambda: len(s.jobs(ended_by="disconnect")) == len(channels), 20), s.jobs()
    assert wait_until(lambda: not sandbox_processes(workdir), 10), sandbox_processes(workdir)


def test_a_result_computed_after_its_client_left_is_recorded_as_not_delivered(realm, own_server, workdir, monkeypatch):
    """The server's front freezes (SIGSTOP) mid-compile, the client gives up, the compile ends meanwhile: once the
    front runs again its record says ``delivered: false``, unlike a result that reached its client."""
    s = own_server()
    channel = authenticated_channel(s, realm, monkeypatch)
    assert isinstance(channel.call(slow_job(workdir, "1000L")), wire.Result)
    channel.sock.sendall(channel.wire.seal(slow_job(workdir, "1500000L")))  # about 3 s of compile
    assert wait_until(lambda: bool(sandbox_processes(workdir)), 10)
    os.kill(s.process.pid, signal.SIGSTOP)
    try:
        channel.close()
        assert wait_until(lambda: not sandbox_processes(workdir), 30), "the compile did not end"
    finally:
        os.kill(s.process.pid, signal.SIGCONT)
    assert wait_until(lambda: len(s.jobs(principal="alice@TEST.REALM")) >= 2, 10)
    delivered, computed = s.jobs(principal="alice@TEST.REALM")[-2:]
    assert delivered["delivered"] is True and delivered["exit_status"] == 0
    assert computed["delivered"] is False, computed


def test_job_whose_client_left_before_it_started_is_not_compiled(realm, own_server, workdir, monkeypatch):
    """The job and the client's FIN arrive together (the agent dropping a cancelled job): it is killed at once."""
    s = own_server()
    for _ in range(3):
        channel = authenticated_channel(s, realm, monkeypatch)
        channel.sock.sendall(channel.wire.seal(slow_job(workdir, "1000000000L")))
        channel.close()
    assert wait_until(lambda: len(s.jobs(ended_by="disconnect")) == 3, 10), s.jobs()
    assert wait_until(lambda: not sandbox_processes(workdir), 5), sandbox_processes(workdir)


def closed_by_peer(sock: socket.socket, timeout: float = 5) -> bool:
    """True when the server closed or reset the connection within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_garbage_and_stalled_handshakes_do_not_hurt_others(realm, own_server, workdir):
    """Garbage is dropped at once, a silent peer at the handshake deadline; alice compiles meanwhile."""
    s = own_server(timeouts={"handshake": 1})
    write_project(workdir)
    garbage = socket.create_connection(("127.0.0.1", s.port))
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
    assert closed_by_peer(garbage)
    stalled = socket.create_connection(("127.0.0.1", s.port))
    huge = socket.create_connection(("127.0.0.1", s.port))
    huge.sendall(b"\xff\xff\xff\xff\x01")  # a 4 GiB frame announced: refused before any allocation
    assert closed_by_peer(huge)
    done = securecc(realm, s, "alice", workdir, "gcc", "-DSCALE=1", "-I.", "-c", "src/main.c", "-o", "ok.o",
                    SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled" in done.stderr
    assert closed_by_peer(stalled, 3)
    assert s.alive()


def test_flipped_byte_in_a_sealed_frame_is_rejected(realm, server, workdir, monkeypatch):
    """One flipped byte in a wrapped frame: the server rejects it, runs nothing, and keeps serving."""
    before = len(server.jobs())
    channel = authenticated_channel(server, realm, monkeypatch)
    sealed = bytearray(channel.wire.seal(make_job("gcc", [], "c", "-c", str(workdir), "t.c", b"int x;\n")))
    sealed[len(sealed) // 2] ^= 0x01
    channel.sock.sendall(bytes(sealed))
    assert closed_by_peer(channel.sock)
    channel.close()
    assert len(server.jobs()) == before
    assert "sealed frame rejected" in server.log_path.read_text()
    write_project(workdir)
    done = securecc(realm, server, "alice", workdir, "gcc", "-DSCALE=1", "-I.", "-c", "src/main.c", "-o", "f.o",
                    SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled" in done.stderr


def test_several_jobs_on_one_connection(realm, server, workdir, monkeypatch):
    """One authenticated connection carries jobs one after another."""
    channel = authenticated_channel(server, realm, monkeypatch)
    for n in range(3):
        reply = channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), f"t{n}.c", f"int x{n};\n".encode()))
        assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output
    channel.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"compiler": "sh"}, "denied:compiler-not-offered"),
        ({"compiler": "/usr/bin/gcc"}, "denied:compiler-not-offered"),
        ({"args": ["-fplugin=/tmp/evil.so"]}, "denied:argument-refused"),
        ({"args": ["-B/tmp/evil"]}, "denied:argument-refused"),
        ({"args": ["-wrapper", "/bin/sh,-c,id"]}, "denied:argument-refused"),
        ({"args": ["-I/etc"]}, "denied:argument-refused"),  # preprocessing options only where the server preprocesses
        ({"args": ["/etc/passwd"]}, "denied:argument-refused"),
        ({"language": "assembler"}, "denied:argument-refused"),
        ({"environment": {"LD_PRELOAD": "/tmp/evil.so"}}, "denied:argument-refused"),
        ({"environment": {"TZ": "../../etc/shadow"}}, "denied:argument-refused"),
        ({"cwd": "/usr/bin"}, "denied:bad-path"),
        ({"source_path": "../../../../../../proc/1/environ"}, "denied:bad-path"),
        ({"language": "c-source", "include_paths": ["/etc/passwd"], "includes": [b"x"]}, "denied:bad-path"),
        ({"include_paths": ["/tmp/x.h"], "includes": [b"x"]}, "denied:argument-refused"),
    ],
)
def test_hostile_jobs_are_refused_and_audited(realm, server, workdir, monkeypatch, change, reason):
    """A committer's hand-made job asking for code execution, secret paths or odd environments is refused."""
    import dataclasses

    channel = authenticated_channel(server, realm, monkeypatch)
    job = dataclasses.replace(make_job("gcc", ["-O2"], "c", "-c", str(workdir), "t.c", b"int t;\n"), **change)
    reply = channel.call(job)
    channel.close()
    assert isinstance(reply, wire.Refused) and reply.reason == reason, reply
    record = server.jobs(job_id=reply.job_id)[0]
    assert record["decision"] == "refused" and record["reason"] == reason


def test_incbin_of_the_server_keytab_finds_nothing(realm, server, workdir, monkeypatch):
    """The assembler cannot .incbin the server's keytab: the sandbox does not contain it."""
    keytab = realm.dir / "service.keytab"
    channel = authenticated_channel(server, realm, monkeypatch)
    source = f'asm(".section .rodata\\n.incbin \\"{keytab}\\"\\n.previous");\n'.encode()
    reply = channel.call(make_job("gcc", ["-O2"], "c", "-c", str(workdir), "steal.c", source))
    channel.close()
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and reply.output is None
    assert b"file not found: " + str(keytab).encode() in reply.stderr
