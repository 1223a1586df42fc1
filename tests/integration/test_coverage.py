"""What real projects compile, sent to the server and identical to a local build (issue 15's corpus in small).

Each case is a command line a Debian package uses; the object (and any
dependency file) must equal local gcc's byte for byte, and the audit log
must show the job, or the client must say why it stayed local.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import IDENTITIES, local, securecc
from hostile import Hostile
from test_args import compile_like_the_server, preprocessed

from securecc import args as argpolicy
from securecc import protocol as wire
from securecc.client import native
from securecc.toolchain import HeaderDigests

C_MAIN = """\
#include <stdio.h>
#include <string.h>
#include "inc/conv.h"
#define SCALE 3
int main(int argc, char **argv) {
  unsigned char a[64], b[64];
  memset(a, argc, sizeof a);
  convert(a, b, sizeof a);
  printf("%d %s\\n", b[3] * SCALE, argv[0]);
  return 0;
}
"""
CONV_H = """\
static inline void convert(const unsigned char *in, unsigned char *out, unsigned n) {
  for (unsigned i = 0; i < n; i++)
    out[i] = (unsigned char)(in[i] * 3 + 1);
}
"""
ASM_WITH_CPP = """\
#include "inc/asm.h"
  .text
  .globl ENTRY(answer)
  .type ENTRY(answer), @function
ENTRY(answer):
  movl $VALUE, %eax
  ret
  .section .note.GNU-stack,"",@progbits
"""
ASM_H = "#define ENTRY(x) securecc_##x\n#define VALUE 42\n"
# libjpeg-turbo 2.1.5's jdcolor.c in small (jdcolext.c included twice): at -O3 -g, the same source
# compiled from preprocessed text gets one more .debug_line row than compiled directly (gcc 12).
TWICE_MAIN = """\
#define R 0
#define B 2
#define FUNC conv_rgbx
#include "ext.c"
#undef R
#undef B
#undef FUNC
#define R 2
#define B 0
#define FUNC conv_bgrx
#include "ext.c"
void convert(int which, unsigned char ***in, unsigned row, unsigned char **out, int rows, unsigned cols)
{
  if (which)
    conv_rgbx(in, row, out, rows, cols);
  else
    conv_bgrx(in, row, out, rows, cols);
}
"""
TWICE_EXT = """\
static inline void
FUNC(unsigned char ***input_buf, unsigned input_row, unsigned char **output_buf, int num_rows, unsigned num_cols)
{
  unsigned char *inptr0, *inptr1, *inptr2;
  unsigned char *outptr;
  unsigned col;

  while (--num_rows >= 0) {
    inptr0 = input_buf[0][input_row];
    inptr1 = input_buf[1][input_row];
    inptr2 = input_buf[2][input_row];
    input_row++;
    outptr = *output_buf++;
    for (col = 0; col < num_cols; col++) {
      outptr[R] = inptr0[col];
      outptr[1] = inptr1[col];
      outptr[B] = inptr2[col];
      outptr[3] = 255;
      outptr += 4;
    }
  }
}
"""
PLAIN_ASM = '  .text\n  .globl f\nf:\n  ret\n  .section .note.GNU-stack,"",@progbits\n'

CASES = {
    # name: (files, compile flags before "-c SOURCE -o OUT", source)
    "jdcolor-O3-g": ({"main.c": TWICE_MAIN, "ext.c": TWICE_EXT}, ["-O3", "-g"], "main.c"),
    "hardened-O3-g": ({"m.c": C_MAIN, "inc/conv.h": CONV_H},
                      ["-O3", "-g", "-Wa,--noexecstack", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-Wall"], "m.c"),
    "Xassembler": ({"m.c": C_MAIN, "inc/conv.h": CONV_H}, ["-O2", "-Xassembler", "--noexecstack"], "m.c"),
    "g3-macro-info": ({"m.c": C_MAIN, "inc/conv.h": CONV_H}, ["-O2", "-g3"], "m.c"),
    "assembler-with-cpp": ({"a.S": ASM_WITH_CPP, "inc/asm.h": ASM_H}, ["-g", "-Wa,--noexecstack"], "a.S"),
    "x-assembler-with-cpp": ({"a.asm": ASM_WITH_CPP, "inc/asm.h": ASM_H}, ["-x", "assembler-with-cpp", "-g"], "a.asm"),
    "assembler": ({"p.s": PLAIN_ASM}, ["-g"], "p.s"),
    "unnormalized-path": ({"lib/m.c": C_MAIN, "lib/inc/conv.h": CONV_H}, ["-O2", "-g", "-Ilib"], ".//lib/m.c"),  # zstd
    "include-through-dotdot": ({"m.c": C_MAIN.replace('"inc/conv.h"', '"conv.h"'), "inc/conv.h": CONV_H, "empty/.keep": ""},
                               ["-O2", "-Iempty/../inc"], "m.c"),  # a directory no file of the job is in
    "wp-fortify-g": ({"m.c": C_MAIN, "inc/conv.h": CONV_H}, ["-O2", "-g", "-Wp,-D_FORTIFY_SOURCE=2"], "m.c"),
    "md-dependencies": ({"m.c": C_MAIN, "inc/conv.h": CONV_H}, ["-O2", "-MD", "-MP"], "m.c"),
    "march-native": ({"m.c": C_MAIN, "inc/conv.h": CONV_H}, ["-O3", "-march=native"], "m.c"),
    "mtune-native-g-unrecorded": ({"m.c": C_MAIN, "inc/conv.h": CONV_H},
                                  ["-O2", "-g", "-gno-record-gcc-switches", "-mtune=native"], "m.c"),
    "empty-source": ({"e.c": ""}, ["-O2", "-g"], "e.c"),  # an empty file is still the file the server preprocesses
}


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


@pytest.mark.parametrize("case", CASES)
def test_real_project_lines_compile_remotely_and_identically(realm, server, workdir, case):
    """Hardened C (-Wa,--noexecstack), -O3 -g, -g3, assembler with and without cpp: remote, and the local bytes."""
    files, flags, source = CASES[case]
    write(workdir, files)
    done = securecc(realm, server, "alice", workdir, "gcc", *flags, "-c", source, "-o", "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0, done.stderr
    assert f"compiled {source} on 127.0.0.1".encode() in done.stderr, done.stderr
    remote_deps = (workdir / "r.d").read_bytes() if (workdir / "r.d").exists() else None
    here = local(workdir, "gcc", *flags, "-c", source, "-o", "l.o")
    assert here.returncode == 0, here.stderr
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    if remote_deps is not None:
        assert remote_deps == (workdir / "l.d").read_bytes().replace(b"l.o", b"r.o")
    assert server.jobs(cwd=str(workdir), source=source)[-1]["decision"] == "allowed"


def test_directives_only_text_is_not_exact_at_O3_g(tmp_path):
    """Why the server preprocesses: the -fdirectives-only text of the jdcolor case, compiled as securecc's
    server used to, equals gcc's object at -O2 -g and not at -O3 -g (one more line-table row)."""
    write(tmp_path, {"main.c": TWICE_MAIN, "ext.c": TWICE_EXT})
    for flags, same in ((["-O2", "-g"], True), (["-O3", "-g"], False)):
        p = argpolicy.plan([*flags, "-c", "main.c", "-o", "direct.o"])
        remote = compile_like_the_server(tmp_path, p, argpolicy.remote_text(p, preprocessed(tmp_path, p)))
        assert remote.returncode == 0 and local(tmp_path, "gcc", *flags, "-c", "main.c", "-o", "direct.o").returncode == 0
        assert ((tmp_path / "job" / "output").read_bytes() == (tmp_path / "direct.o").read_bytes()) is same, flags
        shutil.rmtree(tmp_path / "job")


@pytest.mark.parametrize(
    ("source", "text", "why"),
    [
        ("i.s", '  .section .rodata\n  .incbin "blob.bin"\n', "assembler .include or .incbin"),
        ("j.S", '#define FILE "blob.bin"\n  .include FILE\n', "assembler .include or .incbin"),
    ],
)
def test_assembler_that_reads_files_stays_local(realm, server, workdir, source, text, why):
    """.incbin and .include name files no job carries: compiled here, and the user can see why."""
    (workdir / source).write_text(text)
    (workdir / "blob.bin").write_bytes(b"\x01\x02")
    done = securecc(realm, server, "alice", workdir, "gcc", "-c", source, "-o", "r.o", SECURECC_VERBOSE="1")
    assert f"compiling locally: {why}".encode() in done.stderr, done.stderr
    assert not server.jobs(cwd=str(workdir))


@pytest.mark.parametrize("output", ["obj/m.o", None])
def test_split_dwarf_brings_back_the_dwo(realm, server, workdir, output):
    """-gsplit-dwarf: the .dwo comes back next to the object, and both equal gcc's (the object names the .dwo)."""
    write(workdir, {"m.c": C_MAIN, "inc/conv.h": CONV_H})
    (workdir / "obj").mkdir()
    out = ["-o", output] if output else []
    flags = ["-O2", "-g", "-gsplit-dwarf", "-c", "m.c"]
    done = securecc(realm, server, "alice", workdir, "gcc", *flags, *out, SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled m.c on" in done.stderr, done.stderr
    obj = workdir / (output or "m.o")
    remote = obj.read_bytes(), obj.with_suffix(".dwo").read_bytes()
    obj.unlink()
    obj.with_suffix(".dwo").unlink()
    assert local(workdir, "gcc", *flags, *out).returncode == 0
    assert remote == (obj.read_bytes(), obj.with_suffix(".dwo").read_bytes())
    assert server.jobs(cwd=str(workdir))[-1]["decision"] == "allowed"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"args": ["-gsplit-dwarf"]}, "denied:argument-refused"),  # no output path: its .dwo would go nowhere
        ({"output_path": "m.o"}, "denied:argument-refused"),  # an output path without -gsplit-dwarf
        ({"args": ["-gsplit-dwarf"], "output_path": "m.c"}, "denied:bad-path"),  # over the source
        ({"args": ["-gsplit-dwarf"], "output_path": "/etc/x.o"}, "denied:bad-path"),
        ({"args": ["-gsplit-dwarf"], "output_path": "-o"}, "denied:bad-path"),
        ({"args": ["-gsplit-dwarf"], "output_path": "m.dwo"}, "denied:bad-path"),  # object and .dwo the same file
        ({"args": ["-gsplit-dwarf"], "output_path": "inc.o", "include_paths": ["WD/inc.dwo/x.h"], "includes": [b""]},
         "denied:bad-path"),
    ],
)
def test_split_dwarf_output_paths_are_checked(realm, server, workdir, monkeypatch, fields, reason):
    """The object's path a job names (for its .dwo) is a mount point like any: never over the job's files."""
    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    fields = {**fields, **({"include_paths": [p.replace("WD", str(workdir)) for p in fields["include_paths"]]}
                           if "include_paths" in fields else {})}
    includes = fields.pop("includes", [])
    reply = Hostile(server.port).job((b"", b"int x;\n"), includes, language="c-source", cwd=str(workdir), source_path="m.c",
                                     compiler_identity=IDENTITIES["gcc"], **fields)
    assert isinstance(reply, wire.Refused) and reply.reason == reason, reply


def test_native_is_sent_as_what_it_means_here(realm, server, workdir):
    """-march=native travels as this CPU's explicit options; with recorded switches (-g) it stays local."""
    write(workdir, {"m.c": C_MAIN, "inc/conv.h": CONV_H})
    assert "-march=native" not in native.expansion("/usr/bin/gcc", "-march=native")
    assert any(a.startswith("-march=") for a in native.expansion("/usr/bin/gcc", "-march=native"))
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-march=native", "-c", "m.c", SECURECC_VERBOSE="1")
    sent = server.jobs(cwd=str(workdir))[-1]["args"]
    assert done.returncode == 0 and "-march=native" not in sent and native.expansion("/usr/bin/gcc", "-march=native")[0] in sent
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-g", "-march=native", "-c", "m.c", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiling locally: -march=native with -g" in done.stderr, done.stderr


def test_a_precompiled_header_keeps_the_compile_local(realm, server, workdir):
    """gcc uses pch.h.gch here (CMake's target_precompile_headers), which no server has: compiled here."""
    write(workdir, {"pch.h": CONV_H, "m.c": "int f(void) { unsigned char a[4] = {1}, b[4]; convert(a, b, 4); return b[0]; }\n"})
    assert local(workdir, "gcc", "-O2", "-x", "c-header", "pch.h", "-o", "pch.h.gch").returncode == 0
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-include", "pch.h", "-c", "m.c", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and f"compiling locally: precompiled header {workdir}/pch.h.gch".encode() in done.stderr


def test_several_sources_in_one_command_are_one_job_each(realm, server, workdir):
    """lz4's `cc -c a.c b.c c.c`: every source is a job of its own, and a.o b.o c.o equal gcc's."""
    write(workdir, {"inc/conv.h": CONV_H, **{f"{n}.c": f'#include "inc/conv.h"\nint {n}(void) {{ return {i}; }}\n'
                                             for i, n in enumerate("abc")}})
    done = securecc(realm, server, "alice", workdir, "gcc", "-O2", "-g", "-c", "a.c", "b.c", "c.c", SECURECC_VERBOSE="1")
    assert done.returncode == 0, done.stderr
    remote = {n: (workdir / f"{n}.o").read_bytes() for n in "abc"}
    assert sorted(r["source"] for r in server.jobs(cwd=str(workdir))) == ["a.c", "b.c", "c.c"]
    assert local(workdir, "gcc", "-O2", "-g", "-c", "a.c", "b.c", "c.c").returncode == 0
    assert remote == {n: (workdir / f"{n}.o").read_bytes() for n in "abc"}


def test_several_sources_some_local(realm, server, workdir):
    """A source that must stay local is compiled here, alone; the others still go to the server."""
    write(workdir, {"a.c": "int a(void) { return 1; }\n", "b.c": 'const char *b = __TIMESTAMP__;\n'})
    done = securecc(realm, server, "alice", workdir, "gcc", "-c", "a.c", "b.c", SECURECC_VERBOSE="1")
    assert done.returncode == 0, done.stderr
    assert b"compiled a.c on" in done.stderr and b"compiling locally: uses __TIMESTAMP__" in done.stderr
    assert [r["source"] for r in server.jobs(cwd=str(workdir))] == ["a.c"]
    assert (workdir / "a.o").exists() and (workdir / "b.o").exists()


def test_a_failing_compile_prints_what_local_gcc_prints(realm, server, workdir):
    """An error fails on the server too; the client then compiles here, so the user sees gcc's own words once."""
    (workdir / "bad.c").write_text('#include <stdio.h>\nint f(void) { return undefined_name; }\n')
    done = securecc(realm, server, "alice", workdir, "gcc", "-Wall", "-c", "bad.c", "-o", "bad.o")
    here = local(workdir, "gcc", "-Wall", "-c", "bad.c", "-o", "bad.o")
    assert done.returncode == here.returncode == 1
    assert done.stderr == here.stderr
    assert server.jobs(cwd=str(workdir))[-1]["exit_status"] == 1  # it did go to the server first


def test_a_server_with_other_system_headers_does_not_compile(realm, server, workdir, monkeypatch):
    """A job whose /usr headers differ from the server's (another glibc, say) is not compiled there."""
    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    client = Hostile(server.port)
    source = b"#include <stdio.h>\nint x;\n"
    fields = {"language": "c-source", "cwd": str(workdir), "source_path": "m.c", "compiler_identity": IDENTITIES["gcc"],
              "system_headers": ["/usr/include/stdio.h"]}
    reply = client.job((b"", source), system_digest="0" * 64, **fields)
    assert isinstance(reply, wire.Result) and reply.exit_status == 1 and reply.output is None
    assert b"system headers differ" in reply.stderr
    assert server.jobs(cwd=str(workdir))[-1]["ended_by"] == "system-headers-differ"
    reply = client.job((b"", source), system_digest=HeaderDigests().of(["/usr/include/stdio.h"]), **fields)
    assert isinstance(reply, wire.Result) and reply.exit_status == 0 and reply.output


@pytest.mark.parametrize(
    "path", ["/etc/shadow", "/usr/../etc/shadow", "/usr/local/include/x.h", "usr/include/stdio.h", "-I/etc", "/usr"]
)
def test_system_headers_outside_usr_are_refused(realm, server, workdir, monkeypatch, path):
    """The headers a job asks the server to digest are paths under /usr, normalized, and nothing else."""
    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    reply = Hostile(server.port).job((b"", b"int x;\n"), language="c-source", cwd=str(workdir), source_path="m.c",
                                     compiler_identity=IDENTITIES["gcc"], system_headers=[path])
    assert isinstance(reply, wire.Refused) and reply.reason == "denied:bad-path", reply


@pytest.mark.parametrize(
    ("directories", "fields", "reason"),
    [
        (["/etc/ssl"], {}, "denied:bad-path"),
        (["/usr/include/x"], {}, "denied:bad-path"),
        (["/job/x"], {}, "denied:bad-path"),
        (["relative/dir"], {}, "denied:bad-path"),
        (["/"], {}, "denied:bad-path"),
        (["WD/m.c"], {}, "denied:bad-path"),  # over the source
        (["WD/x"], {"language": "cpp-output"}, "denied:argument-refused"),  # text jobs name no directories
    ],
)
def test_directories_a_job_names_are_checked(realm, server, workdir, monkeypatch, directories, fields, reason):
    """The empty directories a job asks for (for 'empty/../inc') are mount points like any, never over its files."""
    for key, value in realm.user_env("alice", workdir).items():
        monkeypatch.setenv(key, value)
    fields = {"language": "c-source", **fields}
    reply = Hostile(server.port).job((b"", b"int x;\n"), cwd=str(workdir), source_path="m.c", compiler_identity=IDENTITIES["gcc"],
                                     directories=[d.replace("WD", str(workdir)) for d in directories], **fields)
    assert isinstance(reply, wire.Refused) and reply.reason == reason, reply


def test_header_digests_do_not_follow_links_out_of_usr(tmp_path):
    """A link in /usr that leads elsewhere (/usr/lib/ssl/private -> /etc/ssl/private) is never read: 'outside'."""
    usr = tmp_path / "usr"
    usr.mkdir()
    (tmp_path / "secret").write_text("key\n")
    (usr / "link.h").symlink_to(tmp_path / "secret")
    (usr / "h.h").write_text("int h;\n")
    digests, within = HeaderDigests(), f"{usr}/"
    link = str(usr / "link.h")
    before = digests.of([link], within)
    assert before == hashlib.sha256(f"{link}\0outside\n".encode()).hexdigest()
    (tmp_path / "secret").write_text("another key\n")
    assert digests.of([link], within) == before
    inside = digests.of([str(usr / "h.h")], within)
    (usr / "h.h").write_text("int h2;\n")
    assert digests.of([str(usr / "h.h")], within) != inside  # a changed header is read again
