"""Compiler command lines: what may be distributed, and the one argument policy.

``POLICY`` is the single table both ends use: the client keeps anything that
is not ``REMOTE`` or ``CPP``/``LINK`` on this machine, and the server refuses
any argument that is not ``REMOTE`` (:func:`refused_argument`).  Rules are
tried in order, first match wins, and anything no rule matches is ``LOCAL``:
an unknown option is never sent to a server.

How a job keeps objects byte-identical to a local compile, ``-g`` included:
the server preprocesses the client's own files at their own paths (the job
carries the source and project headers; ``SERVER_PREPROCESSES``) from a
``/usr`` whose headers match the client's, so it runs exactly the compile
gcc runs here (see ``client.prepare_job`` for the exceptions).  This module
still makes the ``-fdirectives-only`` text of the one exception that sends
text (a preprocessing-only option, without ``-g``): it drops the compiler's
built-in macros, which the server defines itself, and ``-pedantic`` builds
keep them and compile with ``-fpreprocessed -fdirectives-only``.  Such text
is not exact with debug info (an ``-O3 -g`` line table gains rows).

Why one file of ~520 lines: the argument policy is one security decision, and
its table is reviewed whole; splitting it would make two places to look.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import Enum


class Use(Enum):
    REMOTE = "remote"  # passed to the preprocessor here and to the compiler there
    CPP_SEND = "cpp-send"  # preprocessing: used here, sent only to a server that preprocesses
    CPP = "cpp"  # preprocessing only: used here, never sent
    LINK = "link"  # meaningless with -c; the local preprocessor sees (and warns about) it
    LOCAL = "local"  # needs this machine, or names/runs files: compile locally


# Options whose value is the next argument (when not joined).
SEPARATE_VALUE = frozenset(
    "-o -x -I -D -U -include -imacros -isystem -iquote -idirafter -iprefix -iwithprefix "
    "-iwithprefixbefore -isysroot -imultilib -MF -MT -MQ -A -Xpreprocessor -Xassembler "
    "-Xlinker -L -l -u -z -T -aux-info -B -specs -wrapper --param --sysroot".split()
)

# -f options that take a value and are known not to name, read, write or run
# anything; every other "-fname=value" stays local.
_F_VALUES = (
    "abi-version|align-functions|align-jumps|align-labels|align-loops|asan-shadow-offset|"
    "cf-protection|constexpr-depth|constexpr-loop-limit|constexpr-ops-limit|debug-prefix-map|"
    "diagnostics-color|diagnostics-column-origin|diagnostics-column-unit|diagnostics-minimum-margin-width|"
    "diagnostics-path-format|diagnostics-show-location|diagnostics-urls|exec-charset|excess-precision|"
    "file-prefix-map|fp-contract|inline-limit|input-charset|ira-algorithm|ira-region|live-patching|"
    "lto|lto-compression-level|lto-partition|macro-prefix-map|max-errors|message-length|"
    "no-sanitize|patchable-function-entry|permitted-flt-eval-methods|random-seed|"
    "reorder-blocks-algorithm|sanitize|sanitize-coverage|sanitize-recover|sanitize-trap|"
    "simd-cost-model|stack-check|strict-flex-arrays|strong-eval-order|template-depth|tls-model|"
    "trivial-auto-var-init|vect-cost-model|visibility|wide-exec-charset|zero-call-used-regs"
)

# Assembler options (-Wa,ITEM,... and -Xassembler ITEM) that read, write and run nothing: code
# generation, notes and debug-section format only.  Any other item (-I, -a=, --MD, @file) stays local.
_AS_ITEM = (
    r"--noexecstack|--execstack|-mrelax-relocations=(yes|no)|-mx86-used-note=(yes|no)|-mno-shared|-mshared|"
    r"--gdwarf-[2-5]|--gdwarf2|--gdwarf-sections|-g|--gen-debug|--nocompress-debug-sections|"
    r"--compress-debug-sections(=(none|zlib|zlib-gnu|zlib-gabi|zstd))?|--generate-missing-build-notes=(yes|no)|"
    r"--fatal-warnings|--warn|--no-warn|-W|-v|--32|--64|--x32|-O[0-2s]?|-mbranches-within-32B-boundaries|"
    r"-malign-branch-boundary=[0-9]+|-malign-branch=[a-z+]+|-malign-branch-prefix-size=[0-9]+|"
    r"-mlfence-after-load=(yes|no)|-mlfence-before-(indirect-branch|ret)=[a-z]+|-mfence-as-lock-add=(yes|no)|"
    r"-m(arch|tune)=[a-z0-9_.+-]+"
)

POLICY: tuple[tuple[str, Use], ...] = (
    # Run code, read or write files by name, or need this very machine.
    # @file anywhere is a response file, also as the value the driver hands cc1 apart (-D@f: "-D" "@f").
    (r"@.*|-[IDU]@.*|-B.*|-specs(=.*)?|-wrapper|-fplugin.*|-fmodule.*|-fmodules-ts|-fdeps-.*", Use.LOCAL),
    (r"-fdump-.*|-fprofile.*|-fauto-profile.*|-fbranch-probabilities|-ftest-coverage|--coverage", Use.LOCAL),
    (r"-fcallgraph-info.*|-fstack-usage|-fopt-info.*|-fsave-optimization-record|-fcompare-debug.*|-ftime-trace.*", Use.LOCAL),
    (r"-fdirectives-only|-fpreprocessed|-fworking-directory|-fno-working-directory|-traditional.*", Use.LOCAL),
    (r"-fsyntax-only|-save-temps.*|-E|-M|-MM|-v|-###|--help.*|--version|-dump.*|-print-.*", Use.LOCAL),
    (rf"-Wa,({_AS_ITEM})(,({_AS_ITEM}))*|-Xassembler", Use.REMOTE),  # -Xassembler's value: VALUE_FORMS
    (r"-Wa,.*|-aux-info|-no-integrated-cpp|-x", Use.LOCAL),
    (r"-m(arch|tune|cpu)=native", Use.LOCAL),  # the client expands them (securecc.client.native) before this table
    # Preprocessing: harmless in the sandbox, which holds nothing but /usr and the job's files.
    (r"-[IDU].*|-include|-imacros|-isystem|-iquote|-idirafter|-nostdinc|-nostdinc\+\+|-undef|-CC?", Use.CPP_SEND),
    (r"-Wp,-[DU][^,@][^,]*(,-[DU][^,@][^,]*)*", Use.CPP_SEND),  # -Wp,-D_FORTIFY_SOURCE=2 (Fedora's hardening)
    (r"-A.*|-iprefix|-iwithprefix(before)?|-isysroot|-imultilib|-trigraphs|-H|-Wp,.*|-Xpreprocessor", Use.CPP),
    (r"-MD|-MMD|-MF|-MT|-MQ|-MP|-MG|--sysroot(=.*)?", Use.CPP),
    # Linking only.
    (r"-[lL].*|-Wl,.*|-Xlinker|-static.*|-shared|-rdynamic|-s|-nostdlib|-nostartfiles|-nodefaultlibs", Use.LINK),
    (r"-pie|-no-pie|-u|-z|-T", Use.LINK),
    # What a server may run.
    (r"-O[0-3sgz]?|-Ofast|-std=[a-z0-9+]+|-ansi|-w|-pedantic|-pedantic-errors|-pthread|-pg?|-pipe", Use.REMOTE),
    (r"-g[a-z0-9-]*|-gz(=[a-z]+)?", Use.REMOTE),
    (r"-W|-W[A-Za-z0-9][-A-Za-z0-9+_]*(=[-A-Za-z0-9_+.]+)?", Use.REMOTE),  # -W: the old -Wextra (nettle)
    (r"-m[a-z0-9][-a-z0-9_.+]*(=[-A-Za-z0-9_.,+]+)?", Use.REMOTE),
    (rf"-f(no-)?({_F_VALUES})=[^\s;|&`$]*", Use.REMOTE),
    (r"-f[A-Za-z0-9][-A-Za-z0-9+_.]*", Use.REMOTE),
    (r"--param(=[a-z0-9-]+=[0-9a-z-]+)?", Use.REMOTE),
)
_COMPILED = tuple((re.compile(pattern), use) for pattern, use in POLICY)
VALUE_FORMS = {"--param": re.compile(r"[a-z0-9-]+=[0-9a-z-]+"), "-Xassembler": re.compile(_AS_ITEM)}
"""Options whose separate value a server runs too: the value must have this form."""


# The only variables a client may set for its compiler, and their forms.
CLIENT_ENVIRONMENT = {
    "LC_ALL": re.compile(r"[A-Za-z0-9_.@-]{1,64}"),  # message language and quotes
    "SOURCE_DATE_EPOCH": re.compile(r"[0-9]{1,19}"),  # reproducible __DATE__/__TIME__
    "TZ": re.compile(r"(?!.*\.\.)[A-Za-z0-9_+,:<>./-]{1,64}"),  # __TIME__ in local time
}


def check_environment(environment: dict[str, str]) -> str | None:
    """Why a job's environment cannot be used (the first bad variable), or None."""
    for key, value in environment.items():
        form = CLIENT_ENVIRONMENT.get(key)
        if form is None or not form.fullmatch(value):
            return f"{key}={value!r}"
    return None


def classify(arg: str) -> Use:
    """The policy's verdict on one option (not on a separate value)."""
    for pattern, use in _COMPILED:
        if pattern.fullmatch(arg):
            return use
    return Use.LOCAL


def takes_value(arg: str) -> bool:
    """True when ``arg`` consumes the next argument as its value."""
    return arg in SEPARATE_VALUE


def value_allowed(option: str, value: str) -> bool:
    """Whether ``option``'s separate ``value`` has the form VALUE_FORMS asks (any, for other options), and
    never begins with ``@``: gcc (and cc1) read any argument that does as a response file of options,
    wherever it stands (``-D @opts`` would bring ``-wrapper`` or ``-fplugin=`` past this policy)."""
    if takes_value(option) and value.startswith("@"):
        return False
    form = VALUE_FORMS.get(option)
    return form is None or bool(form.fullmatch(value))


def refused_argument(args: list[str], preprocessing: bool = False) -> str | None:
    """Server side: the first argument the policy does not allow remotely, or None.

    ``preprocessing``: the server preprocesses this job, so CPP_SEND options
    (include paths, macros) are allowed too.
    """
    allowed = {Use.REMOTE, Use.CPP_SEND} if preprocessing else {Use.REMOTE}
    i = 0
    while i < len(args):
        arg = args[i]
        if classify(arg) not in allowed:
            return arg
        if takes_value(arg):
            if i + 1 >= len(args) or not value_allowed(arg, args[i + 1]):
                return arg
            i += 1
        i += 1
    return None


# How the server compiles each language a job may name: -x and friends.
COMPILE_LANGUAGE: dict[str, tuple[str, ...]] = {
    "c": ("-x", "c"),
    "c++": ("-x", "c++"),
    "cpp-output": ("-x", "cpp-output"),
    "c++-cpp-output": ("-x", "c++-cpp-output"),
    "c-directives": ("-x", "cpp-output", "-fdirectives-only"),
    "c++-directives": ("-x", "c++-cpp-output", "-fdirectives-only"),
    "c-source": ("-x", "c"),  # the server preprocesses: args may hold CPP_SEND options
    "c++-source": ("-x", "c++"),
    "assembler-with-cpp-source": ("-x", "assembler-with-cpp"),  # .S: cpp, then as
    "assembler-source": ("-x", "assembler"),  # .s: as reads it where the client has it
}
SERVER_PREPROCESSES = frozenset({"c-source", "c++-source", "assembler-with-cpp-source", "assembler-source"})
"""Jobs that carry the client's own files, at their paths, and compile them as gcc does there."""
LANGUAGES = frozenset(COMPILE_LANGUAGE)

SOURCE_LANGUAGES = {
    ".c": "c",
    ".i": "cpp-output",
    ".cc": "c++",
    ".cp": "c++",
    ".cxx": "c++",
    ".cpp": "c++",
    ".CPP": "c++",
    ".c++": "c++",
    ".C": "c++",
    ".ii": "c++-cpp-output",
    ".S": "assembler-with-cpp",
    ".sx": "assembler-with-cpp",
    ".s": "assembler",
}
ASSEMBLER = frozenset({"assembler", "assembler-with-cpp"})
_READS_FILES = re.compile(rb"^[ \t]*\.(include|incbin)\b", re.MULTILINE | re.IGNORECASE)


def assembler_reads_files(text: bytes) -> bool:
    """``.include`` and ``.incbin`` make ``as`` read files by name, which no job carries: keep those local."""
    return bool(_READS_FILES.search(text))


@dataclass
class Plan:
    """A distributable compile, as the client will carry it out."""

    source: str
    language: str  # of the source as given: "c", "c++", "cpp-output", ...
    mode: str  # "-c" or "-S"
    output: str
    remote_args: list[str]
    cpp_args: list[str] = field(default_factory=list)  # everything but the output, for "gcc -E"
    dependency_file: bool = False
    # For a server that preprocesses: REMOTE and CPP_SEND options in their order,
    # or None when a CPP-only option (-Wp, -H, ...) rules that out.
    source_args: list[str] | None = None

    @property
    def preprocessed(self) -> bool:
        return self.language.endswith("cpp-output")

    @property
    def debug(self) -> bool:
        """Whether the compile emits debug info: the last -g level, flipped by each -gtoggle."""
        levels = [a for a in self.remote_args if re.fullmatch(r"-g(gdb|dwarf(-\d)?)?\d?", a)]
        on = bool(levels) and not levels[-1].endswith("0")
        return on != (self.remote_args.count("-gtoggle") % 2 == 1)

    @property
    def split_dwarf(self) -> bool:
        """``-gsplit-dwarf``: a ``.dwo`` file besides the object (gcc writes none with ``-S``)."""
        return "-gsplit-dwarf" in self.remote_args and self.mode == "-c"

    @property
    def pedantic(self) -> bool:
        return any(a.startswith(("-pedantic", "-Wpedantic", "-Werror=pedantic")) for a in self.remote_args)


class NotDistributable(Exception):
    """Why a command line is compiled locally (shown with SECURECC_VERBOSE=1)."""


def plan(args: list[str]) -> Plan:
    """Analyse the arguments after the compiler name.

    Raises NotDistributable when the compile must run here: linking, several
    or no sources, stdin, unknown or machine-bound options.
    """
    mode = None
    output = None
    sources: list[str] = []
    language_override = None
    remote: list[str] = []
    cpp: list[str] = []
    source_args: list[str] | None = []
    deps = False
    i = 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if arg in ("-c", "-S"):
            if mode and mode != arg:
                raise NotDistributable("both -c and -S")
            mode = arg
            i += 1
            continue
        if arg == "-o" or (arg.startswith("-o") and len(arg) > 2):
            output = arg[2:] if len(arg) > 2 else value
            if output is None:
                raise NotDistributable("-o without a file name")
            i += 1 if len(arg) > 2 else 2
            continue
        if arg == "-x":
            if value not in ("c", "c++", *ASSEMBLER):
                raise NotDistributable(f"-x {value}")
            if sources:
                raise NotDistributable("-x after the source file")
            language_override = value
            cpp += [arg, value]
            i += 2
            continue
        if arg.startswith("@"):
            raise NotDistributable(f"response file {arg}")
        if not arg.startswith("-") or arg == "-":
            if arg == "-":
                raise NotDistributable("source from standard input")
            sources.append(arg)
            cpp.append(arg)
            i += 1
            continue
        use = classify(arg)
        if use is Use.LOCAL:
            raise NotDistributable(f"option {arg}")
        group = [arg]
        if takes_value(arg):
            if value is None:
                raise NotDistributable(f"{arg} without a value")
            group.append(value)
        if not value_allowed(arg, value or ""):
            raise NotDistributable(f"{arg} {value}")
        if arg in ("-MD", "-MMD"):
            deps = True
        cpp += group
        if use is Use.REMOTE:
            remote += group
        if source_args is not None and use in (Use.REMOTE, Use.CPP_SEND):
            source_args += group
        elif use is Use.CPP and arg not in ("-MD", "-MMD", "-MF", "-MT", "-MQ", "-MP"):
            source_args = None
        i += len(group)
    if mode is None:
        raise NotDistributable("not a compile-only command (-c or -S)")
    if len(sources) != 1:
        raise NotDistributable(f"{len(sources)} source files")
    source = sources[0]
    suffix = os.path.splitext(source)[1]
    language = language_override or SOURCE_LANGUAGES.get(suffix)
    if language is None:
        raise NotDistributable(f"source type {suffix or source!r}")
    if output == "-":
        raise NotDistributable("output to standard output")
    if "-gsplit-dwarf" in remote and (mode == "-S" or language in ASSEMBLER):
        raise NotDistributable("-gsplit-dwarf without a compile to an object")
    stem = os.path.splitext(os.path.basename(source))[0]
    if output is None:
        output = stem + (".o" if mode == "-c" else ".s")
    if deps:
        if not any(a in ("-MF",) or a.startswith("-MF") for a in cpp):
            cpp += ["-MF", os.path.splitext(output)[0] + ".d"]
        if not any(a.startswith(("-MT", "-MQ")) for a in cpp):
            cpp += ["-MQ", output]
    return Plan(source, language, mode, output, remote, cpp, deps, source_args)


def dwo_path(output: str) -> str:
    """Where ``-gsplit-dwarf`` puts the ``.dwo`` of the object ``output`` (gcc 11 and later: its name,
    extension dropped, in its directory); the object's DW_AT_dwo_name says the same path."""
    return os.path.splitext(output)[0] + ".dwo"


def each_source(args: list[str]) -> list[tuple[int, list[str]]] | None:
    """``gcc -c a.c b.c`` as one command line per source (gcc compiles each on its own, to ``a.o`` and
    ``b.o``): (the source's index, its line), or None when ``args`` do not name several sources or do
    not compile them one by one (``-o``, linking)."""
    sources: list[int] = []
    compiles = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-c", "-S"):
            compiles = True
        elif arg.startswith(("-o", "@")) or arg in ("-", "-MF", "-MT", "-MQ"):
            return None  # one output (or dependency file) for several sources: gcc refuses or merges them
        elif not arg.startswith("-"):
            sources.append(i)
        elif takes_value(arg):
            i += 1
        i += 1
    if not compiles or len(sources) < 2:
        return None
    others = set(sources)
    return [(n, [a for k, a in enumerate(args) if k == n or k not in others]) for n in sources]


def preprocess_command(compiler: str, p: Plan, family: str = "gcc") -> list[str]:
    """The local preprocessing command; its standard output names the files to send, or is what we send.

    ``family`` is :func:`securecc.toolchain.family`.  Clang has no
    ``-fdirectives-only``, and a server that preprocesses needs only the
    list of files, so clang runs plain ``-E`` (a third of the size of its
    ``-frewrite-includes`` text); :func:`remote_text` does not take that
    text, so a clang job that cannot be preprocessed remotely stays here.
    """
    return [compiler, *p.cpp_args, "-E", *(["-fdirectives-only"] if family == "gcc" else [])]


def check_family(p: Plan, family: str) -> None:
    """Raises NotDistributable for what a compiler of this ``family`` cannot do remotely as it does here.

    Clang names the debug info of preprocessed input (``.i``) after the
    file's first line marker only when the file it reads is called ``*.i``,
    which the server's ``/job/input`` is not (any ``-g`` option counts:
    clang also has ``-gline-tables-only`` and ``-gmlt``); and it
    preprocesses a ``.S`` file into a temporary file, which the sandbox's
    read-only ``/tmp`` refuses even with ``-pipe``.
    """
    if family != "clang":
        return
    if p.preprocessed and any(a.startswith("-g") for a in p.remote_args):
        raise NotDistributable("clang with -g on preprocessed input")
    if p.language == "assembler-with-cpp":
        raise NotDistributable("clang preprocesses .S into a temporary file")


def dependency_command(compiler: str, p: Plan, family: str = "gcc") -> list[str] | None:
    """``gcc -M``: the files a server that preprocesses needs, without the text (a hundredth of its size).

    The rule goes where the user's ``-MD`` sends it, in the very bytes
    ``-MD`` writes there (``-M`` after ``-MD -MF FILE`` only stops the text),
    else to standard output.  None where only the text will do: clang (its
    rule differs), assembler (whose text is checked for ``.include``),
    ``-MMD`` (``-M`` would list the system headers in the user's file too)
    and a dependency file that is not an ordinary file's name.
    """
    if family != "gcc" or p.source_args is None or p.language in ASSEMBLER or "-MMD" in p.cpp_args:
        return None
    target = dependency_target(p)
    if target is not None and (target == "-" or target.startswith("/dev/")):
        return None
    return [compiler, *p.cpp_args, "-M"]


def dependency_target(p: Plan) -> str | None:
    """The file ``-MD`` writes (:func:`plan` adds ``-MF`` when the user gave none), or None without ``-MD``."""
    if not p.dependency_file:
        return None
    value = None
    for n, arg in enumerate(p.cpp_args):
        if arg == "-MF" and n + 1 < len(p.cpp_args):
            value = p.cpp_args[n + 1]
        elif arg.startswith("-MF") and len(arg) > 3:
            value = arg[3:]
    return value


_ESCAPED = re.compile(rb"\\([ #])|\$\$")


def dependency_names(rule: bytes, source: str) -> list[str] | None:
    """The files a ``gcc -M`` rule names after its targets, as gcc wrote them, or None if it cannot be read back.

    gcc writes a space as ``\\ ``, ``#`` as ``\\#`` and ``$`` as ``$$``; a
    name with any other backslash or a tab cannot be told apart
    from the rule's own syntax, and a rule whose first dependency is not the
    source is not the one expected: the caller then takes the text's markers.
    """
    first = rule.replace(b"\\\n", b" ").split(b"\n", 1)[0]  # -MP's rules follow, one a line
    targets, colon, names = first.partition(b": ")
    if not colon or b"\t" in names:
        return None
    words = re.split(rb"(?<!\\) +", names.strip())
    if any(b"\\" in _ESCAPED.sub(b"", word) for word in words):
        return None
    found = [_ESCAPED.sub(lambda m: m.group(1) or b"$", word).decode("utf-8", "surrogateescape") for word in words]
    return found if os.path.normpath(found[0]) == os.path.normpath(source) else None  # gcc drops a leading ./


def full_preprocess_command(compiler: str, p: Plan) -> list[str]:
    """Plain ``-E``: the fallback when ``-fdirectives-only`` refuses a file."""
    return [compiler, *p.cpp_args, "-E"]


PREPROCESSED = {"c": "cpp-output", "c++": "c++-cpp-output"}


def remote_language(p: Plan) -> str:
    """The language the server compiles the text as (a COMPILE_LANGUAGE key)."""
    if p.preprocessed:
        return p.language
    return f"{p.language}-directives" if p.pedantic else p.language


# A newline as the literal prefix (not ^ with MULTILINE) lets the regex engine skip ahead: 3x faster on 300 KB.
_INCLUDE_MARKER = re.compile(rb'\n# \d+ "((?:[^"\\]|\\.)*)" 1')


def include_markers(text: bytes) -> list[str]:
    """The names of the files a preprocessed text entered by #include (or -include), as written, once each.

    Only markers that enter a file count (flag 1), not ``#line`` renames.
    One scan of the text serves included_files and lookup_directories.
    """
    found: dict[str, None] = {}
    for match in _INCLUDE_MARKER.finditer(b"\n" + text):
        name = match.group(1)
        if b"\\" in name:
            name = re.sub(rb"\\(.)", rb"\1", name)
        found[name.decode("utf-8", "surrogateescape")] = None
    return [name for name in found if name not in _PSEUDO_FILES]


def included_files(markers: list[str], cwd: str) -> list[str]:
    """The files the include markers name, absolute."""
    return list(dict.fromkeys(os.path.normpath(os.path.join(cwd, name)) for name in markers))


RESERVED = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/dev", "/job", "/sys", "/run")
"""The sandbox's own directories: no path a job names may be one or lie under one (securecc.server.jobspec)."""


def reserved(path: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in RESERVED)


_PSEUDO_FILES = frozenset({"<built-in>", "<command line>"})
_SEARCH_DIRS = ("-I", "-iquote", "-isystem", "-idirafter")


def lookup_directories(p: Plan, markers: list[str], cwd: str) -> list[str]:
    """Directories the compile must find although no file of the job lies in them, absolute.

    The kernel resolves ``empty/../inc/x.h`` (an include directory written
    so, or a marker's name) only when ``empty`` exists; a server that
    preprocesses creates the directories holding the job's files, not
    these.  Only names with a ``..`` component need them.
    """
    names = list(markers)
    args = p.source_args or []
    for n, arg in enumerate(args):
        if arg in _SEARCH_DIRS and n + 1 < len(args):
            names.append(args[n + 1])
        elif arg.startswith("-I") and len(arg) > 2:
            names.append(arg[2:])
    found: dict[str, None] = {}
    for name in names:
        parts = name.split("/")
        if ".." not in parts:
            continue
        path = cwd if not name.startswith("/") else "/"
        for part in parts[:-1]:
            path = os.path.dirname(path) if part == ".." else path if part in ("", ".") else os.path.join(path, part)
            if part not in ("..", "", ".") and os.path.isdir(path) and not reserved(os.path.normpath(path)):
                found[os.path.normpath(path)] = None
    return list(found)  # clang's -E enters them (flag 1) before the main file


def project_files(included: list[str]) -> list[str]:
    """What a server that preprocesses needs besides its own /usr (as it has its own compiler).

    Raises NotDistributable for headers under /usr/local, which that server
    may well not have.
    """
    local = [p for p in included if p.startswith("/usr/local/")]
    if local:
        raise NotDistributable(f"includes {local[0]}")
    return [p for p in included if not p.startswith("/usr/")]


def uses_push_macro(files: list[bytes]) -> bool:
    """``#pragma push_macro``: -fdirectives-only runs it and leaves a bare #undef (gcc 12)."""
    return any(b"push_macro" in data or b"pop_macro" in data for data in files)


def system_files(included: list[str]) -> list[str]:
    """The included files a server that preprocesses takes from its own /usr (see :func:`project_files`)."""
    return [p for p in included if p.startswith("/usr/")]


_BUILTINS = b'\n# 0 "<built-in>"\n'
_COMMAND_LINE = b'\n# 0 "<command-line>"\n'
_LOCATION_MACROS = (b"__BASE_FILE__", b"__TIMESTAMP__")


def remote_text(p: Plan, text: bytes) -> bytes:
    """What to send for ``-fdirectives-only`` output ``text``.

    Unless the job compiles with ``-fdirectives-only`` (pedantic), drop the
    compiler's predefined macros: the server's compiler defines them itself,
    and each would be a "redefined" warning.  Raises NotDistributable when
    the text does not have the expected shape, or uses a macro that would
    expand differently on the server.
    """
    if any(macro in text for macro in _LOCATION_MACROS):
        raise NotDistributable("uses __BASE_FILE__ or __TIMESTAMP__")
    if p.pedantic:
        return text
    start = text.find(_BUILTINS)
    end = text.find(_COMMAND_LINE, start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        raise NotDistributable("unexpected preprocessor output (not gcc?)")
    return text[: start + 1] + text[end + 1 :]
