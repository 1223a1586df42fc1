"""Compiler identity: which compiler build a job needs, so builds never mix versions.

The identity is what ``COMPILER -v`` says of itself: its version line (with
the distribution's revision) and its target.  Objects from two compilers
with different identities may differ, so a server refuses a job whose
identity is not its own compiler's (distcc#380, icecream#442) and the client
compiles locally.  The client probes once per compiler binary and caches
the answer by path, size and mtime in ``~/.cache/securecc/compilers.json``.
"""

from __future__ import annotations

import json
import os
import subprocess


class ProbeError(Exception):
    """The compiler did not say who it is."""


def probe(path: str) -> str:
    """``"<version line>; target <triple>"`` from ``path -v``."""
    try:
        done = subprocess.run([path, "-v"], capture_output=True, timeout=30, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProbeError(f"cannot run {path} -v: {e}") from None
    lines = done.stderr.decode("utf-8", "replace").splitlines()
    version = next((line for line in lines if " version " in line and not line.startswith("Configured")), None)
    target = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Target:")), None)
    if done.returncode != 0 or version is None or target is None:
        raise ProbeError(f"{path} -v did not print its version and target")
    return f"{version.strip()}; target {target}"


def cached_identity(path: str, cache_file: str | None = None) -> str:
    """The identity of the compiler at ``path``, probing only when the binary changed."""
    cache_file = cache_file or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "securecc", "compilers.json"
    )
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        with open(cache_file) as f:
            cache = json.load(f)
        entry = cache.get(real)
        if isinstance(entry, list) and entry[:2] == stamp and isinstance(entry[2], str):
            return entry[2]
    except (OSError, ValueError, AttributeError, IndexError):
        cache = {}
    identity = probe(real)
    cache = cache if isinstance(cache, dict) else {}
    cache[real] = [*stamp, identity]
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        temp = f"{cache_file}.{os.getpid()}.tmp"
        with open(temp, "w") as f:
            json.dump(cache, f)
        os.replace(temp, cache_file)  # concurrent clients: last writer wins, nobody reads half a file
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    return identity
