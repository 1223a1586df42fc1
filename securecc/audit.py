"""The job log: one JSON line per job attempt and per refusal.

Records are appended and flushed one whole line at a time so a reader (or
``jq``) never sees half a record from a running server.  Fields: ``time``
(UTC, RFC 3339), ``event``, ``job_id``, ``server``, ``principal``, ``peer``,
``compiler``, ``compiler_path``, ``args``, ``source``, ``input_sha256``,
``output_sha256``, ``exit_status``, ``ended_by``, ``duration``, ``bytes_in``,
``bytes_out``, ``decision`` (``allowed``/``refused``) and ``reason``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, **record: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
        os.write(self._fd, line.encode())  # O_APPEND: one write, one whole line

    def close(self) -> None:
        os.close(self._fd)
