"""The audit writer's checkpoints by time, on a clock the test advances: no record waits unsigned for much
longer than ``checkpoint_seconds`` after the last checkpoint, and nothing is signed twice."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from twisted.internet import task

from securecc.audit import generate_key, load_private_key, load_public_key, verify
from securecc.server.auditlog import AuditLog


def open_log(tmp_path: Path, clock: task.Clock, **settings: float) -> tuple[AuditLog, list[bytes]]:
    """A log on ``clock`` and the checkpoint lines it forwards."""
    key = tmp_path / "audit.key"
    generate_key(key)
    forwarded: list[bytes] = []
    log = AuditLog(tmp_path / "audit.jsonl", load_private_key(key), "test", forward=forwarded.append, clock=clock, **settings)
    return log, forwarded


def test_the_servers_tick_signs_records_once_checkpoint_seconds_have_passed(tmp_path: Path) -> None:
    clock = task.Clock()
    log, signed = open_log(tmp_path, clock, checkpoint_seconds=5)
    ticking = task.LoopingCall(log.tick)  # as the server runs it
    ticking.clock = clock
    ticking.start(1.0, now=False)
    clock.pump([1] * 3)
    log.write(event="job", job_id="a")
    clock.advance(1)
    assert signed == []  # 4 s since the log was opened
    clock.advance(1)
    assert [json.loads(line)["records"] for line in signed] == [1]
    clock.pump([1] * 10)
    assert len(signed) == 1  # nothing new: no checkpoint
    ticking.stop()
    log.close()
    assert verify([tmp_path / "audit.jsonl"], load_public_key(tmp_path / "audit.key.pub")).ok


def test_a_checkpoint_by_count_starts_the_wait_again(tmp_path: Path) -> None:
    clock = task.Clock()
    log, signed = open_log(tmp_path, clock, checkpoint_every=3, checkpoint_seconds=5)
    clock.advance(4)
    for n in range(3):
        log.write(event="job", job_id=f"j{n}")
    assert len(signed) == 1  # by count, at 4 s
    log.write(event="job", job_id="late")
    clock.advance(4.9)
    log.tick()
    assert len(signed) == 1  # 4.9 s after the last checkpoint
    clock.advance(0.1)
    log.tick()
    assert [json.loads(line)["records"] for line in signed] == [3, 1]
    log.close()


def test_a_rotation_the_directory_refuses_leaves_the_log_writing_where_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log directory the server's user cannot write (root's, with the file chown'ed to it: a mistaken install)
    refuses the rename.  The record that reached rotate_bytes is written and the write says so; the log keeps
    writing its own file, never a descriptor closed for the rotation and since reused by another file or a
    client's socket; the rotation happens once the directory allows it, and the chain verifies."""
    clock = task.Clock()
    log, _signed = open_log(tmp_path, clock, rotate_bytes=1)

    def refused(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(os, "rename", refused)
    log.write(event="job", job_id="a")  # rotate_bytes reached: the rename fails
    assert log.healthy
    with open(tmp_path / "other", "wb"):  # takes the lowest free descriptor, as the next accept() would
        log.write(event="job", job_id="b")
    assert (tmp_path / "other").read_bytes() == b""
    monkeypatch.undo()
    log.write(event="job", job_id="c")
    log.close()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) == 2
    ids = [json.loads(line).get("job_id") for path in files for line in path.read_bytes().splitlines()]
    assert sorted(i for i in ids if i) == ["a", "b", "c"]
    assert verify(files, load_public_key(tmp_path / "audit.key.pub")).ok
