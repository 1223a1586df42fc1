"""acl.yaml read only whole and settled: read_acl_stable, and the server's AclFile on a clock the test advances."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from securecc.acl import SETTLE, AclError, AclUnstable, file_stamp, load_acl, read_acl_stable
from securecc.server.aclfile import AclFile

FULL_ACL = "realms: [TEST.REALM]\nallow:\n  - group: committers\ndeny:\n  principals: [mallory]\n"
HALF_ACL = FULL_ACL[: FULL_ACL.index("deny:")]  # what an in-place save has written so far: it parses, without the deny


@pytest.mark.parametrize("moment", ["before the open", "during the read", "replaced during the read"])
def test_acl_changing_while_read_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    """The rest of a save landing while the file is read: refused as unstable, never the half that was read."""
    path = tmp_path / "acl.yaml"
    path.write_text(HALF_ACL)
    real_stat, calls = os.stat, []

    def save_the_rest() -> None:
        if moment == "replaced during the read":
            (tmp_path / "new").write_text(HALF_ACL)  # the same bytes, atomically renamed over it: a new inode
            os.replace(tmp_path / "new", path)
        else:
            with open(path, "a") as f:
                f.write(FULL_ACL[len(HALF_ACL) :])

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(target) == path:
            calls.append(target)
            if len(calls) == 2 and moment != "before the open":
                save_the_rest()
        result = real_stat(target, *args, **kwargs)
        if Path(target) == path and len(calls) == 1 and moment == "before the open":
            save_the_rest()
        return result

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(AclUnstable, match="changed while being read; keeping the previous ACL"):
        load_acl(path)
    monkeypatch.undo()
    assert load_acl(path).deny_principals == ({"mallory"} if moment != "replaced during the read" else frozenset())


def test_acl_just_written_waits_to_settle(tmp_path: Path) -> None:
    """A file changed under a second ago may be half a save: the hot reload waits; start-up and SIGHUP do not."""
    path = tmp_path / "acl.yaml"
    path.write_text(HALF_ACL)
    with pytest.raises(AclUnstable, match="maybe still being written; keeping the previous ACL"):
        read_acl_stable(path, settle=1.0)
    assert load_acl(path).allow  # no settle time: an admin's explicit load
    changed = path.stat().st_ctime_ns / 1e9
    assert read_acl_stable(path, settle=1.0, now=lambda: changed + 1.0).allow
    acl = read_acl_stable(path, settle=1.0, now=lambda: changed + 1.0)
    assert acl.stamp == file_stamp(path) and acl == load_acl(path)  # the stamp is not part of the policy
    old = time.time() - 3600
    os.utime(path, (old, old))  # an mtime set back (cp -p, tar) does not make the edit old: ctime says when it was
    with pytest.raises(AclUnstable, match="maybe still being written"):
        read_acl_stable(path, settle=1.0)


def test_a_change_time_ahead_of_the_clock_waits_for_the_steady_clock(tmp_path: Path) -> None:
    """Clock skew (NFS, a VM) puts the change in the future: the server trusts it after seeing it unchanged a while."""
    path = tmp_path / "acl.yaml"
    path.write_text(HALF_ACL)
    changed = path.stat().st_ctime_ns / 1e9
    with pytest.raises(AclUnstable, match="ahead of this host's clock"):
        read_acl_stable(path, settle=1.0, now=lambda: changed - 3600)
    assert read_acl_stable(path, settle=1.0, now=lambda: changed - 3600, steady_for=1.0).allow

    clock = Clock()
    acls = AclFile(path, clock)
    path.write_text(FULL_ACL)  # changed just now, by the real clock: held back until the steady clock says 1 s
    assert acls.current().deny_principals == frozenset()
    clock.advance(SETTLE / 2)
    assert acls.current().deny_principals == frozenset()
    clock.advance(SETTLE / 2)
    assert acls.current().deny_principals == {"mallory"}


def test_a_broken_edit_keeps_the_last_good_acl_and_is_reported_once(tmp_path: Path) -> None:
    """Edits stamped ahead of this host's clock, so that their age is the server's clock, which the test advances."""
    path, clock, reloads = tmp_path / "acl.yaml", Clock(), []
    path.write_text(FULL_ACL)
    acls = AclFile(path, clock, on_reload=lambda **record: reloads.append(record))

    def edit(text: str) -> None:
        path.write_text(text)
        ahead = time.time() + 3600
        os.utime(path, (ahead, ahead))

    edit(FULL_ACL.replace("allow:", "alow:"))
    assert acls.current().deny_principals == {"mallory"} and reloads == []  # not settled: held back, quietly
    clock.advance(SETTLE)
    assert acls.current().deny_principals == {"mallory"}
    assert [r["accepted"] for r in reloads] == [False] and str(path) in reloads[0]["detail"]
    clock.advance(SETTLE)
    assert acls.current().deny_principals == {"mallory"} and len(reloads) == 1  # not re-read on every job
    edit(HALF_ACL)
    acls.current()
    clock.advance(SETTLE)
    assert acls.current().deny_principals == frozenset() and [r["accepted"] for r in reloads] == [False, True]


@pytest.mark.parametrize("broken", ["deny: !!map [mallory]\n", "deny:\n  principals: !!seq {mallory: 1}\n",
                                    "allow: !!map [{group: committers}]\n"])
def test_an_edit_with_a_tag_on_the_wrong_node_keeps_the_last_good_acl(tmp_path: Path, broken: str) -> None:
    """A mistyped tag is a broken edit like any other: the last good ACL stays in force, no exception reaches the job."""
    line = broken.count("\n") + 1  # the tag is on the edit's last line, after the realms
    path, clock, reloads = tmp_path / "acl.yaml", Clock(), []
    path.write_text(FULL_ACL)
    acls = AclFile(path, clock, on_reload=lambda **record: reloads.append(record))
    path.write_text("realms: [TEST.REALM]\n" + broken)
    ahead = time.time() + 3600
    os.utime(path, (ahead, ahead))
    acls.current()
    clock.advance(SETTLE)
    assert acls.current().deny_principals == {"mallory"}
    assert [r["accepted"] for r in reloads] == [False] and f"{path}:{line}: !!" in reloads[0]["detail"]
    with pytest.raises(AclError, match=f"{path}:{line}: !!"):
        load_acl(path)


def test_a_save_in_two_writes_is_never_loaded_half(tmp_path: Path) -> None:
    """A real writer, pausing between its two writes until the reader has read the half, against a reader polling
    as the server does (real time: the file's change time is the kernel's)."""
    path = tmp_path / "acl.yaml"
    path.write_text(FULL_ACL)
    read_the_half, done = threading.Event(), threading.Event()

    def editor() -> None:
        with open(path, "w") as f:  # in place, in two writes, like a non-atomic editor
            f.write(HALF_ACL)
            f.flush()
            read_the_half.wait(5)
            f.write(FULL_ACL[len(HALF_ACL) :])
        done.set()

    threading.Thread(target=editor).start()
    results: list[frozenset[str] | None] = []
    deadline = time.monotonic() + 5
    while not (done.is_set() and results[-1] is not None) and time.monotonic() < deadline:
        before = path.stat().st_size
        try:
            results.append(read_acl_stable(path, settle=0.3).deny_principals)
        except AclUnstable:
            results.append(None)
        if before == path.stat().st_size == len(HALF_ACL):  # the whole read fell between the two writes
            read_the_half.set()
        time.sleep(0.001)  # the poll, as jobs come
    assert read_the_half.is_set() and None in results  # the reader did meet the save in progress
    assert all(deny == {"mallory"} for deny in results if deny is not None) and results[-1] == {"mallory"}
