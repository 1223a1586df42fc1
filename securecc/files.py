"""File habits both ends share: replacing a file atomically, and where a user's securecc cache lives."""

from __future__ import annotations

import _thread  # threading's get_ident without importing threading: the client starts once per compile (1 ms)
import os
import time
from collections.abc import Mapping


def cache_path(name: str, env: Mapping[str, str] = os.environ) -> str:
    """``$XDG_CACHE_HOME/securecc/NAME``, else ``~/.cache/securecc/NAME``."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "securecc", name)


def write_atomically(path: str | os.PathLike[str], data: bytes, mode: int = 0o644, sync: bool = False) -> None:
    """Write beside ``path`` and rename over it: a reader sees the old file or the new one, never half.

    The temporary name is unique per process, thread and call, so concurrent writers (make -j, the
    agent's threads) never share one; with ``sync`` the bytes are on disk before the rename.
    """
    directory, base = os.path.split(os.fspath(path))
    temp = os.path.join(directory, f".{base}.{os.getpid()}-{_thread.get_ident()}-{time.monotonic_ns()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
