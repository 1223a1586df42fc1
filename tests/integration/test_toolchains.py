"""Toolchains users have: clang, a Debian cross compiler, ccache, CMake and Meson, end to end.

Real KDC, slapd, server, sandbox and CLI.  Every object is compared byte for
byte with the one the local compiler makes, ``-g`` included, and every job
that should be remote is found in the server's audit log.  The tools come
from scripts/setup; a missing one fails these tests, it does not skip them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, Realm, Server, local, securecc, start_server

from securecc import args as argpolicy
from securecc.server.config import ConfigError, load_config
from securecc.toolchain import cached_identity, family, probe

OFFERED = {"clang": "/usr/bin/clang", "clang++": "/usr/bin/clang++", "aarch64-linux-gnu-gcc": "/usr/bin/aarch64-linux-gnu-gcc"}
TOOLS = ("clang", "clang++", "aarch64-linux-gnu-gcc", "ccache", "cmake", "meson", "ninja")
AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def toolchain_server(realm):
    """A server that offers clang, clang++ and the aarch64 cross compiler besides gcc and g++."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"missing {', '.join(missing)}: run scripts/setup"
    server = start_server(realm, realm.dir / "toolchain-server", compilers=OFFERED)
    yield server
    server.stop()


def elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


def messages(stderr: bytes) -> bytes:
    """The compiler's own messages: stderr without securecc's lines."""
    return b"".join(line for line in stderr.splitlines(keepends=True) if not line.startswith(b"securecc:"))


def as_alice(realm: Realm, server: Server, cwd: Path, **extra: str) -> dict[str, str]:
    """alice's environment for a build tool that runs ``securecc`` itself (found in PATH)."""
    env = realm.user_env("alice", cwd)
    env.update(SECURECC_HOSTS=server.hosts, PATH=f"{BIN}:{os.environ['PATH']}", PWD=str(cwd),
               XDG_CACHE_HOME=str(cwd / ".cache"), **extra)
    return env


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, check=False, cwd=cwd, env=env or {**os.environ, "PWD": str(cwd)}, capture_output=True, timeout=300
    )
    assert done.returncode == 0, f"{command}: {done.stdout.decode()}{done.stderr.decode()}"
    return done


# --- identity ------------------------------------------------------------------------------------


def test_identities_name_version_package_and_target():
    """clang's identity has its version, its Debian package revision and its target; the cross gcc its own triple."""
    clang = probe("/usr/bin/clang")
    assert re.fullmatch(rf"(\S+ )?clang version \d+\.\d+\.\d+ \(clang-\d+ \S+\); target {platform.machine()}-\S+", clang), clang
    assert family(clang) == "clang" and probe("/usr/bin/clang++") == clang  # one binary, two driver modes
    cross = probe("/usr/bin/aarch64-linux-gnu-gcc")
    assert re.fullmatch(r"gcc version \d+\.\S+ \(Debian \S+\); target aarch64-linux-gnu", cross), cross
    assert family(cross) == "gcc" and family(probe("/usr/bin/gcc")) == "gcc"
    assert probe("/usr/bin/gcc") != cross


def test_clang_is_probed_by_the_name_it_runs_as(tmp_path):
    """clang takes its target from its name: a link named aarch64-linux-gnu-clang is an aarch64 compiler."""
    (tmp_path / "aarch64-linux-gnu-clang").symlink_to("/usr/bin/clang")
    cache = str(tmp_path / "compilers.json")
    cross = cached_identity(str(tmp_path / "aarch64-linux-gnu-clang"), cache)
    assert cross.endswith("; target aarch64-unknown-linux-gnu"), cross
    assert cached_identity("/usr/bin/clang", cache) == probe("/usr/bin/clang") != cross
    assert cached_identity(str(tmp_path / "aarch64-linux-gnu-clang"), cache) == cross  # from the cache, per name


def test_server_config_takes_debian_toolchains_and_refuses_links_out_of_the_sandbox(realm, tmp_path):
    """Debian's clang (a link into /usr/lib/llvm-14) and cross gcc are valid compilers; a link out of /usr is not."""
    base = yaml.safe_load((realm.dir / "securecc.yaml").read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, "compilers": OFFERED}))
    assert {name: c.path for name, c in load_config(tmp_path / "c.yaml").compilers.items()} == OFFERED
    (tmp_path / "cross" / "bin").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "elsewhere" / "gcc").chmod(0o755)
    (tmp_path / "cross" / "bin" / "gcc").symlink_to(tmp_path / "elsewhere" / "gcc")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, "compilers": {"gcc": "/usr/bin/gcc", "cross-gcc": {
        "path": str(tmp_path / "cross" / "bin" / "gcc"), "root": str(tmp_path / "cross")}}}))
    with pytest.raises(ConfigError, match=r"compiler 'cross-gcc': .* leads to .*/elsewhere/gcc, which the sandbox does not"):
        load_config(tmp_path / "c.yaml")


def test_clang_preprocessing_commands(tmp_path):
    """clang preprocesses with plain -E (no -fdirectives-only), whose <built-in> and <command line> are no files."""
    plan = argpolicy.plan(["-DX=1", "-Iinc", "-c", "a.c"])
    assert argpolicy.preprocess_command("clang", plan, "clang") == ["clang", "-DX=1", "-Iinc", "a.c", "-E"]
    assert argpolicy.preprocess_command("gcc", plan, "gcc")[-2:] == ["-E", "-fdirectives-only"]
    (tmp_path / "a.c").write_text('#include "a.h"\nint a = X;\n')
    (tmp_path / "a.h").write_text("#define Y 2\n")
    text = run(argpolicy.preprocess_command("/usr/bin/clang", argpolicy.plan(["-DX=1", "-c", "a.c"]), "clang"), tmp_path).stdout
    assert b'# 1 "<built-in>" 1' in text and b'# 1 "<command line>" 1' in text
    assert argpolicy.included_files(argpolicy.include_markers(text), str(tmp_path)) == [str(tmp_path / "a.h")]


def test_what_clang_keeps_here():
    """A .i file with any -g, and a .S file, stay local for clang (not for gcc): see args.check_family."""
    for args, why in ((["-gline-tables-only", "-c", "a.i"], "clang with -g on preprocessed input"),
                      (["-c", "a.S"], "clang preprocesses .S into a temporary file")):
        with pytest.raises(argpolicy.NotDistributable, match=why):
            argpolicy.check_family(argpolicy.plan(args), "clang")
        argpolicy.check_family(argpolicy.plan(args), "gcc")
    for args in (["-O2", "-c", "a.i"], ["-g", "-c", "a.s"], ["-g", "-c", "a.c"]):
        argpolicy.check_family(argpolicy.plan(args), "clang")


# --- clang -----------------------------------------------------------------------------------------

C_SOURCE = """\
#include <stdio.h>
#include "util.h"
#define SQUARE(x) ((x) * (x))
int main(void) { int v = SQUARE(SCALE) + twice(WIDTH); printf("%d\\n", v); return v > 0 ? 0 : 1; }
"""
C_HEADER = "#define WIDTH 21\nstatic inline int twice(int x) { return 2 * x; }\n"
CXX_SOURCE = """\
#include <map>
#include <string>
#include <vector>
#include "util.h"
template <typename T> struct Box { T value; T get() const { return value; } };
template <typename T> T total(const std::vector<T>& xs) { T sum{}; for (const T& x : xs) sum += x; return sum; }
int use() {
  std::map<std::string, std::vector<int>> m{{"a", {1, 2, WIDTH}}};
  Box<std::string> b{"box"};
  return total(m["a"]) + static_cast<int>(b.get().size()) + twice(SCALE);
}
"""


def write_sources(directory: Path) -> None:
    (directory / "src").mkdir(exist_ok=True)
    (directory / "src" / "main.c").write_text(C_SOURCE)
    (directory / "src" / "lib.cpp").write_text(CXX_SOURCE)
    (directory / "util.h").write_text(C_HEADER)


@pytest.mark.parametrize(
    ("compiler", "source", "flags"),
    [("clang", "src/main.c", ["-O2"]), ("clang", "src/main.c", ["-g", "-O2"]), ("clang", "src/main.c", ["-g", "-O0", "-Wall"]),
     ("clang", "src/main.c", ["-gline-tables-only", "-O2"]), ("clang++", "src/lib.cpp", ["-g", "-O2", "-std=c++17"]),
     ("clang++", "src/lib.cpp", ["-O3", "-fPIC"])],
    ids=["O2", "g-O2", "g-O0-Wall", "line-tables", "cxx-g-O2", "cxx-O3-fPIC"],
)
def test_clang_objects_are_identical(realm, toolchain_server, workdir, compiler, source, flags):
    """clang and clang++ compile remotely (the server preprocesses: DWARF 5 sums the files) into the local object."""
    write_sources(workdir)
    args = [*flags, "-DSCALE=3", "-I.", "-c", source, "-o"]
    done = securecc(realm, toolchain_server, "alice", workdir, compiler, *args, "remote.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().splitlines()[-1].startswith(f"securecc: compiled {source} on 127.0.0.1"), done.stderr
    assert local(workdir, compiler, *args, "local.o").returncode == 0
    remote = (workdir / "remote.o").read_bytes()
    assert remote == (workdir / "local.o").read_bytes()
    record = toolchain_server.jobs(cwd=str(workdir), compiler=compiler)[-1]
    assert record["decision"] == "allowed" and record["compiler_path"] == OFFERED[compiler]
    assert record["output_sha256"] == hashlib.sha256(remote).hexdigest()
    assert family(record["compiler_identity"]) == "clang"


WARNINGS = """\
#include "w.h"
#warning checked
#define SCALE 9
int f(int x) {
  UNUSED_IN_MACRO;
  if (CMP(x, 1)) return 1;
  if ((x == 2)) return 2;
  int y;
  return x + y + SCALE;
}
"""
WARNINGS_HEADER = "#pragma once\n#define CMP(a, b) ((a) == (b))\n#define UNUSED_IN_MACRO int unused_m = 0\n"


def test_clang_messages_and_errors_are_clangs(realm, toolchain_server, workdir):
    """Warnings (with their 'expanded from macro' notes and their count) and errors come out as a local clang's."""
    (workdir / "w.h").write_text(WARNINGS_HEADER)
    (workdir / "w.c").write_text(WARNINGS)
    (workdir / "e.c").write_text('#include "w.h"\nint g(void) { return undefined_thing; }\n')
    args = ["-Wall", "-Wextra", "-DSCALE=3", "-O2", "-c"]
    done = securecc(realm, toolchain_server, "alice", workdir, "clang", *args, "w.c", "-o", "r.o", SECURECC_VERBOSE="1")
    here = local(workdir, "clang", *args, "w.c", "-o", "l.o")
    assert done.returncode == here.returncode == 0
    assert b"compiled w.c on 127.0.0.1" in done.stderr, done.stderr
    assert messages(done.stderr) == here.stderr
    assert b"expanded from macro 'UNUSED_IN_MACRO'" in here.stderr and b"5 warnings generated." in here.stderr
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    done = securecc(realm, toolchain_server, "alice", workdir, "clang", *args, "e.c", "-o", "r-e.o")
    here = local(workdir, "clang", *args, "e.c", "-o", "l-e.o")
    assert done.returncode == here.returncode == 1
    assert done.stderr == here.stderr and b"1 error generated." in here.stderr
    assert not (workdir / "r-e.o").exists()


def test_clang_preprocessed_input(realm, toolchain_server, workdir):
    """A .i file compiles remotely as it is; with -g clang keeps it here, where its debug info names the source."""
    write_sources(workdir)
    assert local(workdir, "clang", "-DSCALE=2", "-I.", "-E", "src/main.c", "-o", "main.i").returncode == 0
    for flags, remote in ((["-O2"], True), (["-g", "-O2"], False)):
        done = securecc(realm, toolchain_server, "alice", workdir, "clang", *flags, "-c", "main.i", "-o", "r.o",
                        SECURECC_VERBOSE="1")
        assert done.returncode == 0, done.stderr
        said = done.stderr.decode()
        assert ("compiled main.i on 127.0.0.1" in said) == remote, said
        assert remote or "compiling locally: clang with -g on preprocessed input" in said
        assert local(workdir, "clang", *flags, "-c", "main.i", "-o", "l.o").returncode == 0
        assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()


def test_clang_dependency_file(realm, toolchain_server, workdir):
    """-MD with clang: the dependency file is written here, as clang writes it, and the object is remote."""
    write_sources(workdir)
    args = ["-g", "-DSCALE=1", "-I.", "-MD", "-c", "src/main.c", "-o"]
    done = securecc(realm, toolchain_server, "alice", workdir, "clang", *args, "r.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled src/main.c on 127.0.0.1" in done.stderr, done.stderr
    assert local(workdir, "clang", *args, "l.o").returncode == 0
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    assert (workdir / "r.d").read_text().replace("r.o:", "l.o:") == (workdir / "l.d").read_text()
    assert "util.h" in (workdir / "l.d").read_text()


def test_clang_assembler(realm, toolchain_server, workdir):
    """clang assembles a .s remotely; a .S (which clang preprocesses into a temporary file) here."""
    (workdir / "a.s").write_text(".text\n.globl f\nf:\n mov $3, %eax\n ret\n")
    (workdir / "b.S").write_text("#define N 3\n.text\n.globl g\ng:\n mov $N, %eax\n ret\n")
    for source, said in (("a.s", "compiled a.s on 127.0.0.1"), ("b.S", "compiling locally: clang preprocesses .S")):
        done = securecc(realm, toolchain_server, "alice", workdir, "clang", "-g", "-c", source, "-o", "r.o", SECURECC_VERBOSE="1")
        assert done.returncode == 0 and said.encode() in done.stderr, done.stderr
        assert local(workdir, "clang", "-g", "-c", source, "-o", "l.o").returncode == 0
        assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()


def test_clang_time_trace_stays_here(realm, toolchain_server, workdir):
    """-ftime-trace writes a file beside the object: compiled here, the trace where clang puts it, no stray file."""
    write_sources(workdir)
    done = securecc(realm, toolchain_server, "alice", workdir, "clang", "-ftime-trace", "-DSCALE=1", "-I.", "-c", "src/main.c",
                    "-o", "t.o", SECURECC_VERBOSE="1")
    assert done.returncode == 0 and done.stderr == b"securecc: compiling locally: option -ftime-trace\n", done.stderr
    assert sorted(p.name for p in workdir.glob("*.json")) == ["t.json"]


def test_clang_masquerade_symlink(realm, toolchain_server, workdir):
    """Symlinks named clang and clang++ run securecc with that compiler; --version is clang's own."""
    write_sources(workdir)
    bindir = workdir / "masq"
    bindir.mkdir()
    for name in ("clang", "clang++"):
        (bindir / name).symlink_to(BIN / "securecc")
    env = as_alice(realm, toolchain_server, workdir, SECURECC_VERBOSE="1")
    env["PATH"] = f"{bindir}:{env['PATH']}"
    for name, source in (("clang", "src/main.c"), ("clang++", "src/lib.cpp")):
        done = subprocess.run([name, "-g", "-DSCALE=1", "-I.", "-c", source, "-o", "m.o"], check=False, cwd=workdir, env=env,
                              capture_output=True, timeout=60)
        assert done.returncode == 0 and f"compiled {source} on 127.0.0.1".encode() in done.stderr, done.stderr
    version = subprocess.run(["clang", "--version"], check=False, cwd=workdir, env=env, capture_output=True, timeout=60)
    assert version.stdout.splitlines()[0] == run(["/usr/bin/clang", "--version"], workdir).stdout.splitlines()[0]


# --- a cross compiler ------------------------------------------------------------------------------

CROSS_SOURCE = """\
#include <stdint.h>
#include <stdio.h>
int main(void) { uint64_t v = UINT64_C(1) << 40; printf("%llu\\n", (unsigned long long)v); return 0; }
"""


@pytest.mark.parametrize("flags", [["-O2"], ["-g", "-O2"]], ids=["O2", "g-O2"])
def test_cross_compiler_end_to_end(realm, toolchain_server, workdir, flags):
    """aarch64-linux-gnu-gcc compiles in the server's sandbox with the server's own cross compiler, as here."""
    (workdir / "x.c").write_text(CROSS_SOURCE)
    done = securecc(realm, toolchain_server, "alice", workdir, "aarch64-linux-gnu-gcc", *flags, "-c", "x.c", "-o", "r.o",
                    SECURECC_VERBOSE="1")
    assert done.returncode == 0 and b"compiled x.c on 127.0.0.1" in done.stderr, done.stderr
    assert local(workdir, "aarch64-linux-gnu-gcc", *flags, "-c", "x.c", "-o", "l.o").returncode == 0
    assert elf_machine(workdir / "r.o") == AARCH64
    assert (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    record = toolchain_server.jobs(cwd=str(workdir))[-1]
    assert record["compiler"] == "aarch64-linux-gnu-gcc" and record["decision"] == "allowed"
    assert record["compiler_identity"].endswith("; target aarch64-linux-gnu")


def test_server_without_the_cross_compiler_says_so_and_it_builds_here(realm, server, workdir):
    """A server that does not offer aarch64-linux-gnu-gcc refuses in one line; the object is made here."""
    (workdir / "x.c").write_text(CROSS_SOURCE)
    done = securecc(realm, server, "alice", workdir, "aarch64-linux-gnu-gcc", "-O2", "-c", "x.c", "-o", "r.o")
    assert done.returncode == 0
    assert done.stderr.decode() == ("securecc: x.c: 127.0.0.1 refused the job: compiler 'aarch64-linux-gnu-gcc' is not "
                                    "offered by this server; compiling locally\n")
    local(workdir, "aarch64-linux-gnu-gcc", "-O2", "-c", "x.c", "-o", "l.o")
    assert elf_machine(workdir / "r.o") == AARCH64 and (workdir / "r.o").read_bytes() == (workdir / "l.o").read_bytes()
    assert server.jobs(cwd=str(workdir))[-1]["reason"] == "denied:compiler-not-offered"


def test_server_whose_cross_compiler_is_another_target_refuses(realm, own_server, workdir):
    """A server whose 'aarch64-linux-gnu-gcc' is a native gcc refuses the job (compiler-mismatch), naming both targets."""
    wrong = own_server(compilers={"aarch64-linux-gnu-gcc": "/usr/bin/gcc"})
    (workdir / "x.c").write_text(CROSS_SOURCE)
    done = securecc(realm, wrong, "alice", workdir, "aarch64-linux-gnu-gcc", "-O2", "-c", "x.c", "-o", "r.o")
    assert done.returncode == 0 and elf_machine(workdir / "r.o") == AARCH64
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("securecc: x.c: 127.0.0.1 refused the job: this server's"), lines
    assert "target x86_64-linux-gnu" in lines[0] and "target aarch64-linux-gnu" in lines[0]
    assert lines[0].endswith("objects would differ; compiling locally")
    assert wrong.jobs(cwd=str(workdir))[-1]["reason"] == "denied:compiler-mismatch"


# --- ccache, CMake, Meson --------------------------------------------------------------------------


def test_ccache_prefix(realm, toolchain_server, workdir):
    """CCACHE_PREFIX=securecc: the miss is compiled by the server, the second run is a ccache hit; objects equal."""
    write_sources(workdir)
    env = as_alice(realm, toolchain_server, workdir, CCACHE_DIR=str(workdir / "ccache"), CCACHE_PREFIX="securecc")
    command = ["ccache", "gcc", "-g", "-O2", "-DSCALE=4", "-I.", "-c", "src/main.c", "-o", "main.o"]
    run(command, workdir, env)
    first = (workdir / "main.o").read_bytes()
    jobs = toolchain_server.jobs(cwd=str(workdir))
    assert [(j["compiler"], j["source"], j["decision"]) for j in jobs] == [("gcc", "src/main.c", "allowed")]
    assert jobs[0]["output_sha256"] == hashlib.sha256(first).hexdigest()
    (workdir / "main.o").unlink()
    run(command, workdir, env)
    stats = dict(line.split("\t") for line in run(["ccache", "--print-stats"], workdir, env).stdout.decode().splitlines())
    assert int(stats["direct_cache_hit"]) + int(stats["preprocessed_cache_hit"]) == 1, stats
    assert len(toolchain_server.jobs(cwd=str(workdir))) == 1  # the hit never left this machine
    assert (workdir / "main.o").read_bytes() == first
    assert local(workdir, "gcc", *command[2:-1], "local.o").returncode == 0
    assert first == (workdir / "local.o").read_bytes()


PROJECT_HEADER = """\
#pragma once
#include <string>
#include <vector>
#define SCALE 3
template <typename T> class Stack {
 public:
  void push(const T& v) { items_.push_back(v); }
  T pop() { T v = items_.back(); items_.pop_back(); return v; }
  bool empty() const { return items_.empty(); }
 private:
  std::vector<T> items_;
};
int area(int w, int h);
std::string describe(Stack<int>& s);
extern "C" unsigned checksum(const char* s);
"""
PROJECT = {
    "include/shapes.hpp": PROJECT_HEADER,
    "src/main.cpp": '#include <iostream>\n#include "shapes.hpp"\n'
                    'int main() { Stack<int> s; s.push(area(2, SCALE)); std::cout << describe(s) << checksum("x") << "\\n"; }\n',
    "src/area.cpp": '#include "shapes.hpp"\nint area(int w, int h) { return w * h; }\n',
    "src/describe.cpp": '#include <sstream>\n#include "shapes.hpp"\ntemplate class Stack<std::string>;\n'
                        'std::string describe(Stack<int>& s) { std::ostringstream o; while (!s.empty()) o << s.pop() << " "; '
                        "return o.str(); }\n",
    "src/checksum.c": "unsigned checksum(const char *s) {\n"
                      "  unsigned h = 5381; while (*s) h = h * 33 + (unsigned char)*s++; return h;\n}\n",
    "CMakeLists.txt": "cmake_minimum_required(VERSION 3.16)\nproject(demo C CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
                      "add_executable(demo src/main.cpp src/area.cpp src/describe.cpp src/checksum.c)\n"
                      "target_include_directories(demo PRIVATE include)\n",
    "meson.build": "project('demo', 'c', 'cpp', default_options: ['cpp_std=c++17', 'buildtype=debugoptimized'])\n"
                   "executable('demo', 'src/main.cpp', 'src/area.cpp', 'src/describe.cpp', 'src/checksum.c',\n"
                   "           include_directories: include_directories('include'))\n",
}
SOURCES = sorted(name for name in PROJECT if name.startswith("src/"))


def build_twice(realm: Realm, server: Server, project: Path, configure: list[str], build: list[str], objects: str,
                remote: dict[str, str] | None = None, here: dict[str, str] | None = None) -> dict[str, bytes]:
    """Build in ``project/build`` through securecc, then locally in the same directory (debug info names it).

    ``configure`` runs with ``remote`` in the environment, and again without its ``securecc``
    arguments, with ``here``, for the local build.
    Returns the remote objects by path; asserts that the local ones are the same, and that the
    server compiled every source of the project, for alice, into the object that came back.
    """
    for name, text in PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    directory = project / "build"
    env = as_alice(realm, server, project, **(remote or {}))
    run(configure, project, env)
    run(build, directory, {**env, "PWD": str(directory)})
    made = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.glob(objects))}
    assert len(made) == len(SOURCES), made.keys()
    jobs = server.jobs(cwd=str(directory))
    assert sorted(os.path.relpath(os.path.join(directory, j["source"]), project) for j in jobs) == SOURCES
    assert all(j["decision"] == "allowed" and j["principal"] == "alice@TEST.REALM" and j["exit_status"] == 0 for j in jobs)
    assert {j["output_sha256"] for j in jobs} == {hashlib.sha256(data).hexdigest() for data in made.values()}
    directory.rename(project / "build-remote")
    plain = {**{k: v for k, v in os.environ.items() if not k.startswith(("SECURECC", "CCACHE"))}, **(here or {})}
    run([a for a in configure if "securecc" not in a], project, {**plain, "PWD": str(project)})
    run(build, directory, {**plain, "PWD": str(directory)})
    for name, data in made.items():
        assert (directory / name).read_bytes() == data, name
    return made


def test_cmake_with_a_compiler_launcher(realm, toolchain_server, workdir):
    """CMake with CMAKE_{C,CXX}_COMPILER_LAUNCHER=securecc: every source compiled remotely, objects as a local build's."""
    configure = ["cmake", "-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                 "-DCMAKE_C_COMPILER_LAUNCHER=securecc", "-DCMAKE_CXX_COMPILER_LAUNCHER=securecc"]
    made = build_twice(
        realm, toolchain_server, workdir, configure, ["cmake", "--build", ".", "-j2"], "CMakeFiles/demo.dir/src/*.o"
    )
    assert "CMakeFiles/demo.dir/src/describe.cpp.o" in made


@pytest.mark.parametrize(("cc", "cxx"), [("gcc", "g++"), ("clang", "clang++")])
def test_meson_and_ninja(realm, toolchain_server, workdir, cc, cxx):
    """CC="securecc gcc" CXX="securecc g++" meson setup; ninja: every source remote, objects as a local build's."""
    made = build_twice(realm, toolchain_server, workdir, ["meson", "setup", "build"], ["ninja", "-j2"], "demo.p/*.o",
                       remote={"CC": f"securecc {cc}", "CXX": f"securecc {cxx}"}, here={"CC": cc, "CXX": cxx})
    assert any(name.endswith("describe.cpp.o") for name in made)
