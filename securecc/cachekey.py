"""The result cache's key: the sha256 over everything that can change a compile's output.

Shared by both ends: the server keys its cache with it, and the client sends
identical jobs to the same server (its affinity key), so they meet there.

It covers the cache format, the server compiler's identity, the language,
mode, arguments and environment, the client's cwd and source path (debug info
names them), and the exact text compiled (plus, for jobs the server
preprocesses, every header sent, with its path).

A job whose compile reads the clock is not cached at all (:func:`expands_time`):
``__DATE__`` and ``__TIME__`` expand to when the server compiled it, and
keying on that time would make every such entry single-use, so the server
neither looks such a job up nor stores it (its key is None).
``SOURCE_DATE_EPOCH`` (keyed with the environment) pins those two, so such a
job is cached; nothing pins ``__TIMESTAMP__`` (the mtime of the file the
server wrote for the compile).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict

from securecc import protocol as wire

FORMAT = 2  # 2: system headers in the key


def cache_key(identity: str, job: wire.Job) -> str:
    """The key of a job's result: everything that can change it, nothing else (see :func:`expands_time`)."""
    h = hashlib.sha256()
    head = [FORMAT, identity, job.compiler, job.language, job.mode, job.args, sorted(job.environment.items()),
            job.cwd, job.source_path, len(job.source), len(job.original), job.include_paths,
            [len(i) for i in job.includes], job.system_headers, job.system_digest]
    h.update(json.dumps(head).encode() + b"\0")
    for blob in (job.source, job.original, *job.includes):
        h.update(blob)
    return h.hexdigest()


_CLOCK_MACROS = (b"__DATE__", b"__TIME__")  # pinned by SOURCE_DATE_EPOCH
_MTIME_MACROS = (b"__TIMESTAMP__",)  # never pinned (gcc 12 reads the file's mtime)
# Backslash-newline, also through the ??/ trigraph (on under -std=c11 and the like)
# and with blanks before the newline (gcc warns, and splices).
_SPLICE = re.compile(rb"(?:\\|\?\?/)[ \t\f\v]*\r?\n")
_BACKSLASH_SPLICE = re.compile(rb"\\[ \t\f\v]*\r?\n")  # _SPLICE on a text without ??/: its literal start is found 4x faster
_IDENT = rb"A-Za-z0-9_$\x80-\xff"  # gcc takes $ and UTF-8 in identifiers
_LETTERS = bytes(sorted(set(b"".join(_CLOCK_MACROS + _MTIME_MACROS))))
# Whole identifiers spelt only with the macros' letters; the first one matched
# before the lookbehind lets the regex engine skip other bytes quickly.
_PIECE = re.compile(rb"[%s](?<![%s][%s])[%s]*(?![%s])" % (_LETTERS, _IDENT, _LETTERS, _LETTERS, _IDENT))
MOST_PASTED = 3  # the most operands of a paste that uncacheable() tries
# The only pieces a paste of a macro can use: the macros' substrings (which bounds what a text's entry holds).
_PARTS = frozenset(m[i:j] for m in _CLOCK_MACROS + _MTIME_MACROS for i in range(len(m)) for j in range(i + 1, len(m) + 1))
_SOURCE_DATE_EPOCH = re.compile(r"[0-9]+")
REMEMBERED_BYTES = 16 << 20  # texts whose pieces are remembered, in all: a build sends the same headers job after job
REMEMBERED_TEXT = 1 << 20  # the largest text remembered


class _Remembered:
    """What :func:`uncacheable` finds in each text, by the text itself (so a lookup compares the bytes), the most
    recently seen first, at most REMEMBERED_BYTES of them: scanning a gnulib job's ~500 KB of headers costs
    the server ~5 ms a job, and its jobs send the same headers again and again.  Shared by the digest threads."""

    def __init__(self) -> None:
        self._found: OrderedDict[bytes, tuple[frozenset[bytes], frozenset[bytes]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def found(self, text: bytes) -> tuple[frozenset[bytes], frozenset[bytes]]:
        """(the time macros spelt out in ``text``, its pieces), both after its line splices are undone."""
        with self._lock:
            known = self._found.get(text)
            if known is not None:
                self._found.move_to_end(text)
                return known
        unspliced = _SPLICE.sub(b"", text) if b"??/" in text else _BACKSLASH_SPLICE.sub(b"", text) if b"\\" in text else text
        known = (frozenset(m for m in _CLOCK_MACROS + _MTIME_MACROS if m in unspliced), _PARTS.intersection(_PIECE.findall(unspliced)))
        if len(text) <= REMEMBERED_TEXT:
            with self._lock:
                if text not in self._found:
                    self._found[text] = known
                    self._bytes += len(text)
                while self._bytes > REMEMBERED_BYTES:
                    self._bytes -= len(self._found.popitem(last=False)[0])
        return known


_REMEMBERED = _Remembered()


def uncacheable(job: wire.Job) -> str | None:
    """Why ``job``'s result must be neither looked up nor stored, or None when it may be cached.

    Its compile may expand a time macro when one is spelt out in the source,
    the original, any header sent or an argument (after line splices are
    undone: ``__DA\\<newline>TE__``), or when it can be spelt by pasting
    together at most ``MOST_PASTED`` identifiers found in them
    (``CAT(__DA, TE__)``, ``CAT3(__, DATE, __)``).  Whether a paste macro
    exists is not asked: the server's compiler may take one from its own /usr
    (glibc's ``__CONCAT``), which no job carries.

    Conservative: a name in a comment, a string or a longer name counts, and
    so does a paste that no macro performs; a file naming ``DATE`` or ``TIME``
    next to glibc's identifier ``__`` is not cached.  Not seen: a paste of
    more operands (``_`` ``_`` ``D`` ``A``...: the one-letter names of every
    C++ text would otherwise make all of it uncacheable); a time macro, or an
    operand, that comes only from a header of the server's /usr (none in
    Debian's /usr/include uses one); names spelt with universal character
    names (``__DAT\\u0045__``: gcc 12 rejects them, and failed compiles are
    not cached).
    """
    pinned = bool(_SOURCE_DATE_EPOCH.fullmatch(job.environment.get("SOURCE_DATE_EPOCH", "")))
    macros = _MTIME_MACROS if pinned else _CLOCK_MACROS + _MTIME_MACROS
    # Every argument (a -D value may be the next one), "-DX" read as "X": a name, not a part of "DX".
    args = b"\n".join(a.removeprefix("-D").removeprefix("-U").encode("utf-8", "surrogateescape") for a in job.args)
    found = [_REMEMBERED.found(t) for t in (job.source, job.original, *job.includes, args)]
    for macro in macros:
        if any(macro in spelt for spelt, _ in found):
            return f"uses {macro.decode()}"
    pieces = {piece for _, some in found for piece in some}
    for macro in macros:
        if _spelt(macro, pieces, MOST_PASTED):
            return f"may paste {macro.decode()} together"
    return None


def expands_time(job: wire.Job) -> bool:
    """True when the compile may expand a time macro that SOURCE_DATE_EPOCH does not pin: no key can carry it."""
    return uncacheable(job) is not None


def _spelt(word: bytes, pieces: set[bytes], most: int) -> bool:
    """Whether ``word`` is the concatenation of at most ``most`` of ``pieces`` (repeats allowed)."""
    fewest = [0] + [most + 1] * len(word)  # fewest[i]: pieces that spell word[:i]
    for i in range(len(word)):
        if fewest[i] < most:
            for j in range(i + 1, len(word) + 1):
                if word[i:j] in pieces:
                    fewest[j] = min(fewest[j], fewest[i] + 1)
    return fewest[-1] <= most
