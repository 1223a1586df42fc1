#!/usr/bin/env python3
"""How much of real builds securecc distributes, why the rest stays local, and whether the objects match (issue 15).

Not a test: `.venv/bin/python bench/coverage.py [--packages zstd,lz4,bzip2] [--jobs 4] [--work DIR]`, as root.
Each package (upstream tree of a Debian source package) is built three ways at the same absolute path,
WORK/src/PACKAGE: with plain gcc/g++, through securecc (a testrealm securecc-server on 127.0.0.1, result cache
off, SECURECC_VERBOSE=1) and through Debian's distcc (distccd on 127.0.0.1, DISTCC_VERBOSE=1, fallback on).
Every compiler run goes through a small tracing wrapper that keeps its cwd, argv, stderr and distcc log, so
each run is counted once and its verbose lines are its own. Per package: the compile jobs (runs with -c or -S),
remote and local counts with the local reasons grouped, the servers' own counts (audit log, distccd's log),
and every .o of the securecc and distcc builds compared byte for byte with the local build's.
Prints a markdown table and writes JSON (bench/results/coverage.json), after every package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchrealm import BIN, REPO, Realm, debian_source, ensure_tools, shutil_rm
from vs_distcc import ACL, CpuGroup, machine, start_distcc, start_securecc, tear_down

# The tracing wrapper: everything before the compiler in CC/CXX or a CMake launcher list. Without
# COVERAGE_TRACE (configure steps) it is exec; with it, one record per run: cwd and argv, NUL-separated, the
# run's stderr (securecc's verbose lines; passed on afterwards) and its own DISTCC_LOG.
WRAPPER = """#!/bin/sh
[ -n "$COVERAGE_TRACE" ] || exec "$@"
record=$(mktemp "$COVERAGE_TRACE/run.XXXXXX") || exit 1
printf '%s\\0' "$(pwd)" "$@" > "$record"
DISTCC_LOG=$record.distcc "$@" 2> "$record.err"
status=$?
cat "$record.err" >&2
exit $status
"""
TOOLS = {"cmake": "cmake", "meson": "meson", "ninja": "ninja-build", "autoreconf": "autoconf", "automake": "automake",
         "libtoolize": "libtool", "nasm": "nasm", "distcc": "distcc", "distccd": "distcc", "bwrap": "bubblewrap",
         "make": "make", "perl": "perl", "g++": "g++"}
MODES = ["local", "securecc", "distcc"]
PREPROCESS_ONLY = {"-E", "-M", "-MM"}


@dataclass(frozen=True)
class Recipe:
    """How one package is configured and built, and what was left out of it (``note``) to keep the time sane."""

    system: str  # "make" (no configure step), "configure" (its configure script), "cmake" or "meson"
    languages: str
    options: tuple[str, ...] = ()  # arguments of the configure script, cmake or meson setup
    targets: tuple[str, ...] = ()  # make targets and variables of the build
    script: tuple[str, ...] = ("sh", "./configure")  # "configure" only; autoreconf -fi first if it is missing
    generate: tuple[str, ...] = ()  # make targets run once after configuring, with plain gcc and untraced
    extra: Callable[[Path], tuple[list[str], list[str]]] | None = None  # more (generate, targets), from the tree
    note: str = ""

    @property
    def once(self) -> bool:
        """Configured once with plain gcc, the three builds overriding CC/CXX on make's command line (as
        `make CC="distcc gcc"` is used); CMake and Meson keep their compiler, so they are configured per build."""
        return self.system in ("make", "configure")


OPENSSL_CRYPTO = ("aes", "bn", "ec", "evp", "modes", "sha")  # the libcrypto directories built, besides its assembler


def openssl_subset(tree: Path) -> tuple[list[str], list[str]]:
    """A few hundred of OpenSSL's compiles: its perlasm .s files to generate once (perl), and as targets their
    objects (assembler jobs) and the objects of some libcrypto directories (libssl.a is in the recipe)."""
    makefile = (tree / "Makefile").read_text()
    assembler = re.findall(r"^(\S+\.o): (\S+\.s)\b", makefile, re.MULTILINE)
    crypto = re.findall(rf"^(crypto/(?:{'|'.join(OPENSSL_CRYPTO)})/libcrypto-lib-\S+\.o):", makefile, re.MULTILINE)
    return [s for _, s in assembler], list(dict.fromkeys([o for o, _ in assembler] + crypto))


def libffi_host(tree: Path) -> tuple[list[str], list[str]]:
    """make -C HOST all-am, HOST the directory libffi's configure builds in (x86_64-pc-linux-gnu): its Makefiles
    set MAKEOVERRIDES empty, so make's recursion (all, then all-recursive) drops CC=... and compiles with gcc."""
    return [], ["-C", next(p.name for p in tree.iterdir() if (p / "fficonfig.h").exists()), "all-am"]


RECIPES: dict[str, Recipe] = {
    "zstd": Recipe("make", "C, assembler (.S)", targets=("BUILD_DIR=obj/coverage",),
                   note="default target (lib-release zstd-release), -O3; BUILD_DIR fixed: zstd names its object "
                        "directory after a hash of $(CC)"),
    "lz4": Recipe("make", "C", note="default target (lib-release lz4-release), -O3"),
    "bzip2": Recipe("make", "C", targets=("libbz2.a", "bzip2", "bzip2recover"), note="-O2 -g; its tests not run"),
    "zlib": Recipe("configure", "C", note="zlib's own configure, -O3"),
    "libyaml": Recipe("configure", "C", note="autoreconf -fi, then configure (-g -O2)"),
    "lua5.4": Recipe("make", "C", targets=("posix",), note="make posix (-O2)"),
    "jansson": Recipe("cmake", "C", ("-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DJANSSON_BUILD_DOCS=OFF"),
                      note="RelWithDebInfo (-O2 -g), tests included"),
    "xz-utils": Recipe("configure", "C", ("--disable-static", "--disable-nls", "--disable-doc"),
                       note="--disable-static (one libtool compile per file), -g -O2"),
    "yaml-cpp": Recipe("cmake", "C++", ("-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DYAML_CPP_BUILD_TESTS=OFF"),
                       note="RelWithDebInfo (-O2 -g), tests off"),
    "fmtlib": Recipe("cmake", "C++", ("-DCMAKE_BUILD_TYPE=Release", "-DFMT_TEST=OFF", "-DFMT_DOC=OFF"),
                     note="Release (-O3), tests off"),
    "libjpeg-turbo": Recipe("cmake", "C, NASM", ("-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_C_FLAGS=-g",
                                                 "-DENABLE_SHARED=OFF"),
                            note="-g -O3 (CMAKE_C_FLAGS=-g, Release), static only; nasm runs locally in all three"),
    "curl": Recipe("configure", "C", ("--disable-shared", "--without-ssl", "--without-zlib", "--without-brotli",
                                      "--without-zstd", "--without-libpsl", "--without-libidn2", "--without-nghttp2",
                                      "--without-libssh2", "--without-librtmp", "--disable-ldap", "--disable-manual"),
                   note="static, no TLS or optional libraries, -g -O2"),
    "openssl": Recipe("configure", "C, assembler (.s)", ("linux-x86_64", "no-shared"), ("libssl.a",),
                      script=("perl", "./Configure"), generate=("build_generated",), extra=openssl_subset,
                      note="subset: libssl.a, libcrypto's perlasm objects (.s) and crypto/{" + ",".join(OPENSSL_CRYPTO)
                           + "}, not the rest of libcrypto; -O3"),
    "fribidi": Recipe("meson", "C", ("--buildtype=debugoptimized", "-Ddocs=false"), note="debugoptimized (-O2 -g)"),
    # Not tuned on: added to find what the 14 above did not exercise.
    "libsodium": Recipe("configure", "C, assembler (.S)", ("--disable-static",),
                        note="autoreconf -fi, --disable-static; per-directory -m flags (-msse4.1, -mavx2, ...)"),
    "libffi": Recipe("configure", "C, assembler (.S)", ("--disable-static", "--disable-docs"), extra=libffi_host,
                     note="--disable-static, no docs; x86-64 .S through the driver (libtool --mode=compile)"),
    "nettle": Recipe("configure", "C, assembler (m4 .asm to .s)", ("--disable-shared", "--disable-documentation",
                                                                   "--disable-openssl"),
                     note="static only, no docs or openssl glue; x86_64 .asm preprocessed by m4 into .s, -O2 -g"),
    "pcre2": Recipe("configure", "C", ("--disable-shared", "--enable-pcre2-16", "--enable-pcre2-32", "--enable-jit"),
                    note="static; the 8-, 16- and 32-bit libraries (each source three times, per-target "
                         "-DPCRE2_CODE_UNIT_WIDTH), JIT (sljit, #included .c files), -O2"),
    "json-c": Recipe("cmake", "C", ("-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DBUILD_STATIC_LIBS=OFF",
                                    "-DBUILD_TESTING=OFF"),
                     note="RelWithDebInfo (-O2 -g), shared only, tests off; its -Werror and warning flags"),
    "snappy": Recipe("cmake", "C++", ("-DCMAKE_BUILD_TYPE=Release", "-DSNAPPY_BUILD_TESTS=OFF",
                                      "-DSNAPPY_BUILD_BENCHMARKS=OFF"),
                     note="Release (-O3), no tests or benchmarks (their googletest/benchmark submodules are absent)"),
    "double-conversion": Recipe("cmake", "C++", ("-DCMAKE_BUILD_TYPE=Debug", "-DBUILD_TESTING=ON"),
                                note="Debug (-g, no -O), its test programs built, not run"),
}


@dataclass
class Mode:
    """One way to build: what stands before the compiler, its environment, and the server's own job count."""

    name: str
    launcher: list[str]  # words between the tracing wrapper and the compiler
    env: dict[str, str]
    verbose: dict[str, str]  # added for the build step only
    outcome: Callable[[dict[str, Any]], tuple[bool, str | None]] = lambda run: (False, None)  # remote? why not?
    served: Callable[[], int] = lambda: 0  # jobs the server says it compiled so far


class BuildFailed(Exception):
    """A build step failed: its command and the tail of its log (the package is reported as failed)."""


def run(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run one build step with its output appended to ``log``; its wall time, or BuildFailed with the log's tail."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        started = time.monotonic()
        done = subprocess.run(command, cwd=cwd, env={**env, "PWD": str(cwd)}, stdout=out, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode:
        tail = log.read_bytes()[-2500:].decode(errors="replace")
        raise BuildFailed(f"exit {done.returncode}: {' '.join(command)}\n{tail}")
    return time.monotonic() - started


def configure(recipe: Recipe, tree: Path, cc: dict[str, str], env: dict[str, str], jobs: int,
              log: Path) -> tuple[float, list[str]]:
    """The configure step in ``tree`` with the compilers ``cc``: its wall time and the build command."""
    env = {**env, "CC": cc["CC"], "CXX": cc["CXX"]}
    wall = 0.0
    if recipe.system == "configure":
        if not (tree / recipe.script[-1]).exists() and (tree / "configure.ac").exists():
            wall += run(["autoreconf", "-fi"], tree, env, log)
        wall += run([*recipe.script, *recipe.options], tree, env, log)
    elif recipe.system == "cmake":
        launcher = ";".join(cc["LAUNCHER"].split())  # a CMake list
        wall += run(["cmake", "-S", ".", "-B", "_build", "-G", "Ninja", "-DCMAKE_C_COMPILER=gcc",
                     "-DCMAKE_CXX_COMPILER=g++", f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}",
                     f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}", *recipe.options], tree, env, log)
    elif recipe.system == "meson":
        wall += run(["meson", "setup", "_build", *recipe.options], tree, env, log)
    generate, targets = recipe.extra(tree) if recipe.extra else ([], [])
    if recipe.generate or generate:
        wall += run(["make", f"-j{jobs}", *recipe.generate, *generate], tree, env, log)
    if recipe.system in ("cmake", "meson"):
        return wall, ["ninja", "-C", "_build", f"-j{jobs}"]
    return wall, ["make", f"-j{jobs}", *recipe.targets, *targets]


def compilers(wrapper: Path, mode: Mode) -> dict[str, str]:
    """CC and CXX (for make and Meson) and the CMake launcher of a mode, all behind the tracing wrapper."""
    launcher = " ".join([str(wrapper), *mode.launcher])
    return {"CC": f"{launcher} gcc", "CXX": f"{launcher} g++", "LAUNCHER": launcher}


def object_files(tree: Path) -> set[str]:
    """The objects in a tree: *.o, and *.lo that are ELF (zlib's PIC objects; libtool's .lo are text)."""
    def elf(path: Path) -> bool:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"

    found = [p for pattern in ("*.o", "*.lo") for p in tree.rglob(pattern) if p.is_file() and not p.is_symlink()]
    return {str(p.relative_to(tree)) for p in found if p.suffix == ".o" or elf(p)}


def is_job(args: list[str]) -> bool:
    """A compile job: a compiler run with -c or -S that does not only preprocess."""
    return ("-c" in args or "-S" in args) and not PREPROCESS_ONLY & set(args)


def traced_runs(trace: Path, skip: int) -> list[dict[str, Any]]:
    """The compiler runs a build made: cwd, the compiler's argv (``skip`` launcher words dropped), stderr, distcc log."""
    runs = []
    for record in sorted(trace.glob("run.??????")):
        cwd, *argv = record.read_bytes().decode(errors="surrogateescape").split("\0")[:-1]
        err, log = Path(f"{record}.err"), Path(f"{record}.distcc")
        runs.append({"cwd": cwd, "argv": argv[skip:], "stderr": err.read_text(errors="replace") if err.exists() else "",
                     "distcc": log.read_text(errors="replace") if log.exists() else ""})
    return runs


SECURECC_REMOTE = re.compile(r"^securecc: compiled (.+) on (\S+) \(job (\S+)\)$", re.MULTILINE)
SECURECC_LOCAL = re.compile(r"^securecc: compiling locally: (.+)$", re.MULTILINE)
SECURECC_FAILURE = re.compile(r"^securecc: (.+); compiling locally$", re.MULTILINE)
SECURECC_SERVER_CPP = re.compile(r"^securecc: the server preprocesses \S+: (.+)$", re.MULTILINE)


def securecc_outcome(stderr: str) -> tuple[bool, str | None]:
    """Remote or not, and why not, from one run's verbose lines."""
    local = SECURECC_LOCAL.findall(stderr) + [f"failed: {m}" for m in SECURECC_FAILURE.findall(stderr)]
    remote = SECURECC_REMOTE.findall(stderr)
    if local:
        return False, ("partly remote; " if remote else "") + local[0]
    return (True, None) if remote else (False, "no securecc line (compiled here, reason not printed)")


DISTCC_EXEC = re.compile(r"^distcc\[\d+\] exec on (\S+): ", re.MULTILINE)
DISTCC_SCAN = re.compile(r"^distcc\[\d+\] \(dcc_scan_args\) (.+)$", re.MULTILINE)
DISTCC_WARNING = re.compile(r"^distcc\[\d+\] (?:\(\w+\) )?(?:Warning|ERROR): (.+)$", re.MULTILINE)
DISTCC_INFO = ("scanning arguments:", "found input file", "found object/output file")


def distcc_outcome(log: str) -> tuple[bool, str | None]:
    """Remote or not, and why not, from one run's DISTCC_LOG: the host of its last "exec on" line; for a
    local run, distcc's warning or the last thing its argument scan said."""
    hosts = DISTCC_EXEC.findall(log)
    if hosts and hosts[-1] != "localhost":
        return True, None
    warnings = DISTCC_WARNING.findall(log)
    said = [line for line in DISTCC_SCAN.findall(log) if not line.startswith(DISTCC_INFO)]
    reason = warnings[-1] if warnings else said[-1] if said else "no reason logged" if hosts else "no distcc log"
    return False, reason


def reason_group(reason: str) -> str:
    """A reason with its file names cut out, so that one reason given for many files is counted once."""
    quoted = re.sub(r"""(['"])[^'"]*/[^'"]*\1""", r"\1…\1", reason)
    return re.sub(r"(?<![\w'\"])\.{0,2}/[^\s:;,]+", "…", quoted)


def tally(runs: list[dict[str, Any]], outcome: Callable[[dict[str, Any]], tuple[bool, str | None]],
          served: int) -> dict[str, Any]:
    """The counts of one build: jobs, remote, local with reasons (most common first), and the server's count."""
    jobs = [r for r in runs if is_job(r["argv"][1:])]
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    remote = 0
    for job in jobs:
        went, why = outcome(job)
        remote += went
        if why:
            reasons[reason_group(why)] += 1
            examples.setdefault(reason_group(why), why)
    server_cpp = Counter(m for job in jobs for m in SECURECC_SERVER_CPP.findall(job["stderr"]))
    return {"runs": len(runs), "jobs": len(jobs), "remote": remote, "local": len(jobs) - remote,
            "local_reasons": dict(reasons.most_common()), "reason_examples": examples,
            "server_preprocessed": dict(server_cpp.most_common()),
            "server_count": served}


def elf_sections(data: bytes) -> list[tuple[str, bytes]]:
    """(name, contents) of each section of an ELF64 little-endian file, in order; [] for anything else."""
    if data[:5] != b"\x7fELF\x02" or len(data) < 64:
        return []
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * size) for i in range(count)]
    names = data[headers[names_index][4] :][: headers[names_index][5]] if count else b""
    return [(names[h[0] : names.index(b"\0", h[0])].decode(errors="replace"),
             b"" if h[1] == 8 else data[h[4] : h[4] + h[5]]) for h in headers]  # type 8: SHT_NOBITS


def differing_sections(a: bytes, b: bytes) -> list[str]:
    """Where two differing objects differ: the names of the sections whose contents differ."""
    first, second = elf_sections(a), elf_sections(b)
    if not first or not second:
        return ["(not ELF64)"]
    if [n for n, _ in first] != [n for n, _ in second]:
        return ["(section list)"]
    return sorted({n for (n, x), (_, y) in zip(first, second) if x != y}) or ["(ELF headers only)"]


def compare(local: Path, local_objects: set[str], other: Path, other_objects: set[str]) -> dict[str, Any]:
    """Every object two builds both made, byte for byte (as cmp), and the objects only one of them made."""
    differing = {}
    both = sorted(local_objects & other_objects)
    for name in both:
        a, b = (local / name).read_bytes(), (other / name).read_bytes()
        if a != b:
            differing[name] = differing_sections(a, b)
    return {"compared": len(both), "differing": len(differing), "differing_objects": differing,
            "only_in_local": sorted(local_objects - other_objects),
            "only_in_this": sorted(other_objects - local_objects)}


def build_package(package: str, recipe: Recipe, modes: list[Mode], work: Path, wrapper: Path,
                  jobs: int) -> dict[str, Any]:
    """The three builds of one package at WORK/src/PACKAGE, each moved to WORK/builds/PACKAGE/MODE after it."""
    started = time.monotonic()
    pristine = debian_source(package, work / "sources")
    canonical, configured = work / "src" / package, work / "configured" / package
    for stale in (canonical, configured, work / "builds" / package, work / "trace" / package):
        shutil_rm(stale)
    for parent in ("logs", "src", "configured"):
        (work / parent).mkdir(exist_ok=True)
    result: dict[str, Any] = {"package": package, "tree": pristine.name, "system": recipe.system,
                              "languages": recipe.languages, "note": recipe.note, "seconds": {}, "builds": {}}
    objects: dict[str, set[str]] = {}
    make: list[str] = []
    for mode in modes:
        log = work / "logs" / f"{package}-{mode.name}.log"
        log.unlink(missing_ok=True)
        cc = compilers(wrapper, mode)
        if recipe.once:
            if not configured.exists():
                shutil.copytree(pristine, canonical, symlinks=True)
                plain = {"CC": "gcc", "CXX": "g++"}
                wall, make = configure(recipe, canonical, plain, modes[0].env, jobs, log)
                if recipe.system != "make":
                    result["seconds"]["configure"] = wall
                canonical.rename(configured)
            shutil.copytree(configured, canonical, symlinks=True)
            command = [*make, f"CC={cc['CC']}", f"CXX={cc['CXX']}", f"CCAS={cc['CC']}"]  # automake's .S: $(CCAS)
        else:
            shutil.copytree(pristine, canonical, symlinks=True)
            result["seconds"][f"configure_{mode.name}"], command = configure(recipe, canonical, cc, mode.env, jobs, log)
        before = object_files(canonical)
        trace = work / "trace" / package / mode.name
        trace.mkdir(parents=True)
        served = mode.served()
        try:
            result["seconds"][mode.name] = run(command, canonical, {**mode.env, **mode.verbose,
                                                                    "COVERAGE_TRACE": str(trace)}, log)
        finally:
            time.sleep(0.3)  # the servers' last audit record and log line
            destination = work / "builds" / package / mode.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            canonical.rename(destination)
        objects[mode.name] = object_files(destination) - before
        runs = traced_runs(trace, len(mode.launcher))
        shown = [arg.replace(str(REPO), "REPO") for arg in command]  # the JSON is committed: no machine's paths in it
        result["builds"][mode.name] = {"command": shown, **tally(runs, mode.outcome, mode.served() - served)}
        print(f"{package} {mode.name}: {result['builds'][mode.name]['jobs']} jobs, "
              f"{result['builds'][mode.name]['remote']} remote, {result['seconds'][mode.name]:.1f} s", file=sys.stderr)
    local = work / "builds" / package / "local"
    result["jobs"] = result["builds"]["local"]["jobs"]
    result["objects"] = {m.name: compare(local, objects["local"], work / "builds" / package / m.name, objects[m.name])
                         for m in modes[1:]}
    result["seconds"]["total"] = time.monotonic() - started
    return result


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def reasons(counts: dict[str, int]) -> str:
    return "; ".join(f"{n}× {cell(r)}" for r, n in counts.items()) or "–"


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of a run, then the differing objects and what each build left out."""
    lines = [("| package | build | jobs | securecc remote | securecc local: reasons | distcc remote | "
              "distcc local: reasons | securecc objects compared / differing | distcc objects compared / differing "
              "| build s: local / securecc / distcc (package total) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['package']} | {r.get('system', '')} | failed: {cell(r['error'].splitlines()[0])} |"
                         + " |" * 7)
            continue
        sc, dc = r["builds"]["securecc"], r["builds"]["distcc"]
        o = r["objects"]
        seconds = " / ".join(f"{r['seconds'][m]:.0f}" for m in MODES) + f" ({r['seconds']['total']:.0f})"
        lines.append(f"| {r['package']} | {r['system']} ({r['languages']}) | {r['jobs']} | "
                     f"{sc['remote']} (audit {sc['server_count']}) | {sc['local']}: {reasons(sc['local_reasons'])} | "
                     f"{dc['remote']} (distccd {dc['server_count']}) | {dc['local']}: {reasons(dc['local_reasons'])} | "
                     f"{o['securecc']['compared']} / {o['securecc']['differing']} | "
                     f"{o['distcc']['compared']} / {o['distcc']['differing']} | {seconds} |")
        for mode in MODES[1:]:
            built = r["builds"][mode]
            if built["jobs"] != r["jobs"]:
                notes.append(f"- {r['package']}: the {mode} build ran {built['jobs']} jobs, the local one {r['jobs']}")
            if built.get("server_preprocessed"):
                notes.append(f"- {r['package']}: securecc's server preprocessed {reasons(built['server_preprocessed'])}")
            diff = o[mode]
            if diff["differing_objects"]:
                names = [f"{n} ({', '.join(s)})" for n, s in diff["differing_objects"].items()]
                notes.append(f"- {r['package']}: {mode} objects differing from local: {', '.join(names[:12])}"
                             + (f" and {len(names) - 12} more" if len(names) > 12 else ""))
            if diff["only_in_local"] or diff["only_in_this"]:
                notes.append(f"- {r['package']}: objects only in local {len(diff['only_in_local'])}, "
                             f"only in {mode} {len(diff['only_in_this'])}")
        if r["note"]:
            notes.append(f"- {r['package']} ({r['tree']}): {r['note']}")
    return "\n".join(lines + [""] + notes)


def source_state() -> dict[str, Any]:
    """The securecc code measured: its commit, and the files of securecc/ and bin/ changed since."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False).stdout

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted": git("status", "--porcelain", "--", "securecc", "bin").split("\n")[:-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--jobs", "-j", type=int, default=4, help="make/ninja -j, distccd --jobs, securecc slots")
    parser.add_argument("--work", type=Path, default=Path("/tmp/securecc-coverage"),
                        help="sources cache, the build path WORK/src/PACKAGE, the kept builds, traces and logs")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "coverage.json")
    options = parser.parse_args()
    packages = options.packages.split(",")
    if unknown := [p for p in packages if p not in RECIPES]:
        raise SystemExit(f"no recipe for {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    ensure_tools(TOOLS)
    started = time.monotonic()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    wrapper = work / "trace-cc"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    top = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    os.chmod(work, 0o755)
    os.chmod(top, 0o755)
    realm = Realm(top / "realm", ACL)
    daemons: list[subprocess.Popen] = []
    groups: list[CpuGroup] = []
    try:
        securecc = start_securecc(realm, top, "server", options.jobs, groups)
        distcc = start_distcc(top, "distccd", options.jobs, daemons, groups)
        # Fallback on, and no backoff: a compile that fails remotely (json-c's -Werror on distcc's expanded text)
        # would otherwise keep distccd "disliked" for 60 s, and every job after it, in later packages too, local.
        distcc_env = {k: v for k, v in distcc.env.items() if k not in ("DISTCC_FALLBACK", "DISTCC_SKIP_LOCAL_RETRY")}
        distcc_env["DISTCC_BACKOFF_PERIOD"] = "0"
        modes = [Mode("local", [], dict(os.environ), {}),
                 Mode("securecc", [f"{BIN}/securecc"], securecc.env, {"SECURECC_VERBOSE": "1"},
                      lambda run: securecc_outcome(run["stderr"]), securecc.remote_jobs),
                 Mode("distcc", [shutil.which("distcc") or "distcc"], distcc_env, {"DISTCC_VERBOSE": "1"},
                      lambda run: distcc_outcome(run["distcc"]), distcc.remote_jobs)]
        out: dict[str, Any] = {"machine": machine(), "securecc": source_state(), "jobs": options.jobs,
                               "work": str(work), "packages": []}
        for package in packages:
            try:
                out["packages"].append(build_package(package, RECIPES[package], modes, work, wrapper, options.jobs))
            except (BuildFailed, SystemExit) as e:
                print(f"{package}: FAILED: {e}", file=sys.stderr)
                out["packages"].append({"package": package, "system": RECIPES[package].system, "error": str(e)})
            out["seconds"] = time.monotonic() - started
            options.json.parent.mkdir(parents=True, exist_ok=True)
            options.json.write_text(json.dumps(out, indent=1) + "\n")
        info = out["machine"]
        print(f"\n{info['nproc']} x {info['cpu']}, {info['os']}, {info['gcc']}, {info['distcc']}; -j{options.jobs}; "
              f"builds in {work}/src/PACKAGE, kept in {work}/builds; securecc at {out['securecc']['commit'][:12]}"
              f" with {len(out['securecc']['uncommitted'])} files of securecc/ and bin/ changed\n")
        print(table(out["packages"]))
        print(f"\n{options.json} ({out['seconds']:.0f} s)")
    finally:
        tear_down(top, daemons, realm, groups)


if __name__ == "__main__":
    main()
