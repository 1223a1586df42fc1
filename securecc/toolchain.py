"""Compiler identity: which compiler build a job needs, so builds never mix versions.

The identity is what ``COMPILER -v`` says of itself: its version line (with
the distribution's revision) and its target.  Objects from two compilers
with different identities may differ, so a server refuses a job whose
identity is not its own compiler's (distcc#380, icecream#442) and the client
compiles locally.  The client probes once per compiler and caches the answer
by path, size and mtime in ``~/.cache/securecc/compilers.json``.

gcc (native or cross: ``aarch64-linux-gnu-gcc`` says ``Target:
aarch64-linux-gnu``) and clang both print such a version line.  Clang's
(``Debian clang version 14.0.6``) lacks the package revision, so the
identity adds the package that installed the binary when dpkg knows it.
Clang also takes its target and driver mode from the name it is run by
(``aarch64-linux-gnu-clang``, ``clang++``), so a compiler is probed by the
path it is run as, never by the file a link leads to.

A job the server preprocesses also depends on the system headers it reads
from ``/usr``, which the server takes from its own ``/usr``: both ends digest
them with :func:`headers_digest`, and a server whose headers differ does not
compile the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess

from securecc.files import cache_path, write_atomically


class ProbeError(Exception):
    """The compiler did not say who it is."""


def probe(path: str) -> str:
    """``"<version line>; target <triple>"`` from ``path -v``."""
    try:
        done = subprocess.run([path, "-v"], check=False, capture_output=True, timeout=30, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProbeError(f"cannot run {path} -v: {e}") from None
    lines = done.stderr.decode("utf-8", "replace").splitlines()
    version = next((line.strip() for line in lines if " version " in line and not line.startswith("Configured")), None)
    target = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Target:")), None)
    if done.returncode != 0 or version is None or target is None:
        raise ProbeError(f"{path} -v did not print its version and target")
    if family(version) == "clang":
        version += _package(path)
    return f"{version}; target {target}"


def family(identity: str) -> str:
    """``"clang"`` or ``"gcc"``: how the client preprocesses for it (clang has no ``-fdirectives-only``)."""
    return "clang" if _CLANG.search(identity.partition("; target ")[0]) else "gcc"


_CLANG = re.compile(r"(^| )clang version ")  # "clang version 17.0.6", "Debian clang version 14.0.6", "Apple clang ..."


def _package(path: str) -> str:
    """`` (clang-14 1:14.0.6-12)``: the Debian package holding the compiler, or "" where dpkg does not know it."""

    def query(*args: str) -> str:
        done = subprocess.run(["/usr/bin/dpkg-query", *args], check=False, capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else ""

    try:
        name = query("-S", os.path.realpath(path)).partition(":")[0]  # "clang-14: /usr/lib/llvm-14/bin/clang"
        version = query("-W", "-f", "${Version}", name) if name and "," not in name else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return f" ({name} {version})" if version else ""


def cached_identity(path: str, cache_file: str | None = None) -> str:
    """The identity of the compiler run as ``path``, probing only when the binary changed."""
    cache_file = cache_file or cache_path("compilers.json")
    path = os.path.abspath(path)
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, real]  # the name is probed: it may choose clang's target
    try:
        with open(cache_file) as f:
            cache = json.load(f)
        entry = cache.get(path)
        if isinstance(entry, list) and entry[:3] == stamp and isinstance(entry[3], str):
            return entry[3]
    except (OSError, ValueError, AttributeError, IndexError):
        cache = {}
    identity = probe(path)
    cache = cache if isinstance(cache, dict) else {}
    cache[path] = [*stamp, identity]
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        write_atomically(cache_file, json.dumps(cache).encode())  # concurrent clients: last writer wins, nobody reads half
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    return identity


NAMES_REMEMBERED = 4096  # a build's system headers by name; more only costs the full check again


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """Which file, and which version of it: (device, inode, size, mtime, ctime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class HeaderDigests:
    """SHA-256 of files, remembered by (device, inode, size, mtime, ctime): a build reads the same few
    hundred system headers for every job, and a stat costs a microsecond where reading them costs a millisecond.

    The memory is keyed by the file, not by its name: /usr has loops (Debian's ``/usr/bin/X11 -> .``,
    llvm-14's ``build/Release -> ..``), so a job can name one large file in countless ways, and each name
    would otherwise read it again (and stay in memory)."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, ...], tuple[tuple[int, ...], str]] = {}  # (device, inode) -> (stamp, digest)
        self._named: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}

    def _remembered(self, path: str, within: str) -> str:
        """``_digest``, answered by one stat (which opens nothing) while the name still leads to the very
        same file: a build asks for the same names job after job (lua: 63 headers a job)."""
        try:
            st = os.stat(path)
        except OSError:
            return self._digest(path, within)
        known = self._named.get((path, within))
        if known and known[0] == _stamp(st):
            return known[1]
        digest = self._digest(path, within)
        if len(self._named) >= NAMES_REMEMBERED:  # a hostile job's countless names: memory stays bounded
            self._named.clear()
        self._named[(path, within)] = (_stamp(st), digest)
        return digest

    def _digest(self, path: str, within: str) -> str:
        """``path``'s digest, or "missing" (no such regular file) or "outside" (its links leave ``within``).
        The name is resolved once, by the kernel (at most 40 links), into an O_PATH descriptor: nothing is
        opened for reading but a regular file inside ``within``, so a FIFO or device is never opened."""
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return "missing"
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(within):
                return "outside"
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "missing"
            stamp = _stamp(st)
            known = self._known.get(stamp[:2])
            if known and known[0] == stamp:
                return known[1]
            with open(f"/proc/self/fd/{fd}", "rb") as f:  # the same file, reopened for reading
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            self._known[stamp[:2]] = (stamp, digest)
            return digest
        except OSError:
            return "missing"
        finally:
            os.close(fd)

    def of(self, paths: list[str], within: str = "/usr/") -> str:
        """One digest of ``paths`` and their contents, in order.  A missing file counts as such, and so
        does one whose links lead outside ``within`` (the sandbox sees only /usr: neither is read)."""
        h = hashlib.sha256()
        for path in paths:
            h.update(f"{path}\0{self._remembered(path, within)}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()
