"""The server's result cache: Bob's identical job gets Alice's object, and nobody can poison it.

Only the server writes it, from its own sandboxed compiles; no message lets a
client put anything in.  Keys are :mod:`securecc.cachekey`'s.

An entry is one file: a JSON header line (provenance: producing job,
principal, host, time; stdout/stderr/object lengths; sha256 of the payload)
then the payload.  It is written to a temporary file, fsynced and renamed,
so a crash never leaves half an entry under a key; every read checks the
digest and drops an entry that does not match (corrupt or truncated) — the
job is then compiled again.  Only successful compiles are cached: a failed
one is cheap to repeat, and its diagnostics are what a developer who is
fixing the code needs fresh.  The directory is bounded in bytes, evicting
the least recently used entries (hits refresh an entry's mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securecc.cachekey import FORMAT
from securecc.files import write_atomically


@dataclass(frozen=True)
class Entry:
    stdout: bytes
    stderr: bytes
    output: bytes
    producer: dict[str, Any]  # job_id, principal, server, time; attestation: the producing server's (securecc.attest)


class ResultCache:
    """Entries under ``root/<key[:2]>/<key>``; bounded by ``max_bytes``, LRU."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # the server's alone: never mounted into a sandbox
        self._sizes: dict[Path, int] = {}
        for path in root.glob("*/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # left by a crash mid-write
            else:
                self._sizes[path] = path.stat().st_size
        self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> Entry | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            header_end = data.index(b"\n")
            header = json.loads(data[:header_end])
            payload = data[header_end + 1 :]
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise ValueError("digest mismatch")
            a, b = header["stdout"], header["stdout"] + header["stderr"]
            if b + header["output"] != len(payload):
                raise ValueError("length mismatch")
            entry = Entry(payload[:a], payload[a:b], payload[b:], header["producer"])
        except (ValueError, KeyError, TypeError):
            self.corrupt += 1
            self._remove(path)
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        return entry

    def put(self, key: str, entry: Entry) -> None:
        payload = entry.stdout + entry.stderr + entry.output
        header = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "stdout": len(entry.stdout),
                  "stderr": len(entry.stderr), "output": len(entry.output), "producer": entry.producer}
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        write_atomically(path, json.dumps(header).encode() + b"\n" + payload, mode=0o600, sync=True)
        with self._lock:
            self._sizes[path] = path.stat().st_size
        self._evict()

    def drop(self, key: str) -> None:
        self._remove(self._path(key))

    def _remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(path, None)

    def _evict(self) -> None:
        with self._lock:
            total = sum(self._sizes.values())
            if total <= self.max_bytes:
                return
            by_age = sorted(self._sizes, key=lambda p: p.stat().st_mtime if p.exists() else 0)
        for path in by_age:
            if total <= self.max_bytes:
                break
            total -= self._sizes.get(path, 0)
            self._remove(path)
