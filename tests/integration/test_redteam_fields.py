"""Red team: the job fields added with server-side preprocessing (system_headers, output_path), the
-Wa/-Xassembler allowlist, assembler jobs, and what a hostile client may send instead of the client-only
steps (-march=native expansion, one job per source).

Every test asserts the SAFE behaviour: it passes while the defence holds.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import IDENTITIES
from hostile import Hostile
from test_hostile import read_as_handler, sandboxed_shell, secrets_of

from securecc import args as argpolicy
from securecc import protocol as wire
from securecc import toolchain
from securecc.server import jobspec
from securecc.toolchain import HeaderDigests

GCC = IDENTITIES["gcc"]


@pytest.fixture
def alice(realm, monkeypatch, tmp_path):
    for key, value in realm.user_env("alice", tmp_path).items():
        monkeypatch.setenv(key, value)


def send(server, workdir: Path, text: bytes, includes: list[bytes] = (), **fields: object) -> wire.Message:
    fields = {"language": "c-source", "cwd": str(workdir), "source_path": "m.c", "compiler_identity": GCC, **fields}
    client = Hostile(server.port)
    try:
        return client.job((b"", text), list(includes), **fields)
    finally:
        client.close()


def entry(path: str, label: str) -> bytes:
    return f"{path}\0{label}\n".encode("utf-8", "surrogateescape")


def digest_of(*entries: bytes) -> str:
    return hashlib.sha256(b"".join(entries)).hexdigest()


# --- 1. Job.system_headers: what the handler reads and hashes before the sandbox -----------------


def aliases(count: int) -> list[str]:
    """Distinct names of one 110 MB file through Debian llvm-14's loop links (build/Release -> ..)."""
    base = "/usr/lib/llvm-14"
    names = []
    for n in itertools.count(1):
        for combo in itertools.product(["Release", "Debug+Asserts"], repeat=n):
            names.append(base + "".join(f"/build/{c}" for c in combo) + "/lib/libLLVM-14.so")
            if len(names) == count:
                return names
    return names


@pytest.fixture
def counted_hashing(monkeypatch):
    """Bytes hashed by toolchain.HeaderDigests, however it hashes (sha256(data) or file_digest(f))."""
    hashed = [0]
    real_sha256, real_file_digest = toolchain.hashlib.sha256, toolchain.hashlib.file_digest

    def sha256(data: bytes = b"", **kw: object):
        hashed[0] += len(data)
        return real_sha256(data, **kw)

    def file_digest(f, digest):
        hashed[0] += os.fstat(f.fileno()).st_size
        return real_file_digest(f, digest)

    monkeypatch.setattr(toolchain.hashlib, "sha256", sha256)
    monkeypatch.setattr(toolchain.hashlib, "file_digest", file_digest)
    return hashed


def test_names_of_one_file_through_link_loops_hash_it_once(tmp_path, counted_hashing):
    """BROKEN before the fix: the cache was keyed by the name, so every alias (usr/loop/loop/.../big, and
    Debian really has /usr/bin/X11 -> . and /usr/lib/llvm-14/build/{Release,Debug+Asserts} -> ..) read and
    hashed the whole file again: 20,000 names of libLLVM (110 MB) per job = 2 TB of hashing, in a handler
    thread no timeout or kill stops, and a name-keyed cache that grows with every job."""
    usr = tmp_path / "usr"
    usr.mkdir()
    (usr / "loop").symlink_to(".")
    (usr / "big.h").write_bytes(b"x" * (1 << 20))
    names = [str(usr) + "/loop" * k + "/big.h" for k in range(30)]
    digests = HeaderDigests()
    expected = digest_of(*(entry(n, hashlib.sha256(b"x" * (1 << 20)).hexdigest()) for n in names))
    counted_hashing[0] = 0
    assert digests.of(names, f"{usr}/") == expected  # the digest itself is unchanged
    assert counted_hashing[0] < 2 * (1 << 20), counted_hashing[0]  # the file once, plus the small records
    before = counted_hashing[0]
    assert digests.of([str(usr) + "/loop" * 31 + "/big.h"], f"{usr}/")
    assert counted_hashing[0] - before < 4096  # a new alias of a known file: a stat, not a read


def test_a_name_remembered_by_its_stat_is_checked_again_when_it_leads_elsewhere(tmp_path, counted_hashing):
    """The one-stat answer for a name seen before holds only while the name leads to the same file: a link
    moved to another header, or to a secret outside /usr, is found; a flood of names keeps the memory bounded."""
    usr = tmp_path / "usr"
    usr.mkdir()
    (usr / "a.h").write_text("int a;\n")
    (usr / "b.h").write_text("int b;\n")
    (tmp_path / "secret").write_text("key\n")
    link, within = usr / "link.h", f"{usr}/"
    link.symlink_to("a.h")
    digests = HeaderDigests()
    assert digests.of([str(link)], within) == digest_of(entry(str(link), hashlib.sha256(b"int a;\n").hexdigest()))
    link.unlink()
    link.symlink_to("b.h")
    assert digests.of([str(link)], within) == digest_of(entry(str(link), hashlib.sha256(b"int b;\n").hexdigest()))
    link.unlink()
    link.symlink_to(tmp_path / "secret")
    assert digests.of([str(link)], within) == digest_of(entry(str(link), "outside"))
    (usr / "loop").symlink_to(".")
    flood = [str(usr) + "/loop" * (k % 30) + "/" * (k // 30 + 1) + "a.h" for k in range(2 * toolchain.NAMES_REMEMBERED)]
    digests.of(flood, within)
    assert len(digests._named) <= toolchain.NAMES_REMEMBERED


def test_a_fifo_or_device_among_the_headers_is_not_opened(tmp_path):
    """A FIFO under /usr blocked the digest thread for ever (open() waits for a writer); a link to a
    device is never opened (opening /dev/watchdog or a tape has effects), and neither is read."""
    usr = tmp_path / "usr"
    usr.mkdir()
    os.mkfifo(usr / "fifo.h")
    (usr / "tty.h").symlink_to("/dev/tty")
    (usr / "dir.h").mkdir()
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(HeaderDigests().of(
        [str(usr / "fifo.h"), str(usr / "tty.h"), str(usr / "dir.h")], f"{usr}/")), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # let the stuck thread go before failing
        os.close(os.open(usr / "fifo.h", os.O_WRONLY | os.O_NONBLOCK))
    assert result, "the digest of a FIFO blocked"
    assert result[0] == digest_of(entry(str(usr / "fifo.h"), "missing"), entry(str(usr / "tty.h"), "outside"),
                                  entry(str(usr / "dir.h"), "missing"))


@pytest.mark.skipif(not os.path.exists(aliases(1)[0]), reason="needs Debian's llvm-14 (its build/Release -> .. link)")
def test_a_job_naming_one_big_file_many_times_does_not_pin_the_handler(realm, alice, own_server, workdir):
    """BROKEN before the fix, end to end: 100 names of libLLVM-14.so (110 MB) took 21 s of handler time here;
    a job's 64 KB header holds ~800 such names (~3 min, uncancellable: the digest runs before the sandbox,
    with no timeout, and a disconnect does not stop it), and ten such jobs fill the handler's thread pool,
    which every job's header check and every cache read waits for.  Now the file is read once."""
    s = own_server()
    names = aliases(101)
    send(s, workdir, b"int x;\n", system_headers=names[:1], system_digest="0" * 64)  # warm: read the file once
    started = time.monotonic()
    reply = send(s, workdir, b"int x;\n", system_headers=names[1:], system_digest="0" * 64)
    elapsed = time.monotonic() - started
    assert isinstance(reply, wire.Result) and b"system headers differ" in reply.stderr, reply
    assert elapsed < 5, f"100 aliases of one file took {elapsed:.1f} s"
    reply = send(s, workdir, b"int y;\n")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output


@pytest.mark.parametrize("path", [
    "/usr/./include/stdio.h", "/usr/include//stdio.h", "/usr/include/", "//usr/include/stdio.h",
    "/usr/local/include/x.h", "/usr/include/\nx.h", "/usr/include/\x00x.h", "/usr/include/" + "x" * 300,
    "/usr/lib/../../proc/self/environ", "/proc/self/environ", "/dev/zero", "/job/input", "", "/usr/bin/X11/../../etc/passwd",
    "/usr/include/\udcc3\udca9.h",  # the bytes of "é.h" spelt as two escapes: one file with two names
])
def test_system_header_names_outside_their_grammar_are_refused(server, alice, workdir, path):
    reply = send(server, workdir, b"int x;\n", system_headers=[path])
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:bad-path", (path, reply)


def test_the_header_cap_bounds_how_many_system_headers_a_job_names(server, alice, workdir):
    """20,000 names (jobspec.MAX_HEADERS) never arrive: the job header is capped at 64 KB
    (protocol.MAX_HEADER), the connection is dropped, and the server serves the next one."""
    with pytest.raises((ConnectionError, OSError)):
        send(server, workdir, b"int x;\n", system_headers=["/usr/include/stdio.h"] * (wire.MAX_HEADER // 20))
    reply = send(server, workdir, b"int y;\n")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0


def test_system_headers_and_digest_are_refused_with_text_jobs(server, alice, workdir):
    for fields in ({"system_headers": ["/usr/include/stdio.h"]}, {"system_digest": "0" * 64}):
        reply = send(server, workdir, b"int x;\n", language="cpp-output", **fields)
        assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", reply
    for digest in ("", "0" * 63, "G" * 64, "0" * 64 + "\n"):
        reply = send(server, workdir, b"int x;\n", system_digest=digest)
        assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", reply


def test_non_utf8_system_header_names_are_hashed_and_the_handler_lives(server, alice, workdir):
    """A surrogate-escaped name crosses the front, the handler link (JSON) and the digest as the client's bytes."""
    name = "/usr/include/\udcff\udc80.h"
    reply = send(server, workdir, b"int x;\n", system_headers=[name], system_digest=digest_of(entry(name, "missing")))
    assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output, reply
    reply = send(server, workdir, b"int y;\n")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0


@pytest.mark.skipif(not os.path.islink("/usr/lib/ssl/openssl.cnf"), reason="needs /usr/lib/ssl/openssl.cnf -> /etc")
def test_the_digest_is_no_oracle_for_files_behind_links_out_of_usr(server, alice, workdir):
    """A guess of /etc/ssl/openssl.cnf (behind /usr/lib/ssl/openssl.cnf) is never compared: the handler
    says 'outside' whatever the file holds, as the sandbox, which has no /etc, cannot read it either."""
    name = "/usr/lib/ssl/openssl.cnf"
    right_guess = digest_of(entry(name, hashlib.sha256(Path(name).read_bytes()).hexdigest()))
    reply = send(server, workdir, b"int x;\n", system_headers=[name], system_digest=right_guess)
    assert isinstance(reply, wire.Result) and b"system headers differ" in reply.stderr, reply
    reply = send(server, workdir, b"int x;\n", system_headers=[name], system_digest=digest_of(entry(name, "outside")))
    assert isinstance(reply, wire.Result) and reply.exit_status == 0, reply


def test_a_header_behind_a_link_out_of_usr_is_not_in_the_sandbox(server, alice, workdir):
    """The digest says 'outside' and matches, but the compile still cannot read /etc through /usr."""
    name = "/usr/lib/ssl/openssl.cnf"
    if not os.path.islink(name):
        pytest.skip("needs /usr/lib/ssl/openssl.cnf -> /etc")
    reply = send(server, workdir, f'#include "{name}"\n'.encode(), system_headers=[name],
                 system_digest=digest_of(entry(name, "outside")))
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and reply.output is None
    assert b"No such file" in reply.stderr and Path(name).read_bytes()[:40] not in reply.stderr


# --- 2. Job.output_path with -gsplit-dwarf: a writable directory at a path the job names ---------


def split_job(output_path: str, cwd: str = "/w/src", roots: tuple[str, ...] = (), **fields: object) -> jobspec.ValidJob:
    job = wire.Job("gcc", ["-g", "-gsplit-dwarf"], "c-source", "-c", cwd, "m.c", b"", b"int x;\n",
                   system_digest=HeaderDigests().of([]), output_path=output_path, **fields)
    return jobspec.validate(job, roots)


@pytest.mark.parametrize("output_path, roots", [
    ("/opt/m.o", ("/opt/cross",)),  # over an ancestor of a compiler's root: the root is hidden under scratch
    ("/opt/cross/m.o", ("/opt/cross",)),  # inside the root
    ("/opt/cross/bin/m.o", ("/opt/cross",)),
    ("/m.o", ()),  # "/" writable
    ("/usr/m.o", ()), ("/usr/local/m.o", ()), ("/job/m.o", ()), ("/proc/m.o", ()), ("/dev/shm/m.o", ()),
    ("/etc/m.o", ()), ("/run/m.o", ()), ("/sys/m.o", ()), ("/lib/m.o", ()), ("/bin/m.o", ()),
    ("../../m.o", ()),  # normalizes to /m.o
    ("..", ()), ("../src", ()), (".", ()), ("obj/..", ()), ("-o", ()), ("@m.o", ()), ("/tmp/../usr/m.o", ()),
    ("m.c", ()), ("m.dwo", ()), ("//w/m.o", ()),
])
def test_the_writable_directory_never_covers_the_system_a_compiler_or_the_job(output_path, roots):
    """BROKEN before the fix for an ancestor of a compiler root (/opt for /opt/cross): the sandbox's
    writable scratch directory was bound over it, hiding the compiler's own files."""
    with pytest.raises(jobspec.Invalid):
        split_job(output_path, roots=roots)


@pytest.mark.parametrize("fields", [
    {"include_paths": ["/w/obj"], "includes": [b""]},  # a header at the directory itself
    {"include_paths": ["/w/obj/m.o"], "includes": [b""]},  # a header at the object
    {"include_paths": ["/w/obj/m.dwo"], "includes": [b""]},  # or at the .dwo
    {"include_paths": ["/w/obj/m.o/x.h"], "includes": [b""]},  # under the object
])
def test_the_outputs_clash_with_no_header(fields):
    with pytest.raises(jobspec.Invalid):
        split_job("/w/obj/m.o", **fields)


@pytest.mark.parametrize("mode, language, args", [
    ("-S", "c-source", ["-gsplit-dwarf"]),  # no object
    ("-c", "c-source", []),  # an output path without -gsplit-dwarf
    ("-c", "c-source", ["-gsplit-dwarf=split"]),  # clang's spelling: not on the list at all
])
def test_an_output_path_goes_only_with_gsplit_dwarf_and_c(mode, language, args):
    job = wire.Job("gcc", args, language, mode, "/w", "m.c", b"", b"int x;\n", system_digest=HeaderDigests().of([]),
                   output_path="m.o")
    with pytest.raises(jobspec.Invalid):
        jobspec.validate(job)


@pytest.mark.parametrize("output_path", ["/tmp/m.o", "/tmp/deep/m.o", "../m.o", "obj/m.o", "/home/x/m.o", "./obj//m.o",
                                         "m.o/", "obj/../m.o", "/lib/../tmp/x/m.o"])
def test_split_dwarf_outputs_where_the_job_likes_come_back_from_scratch_only(server, alice, workdir, output_path):
    """The object's directory is bound from the job's scratch wherever the job puts it (/tmp, an ancestor of
    its cwd, a directory no one has): the compile either fails or returns its object and .dwo, nothing of
    the host's, and the server keeps serving."""
    cwd = workdir / "src"
    reply = send(server, workdir, b"int x = 1;\nint f(void) { return x; }\n", cwd=str(cwd), args=["-g", "-gsplit-dwarf"],
                 output_path=output_path)
    assert isinstance(reply, wire.Result), reply
    if reply.exit_status == 0:
        assert reply.output.startswith(b"\x7fELF") and reply.dwo.startswith(b"\x7fELF")
        assert os.path.basename(output_path).removesuffix(".o").encode() + b".dwo" in reply.output
    else:
        assert reply.output is None and reply.dwo is None
    assert not (cwd / "m.o").exists() and not Path(output_path).exists()  # nothing lands on the host
    reply = send(server, workdir, b"int y;\n")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0


@pytest.mark.parametrize("language, text", [
    ("cpp-output", b'# 1 "m.c"\nint x = 1;\n'),
    ("assembler-source", b"  .text\n  .globl f\nf: ret\n"),
    ("assembler-with-cpp-source", b"#define R ret\n  .text\nf: R\n"),
])
def test_split_dwarf_with_other_languages_fails_or_returns_only_its_outputs(server, alice, workdir, language, text):
    """Our client never sends -gsplit-dwarf with assembler or preprocessed text; a hostile one may.  The
    compile writes only the scratch directory; a missing .dwo is a failed job, not a handler error."""
    fields = {"system_digest": ""} if language == "cpp-output" else {}
    reply = Hostile(server.port).job((text, b"") if language == "cpp-output" else (b"", text), [], language=language,
                                     cwd=str(workdir), source_path="m.c" if language == "cpp-output" else "m.s",
                                     compiler_identity=GCC, args=["-g", "-gsplit-dwarf"], output_path="obj/m.o", **fields)
    assert isinstance(reply, wire.Result), reply
    assert reply.exit_status == 0 or (reply.output is None and b"handler failed" not in reply.stderr), reply.stderr
    reply = send(server, workdir, b"int y;\n")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0


def test_a_header_in_the_writable_directory_is_read_only_on_top(server, alice, workdir):
    """A header in the object's directory is bound read-only over the writable scratch: the compile reads it,
    and gcc's own write of the object there still works."""
    header = str(workdir / "obj" / "h.h")
    reply = send(server, workdir, b'#include "obj/h.h"\nint f(void) { return H; }\n', include_paths=[header],
                 includes=[b"#define H 7\n"], args=["-g", "-gsplit-dwarf"], output_path="obj/m.o")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.dwo, reply


def test_a_job_cannot_make_the_handler_build_a_tree_it_cannot_remove(own_server, alice, workdir):
    """BROKEN before the fix (found by an independent review): headers 600, 1200 and 1800 directories deep
    passed validation, the handler made them in the job's tree, and shutil.rmtree's recursion gave up on
    them (RecursionError, not an OSError), so every such job left ~1800 directories on the scratch disk
    and a restarted handler failed in prepare_scratch.  Now a path has at most MAX_DEPTH components."""
    s = own_server()
    deep = [f"{workdir}{'/a' * depth}/x.h" for depth in (600, 1200, 1800)]
    reply = send(s, workdir, b"int x;\n", include_paths=deep, includes=[b""] * 3)
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:bad-path", reply
    within = f"{workdir}{'/a' * (jobspec.MAX_DEPTH - workdir.as_posix().count('/') - 1)}/x.h"
    reply = send(s, workdir, b'#include "x.h"\nint f(void) { return X; }\n', include_paths=[within],
                 includes=[b"#define X 1\n"], args=["-I" + os.path.dirname(within)])
    assert isinstance(reply, wire.Result) and reply.exit_status == 0, reply
    scratch = s.config_path.parent / "scratch"
    deadline = time.monotonic() + 5  # removed in a thread, after the answer
    while any(scratch.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(scratch.iterdir()), "a job directory was left behind"


@pytest.mark.parametrize("trick", [
    "mkfifo /tmp/w/obj/n.o",  # the handler would wait for a writer
    "mkdir /tmp/w/obj/n.o",
    "echo x > /tmp/w/obj/real; ln /tmp/w/obj/real /tmp/w/obj/n.o",  # two links
    "ln -s /proc/self/environ /tmp/w/obj/n.o",
    "ln -s ../../../../../../../etc/shadow /tmp/w/obj/n.o",
    "head -c 200 /dev/zero > /tmp/w/obj/n.o",  # over the cap (100 bytes in read_as_handler)
])
def test_what_a_taken_over_compiler_leaves_in_the_split_directory_is_never_read(workdir, trick):
    done, job_dir = sandboxed_shell(workdir, f"set +e; {trick}; echo d > /tmp/w/obj/n.dwo",
                                    split_dwarf=("obj/n.o", "/tmp/w/obj/n.o", "/tmp/w/obj/n.dwo"))
    assert done.returncode == 0, done.stderr
    started = time.monotonic()
    assert read_as_handler(job_dir / "out", "n.o") == "OutputError"
    assert time.monotonic() - started < 10


def test_a_taken_over_compiler_can_write_no_tmpfs(workdir):
    """BROKEN before the fix: bwrap's --dev /dev is a tmpfs without a size, and it stayed writable: a compile
    (taken over) could fill the host's memory through /dev/shm or /dev, despite 'nothing else is writable'."""
    script = ("set +e; for p in /dev/shm/f /dev/f /tmp/f /f /proc/f /job/f /tmp/w/f; do echo x > $p && echo WROTE $p; done; "
              "echo ok > /dev/null && echo null-ok")
    done, _ = sandboxed_shell(workdir, script)
    assert b"WROTE" not in done.stdout, done.stdout
    assert b"null-ok" in done.stdout, done.stderr


def test_the_sandbox_has_three_devices_and_no_terminal_or_shared_memory(workdir):
    """/dev holds what a compile opens (null, zero, and urandom, from which cc1 seeds itself): no /dev/shm, no
    devpts, no tty, no tmpfs of bwrap's own under it."""
    done, _ = sandboxed_shell(workdir, "ls -A /dev; exit 0")
    assert done.stdout.split() == [b"null", b"urandom", b"zero"], done.stdout


# --- 3. The assembler: -Wa/-Xassembler items, and .s files whose .incbin the server never checks ---


@pytest.mark.parametrize("args", [
    ["-Wa,-I/etc"], ["-Wa,-I", "/etc"], ["-Wa,--MD=/tmp/d"], ["-Wa,--MD,x"], ["-Wa,-adhln=l"], ["-Wa,-a=l"], ["-Wa,-al"],
    ["-Wa,@/etc/passwd"], ["-Wa,-o,x.o"], ["-Wa,--defsym,x=1"], ["-Wa,-D"], ["-Wa,-R"], ["-Wa,-Z"], ["-Wa,-K"],
    ["-Wa,--listing-lhs-width=1"], ["-Wa,--statistics"], ["-Wa,--debug-prefix-map=/a=/b"], ["-Wa,--itbl=x"],
    ["-Wa,-march=x,-I/"], ["-Wa,"], ["-Wa,,--64"], ["-Wa,--64,"], ["-Wa,--64,,"], ["-Wa,-march=native/../x"],
    ["-Wa,-march=a b"], ["-Wa,-g -I/etc"], ["-Wa,--gdwarf-5\n-I/etc"], ["-Wa,-mtune=$(id)"], ["-Wa,-O3"],
    ["-Wa,--compress-debug-sections=lz4"], ["-Wa,--MD"], ["-Wa,--version"], ["-Wa,--help"],
    ["-Xassembler", "-I"], ["-Xassembler", "-I/etc"], ["-Xassembler", "@/etc/passwd"], ["-Xassembler", "--MD=x"],
    ["-Xassembler", "--64,-I/etc"], ["-Xassembler"], ["-Xassembler", "-Xassembler"], ["-Xassembler=--64"],
    ["-Xassembler", "--noexecstack", "-Xassembler", "-adhln=x"],
])
def test_assembler_items_that_name_files_are_refused(args):
    assert argpolicy.refused_argument(args, preprocessing=True) is not None, args


@pytest.mark.parametrize("args", [
    ["-Wa,--noexecstack,--gdwarf-5,--compress-debug-sections=zstd,-O2,--64,-mrelax-relocations=no,-mx86-used-note=no"],
    ["-Wa,-march=generic64,-mtune=generic64,--fatal-warnings,-W,--generate-missing-build-notes=yes"],
    ["-Xassembler", "--noexecstack", "-Xassembler", "-g", "-Wa,-mbranches-within-32B-boundaries"],
    ["-Wa,--gdwarf-sections,--nocompress-debug-sections,-mlfence-before-ret=none,-malign-branch=jcc+jmp"],
])
def test_every_allowed_assembler_item_runs_and_writes_nothing_else(server, alice, workdir, args):
    """The allowed items, all at once, on a .s and a C file: the compile succeeds and returns one object."""
    for language, path, text in (("assembler-source", "m.s", b"  .text\n  .globl f\nf: ret\n"),
                                 ("c-source", "m.c", b"int f(void) { return 1; }\n")):
        reply = send(server, workdir, text, source_path=path, language=language, args=["-g", *args])
        assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output.startswith(b"\x7fELF"), (
            args, reply.stderr if isinstance(reply, wire.Result) else reply)


def targets(realm, server) -> dict[str, bytes]:
    """Host files a job must never read, with a marker of their content."""
    found = {str(realm.dir / "service.keytab"): secrets_of(realm)[0], str(realm.dir / "audit.key"): secrets_of(realm)[1]}
    for path in (server.config_path, server.audit_path, Path("/etc/shadow"), Path("/etc/passwd"),
                 Path("/etc/krb5.conf"), Path(realm.dir / "securecc.yaml")):
        if path.exists() and path.stat().st_size >= 16:
            found[str(path)] = path.read_bytes()[:16]
    return found


def test_incbin_and_include_of_host_files_find_nothing(realm, server, alice, workdir):
    """The server does not check .incbin/.include (only our client does): the sandbox must simply not
    have the host's files.  Each file is asked for by .incbin (bytes into the object) and .include."""
    for path, marker in targets(realm, server).items():
        for directive in (".incbin", ".include"):
            text = f'  .section .rodata\n  {directive} "{path}"\n'.encode()
            reply = send(server, workdir, text, source_path="m.s", language="assembler-source")
            assert isinstance(reply, wire.Result), reply
            assert reply.exit_status != 0 and reply.output is None, (path, directive)
            assert marker not in reply.stderr + reply.stdout


@pytest.mark.parametrize("path", ["/proc/1/environ", "/proc/self/environ", "/proc/1/cmdline", "/proc/self/mountinfo",
                                  "/proc/1/cwd/output", "/proc/1/root/job/input", "/sys/kernel/notes"])
def test_the_sandbox_has_no_proc_or_sys(realm, server, alice, workdir, path):
    """No /proc (its mountinfo named the server's scratch directory) and no /sys: .incbin finds nothing there."""
    text = f'  .section .rodata\n  .incbin "{path}"\n'.encode()
    reply = send(server, workdir, text, source_path="m.s", language="assembler-source")
    assert isinstance(reply, wire.Result) and reply.exit_status != 0 and reply.output is None, reply
    assert f"file not found: {path}".encode() in reply.stderr, reply.stderr


@pytest.mark.parametrize("path", ["/job/input", "/dev/stdin"])
def test_what_the_sandbox_does_hold_carries_no_secret(realm, server, alice, workdir, path):
    """/job and /dev are there: what .incbin reads from them names no secret."""
    text = f'  .section .rodata\n  .incbin "{path}"\n'.encode()
    reply = send(server, workdir, text, source_path="m.s", language="assembler-source")
    assert isinstance(reply, wire.Result), reply
    leaked = (reply.output or b"") + reply.stderr
    for marker in [*secrets_of(realm), b"KRB5", b"keytab", str(realm.dir / "service").encode(), b"SECURECC_"]:
        assert marker not in leaked, (path, marker)


def test_incbin_of_an_endless_device_is_bounded(server, alice, workdir):
    """.incbin "/dev/zero" (or .include of it) is bounded by the sandbox's limits, and the server goes on."""
    for directive in (".incbin", ".include"):
        text = f'  .section .rodata\n  {directive} "/dev/zero"\n'.encode()
        reply = send(server, workdir, text, source_path="m.s", language="assembler-source")
        assert isinstance(reply, (wire.Result, wire.Refused)), reply
        assert getattr(reply, "output", None) is None
    reply = send(server, workdir, b"int y;\n")
    assert isinstance(reply, wire.Result) and reply.exit_status == 0


# --- 4. What our client does for the server, and a hostile one may skip -------------------------


@pytest.mark.parametrize("args", [
    ["-march=native"], ["-mtune=native"], ["-mcpu=native"], ["-O2", "-march=native", "-g"],
    ["b.c"], ["/usr/include/stdio.h"], ["-c"], ["-S"], ["-E"], ["-o", "x.o"], ["-ox.o"], ["-x", "c"], ["-xc"], ["-"],
    [""], ["-include"], ["-I"], ["-D"], ["--include=x"], ["--specs=x"], ["-specs=x"], ["-B/tmp"], ["-Bx"],
    ["-save-temps"], ["-MD"], ["-MF", "x"], ["-Wp,-MD,x"], ["-Xpreprocessor", "-MD"], ["-fplugin=x.so"],
    ["-wrapper", "x"], ["@x"], ["-fdiagnostics-format=json-file"], ["-fdump-tree-all"], ["-aux-info", "x"],
    ["-Xlinker", "x"], ["-Wl,x"], ["-Xclang", "-load"], ["-fsanitize-ignorelist=x"], ["-fprofile-use"],
    ["-gsplit-dwarf=single"], ["--param", "x"], ["-fcallgraph-info"], ["-fstack-usage"],
])
def test_the_server_refuses_what_the_client_expands_or_splits_and_what_names_files(args):
    assert argpolicy.refused_argument(args, preprocessing=True) is not None, args


def test_a_hostile_client_cannot_send_two_sources_or_native(server, alice, workdir):
    for args in (["-march=native"], ["-mtune=native"], ["n.c"], ["-c", "n.c"]):
        reply = send(server, workdir, b"int x;\n", args=args, include_paths=[str(workdir / "n.c")], includes=[b"int n;\n"])
        assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", (args, reply)


@pytest.mark.parametrize("args, said", [
    (["-D", "-wrapper"], b"macro names must be identifiers"), (["-U", "-fplugin=x"], b"macro names must be identifiers"),
    (["-include", "@x"], None), (["-I", "@x"], None), (["-I", "-B/tmp"], b""),
])
def test_a_value_that_looks_like_an_option_stays_a_value(server, alice, workdir, args, said):
    """-D/-I/-include/-U take the next argument as their own, as gcc does: it never becomes an option;
    one that begins with @ is refused (a response file: see below)."""
    reply = send(server, workdir, b"int x;\n", args=args)
    if said is None:
        assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", reply
        return
    assert isinstance(reply, wire.Result), reply
    assert said in reply.stderr and b"plugin" not in reply.stderr.replace(b"-fplugin=x", b""), reply.stderr


# --- 5. Response files: gcc (and cc1) read any argv element that begins with "@" as options -------

PLUGIN_C = b'#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void c(void) { dprintf(2, "PWNED uid=%d\\n", getuid()); }\n'


@pytest.mark.parametrize("option", ["-D", "-U", "-I", "-include", "-imacros", "-isystem", "-iquote", "-idirafter"])
def test_a_separate_value_never_names_a_response_file(server, alice, workdir, option):
    """BROKEN before the fix: the policy skips the separate value of -D/-I/-include..., and gcc's driver
    expands '@FILE' wherever it stands in argv.  '-D @/w/opts' with a shipped header opts holding
    '-wrapper /bin/sh,-c,...' ran a shell in the sandbox: any option, past the whole argument policy."""
    cwd = workdir / "src"
    opts = str(cwd / "opts")
    reply = send(server, workdir, b"int x;\n", cwd=str(cwd), args=[option, "@" + opts], include_paths=[opts],
                 includes=[b"X -wrapper '/bin/sh,-c,echo PWNED-$(id -u) >&2'\n"])
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", (
        reply.stderr if isinstance(reply, wire.Result) else reply)


@pytest.mark.parametrize("option", ["-D", "-U", "-I"])
def test_a_joined_value_never_names_a_response_file(server, alice, workdir, option):
    """Found in review of the fix above: the driver hands cc1 '-D@FILE' as '-D' '@FILE', which cc1 expands."""
    cwd = workdir / "src"
    opts = str(cwd / "opts")
    reply = send(server, workdir, b"int x;\n", cwd=str(cwd), args=[f"{option}@{opts}"], include_paths=[opts],
                 includes=[b"X -wrapper '/bin/sh,-c,echo PWNED-$(id -u) >&2'\n"])
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:argument-refused", (
        reply.stderr if isinstance(reply, wire.Result) else reply)


def test_the_objects_name_never_becomes_a_response_file_for_cc1(server, alice, workdir, tmp_path):
    """BROKEN before the fix: with -gsplit-dwarf, gcc passes cc1 '-dumpbase @evil.c' for the object
    'obj/@evil.o', and cc1 reads evil.c (a header the job ships in its cwd) as options: '-fplugin=' loaded a
    shared object shipped as another 'header', whose constructor ran inside the sandbox."""
    cwd = workdir / "src"
    plugin = tmp_path / "p.so"
    (tmp_path / "p.c").write_bytes(PLUGIN_C)
    assert os.system(f"gcc -shared -fPIC -o {plugin} {tmp_path / 'p.c'}") == 0
    for output_path in ("obj/@evil.o", "./@evil.o", str(cwd / "obj" / "@evil.o"), "@obj/evil.o", "-obj/evil.o"):
        reply = send(server, workdir, b"int x;\n", cwd=str(cwd), args=["-g", "-gsplit-dwarf"], output_path=output_path,
                     include_paths=[str(cwd / "evil.c"), str(cwd / "p.h")],
                     includes=[f"evil.c -fplugin={cwd / 'p.h'}\n".encode(), plugin.read_bytes()])
        assert isinstance(reply, wire.Refused) and reply.reason == "denied:bad-path", (
            output_path, reply.stderr if isinstance(reply, wire.Result) else reply)
