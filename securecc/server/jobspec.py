"""The one job boundary: every field of a job from the wire, checked before anything uses it.

A :class:`wire.Job` (native, or built from a stock distcc request) is
untrusted.  :func:`validate` turns it into a :class:`ValidJob` or raises
:class:`Invalid` with a stable reason; nothing else on the server reads a
client field first.  The grammar, per field:

- paths are bounded, carry no control character, are normalized, and can
  never be read as an option: the source path never begins with ``-`` or
  ``@`` (gcc reads ``@file`` as a response file), mount points are absolute
  and outside the sandbox's own directories and the compilers' roots;
- names that are not UTF-8 arrive as surrogate escapes (``'\\udcff'``) and
  are kept as they are: :func:`os.fsencode` gives the client's bytes back
  for the command line, and the audit log escapes them;
- the system headers a job names are normalized paths under ``/usr`` (not
  ``/usr/local``), with a SHA-256 digest: the job handler, not the front,
  compares them with its own (:class:`securecc.toolchain.HeaderDigests`);
- language and mode are enums; headers are plain source files (no ``.gch``,
  ``.pch`` or other compiled input) at distinct paths;
- arguments go through the one argument policy (:mod:`securecc.args`), the
  environment through its allowlist.

A client's report that a job's result diverged (:class:`wire.Divergence`)
is checked here too, by :func:`validate_report`.
"""

from __future__ import annotations

import enum
import os
import posixpath
import re
from dataclasses import dataclass

from securecc import args as argpolicy
from securecc import protocol as wire

MAX_PATH = 4096
MAX_NAME = 255  # one path component
MAX_DEPTH = 64  # components of a path: the handler makes a job's directories, and removes them, by recursion
MAX_ARGS = 2048
MAX_ARG = 8192
MAX_HEADERS = 20000
MAX_IDENTITY = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_COMPILER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_COMPILED_INPUT = (".gch", ".pch", ".pcm", ".gcm", ".o", ".obj", ".a", ".so")


class Mode(enum.Enum):
    OBJECT = "-c"
    ASSEMBLER = "-S"


Language = enum.Enum("Language", [(name, name) for name in sorted(argpolicy.LANGUAGES)])
"""How the server compiles the text (securecc.args.COMPILE_LANGUAGE)."""


class Invalid(Exception):
    """A job field outside its grammar: the job is refused with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ValidJob:
    """A job whose every field passed :func:`validate`; the only kind the server runs."""

    job: wire.Job
    language: Language
    mode: Mode
    source_mount: str  # where the client's main file lives: absolute, normalized
    preprocessing: bool  # the server preprocesses: source and headers at their paths
    split_dwarf: tuple[str, str, str] | None = None  # -gsplit-dwarf: (-o as the client names it, its mount, the .dwo's)
    directories: tuple[str, ...] = ()  # to create in the sandbox (absolute, normalized, not the job's files)

    def __getattr__(self, name: str) -> object:  # the wire fields, read-only
        return getattr(self.job, name)

    @property
    def input_size(self) -> int:
        return len(self.job.source) + len(self.job.original) + sum(map(len, self.job.includes))


def _text(value: str, what: str, limit: int) -> str:
    """A name as the client's bytes allow it: bounded, no control characters, encodable as a file name, and
    the one spelling of its bytes (so that comparing names compares files)."""
    if len(value) > limit:
        raise Invalid(wire.Reason.BAD_PATH, f"{what} is longer than {limit} characters")
    if _CONTROL.search(value):
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} contains a control character")
    try:
        spelt = os.fsdecode(os.fsencode(value))
    except UnicodeError:
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is not a file name") from None
    if spelt != value:  # "\udcc3\udca9" is the bytes of "é": two names of one file would pass as two files
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is not the name its bytes spell")
    return value


def _path(value: str, what: str, normalized: bool = True) -> str:
    """A path: bounded, never an option, and (unless it is only handed to gcc, as the source path and
    the object's path are: ``.//lib/x.c`` is what zstd's Makefile writes, and debug info keeps it)
    normalized.  What a path names in the sandbox is always its normalized form, validated as a mount
    point; with no links among the job's files, the kernel resolves the name as given to the same file."""
    _text(value, what, MAX_PATH)
    if not value or value.startswith(("-", "@")):
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} could be read as an option")
    if value.startswith("//"):  # POSIX normpath keeps two leading slashes; the kernel reads them as one
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is not a normalized path")
    if normalized and (posixpath.normpath(value) != value.rstrip("/") or value.endswith("/") and value != "/"):
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is not a normalized path")
    parts = value.split("/")
    if any(len(part) > MAX_NAME for part in parts):
        raise Invalid(wire.Reason.BAD_PATH, f"{what} has a component longer than {MAX_NAME}")
    if len(parts) > MAX_DEPTH + 1:
        raise Invalid(wire.Reason.BAD_PATH, f"{what} is more than {MAX_DEPTH} directories deep")
    return value


def _mount_point(value: str, what: str, roots: tuple[str, ...]) -> str:
    """An absolute path the sandbox may create or mount a client file at."""
    _path(value, what)
    if not value.startswith("/") or value == "/":
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is not an absolute path")
    for top in argpolicy.RESERVED:
        if value == top or value.startswith(top + "/"):
            raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is inside the sandbox's {top}")
    if any(value == root or value.startswith(root.rstrip("/") + "/") for root in roots):  # the admin's paths: not named
        raise Invalid(wire.Reason.BAD_PATH, f"{what} {value!r} is inside a compiler root of this server")
    return value


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")[1:-1]
    return ["/" + "/".join(parts[: n + 1]) for n in range(len(parts))]


def validate(job: wire.Job, compiler_roots: tuple[str, ...] = ()) -> ValidJob:
    """``job`` as a :class:`ValidJob`, or :class:`Invalid` naming the first field outside its grammar."""
    if not _COMPILER_NAME.fullmatch(job.compiler):
        raise Invalid(wire.Reason.COMPILER_NOT_OFFERED, f"compiler name {job.compiler[:80]!r} is not a name")
    if len(job.compiler_identity) > MAX_IDENTITY:
        raise Invalid(wire.Reason.COMPILER_MISMATCH, "compiler identity too long")
    try:
        language, mode = Language(job.language), Mode(job.mode)
    except ValueError:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, f"unsupported mode {job.mode[:20]!r} or language {job.language[:40]!r}") from None
    if len(job.args) > MAX_ARGS:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, f"more than {MAX_ARGS} arguments")
    for arg in job.args:
        _text(arg, "argument", MAX_ARG)
    preprocessing = job.language in argpolicy.SERVER_PREPROCESSES
    bad = argpolicy.refused_argument(job.args, preprocessing)
    if bad is not None:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, f"argument {bad!r} is not allowed on a compile server")
    bad = argpolicy.check_environment(job.environment)
    if bad is not None:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, f"environment {bad} is not allowed on a compile server")
    cwd = _mount_point(job.cwd, "working directory", compiler_roots)
    _path(job.source_path, "source path", normalized=False)
    source_mount = _mount_point(posixpath.normpath(posixpath.join(cwd, job.source_path)), "source", compiler_roots)
    if source_mount == cwd:
        raise Invalid(wire.Reason.BAD_PATH, "the source path names the working directory")
    if job.include_paths and not preprocessing:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, "headers sent with a preprocessed job")
    if len(job.include_paths) > MAX_HEADERS:
        raise Invalid(wire.Reason.BAD_PATH, f"more than {MAX_HEADERS} headers")
    files = [source_mount, *job.include_paths]
    for path in job.include_paths:
        _mount_point(path, "header", compiler_roots)
        if path.endswith(_COMPILED_INPUT) or ".gch/" in path or ".pch/" in path:  # gcc tries x.h.gch/* too
            raise Invalid(wire.Reason.BAD_PATH, f"header {path!r} is compiled input, not source")
    if (job.system_headers or job.system_digest) and not preprocessing:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, "system headers named by a preprocessed job")
    if preprocessing and not _DIGEST.fullmatch(job.system_digest):
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, "a job the server preprocesses needs its system headers' digest")
    if len(job.system_headers) > MAX_HEADERS:
        raise Invalid(wire.Reason.BAD_PATH, f"more than {MAX_HEADERS} system headers")
    for path in job.system_headers:
        if not _path(path, "system header").startswith("/usr/") or path.startswith("/usr/local/"):
            raise Invalid(wire.Reason.BAD_PATH, f"system header {path!r} is not under /usr")
    split_dwarf = None
    if job.output_path or "-gsplit-dwarf" in job.args:
        if not job.output_path or mode is not Mode.OBJECT or "-gsplit-dwarf" not in job.args:
            raise Invalid(wire.Reason.ARGUMENT_REFUSED, "an output path goes with -gsplit-dwarf and -c, and only with them")
        _path(job.output_path, "output path", normalized=False)
        # gcc hands cc1 "-dumpdir DIR/ -dumpbase NAME.c" from it, and cc1 reads an "@..." argument as options
        if any(part.startswith(("@", "-")) for part in job.output_path.split("/")):
            raise Invalid(wire.Reason.BAD_PATH, f"output path {job.output_path!r} names a response file")
        output = _mount_point(posixpath.normpath(posixpath.join(cwd, job.output_path)), "output", compiler_roots)
        directory = _mount_point(posixpath.dirname(output), "output directory", compiler_roots)  # bound writable: never "/"
        for root in compiler_roots:  # nor over a compiler's root, which it would hide
            if root.startswith(directory.rstrip("/") + "/"):
                raise Invalid(wire.Reason.BAD_PATH, f"output directory {directory!r} would cover a compiler root of this server")
        split_dwarf = (job.output_path, output, _mount_point(argpolicy.dwo_path(output), "split debug file", compiler_roots))
        files += split_dwarf[1:]
    if job.directories and not preprocessing:
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, "directories named by a preprocessed job")
    if len(job.directories) > MAX_HEADERS:
        raise Invalid(wire.Reason.BAD_PATH, f"more than {MAX_HEADERS} directories")
    made = [_mount_point(d, "directory", compiler_roots) for d in job.directories]
    directories = {cwd, *_ancestors(cwd), *(d for f in files for d in _ancestors(f)), *made, *(a for d in made for a in _ancestors(d))}
    clash = next((f for f in files if f in directories), None)
    if clash is not None or len(set(files)) != len(files):
        raise Invalid(wire.Reason.BAD_PATH, f"{clash or 'a file'!r} is both a file and a directory of the job, or named twice")
    if preprocessing and job.source:  # its source is the original file: text beside it would be what the record hashes
        raise Invalid(wire.Reason.ARGUMENT_REFUSED, "a job the server preprocesses sends its source as the original, not as text")
    return ValidJob(job, language, mode, source_mount, preprocessing, split_dwarf, tuple(made))


MAX_STATEMENT = 16 * 1024  # a signed statement is about 1 KiB
MAX_DETAIL = 500


def validate_report(report: wire.Divergence) -> wire.Divergence:
    """A client's :class:`wire.Divergence` within its grammar (whether this server signed it is the service's to
    check): one or two attestations (the serving server's, and a cache hit's producer), each three bounded
    strings; the client's object digest, or None; a one-line detail."""
    if not 1 <= len(report.attestations) <= 2:
        raise Invalid(wire.Reason.BAD_REPORT, "a report carries the result's one or two attestations")
    for fields in report.attestations:
        if set(fields) != {"statement", "signature", "key"} or any(len(v) > MAX_STATEMENT for v in fields.values()):
            raise Invalid(wire.Reason.BAD_REPORT, "malformed attestation in the report")
    if report.local_sha256 is not None and not _DIGEST.fullmatch(report.local_sha256):
        raise Invalid(wire.Reason.BAD_REPORT, "the reported digest is not a sha256")
    if len(report.detail) > MAX_DETAIL or _CONTROL.search(report.detail):
        raise Invalid(wire.Reason.BAD_REPORT, f"the report's detail is not one line of at most {MAX_DETAIL} characters")
    return report
