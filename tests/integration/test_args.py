"""The argument policy: what the client distributes, what the server refuses, and the text it sends.

Pure functions, no fakes; the preprocessor tests run the real /usr/bin/gcc.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from securecc import args as argpolicy
from securecc.args import NotDistributable, Use, classify, plan, refused_argument
from securecc.client.job import compiler_environment, unrepeated

GCC = "/usr/bin/gcc"  # installed by scripts/setup; the tests fail, not skip, without it


def argv(line: str) -> list[str]:
    return shlex.split(line)


# --- plan(): distributable compile lines -------------------------------------------------


@pytest.mark.parametrize(
    ("line", "source", "mode", "output"),
    [
        ("-c foo.c", "foo.c", "-c", "foo.o"),
        ("-c src/foo.c -o obj/foo.o", "src/foo.c", "-c", "obj/foo.o"),
        ("-c src/foo.c", "src/foo.c", "-c", "foo.o"),  # gcc writes into the working directory
        ("-S foo.c", "foo.c", "-S", "foo.s"),
        ("-S src/foo.c -o out/foo.asm", "src/foo.c", "-S", "out/foo.asm"),
        ("foo.c -c -ofoo-joined.o", "foo.c", "-c", "foo-joined.o"),
        ("-c -c foo.c", "foo.c", "-c", "foo.o"),
    ],
)
def test_plan_source_mode_output(line, source, mode, output):
    """The source, the mode and the output name gcc would use."""
    p = plan(argv(line))
    assert (p.source, p.mode, p.output) == (source, mode, output)
    assert output not in p.cpp_args and "-o" not in p.cpp_args, "the output is not a preprocessor argument"
    assert mode not in p.remote_args and mode not in p.cpp_args, "the mode travels in Job.mode, not in args"


def test_plan_splits_remote_and_preprocessor_args():
    """Optimisation, debug and warnings go to the server; -D and -I stay here, with the source."""
    p = plan(argv("-O2 -g -Wall -DX=1 -Iinc -c foo.c -o foo.o"))
    assert p.remote_args == ["-O2", "-g", "-Wall"]
    assert p.cpp_args == ["-O2", "-g", "-Wall", "-DX=1", "-Iinc", "foo.c"]
    assert p.language == "c" and not p.preprocessed and not p.dependency_file


def test_plan_separate_value_options():
    """-I inc, -D X, -include cfg.h, -isystem /x keep their values with them, on the preprocessor side."""
    p = plan(argv("-I inc -D X -include cfg.h -isystem /x -U Y -iquote q -c foo.c"))
    assert p.remote_args == []
    assert p.cpp_args == ["-I", "inc", "-D", "X", "-include", "cfg.h", "-isystem", "/x", "-U", "Y", "-iquote", "q", "foo.c"]
    assert p.source_args == p.cpp_args[:-1], "for a server that preprocesses, without the source"
    assert p.source == "foo.c", "no option value was taken for the source"


@pytest.mark.parametrize(
    ("line", "source_args"),
    [
        ("-O2 -Iinc -DX=1 -c foo.c", ["-O2", "-Iinc", "-DX=1"]),
        ("-Iinc -O2 -UY -g -c foo.c", ["-Iinc", "-O2", "-UY", "-g"]),  # order kept: it matters for -D/-U
        ("-MD -MF x.d -MT t -MP -O2 -c foo.c", ["-O2"]),  # dependency output is made here
        ("-lm -Wl,-z,relro -O2 -c foo.c", ["-O2"]),  # linker options are dropped
        ("-Wp,-MD,dep.d -O2 -c foo.c", None),  # a CPP-only option: the server cannot preprocess
        ("-H -c foo.c", None),
        ("-A sys=linux -c foo.c", None),
        ("-iprefix /p -c foo.c", None),
    ],
)
def test_plan_source_args(line, source_args):
    """The arguments for a server that preprocesses: REMOTE and CPP_SEND options, and it accepts them."""
    p = plan(argv(line))
    assert p.source_args == source_args
    if source_args is not None:
        assert refused_argument(source_args, preprocessing=True) is None


def test_plan_include_value_is_not_a_source():
    """A value that looks like a C file (-include cfg.c) is not counted as a second source."""
    p = plan(argv("-include prelude.c -c foo.c"))
    assert p.source == "foo.c"


def test_plan_language_override():
    """-x c++ before the source sets the language whatever the suffix, and the preprocessor sees it too."""
    p = plan(argv("-x c++ -c foo.txt"))
    assert (p.language, p.source, p.output) == ("c++", "foo.txt", "foo.o")
    assert p.cpp_args[:2] == ["-x", "c++"]


@pytest.mark.parametrize(
    ("source", "language", "preprocessed"),
    [
        ("foo.c", "c", False),
        ("foo.cc", "c++", False),
        ("foo.cpp", "c++", False),
        ("foo.cxx", "c++", False),
        ("foo.C", "c++", False),
        ("foo.c++", "c++", False),
        ("foo.i", "cpp-output", True),
        ("foo.ii", "c++-cpp-output", True),
    ],
)
def test_plan_language_from_suffix(source, language, preprocessed):
    p = plan(["-c", source])
    assert (p.language, p.preprocessed) == (language, preprocessed)


def test_plan_md_names_the_dependency_file_and_target():
    """-MD alone: the local preprocessor is told where gcc would write the .d and which target it names."""
    p = plan(argv("-MD -c foo.c -o obj/foo.o"))
    assert p.dependency_file
    assert p.cpp_args[-4:] == ["-MF", "obj/foo.d", "-MQ", "obj/foo.o"]
    p = plan(argv("-MMD -MP -c src/bar.cc"))
    assert p.cpp_args[-4:] == ["-MF", "bar.d", "-MQ", "bar.o"]
    assert "-MD" not in p.remote_args and "-MMD" not in p.remote_args and "-MP" not in p.remote_args


def test_plan_md_respects_explicit_mf_and_mt():
    """-MF and -MT given by the build: nothing is added."""
    p = plan(argv("-MD -MF x.d -MT t -c foo.c -o foo.o"))
    assert p.cpp_args.count("-MF") == 1 and "-MQ" not in p.cpp_args
    assert p.cpp_args == ["-MD", "-MF", "x.d", "-MT", "t", "foo.c"]
    p = plan(argv("-MMD -MQ '$(objdir)/foo.o' -c foo.c -o foo.o"))
    assert p.cpp_args == ["-MMD", "-MQ", "$(objdir)/foo.o", "foo.c", "-MF", "foo.d"]


def test_plan_wp_md_is_a_preprocessor_option():
    """-Wp,-MD,dep.d (the kernel's style) is for the local preprocessor only."""
    p = plan(argv("-Wp,-MD,dep.d -O2 -c foo.c"))
    assert classify("-Wp,-MD,dep.d") is Use.CPP
    assert "-Wp,-MD,dep.d" in p.cpp_args and p.remote_args == ["-O2"]


def test_plan_param_travels_as_two_args():
    p = plan(argv("--param max-inline-insns-single=100 -O2 -c foo.c"))
    assert p.remote_args == ["--param", "max-inline-insns-single=100", "-O2"]
    assert refused_argument(p.remote_args) is None


def test_plan_linker_args_with_c_stay_here():
    """Linker options are meaningless with -c: never sent, but the local preprocessor sees them as gcc would."""
    p = plan(argv("-lm -Wl,-z,relro -L/usr/lib -L /opt/lib -pie -O2 -c foo.c"))
    assert p.remote_args == ["-O2"]
    for arg in ("-lm", "-Wl,-z,relro", "-L/usr/lib", "/opt/lib", "-pie"):
        assert arg in p.cpp_args
    assert p.source == "foo.c", "the value of -L is not a source"


# --- plan(): compiled locally -----------------------------------------------------------


NOT_DISTRIBUTABLE = [
    "foo.c",  # linking
    "foo.c -o foo",
    "-c foo.c bar.c",
    "-c",
    "-c -O2",
    "-c -",
    "-x c -c -",
    "-E foo.c",
    "-c -E foo.c",
    "-M foo.c",
    "-MM -c foo.c",
    "-c foo.c -S",
    "-c foo.c -o -",
    "-S foo.c -o-",
    "-c foo.c -o",
    "-c foo.c @rsp",
    "-c @rsp",
    "-x c -c @rsp",  # gcc reads options (and maybe other sources, -o ...) from the file named rsp
    "-c @foo.c",  # likewise: '@foo.c' is a response file to gcc, never a source
    "-c foo.c -fplugin=x.so",
    "-c foo.c -fplugin-arg-x-y=z",
    "-c foo.c -specs=x",
    "-c foo.c -specs x",
    "-c foo.c -B/tmp",
    "-c foo.c -B /tmp",
    "-c foo.c -wrapper gdb,--args",
    "-c foo.c -march=native",
    "-c foo.c -mtune=native",
    "-S foo.c -gsplit-dwarf",
    "-c foo.s -gsplit-dwarf",
    "-c foo.c -save-temps",
    "-c foo.c -save-temps=obj",
    "-c foo.c -fprofile-generate",
    "-c foo.c -fprofile-use=/tmp/p",
    "-c foo.c --coverage",
    "-c foo.c -ftest-coverage",
    "-c foo.c -fdump-tree-all",
    "-c foo.c -fstack-usage",
    "-c foo.c -Wa,-adhln=x",
    "-c foo.c -Xassembler -adhln",
    "-c foo.c -Wa,--noexecstack,-Iinc",  # one item naming a directory keeps the whole option local
    "-c foo.c -Wa,--MD,deps",
    "-c foo.c -Wa,@opts",
    "-c foo.c -Wa,--version",  # prints and assembles nothing
    "-c foo.c -Xassembler --noexecstack -Xassembler -I -Xassembler inc",
    "-x none -c foo.c",
    "-c foo.c -x c",  # -x after the source would apply to a next file only
    "-c foo.f90",
    "-c foo",
    "-c foo.c -fsomething-new=/path",
    "-c foo.c -fsanitize-ignorelist=/etc/shadow",
    "-c foo.c -fmodule-mapper=|cmd",
    "-c foo.c -fmodules-ts",
    "-c foo.c -fdirectives-only",
    "-c foo.c -fpreprocessed",
    "-c foo.c -traditional-cpp",
    "-c foo.c -no-integrated-cpp",
    "-c foo.c -iplugindir=/tmp",
    "-c foo.c -v",
    "-c foo.c --version",
    "-c foo.c -dumpbase x",
    "-c foo.c -MFdep.d",  # joined forms are not in the table: conservative
    "-c foo.c -I",
    "-c foo.c -include",
    "-c foo.c --param",
]


@pytest.mark.parametrize("line", NOT_DISTRIBUTABLE)
def test_not_distributable(line):
    """Linking, several/no sources, stdin/stdout, response files, and anything that runs or names files."""
    with pytest.raises(NotDistributable):
        plan(argv(line))


# --- refused_argument (server side) ---------------------------------------------------------


ALLOWED = ["-O2", "-g", "-Wall", "-fPIC", "-std=c11", "-march=x86-64", "--param", "max-inline-insns-single=100",
           "-fdebug-prefix-map=/a=/b"]


def test_refused_argument_accepts_ordinary_flags():
    assert refused_argument(ALLOWED) is None
    assert refused_argument([]) is None


@pytest.mark.parametrize(
    ("bad", "offender"),
    [
        (["-I/etc"], "-I/etc"),
        (["-DX"], "-DX"),
        (["-include", "/etc/shadow"], "-include"),
        (["-fplugin=/tmp/x.so"], "-fplugin=/tmp/x.so"),
        (["-B/tmp"], "-B/tmp"),
        (["-specs=/tmp/s"], "-specs=/tmp/s"),
        (["-wrapper", "sh,-c"], "-wrapper"),
        (["@/etc/shadow"], "@/etc/shadow"),
        (["-o", "/etc/passwd"], "-o"),
        (["/etc/passwd"], "/etc/passwd"),
        (["max-inline-insns-single=100"], "max-inline-insns-single=100"),  # a --param value on its own
        (["-x", "c"], "-x"),
        (["-Wa,-a=/tmp/l"], "-Wa,-a=/tmp/l"),
        (["-Wa,--noexecstack,-I/etc"], "-Wa,--noexecstack,-I/etc"),
        (["-Xassembler", "-a=/tmp/l"], "-Xassembler"),
        (["-Xassembler"], "-Xassembler"),
        (["-Wl,-T"], "-Wl,-T"),
        (["-Wp,-MD,/tmp/d"], "-Wp,-MD,/tmp/d"),
        (["--param"], "--param"),
        (["--param", "a=b;rm"], "--param"),
        (["--param", "-fplugin=/tmp/x.so"], "--param"),
        (["--param=a=b;rm"], "--param=a=b;rm"),
        (["-fdump-tree-all=/tmp/x"], "-fdump-tree-all=/tmp/x"),
        (["-fprofile-use=/etc/x"], "-fprofile-use=/etc/x"),
        (["-fsanitize-ignorelist=/etc/shadow"], "-fsanitize-ignorelist=/etc/shadow"),
        (["-fvisibility=hidden;id"], "-fvisibility=hidden;id"),
        (["-march=native"], "-march=native"),
        (["-c"], "-c"),
        (["-S"], "-S"),
        (["-E"], "-E"),
        (["-save-temps"], "-save-temps"),
        (["-MD"], "-MD"),
        (["-"], "-"),
        ([""], ""),
    ],
)
def test_refused_argument_names_the_offender(bad, offender):
    """The first argument the policy does not allow remotely, even after allowed ones."""
    assert refused_argument(bad) == offender
    assert refused_argument([*ALLOWED, *bad]) == offender


CPP_SEND = ["-Wp,-D_FORTIFY_SOURCE=2", "-Wp,-UX,-DY=1", "-C", "-CC", "-Iinc", "-I", "/src/include",
            "-DX=1", "-D", "Y", "-UZ", "-U", "W", "-include", "config.h",
            "-imacros", "m.h", "-isystem", "/opt/x", "-iquote", "q", "-idirafter", "d", "-nostdinc", "-undef"]


def test_cpp_send_options_only_for_a_server_that_preprocesses():
    """Include paths and macros are refused for preprocessed text, accepted when the server preprocesses."""
    assert refused_argument([*ALLOWED, *CPP_SEND], preprocessing=True) is None
    for arg in ("-Iinc", "-I", "-DX=1", "-UZ", "-include", "-imacros", "-isystem", "-iquote", "-idirafter", "-nostdinc", "-undef"):
        assert classify(arg) is Use.CPP_SEND
        assert refused_argument([*ALLOWED, arg, "v"]) == arg


@pytest.mark.parametrize(
    ("bad", "offender"),
    [
        (["-fplugin=/tmp/x.so"], "-fplugin=/tmp/x.so"),
        (["-Wp,-MD,/tmp/d"], "-Wp,-MD,/tmp/d"),
        (["-H"], "-H"),
        (["-A", "sys=linux"], "-A"),
        (["-MD"], "-MD"),
        (["-MF", "/tmp/d"], "-MF"),
        (["-iprefix", "/p"], "-iprefix"),
        (["-isysroot", "/"], "-isysroot"),
        (["--sysroot=/"], "--sysroot=/"),
        (["-B/tmp"], "-B/tmp"),
        (["@/etc/shadow"], "@/etc/shadow"),
        (["-o", "/etc/passwd"], "-o"),
        (["/etc/passwd"], "/etc/passwd"),
        (["-D@opts"], "-D@opts"),  # the driver gives cc1 "-D" "@opts", and cc1 reads the file as options
        (["-Wp,-D@opts"], "-Wp,-D@opts"),
        (["-Wp,-DX,-MD,/tmp/d"], "-Wp,-DX,-MD,/tmp/d"),
        (["-I@dir"], "-I@dir"),
        (["-U@x"], "-U@x"),
        (["-D", "@opts"], "-D"),
        (["-include", "@opts"], "-include"),
        (["-include"], "-include"),  # missing value
        (["-I"], "-I"),
        (["--param", "a=b;rm"], "--param"),
    ],
)
def test_refused_argument_when_the_server_preprocesses(bad, offender):
    """Preprocessing on the server still refuses everything but REMOTE and CPP_SEND options."""
    assert refused_argument([*ALLOWED, *CPP_SEND, *bad], preprocessing=True) == offender


def test_separate_values_are_skipped_not_classified():
    """-D's value is a macro (gcc takes the next argument whatever it looks like), not an option."""
    assert refused_argument(["-D", "-fplugin=x.so"], preprocessing=True) is None
    assert refused_argument(["-D", "-fplugin=x.so"]) == "-D"


# --- the client never sends what the server would refuse ------------------------------------


DEBIAN_FLAGS = [
    # dpkg-buildflags CFLAGS (bookworm, trixie)
    "-g", "-O2", "-ffile-prefix-map=/build/pkg-1.0=.", "-fstack-protector-strong", "-fstack-clash-protection",
    "-Wformat", "-Werror=format-security", "-fcf-protection", "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer", "-Wdate-time",
    # common in package build systems
    "-fPIC", "-fPIE", "-pthread", "-std=gnu99", "-std=c11", "-std=c++17", "-std=gnu++20", "-Wall", "-Wextra",
    "-Wno-unused-parameter", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-ffunction-sections",
    "-fdata-sections", "-fno-strict-aliasing", "-fwrapv", "-O3", "-Os", "-Og", "-O0", "-flto", "-flto=auto",
    "-ffat-lto-objects", "-fno-common", "-fexceptions", "-fno-exceptions", "-fno-rtti", "-fasynchronous-unwind-tables",
    "-grecord-gcc-switches", "-ggdb", "-gdwarf-4", "-pipe", "-Werror", "-Werror=implicit-function-declaration",
    "-Wformat=2", "-Wshadow", "-Wstrict-prototypes", "-Wmissing-prototypes", "-Wno-error=deprecated-declarations",
    "-fdebug-prefix-map=/build/pkg-1.0=/usr/src/pkg", "-fmacro-prefix-map=/build/pkg-1.0=.",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fdiagnostics-color=always", "-fno-plt",
    "-m64", "-msse4.2", "-mavx2", "-march=x86-64-v2", "-mtune=generic", "-fcf-protection=full",
    "-ftrivial-auto-var-init=zero", "-fzero-call-used-regs=used-gpr", "-fstrict-flex-arrays=3", "-fopenmp",
    "-w", "-pedantic", "-Wpedantic", "-pedantic-errors", "-ansi", "-fmessage-length=0",
    # hardened C (zstd, openssl, the kernel's JCC-erratum builds) and macro debug info
    "-Wa,--noexecstack", "-Wa,--noexecstack,-mrelax-relocations=no", "-Wa,--compress-debug-sections=zlib",
    "-Wa,-mbranches-within-32B-boundaries", "-Wa,--gdwarf-5", "-Wa,-v", "-g3", "-ggdb3", "-W",
]


@pytest.mark.parametrize("flag", DEBIAN_FLAGS)
def test_realistic_flag_is_remote_and_accepted(flag):
    """Each flag a distribution build uses is sent, and the server accepts exactly what is sent."""
    assert classify(flag) is Use.REMOTE
    p = plan([flag, "-c", "foo.c", "-o", "foo.o"])
    assert p.remote_args == [flag]
    assert refused_argument(p.remote_args) is None


def test_realistic_flags_together():
    p = plan([*DEBIAN_FLAGS, "-D_FORTIFY_SOURCE=2", "-I/usr/include/foo", "-c", "foo.c", "-o", "foo.o"])
    assert p.remote_args == DEBIAN_FLAGS
    assert refused_argument(p.remote_args) is None


@pytest.mark.parametrize(
    "line",
    [
        "--param max-inline-insns-single=100 -c foo.c",
        "--param max-inline-insns-single -c foo.c",  # a typo: gcc refuses it, the server too
        "--param 'a=b;rm' -c foo.c",
        "--param -fplugin=/tmp/x.so -c foo.c",
        "--param=ssp-buffer-size=4 -c foo.c",
        "-I -O2 -c foo.c",
        "-D -fplugin=x.so -c foo.c",
        "-include -O2 -c foo.c",
        "-Iinc -DX -Wp,-MD,d -O2 -c foo.c",
        "-Xassembler --noexecstack -c foo.c",
        "-Xassembler -Iinc -c foo.c",
        "-O2 -DNDEBUG -Iinclude -isystem /usr/include/glib-2.0 -MD -c foo.c",
    ],
)
def test_plan_never_sends_what_the_server_refuses(line):
    """Whatever plan() puts in remote_args (or source_args) passes refused_argument, or the line stays local."""
    try:
        p = plan(argv(line))
    except NotDistributable:
        return
    assert refused_argument(p.remote_args) is None, f"client would send {p.remote_args}"
    if p.source_args is not None:
        assert refused_argument(p.source_args, preprocessing=True) is None, f"client would send {p.source_args}"


@pytest.mark.parametrize(
    ("line", "debug"),
    [
        ("-O2", False),
        ("-g", True),
        ("-g0", False),
        ("-g -g0", False),
        ("-g0 -g", True),
        ("-g1", True),
        ("-ggdb", True),
        ("-gdwarf-4", True),
        ("-gdwarf-5 -O2", True),
        ("-grecord-gcc-switches", False),  # a modifier: no debug info by itself
        ("-g -grecord-gcc-switches", True),
        ("-gtoggle", True),  # gcc: "turn it on at level 2" when it was off
        ("-g -gtoggle", False),
    ],
)
def test_plan_debug(line, debug):
    """Whether the compile emits debug info: the last -g level wins."""
    assert plan([*argv(line), "-c", "foo.c"]).debug is debug


# --- preprocess_command / remote_language ----------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ["-O2 -DX=1 -c foo.c -o out.o", "-pedantic -std=c99 -c foo.c -o out.o", "-Wpedantic -MD -c foo.cc -o out.o"],
)
def test_preprocess_command(line):
    """gcc -E -fdirectives-only on the cpp args (pedantic too); the text goes to stdout, not to the object's name."""
    p = plan(argv(line))
    cmd = argpolicy.preprocess_command("gcc", p)
    assert cmd == ["gcc", *p.cpp_args, "-E", "-fdirectives-only"]
    assert "-o" not in cmd and "-c" not in cmd
    assert cmd.count("out.o") == (1 if p.dependency_file else 0)  # only as the -MQ target


def test_full_preprocess_command():
    """The fallback: plain -E on the same arguments, still to stdout."""
    p = plan(argv("-O2 -DX=1 -Iinc -c foo.c -o out.o"))
    assert argpolicy.full_preprocess_command("gcc", p) == ["gcc", *p.cpp_args, "-E"]


@pytest.mark.parametrize(
    ("line", "language"),
    [
        ("-c foo.c", "c"),
        ("-c foo.cc", "c++"),
        ("-x c++ -c foo.h", "c++"),
        ("-pedantic -c foo.c", "c-directives"),
        ("-Wpedantic -c foo.c", "c-directives"),
        ("-pedantic-errors -c foo.c", "c-directives"),
        ("-Werror=pedantic -c foo.c", "c-directives"),
        ("-pedantic -c foo.cpp", "c++-directives"),
        ("-Wno-pedantic -c foo.c", "c"),
        ("-c foo.i", "cpp-output"),
        ("-pedantic -c foo.i", "cpp-output"),
        ("-c foo.ii", "c++-cpp-output"),
    ],
)
def test_remote_language(line, language):
    """Ordinary text compiles as C/C++; pedantic builds as -fdirectives-only text; .i stays preprocessed."""
    p = plan(argv(line))
    assert argpolicy.remote_language(p) == language
    assert language in argpolicy.LANGUAGES and language not in argpolicy.SERVER_PREPROCESSES
    assert argpolicy.COMPILE_LANGUAGE[language][0] == "-x"


def test_every_plan_language_has_a_server_form():
    """What a client names (text, or source for a server that preprocesses) is a language the server knows."""
    for language in set(argpolicy.SOURCE_LANGUAGES.values()):
        assert language in argpolicy.LANGUAGES or language in argpolicy.ASSEMBLER  # assembler: only as source
        assert language.endswith("cpp-output") or f"{language}-source" in argpolicy.SERVER_PREPROCESSES
    for language in ("c", "c++"):
        assert f"{language}-source" in argpolicy.SERVER_PREPROCESSES
        assert f"{language}-directives" in argpolicy.LANGUAGES
        assert argpolicy.PREPROCESSED[language] in argpolicy.LANGUAGES


# --- included_files ---------------------------------------------------------------------


def test_included_files_from_line_markers():
    """Files entered by #include (flag 1), absolute and in order; project_files drops the server's own /usr."""
    text = (
        b'# 0 "src/foo.c"\n# 1 "/home/a/p//"\n# 0 "<built-in>"\n# 0 "<command-line>"\n'
        b'# 1 "/usr/include/stdc-predef.h" 1 3 4\n# 1 "src/foo.c"\n# 1 "inc/a.h" 1\nint a;\n'
        b'# 1 "/opt/lib/include/b.h" 1\n# 2 "inc/a.h" 2\n# 1 "inc/../inc/a.h" 1\n'
        b'# 1 "inc/we\\"ird\\\\.h" 1\n#include "not-a-marker.h"\n  # 1 "indented.h"\n'
    )
    included = argpolicy.included_files(argpolicy.include_markers(text), "/home/a/p")
    assert included == [
        "/usr/include/stdc-predef.h", "/home/a/p/inc/a.h", "/opt/lib/include/b.h", '/home/a/p/inc/we"ird\\.h',
    ]
    assert argpolicy.project_files(included) == included[1:]
    with pytest.raises(NotDistributable, match="/usr/local/include/x.h"):
        argpolicy.project_files([*included, "/usr/local/include/x.h"])


def test_line_directives_do_not_name_files_to_send():
    """A '#line N "/etc/shadow"' in a hostile source renames lines; it is not an include, so nothing is read."""
    text = b'# 1 "foo.c"\n# 1 "/etc/shadow"\nint x;\n# 3 "/home/a/.ssh/id_rsa" 2\n'
    assert argpolicy.included_files(argpolicy.include_markers(text), "/home/a/p") == []


def test_included_files_on_real_gcc_output(tmp_path):
    """gcc's own markers: the project header is found, libc's headers are the server's own."""
    (tmp_path / "inc").mkdir()
    (tmp_path / "inc" / "cfg.h").write_text("#define N 3\n")
    (tmp_path / "foo.c").write_text('#include <stdio.h>\n#include "cfg.h"\nint n = N;\n')
    p = plan(["-Iinc", "-g", "-c", "foo.c"])
    for command in (argpolicy.preprocess_command, argpolicy.full_preprocess_command):
        text = subprocess.run(command(GCC, p), cwd=tmp_path, capture_output=True, check=True).stdout
        included = argpolicy.included_files(argpolicy.include_markers(text), str(tmp_path))
        assert "/usr/include/stdio.h" in included
        assert argpolicy.project_files(included) == [str(tmp_path / "inc" / "cfg.h")]


@pytest.mark.parametrize("deps", [[], ["-MT", "out/x.o", "-MD", "-MP", "-MF", "dep/x.d"], ["-MD"]], ids=["none", "automake", "MD"])
def test_gcc_M_names_the_files_the_markers_name(tmp_path, deps):
    """The files a server that preprocesses needs, from ``gcc -M``, are the ones the text's markers name, awkward
    names included; and ``-MD``'s file is the same bytes as beside ``-E -fdirectives-only``."""
    for d in ("sub dir", "inc", "empty", "dep", "out"):
        (tmp_path / d).mkdir()
    (tmp_path / "sub dir" / "a#b.h").write_text('#include "../x$y.h"\n#include <stdio.h>\n')
    (tmp_path / "x$y.h").write_text("#define Q 1\n")
    (tmp_path / "inc" / "pre.h").write_text("#define P 2\n")
    (tmp_path / "src.c").write_text('#include "sub dir/a#b.h"\n#include "empty/../inc/pre.h"\nint q = Q + P;\n')
    p = plan(["-O2", "-include", "inc/pre.h", "-I.", *deps, "-c", "./src.c", "-o", "out/x.o"])
    listing = argpolicy.dependency_command(GCC, p)
    assert listing is not None
    target = argpolicy.dependency_target(p)
    done = subprocess.run(listing, cwd=tmp_path, capture_output=True, check=True)
    rule = (tmp_path / target).read_bytes() if target else done.stdout
    names = argpolicy.dependency_names(rule, p.source)
    assert names is not None
    text = subprocess.run(argpolicy.preprocess_command(GCC, p), cwd=tmp_path, capture_output=True, check=True).stdout
    markers = argpolicy.include_markers(text)
    cwd = str(tmp_path)
    main = str(tmp_path / "src.c")
    assert [f for f in argpolicy.included_files(names, cwd) if f != main] == argpolicy.included_files(markers, cwd)
    directories = argpolicy.lookup_directories(p, names, cwd)
    assert directories == argpolicy.lookup_directories(p, markers, cwd) and str(tmp_path / "empty") in directories
    if target:
        assert (tmp_path / target).read_bytes() == rule  # the -E run above wrote it again


def test_a_job_listed_by_gcc_M_is_the_job_the_text_made(tmp_path):
    """The job prepare_job makes from gcc -M's rule carries the same files, system headers and directories as
    the one from the -fdirectives-only text (which -MMD still takes); the main file is the original, never a
    header or, under /usr, a system header."""
    from securecc.client.job import Invocation, prepare_job

    (tmp_path / "inc").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "inc" / "cfg.h").write_text('#include <stdio.h>\n#define N 3\n')
    (tmp_path / "foo.c").write_text('#include "cfg.h"\n#include "empty/../inc/cfg.h"\nint n = N;\n')
    inv = Invocation(["gcc"], {"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache")}, str(tmp_path),
                     False, io.BytesIO(), io.BytesIO())
    jobs = []
    for deps in (["-MD"], ["-MMD"]):  # gcc -M, then the text
        p = plan(["-O2", "-Iinc", "-I.", *deps, "-c", "foo.c"])
        assert (argpolicy.dependency_command(GCC, p) is None) == (deps == ["-MMD"])
        job, _ = prepare_job(inv, "gcc", GCC, p)
        jobs.append(job)
    listed, text = jobs
    assert listed.include_paths == text.include_paths == [str(tmp_path / "inc" / "cfg.h")]
    assert listed.includes == text.includes and listed.original == text.original
    assert listed.system_headers == text.system_headers and "/usr/include/stdio.h" in listed.system_headers
    assert listed.system_digest == text.system_digest and listed.directories == text.directories


@pytest.mark.parametrize(("rule", "names"), [
    (b"x.o: x.c a\\ b.h \\\n c\\#d.h e$$f.h\n", ["x.c", "a b.h", "c#d.h", "e$f.h"]),
    (b"x.o: ./x.c a.h\na.h:\n", ["./x.c", "a.h"]),  # -MP's phony rules are not names
    (b"x.o: y.c a.h\n", None),  # not the rule for this source
    (b"x.o: x.c a\\\\\\ b.h\n", None),  # a backslash of the name's own: ambiguous
    (b"x.o: x.c a\tb.h\n", None),
    (b"garbage\n", None),
])
def test_dependency_names_reads_back_what_gcc_writes_or_gives_up(rule, names):
    assert argpolicy.dependency_names(rule, "x.c") == names


@pytest.mark.parametrize("line", ["-MMD -c x.c", "-c x.S", "-H -c x.c", "-MD -MF /dev/stdout -c x.c"])
def test_dependency_command_leaves_to_the_text_what_it_cannot_list(line):
    """-MMD (-M would put system headers in the user's file), assembler (its text is checked), a CPP-only option
    (the text is what is sent), a dependency file that is not a file; and clang."""
    assert argpolicy.dependency_command(GCC, plan(argv(line))) is None
    assert argpolicy.dependency_command(GCC, plan(argv("-c x.c")), "clang") is None


# --- remote_text on real gcc output --------------------------------------------------------------


def preprocessed(tmp_path: Path, p: argpolicy.Plan, env: dict[str, str] | None = None) -> bytes:
    """Run the client's preprocessing command with the real gcc in ``tmp_path``."""
    done = subprocess.run(argpolicy.preprocess_command(GCC, p), cwd=tmp_path, capture_output=True, env=env, check=True)
    return done.stdout


SOURCE = "#include <limits.h>\n#define TWICE(x) ((x) * 2)\nint answer(void) { return TWICE(FOO) + CHAR_BIT; }\n"


@pytest.mark.parametrize("debug", [[], ["-g"]], ids=["plain", "g"])
def test_remote_text_drops_builtins_keeps_the_rest(tmp_path, debug):
    """Built-in macros go; command-line macros, included headers and the source text stay."""
    (tmp_path / "foo.c").write_text(SOURCE)
    p = plan([*debug, "-DFOO=1", "-c", "foo.c"])
    text = preprocessed(tmp_path, p)
    assert b'# 0 "<built-in>"' in text and b"#define __STDC__" in text  # the shape remote_text expects
    sent = argpolicy.remote_text(p, text)
    assert b"<built-in>" not in sent
    assert b"#define __STDC__" not in sent and b"#define __GNUC__" not in sent
    assert b"#define FOO 1" in sent
    assert b"#define CHAR_BIT" in sent  # limits.h was resolved here
    assert b"int answer(void) { return TWICE(FOO) + CHAR_BIT; }" in sent  # macros left unexpanded
    assert sent.startswith(b'# 0 "foo.c"\n')
    if debug:
        assert f'\n# 1 "{tmp_path}//"\n'.encode() in sent  # the compilation directory marker survives


def test_remote_text_keeps_builtins_for_pedantic(tmp_path):
    """Pedantic jobs compile with -fdirectives-only on the server, which needs the built-ins as they are."""
    (tmp_path / "foo.c").write_text(SOURCE)
    p = plan(["-pedantic", "-DFOO=1", "-c", "foo.c"])
    text = preprocessed(tmp_path, p)
    assert argpolicy.remote_text(p, text) == text


@pytest.mark.parametrize(
    "text",
    [b"int x;\n", b"", b'# 0 "foo.c"\n# 0 "<built-in>"\n#define __STDC__ 1\nint x;\n', b'# 0 "<command-line>"\nint x;\n'],
)
def test_remote_text_refuses_unexpected_shape(text):
    """Output without both markers is not what -fdirectives-only gives: compile locally."""
    with pytest.raises(NotDistributable):
        argpolicy.remote_text(plan(["-c", "foo.c"]), text)


@pytest.mark.parametrize("macro", ["__BASE_FILE__", "__TIMESTAMP__"])
def test_remote_text_refuses_location_macros(tmp_path, macro):
    (tmp_path / "foo.c").write_text(f"const char *s = {macro};\n")
    p = plan(["-c", "foo.c"])
    with pytest.raises(NotDistributable):
        argpolicy.remote_text(p, preprocessed(tmp_path, p))


# --- the text the client sends compiles to the object gcc makes here -----------------------------------


def compile_like_the_server(tmp_path: Path, p: argpolicy.Plan, text: bytes) -> subprocess.CompletedProcess:
    """The compiler part of sandbox.command(): remote args on the sent text, a clean environment.

    The server compiles ``/job/input`` with -fdebug-prefix-map back to the source path,
    in the client's working directory, with PATH, TMPDIR and the job's environment
    (what the client's compiler_environment() forwards) set.
    """
    environment = {"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp", "LC_ALL": "C", **compiler_environment()}
    job = tmp_path / "job"
    job.mkdir()
    (job / "input").write_bytes(text)
    argv_ = [GCC, *argpolicy.COMPILE_LANGUAGE[argpolicy.remote_language(p)], *p.remote_args, p.mode,
             f"-fdebug-prefix-map={job / 'input'}={p.source}", "-o", str(job / "output"), str(job / "input")]
    return subprocess.run(argv_, cwd=tmp_path, capture_output=True, env=environment)


REPRODUCIBLE = {
    # name: (foo.c, flags, other files)
    "plain": ("#define TWICE(x) ((x) * 2)\nint f(int x) { return TWICE(x); }\n", ["-O2"], {}),
    "debug": ("#define TWICE(x) ((x) * 2)\nint f(int x) {\n  return TWICE(x);\n}\n", ["-O2", "-g"], {}),
    "pedantic": ("#define TWICE(x) ((x) * 2)\nint f(int x) { return TWICE(x); }\n", ["-std=c99", "-pedantic", "-Werror"], {}),
    "werror-pedantic": ("int f(int x) { return x; }\n", ["-Werror=pedantic", "-O2"], {}),
    "fallthrough-comment": ("int f(int x) { int r = 0; switch (x) { case 1: r++;\n/* fall through */\ncase 2: r++; } return r; }\n",
                            ["-Wextra", "-Werror"], {}),
    "header-and-include-level": ('#include "inc/h.h"\nint top = __INCLUDE_LEVEL__;\n', ["-O2", "-g", "-Iinc"],
                                 {"inc/h.h": "int level = __INCLUDE_LEVEL__;\nconst char *h = __FILE__;\n"}),
    "file-name": ('#include "inc/h.h"\nconst char *f = __FILE_NAME__;\n', ["-O2"], {"inc/h.h": "const char *g = __FILE_NAME__;\n"}),
    "counter": ('int a = __COUNTER__;\n#include "h.h"\nint c = __COUNTER__;\n', ["-O2"], {"h.h": "int b = __COUNTER__;\n"}),
    "line-directive": ('#line 100 "other.c"\nint x = __LINE__;\nconst char *f = __FILE__;\n', ["-O2", "-g"], {}),
    "redefined-builtin": ("#undef __GNUC__\n#define __GNUC__ 99\nint v = __GNUC__;\n", ["-O2"], {}),
    "pragma-dependency": ('#pragma GCC dependency "h.h"\nint x;\n', ["-O2"], {"h.h": "\n"}),
    # Debian builds export SOURCE_DATE_EPOCH, so __DATE__ is reproducible locally.
    "date": ('const char *built = __DATE__ " " __TIME__;\n', ["-O2"], {}),
    # The substring check cannot see a name built by token pasting.
    "pasted-base-file": ("#define CAT(a, b) a##b\nconst char *name = CAT(__BASE_, FILE__);\n", ["-O2"], {}),
    "pasted-timestamp": ("#define CAT(a, b) a##b\nconst char *stamp = CAT(__TIME, STAMP__);\n", ["-O2"], {}),
    # -fdirectives-only runs the pragmas here and leaves a bare #undef X where pop_macro was.
    "push-pop-macro": ('#define X 1\n#pragma push_macro("X")\n#undef X\n#define X 2\nint a = X;\n#pragma pop_macro("X")\nint b = X;\n',
                       ["-O2"], {}),
}


def write_project(directory: Path, source: str, files: dict[str, str]) -> None:
    for name, text in {"foo.c": source, **files}.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
        os.utime(directory / name, (1_000_000_000, 1_000_000_000))  # an old mtime, as a checked-out tree has


KNOWN_GAPS = {
    "pasted-base-file": "a __BASE_FILE__ made by token pasting is not detected (nor is a pasted __TIMESTAMP__)",
    "pasted-timestamp": "a __TIMESTAMP__ made by token pasting is not detected",
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_GAPS[c], strict=True)) if c in KNOWN_GAPS else c
     for c in REPRODUCIBLE],
)
def test_sent_text_compiles_to_the_local_object(tmp_path, monkeypatch, case):
    """Either remote_text refuses the text (the server then preprocesses), or the server's compile equals the local object."""
    source, flags, files = REPRODUCIBLE[case]
    write_project(tmp_path, source, files)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    env = dict(os.environ)
    p = plan([*flags, "-c", "foo.c", "-o", "local.o"])
    if argpolicy.uses_push_macro([(tmp_path / name).read_bytes() for name in ("foo.c", *files)]):
        return  # the client has the server preprocess these
    try:
        text = argpolicy.remote_text(p, preprocessed(tmp_path, p, env))
    except NotDistributable:
        return
    remote = compile_like_the_server(tmp_path, p, text)
    local = subprocess.run([GCC, *flags, "-c", "foo.c", "-o", "local.o"], cwd=tmp_path, env=env, capture_output=True)
    assert local.returncode == 0, local.stderr.decode()
    assert remote.returncode == 0, remote.stderr.decode()
    assert (tmp_path / "job" / "output").read_bytes() == (tmp_path / "local.o").read_bytes()


MESSAGES = {
    "warning-directive": ("#warning look here\nint x;\n", ["-O2"]),
    "unused-variable": ("int f(void) { int unused; return 0; }\n", ["-Wall"]),
    "macro-redefined": ("#define X 1\n#define X 2\nint x = X;\n", ["-O2"]),
}


@pytest.mark.parametrize("case", MESSAGES)
def test_messages_are_printed_once(tmp_path, case):
    """The user sees the local preprocessing's messages and the server's (client.prepare_job prints both): gcc's, once."""
    source, flags = MESSAGES[case]
    write_project(tmp_path, source, {})
    p = plan([*flags, "-c", "foo.c"])
    directives = subprocess.run(argpolicy.preprocess_command(GCC, p), cwd=tmp_path, capture_output=True, check=True)
    remote = compile_like_the_server(tmp_path, p, argpolicy.remote_text(p, directives.stdout))
    local = subprocess.run([GCC, *flags, "-c", "foo.c"], cwd=tmp_path, capture_output=True)
    assert local.stderr, "the case must make gcc say something"
    assert unrepeated(directives.stderr, remote.stderr) + remote.stderr == local.stderr


def test_lookup_directories_are_the_ones_a_dotdot_walks_through(tmp_path):
    """'empty/../inc' needs 'empty'; system directories (clang's /usr/lib/llvm-14/.../../include) are never named."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "inc").mkdir()
    p = plan(["-Iempty/../inc", "-I", "/usr/lib/../include", "-c", "foo.c"])
    text = b'# 1 "foo.c"\n# 1 "/usr/lib/llvm-14/lib/clang/14.0.6/include/../../../../include/x.h" 1\n'
    assert argpolicy.lookup_directories(p, argpolicy.include_markers(text), str(tmp_path)) == [str(tmp_path / "empty")]
    assert argpolicy.lookup_directories(plan(["-Iinc", "-c", "foo.c"]), [], str(tmp_path)) == []  # no '..': none needed
