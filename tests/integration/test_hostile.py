"""Attacks by an authenticated committer with a hand-written client (tests/hostile.py).

Each test sends what our own client never would and asserts the job is
refused or compiled with exactly what the policy allows, that nothing of
the server's secrets comes back, and that each job has exactly one audit
record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IDENTITIES
from hostile import Hostile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securecc import protocol as wire
from securecc import sandbox
from securecc.audit import load_public_key, verify


@pytest.fixture
def as_alice(realm, monkeypatch, tmp_path):
    for key, value in realm.user_env("alice", tmp_path).items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def attack(as_alice, own_server):
    """A fresh server and a hostile connection to it as alice, the committer."""
    s = own_server()
    client = Hostile(s.port)
    yield s, client
    client.close()


def one_record(s, reply: wire.Message) -> dict:
    """The single job record of ``reply``'s job (the log is written before the reply is sent)."""
    job_id = getattr(reply, "job_id", "")
    records = s.jobs(job_id=job_id)
    assert job_id and len(records) == 1, (reply, records)
    return records[0]


def secrets_of(realm) -> list[bytes]:
    return [(realm.dir / "service.keytab").read_bytes()[:64], (realm.dir / "audit.key").read_bytes()[-32:]]


def test_response_file_source_path_cannot_run_a_wrapper(realm, attack, workdir):
    """The finding: a source path '@file' made gcc read a header as options (-wrapper), whose
    command linked /job/output to the keytab for the root server to send back.  Refused now."""
    s, client = attack
    keytab = realm.dir / "service.keytab"
    header = str(workdir / "resp")
    options = f"-wrapper /bin/sh,-c,ln\\ -sf\\ {keytab}\\ /job/output".encode()
    for source_path in ("@" + header, "@resp", "-wrapper"):
        reply = client.job(language="c-source", cwd=str(workdir), source_path=source_path, include_paths=[header],
                           includes=[options], compiler_identity=IDENTITIES["gcc"])
        assert isinstance(reply, wire.Refused) and reply.reason == "denied:bad-path", (source_path, reply)
        assert one_record(s, reply)["decision"] == "refused"
    # './@resp' is a file name to gcc, never a response file: it compiles as C (and fails: not C), nothing runs.
    reply = client.job((b"", options), language="c-source", cwd=str(workdir), source_path="./@resp",
                       compiler_identity=IDENTITIES["gcc"])
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and reply.output is None
    assert b"-wrapper" in reply.stderr and not any(secret in reply.stderr for secret in secrets_of(realm))


@pytest.mark.parametrize("fields, reason", [
    ({"cwd": "relative"}, "denied:bad-path"),
    ({"cwd": "/src/../etc"}, "denied:bad-path"),
    ({"cwd": "/usr/include"}, "denied:bad-path"),
    ({"cwd": "/job"}, "denied:bad-path"),
    ({"cwd": "//usr/lib/x86_64-linux-gnu", "source_path": "libzstd.so.1.5.4"}, "denied:bad-path"),  # over cc1's library
    ({"cwd": "//job"}, "denied:bad-path"),
    ({"source_path": "//etc/passwd"}, "denied:bad-path"),
    ({"source_path": "a\nb.c"}, "denied:bad-path"),
    ({"source_path": "a\x1b[2J.c"}, "denied:bad-path"),
    ({"source_path": "x" * 5000}, "denied:bad-path"),
    ({"source_path": "../../proc/self/environ"}, "denied:bad-path"),
    ({"source_path": "."}, "denied:bad-path"),
    ({"language": "assembler"}, "denied:argument-refused"),
    ({"mode": "-E"}, "denied:argument-refused"),
    ({"args": ["-fplugin=/tmp/evil.so"]}, "denied:argument-refused"),
    ({"args": ["-B/tmp"]}, "denied:argument-refused"),
    ({"environment": {"LD_PRELOAD": "/tmp/evil.so"}}, "denied:argument-refused"),
    ({"compiler": "../../bin/sh"}, "denied:compiler-not-offered"),
    ({"compiler": "sh"}, "denied:compiler-not-offered"),
])
def test_fields_outside_their_grammar_are_refused_and_recorded(attack, fields, reason):
    s, client = attack
    reply = client.job(**{"compiler_identity": IDENTITIES["gcc"], **fields})
    assert isinstance(reply, wire.Refused) and reply.reason == reason, reply
    assert one_record(s, reply)["reason"] == reason


def test_a_job_the_server_preprocesses_carries_no_decoy_text(attack):
    """Its source is the original file, compiled where the client has it: text sent beside it was never compiled,
    yet was what the record's input digest hashed.  Refused; an honest job's record hashes the compiled file."""
    s, client = attack
    fields = {"language": "c-source", "compiler_identity": IDENTITIES["gcc"]}
    reply = client.job((b"int decoy;\n", b"int compiled;\n"), **fields)
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", reply
    one_record(s, reply)
    reply = client.job((b"", b"int compiled;\n"), **fields)
    assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output, reply
    assert one_record(s, reply)["input_sha256"] == hashlib.sha256(b"int compiled;\n").hexdigest()


@pytest.mark.parametrize("path", ["/usr/include/stdio.h", "//usr/include/stdio.h", "///usr/include/stdio.h", "/src/a.c", "/src", "/",
                                  "/src/x.gch", "/src/x.h.gch/a", "/etc/passwd",
                                  "/src/a.c/inner.h", "-I/tmp", "@/src/r"])
def test_headers_cannot_overlay_the_system_the_source_or_be_compiled_input(attack, path):
    s, client = attack
    reply = client.job(language="c-source", include_paths=[path], includes=[b"int y;\n"], compiler_identity=IDENTITIES["gcc"])
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:bad-path", reply
    one_record(s, reply)


def test_non_utf8_names_compile_and_are_recorded(realm, attack):
    """A cwd of bytes b'/tmp/\\xffsrc' arrives surrogate-escaped: compiled, audited once, the log verifies."""
    s, client = attack
    reply = client.job(cwd="/tmp/\udcffsrc", source_path="\udcfe.c", compiler_identity=IDENTITIES["gcc"])
    assert isinstance(reply, wire.Result) and reply.exit_status == 0, reply
    record = one_record(s, reply)
    assert record["cwd"] == "/tmp/\udcffsrc" and record["decision"] == "allowed"
    assert verify([s.audit_path], load_public_key(realm.dir / "audit.key.pub"), live=True).ok


def test_a_zstd_bomb_is_dropped_off_the_reactor_and_others_are_served(attack, as_alice):
    """256 MiB of zeros in a 10 KiB frame: the bomber's connection is dropped; another client's job runs."""
    s, client = attack
    bomb = wire.encode_message(wire.Job("gcc", [], "cpp-output", "-c", "/src", "a.c", bytes(300 << 20)))
    client.send(bomb, compressed=True)
    other = Hostile(s.port)
    try:
        reply = other.job(compiler_identity=IDENTITIES["gcc"])
        assert isinstance(reply, wire.Result) and reply.exit_status == 0
    finally:
        other.close()
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(3):
            client.reply()
    assert s.alive()


def test_status_names_nobody_to_a_refused_principal(realm, own_server, monkeypatch, tmp_path):
    """While alice compiles, bob (who may not compile) asks for status: he sees that a job runs, not its
    source, id or owner."""
    import json
    import threading

    from test_job_path import SLOW_CXX, SLOW_FLAGS

    s = own_server()
    for key, value in realm.user_env("alice", tmp_path).items():
        monkeypatch.setenv(key, value)
    alice = Hostile(s.port)
    def compile_slowly() -> None:
        with contextlib.suppress(OSError):  # we hang up on it once bob has looked
            alice.job(blobs=(SLOW_CXX.replace("SPIN", "300000000L").encode(), b""), language="c++-cpp-output",
                      source_path="secret-name.cc", args=SLOW_FLAGS, compiler_identity=IDENTITIES["g++"], compiler="g++")

    slow = threading.Thread(target=compile_slowly)
    slow.start()
    for key, value in realm.user_env("bob", tmp_path).items():
        monkeypatch.setenv(key, value)
    bob = Hostile(s.port)
    running: list[dict] = []
    deadline = time.monotonic() + 20
    while not running and time.monotonic() < deadline:
        bob.send(wire.encode_message(wire.StatusRequest()))
        running = json.loads(bob.reply().json)["running"]
        time.sleep(0.1)
    bob.close()
    alice.close()
    slow.join(30)
    assert running, "alice's job never showed as running"
    assert running[0]["compiler"] == "g++" and "secret-name" not in json.dumps(running)
    assert running[0]["job_id"] == "" and running[0]["principal"] == "(admins only)"


def test_unauthenticated_connections_are_capped_per_source(as_alice, own_server):
    """Beyond the per-source cap, a new unauthenticated connection is closed at once; once they go,
    a real client authenticates again."""
    from securecc.server.admission import PREAUTH_PER_SOURCE

    s = own_server()
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(PREAUTH_PER_SOURCE + 8)]
    time.sleep(1)
    open_ = 0
    for sock in idle:
        sock.setblocking(False)
        try:
            assert sock.recv(1) == b""  # closed without a word
        except BlockingIOError:
            open_ += 1
        except ConnectionResetError:
            pass
    assert open_ <= PREAUTH_PER_SOURCE
    for sock in idle:
        sock.close()
    time.sleep(0.5)
    client = Hostile(s.port)
    reply = client.job(compiler_identity=IDENTITIES["gcc"])
    client.close()
    assert isinstance(reply, wire.Result)


def test_failed_handshakes_cannot_flood_the_audit_log(own_server):
    """300 garbage tokens from one address: one record (the first), not 300; a later one says how many were left out."""
    s = own_server()
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(wire.hello() + wire.token(b"\x60\x05garbagegarbage"))
            while sock.recv(4096):
                pass
    records = [r for r in s.audit() if r.get("event") == "auth"]
    assert len(records) == 1 and records[0]["reason"] == "denied:authentication-failed"


def test_a_handshake_frame_larger_than_a_token_is_refused_before_buffering(own_server):
    s = own_server()
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    sock.sendall(wire.hello() + (wire.MAX_HANDSHAKE_FRAME + 1).to_bytes(4, "big") + bytes([wire.Kind.TOKEN]))
    try:
        assert sock.recv(64) == wire.hello()  # the server's hello, then nothing: dropped
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass
    sock.close()


# --- the sandbox itself, attacked from inside --------------------------------


def sandboxed_shell(tmp_path: Path, script: str, file_size: int = 1 << 20, split_dwarf: tuple[str, str, str] | None = None,
                    mounts: tuple[tuple[str, str], ...] = (), in_memory: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``script`` where a compiler would run, as the job handler would (its uid: 65534 when root), with
    ``mounts`` (name, path) holding their names: on the scratch disk, or ``in_memory`` as the handler gives
    bwrap a small tree."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    as_handler = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if os.geteuid() == 0 else []
    if as_handler:
        os.chmod(tmp_path, 0o755)
        os.chown(scratch, 65534, 65534)
    spec = sandbox.Spec("/bin/sh", ["-c", script], scratch / "j", "/tmp/w", "a.c", {}, mounts, split_dwarf=split_dwarf)
    files = {"input": b"", **{name: name.encode() for name, _ in mounts}}
    code = (
        "import sys; from pathlib import Path, PosixPath; from securecc import sandbox; from securecc.sandbox import *;"
        f"d = sandbox.make_job_dir(Path(sys.argv[1]), 'j', {files!r}, {spec!r}, {in_memory!r}); print(d)"
    )
    job_dir = Path(subprocess.run([*as_handler, os.sys.executable, "-I", "-c", code, scratch], check=True,
                                  capture_output=True, text=True).stdout.strip())
    limits = sandbox.Limits(file_size=file_size)
    memory = sandbox.memory_files(spec, files) if in_memory else []

    def at_file_fds() -> None:  # RunningJob's childFDs, by hand: memory file n at FILE_FD + n
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in memory]
        for n, fd in enumerate(high):
            os.dup2(fd, sandbox.FILE_FD + n)

    argv = sandbox.command(spec, sandbox.Settings(limits, 65534 if as_handler else None, 65534 if as_handler else None),
                           info_fd=None, memory=[len(files[name]) for name, _ in sandbox.tree_files(spec)] if in_memory else None)
    try:
        done = subprocess.run([*as_handler, *argv], capture_output=True, timeout=60, cwd=job_dir,
                              preexec_fn=at_file_fds if memory else None, close_fds=not memory)
    finally:
        for fd in memory:
            os.close(fd)
    return done, job_dir


def test_the_output_cannot_become_a_link_and_nothing_else_is_writable(workdir):
    script = ("set +e; ln -sf /etc/shadow /job/output; rm -f /job/output; mv /job/output /job/o2; touch /job/new /tmp/new ./new /new;"
              "mkfifo /tmp/f; echo compiled > /job/output; ls -la /job >&2")
    done, job_dir = sandboxed_shell(workdir, script)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in job_dir.iterdir()) == ["input", "output"]
    output = job_dir / "output"
    assert not output.is_symlink() and output.read_bytes() == b"compiled\n"
    assert done.stderr.count(b"Read-only file system") >= 5


def test_the_output_is_bounded_by_the_file_size_limit(workdir):
    done, job_dir = sandboxed_shell(workdir, "set +e; head -c 3000000 /dev/zero > /job/output", file_size=1 << 20)
    assert done.returncode != 0
    assert os.stat(job_dir / "output").st_size <= 1 << 20


def test_a_split_dwarf_job_writes_only_its_output_directory(workdir):
    """-gsplit-dwarf binds the object's directory writable: links made there are not followed, nothing else is writable."""
    script = ("set +e; echo dwo > /tmp/w/obj/n.dwo; ln -s /etc/shadow /tmp/w/obj/n.o; touch /tmp/w/new /job/new /new;"
              "ln -s / /tmp/w/obj/root")
    done, job_dir = sandboxed_shell(workdir, script, split_dwarf=("obj/n.o", "/tmp/w/obj/n.o", "/tmp/w/obj/n.dwo"))
    assert done.returncode == 0, done.stderr
    out = job_dir / sandbox.SPLIT_DIR
    assert sorted(p.name for p in out.iterdir()) == ["n.dwo", "n.o", "root"] and not (job_dir / "new").exists()
    assert read_as_handler(out, "n.dwo") == repr(b"dwo\n")
    assert read_as_handler(out, "n.o") == read_as_handler(out, "root") == "OutputError"


HEADERS = (("h0", "/tmp/w/inc/a.h"), ("h1", "/tmp/w/b.h"), ("h2", "/tmp/other/deep/c.h"), ("h3", "/top.h"))


@pytest.mark.parametrize("in_memory", [False, True], ids=["disk", "memory"])
def test_the_job_tree_shows_each_file_at_its_path_and_cannot_be_written(workdir, in_memory):
    """The headers a job sends are bound as a tree per top-level directory, or written by bwrap from memory
    files into its root: each is where the client has it, with its own content, and nothing in the tree can
    be changed, added or removed.  From memory, only the file directly under / is on the disk."""
    script = ("set +e; for f in /tmp/w/inc/a.h /tmp/w/b.h /tmp/other/deep/c.h /top.h; do echo \"$f=$(cat $f)\"; done;"
              "echo x > /tmp/w/b.h; rm -f /tmp/w/inc/a.h; touch /tmp/w/new /tmp/other/new; mkdir /tmp/w/d;"
              "mv /tmp/w/inc /tmp/w/moved; ln -s /etc /tmp/other/deep/l; ls /proc/self/fd >&2; exit 0")
    done, job_dir = sandboxed_shell(workdir, script, mounts=HEADERS, in_memory=in_memory)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["/tmp/w/inc/a.h=h0", "/tmp/w/b.h=h1", "/tmp/other/deep/c.h=h2", "/top.h=h3"]
    assert done.stderr.count(b"Read-only file system") >= 7, done.stderr
    tree = job_dir / sandbox.TREE
    on_disk = ["tmp", "tmp/other", "tmp/other/deep", "tmp/other/deep/c.h", "tmp/w", "tmp/w/b.h", "tmp/w/inc", "tmp/w/inc/a.h"]
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == [*([] if in_memory else on_disk), "top.h"]
    if in_memory:  # bwrap closed each memory file once read: none reaches the compile
        assert not any(str(sandbox.FILE_FD + n).encode() in done.stderr.split() for n in range(3)), done.stderr
    else:
        assert (tree / "tmp/w/b.h").read_bytes() == b"h1"


def test_a_split_dwarf_job_sees_its_headers_inside_its_writable_directory(workdir):
    """A header in the object's own (writable) directory is bound on top of it, read-only: a bind of the
    whole tree there would be hidden by the writable directory."""
    script = "set +e; cat /tmp/w/obj/h.h /tmp/w/b.h; echo > /tmp/w/obj/h.h; echo dwo > /tmp/w/obj/n.dwo"
    done, job_dir = sandboxed_shell(workdir, script, split_dwarf=("obj/n.o", "/tmp/w/obj/n.o", "/tmp/w/obj/n.dwo"),
                                    mounts=(("h0", "/tmp/w/obj/h.h"), ("h1", "/tmp/w/b.h")))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"h0h1" and b"Read-only file system" in done.stderr
    assert read_as_handler(job_dir / sandbox.SPLIT_DIR, "n.dwo") == repr(b"dwo\n")


def test_one_bind_per_top_level_directory_not_one_per_header():
    """Dozens of headers in a project cost one mount; a file directly under / gets its own (the tree is never
    bound at /), and so does one under the writable -gsplit-dwarf directory."""
    headers = tuple((f"h{n}", f"/home/u/p/lib/h{n}.h") for n in range(40)) + (("m", "/home/u/p/src/m.c"), ("t", "/t.h"))
    spec = sandbox.Spec("/usr/bin/gcc", [], Path("/s/j"), "/home/u/p/src", "m.c", {}, headers, directories=("/home/u/x", "/build"))
    laid = sandbox.tree(spec)
    assert laid == sandbox.Tree(("/home/u/p",), ("/t.h",), ("/home/u/p/src",), ("/home/u/x", "/build"))
    argv = sandbox.command(spec, sandbox.Settings(sandbox.Limits(), None, None))
    binds = [argv[k + 1 : k + 3] for k, a in enumerate(argv) if a == "--ro-bind" and argv[k + 1].startswith("/s/j/")]
    assert binds == [["/s/j/tree/home/u/p", "/home/u/p"], ["/s/j/tree/t.h", "/t.h"]]
    split = sandbox.Spec("/usr/bin/gcc", [], Path("/s/j"), "/w", "m.c", {}, (("m", "/w/m.c"), ("h", "/w/inc/h.h")),
                         split_dwarf=("m.o", "/w/m.o", "/w/m.dwo"))
    assert sandbox.tree(split) == sandbox.Tree((), ("/w/m.c", "/w/inc/h.h"), (), ("/w",))


@pytest.mark.parametrize("target", ["tmp/x.h", "/tmp/../etc/x.h", "//tmp/x.h", "/"])
def test_the_job_tree_takes_only_normalized_absolute_paths(tmp_path, target):
    """The handler lays out the tree from paths the front validated, and checks them again as they become names."""
    spec = sandbox.Spec("/usr/bin/gcc", [], tmp_path / "j", "/w", "a.c", {}, (("h", target),))
    with pytest.raises(ValueError):
        sandbox.make_job_dir(tmp_path, "j", {"h": b""}, spec)
    assert not (tmp_path / "etc").exists()


def read_as_handler(directory: Path, name: str) -> str:
    """sandbox.read_output() of ``name`` as the job handler does it (its uid: 65534 when root)."""
    as_handler = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if os.geteuid() == 0 else []
    code = ("import sys; from pathlib import Path; from securecc import sandbox\n"
            "try: print(repr(sandbox.read_output(Path(sys.argv[1]), 100, sys.argv[2])))\n"
            "except sandbox.OutputError: print('OutputError')")
    return subprocess.run([*as_handler, os.sys.executable, "-I", "-c", code, directory, name], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "hardlink", "oversize"])
def test_reading_the_output_follows_nothing_and_takes_only_a_plain_file(tmp_path, kind):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"KEYTAB")
    output = job_dir / "output"
    if kind == "symlink":
        output.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(output)
    elif kind == "directory":
        output.mkdir()
    elif kind == "hardlink":
        os.link(secret, output)
    else:
        output.write_bytes(b"x" * 101)
    with pytest.raises(sandbox.OutputError):
        sandbox.read_output(job_dir, 100)


# --- property-based: any job the boundary accepts runs with exactly the policy's argv ---------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from("\udcff\udc80@-./\x00\n\x1b"),
                 max_size=40)
_paths = st.one_of(_names, st.lists(_names, max_size=5).map(lambda parts: "/" + "/".join(parts)))
_jobs = st.builds(
    wire.Job,
    compiler=st.sampled_from(["gcc", "g++", "sh", "../gcc", ""]) | _names,
    args=st.lists(st.sampled_from(["-O2", "-g", "-c", "-o", "-I/x", "-DX=1", "@f", "-wrapper", "-B/x"]) | _names, max_size=6),
    language=st.sampled_from(["c", "cpp-output", "c-source", "c++-source", "assembler", ""]) | _names,
    mode=st.sampled_from(["-c", "-S", "-E", ""]),
    cwd=_paths, source_path=_paths, source=st.just(b"int x;\n"), original=st.just(b""),
    environment=st.dictionaries(st.sampled_from(["LC_ALL", "SOURCE_DATE_EPOCH", "LD_PRELOAD", "PATH"]), _names, max_size=2),
    include_paths=st.lists(_paths, max_size=3), includes=st.just([]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_jobs)
def test_the_boundary_admits_only_jobs_whose_argv_the_policy_allows(job):
    from securecc import args as argpolicy
    from securecc.server import jobspec

    job = wire.Job(**{**job.__dict__, "includes": [b""] * len(job.include_paths)})
    try:
        valid = jobspec.validate(job, ("/opt/cross",))
    except jobspec.Invalid as e:
        assert e.reason.startswith("denied:")
        return
    assert argpolicy.refused_argument(valid.args, valid.preprocessing) is None
    assert not valid.source_path.startswith(("-", "@"))
    for path in (valid.cwd, valid.source_mount, *valid.include_paths):
        assert path.startswith("/") and not any(c in path for c in "\0\n\r\x1b")
        assert not path.startswith(("/usr/", "/job", "/proc", "/etc", "/opt/cross"))
    spec = sandbox.Spec("/usr/bin/gcc", [*argpolicy.COMPILE_LANGUAGE[valid.language.value], *valid.args, valid.mode.value],
                        Path("/scratch/j"), valid.cwd, valid.source_path, valid.environment, preprocessed=not valid.preprocessing)
    argv = sandbox.command(spec, sandbox.Settings(sandbox.Limits(), None, None))
    compiler_args = argv[argv.index("/usr/bin/gcc") + 1 :]
    client_strings = set(valid.args) | {valid.source_path}
    for arg in compiler_args:  # every compiler argument is ours, a vetted option, or the source path
        assert arg in client_strings or arg in {"-pipe", "-x", "-o", "/job/output", "/job/input", "-c", "-S",
                                                "-fdirectives-only", *argpolicy.LANGUAGES} or \
            arg == f"-fdebug-prefix-map=/job/input={valid.source_path}", arg


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(job=_jobs)
def test_the_real_server_answers_every_crafted_job_and_records_it_once(as_alice, server, job):
    client = Hostile(server.port)
    try:
        includes = [b"int h;\n"] * len(job.include_paths)
        reply = client.job(blobs=(job.source, job.original), includes=includes, **{
            k: getattr(job, k) for k in ("compiler", "args", "language", "mode", "cwd", "source_path", "environment",
                                         "include_paths")}, compiler_identity=IDENTITIES["gcc"])
    finally:
        client.close()
    assert isinstance(reply, (wire.Refused, wire.Result)), reply
    assert len(server.jobs(job_id=reply.job_id)) == 1
    assert server.alive()


@pytest.mark.parametrize("text, environment, cached", [
    (b'const char *d = __DATE__;\n', {}, False),
    (b'const char *t = __TIME__;\n', {}, False),
    (b'#define P(a, b) a ## b\nconst char *t = P(__TIME, __);\n', {}, False),
    (b'#define P(a, b) a ## b\nconst char *t = P(__TI, ME__);\n', {}, False),
    (b'const char *d = __DATE__;\n', {"SOURCE_DATE_EPOCH": "1700000000"}, True),
    (b'int plain;\n', {}, True),
])
def test_time_macros_are_never_served_from_the_cache(attack, text, environment, cached):
    """An object that embeds the time of its compile must not come back from yesterday's cache."""
    s, client = attack
    replies = []
    for _ in range(2):
        replies.append(client.job(blobs=(text, b""), language="c-directives", environment=environment,
                                  compiler_identity=IDENTITIES["gcc"]))
        time.sleep(0.3)  # the handler writes the entry after the reply
    assert all(isinstance(r, wire.Result) and r.exit_status == 0 for r in replies), replies
    kinds = [one_record(s, r).get("cache") for r in replies]
    assert kinds == (["stored", "hit"] if cached else [None, None])
