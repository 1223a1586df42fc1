"""A job directory's outputs are read, and the directory removed, whatever the compile left in it, by the handler's
uid, which has no capability to override a directory's mode: -gsplit-dwarf's writable directory is the compile's to
shape."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from securecc import sandbox

HANDLER_UID = 65533  # an uid of its own, not the sandboxes' (the integration tests count those processes)


def as_handler(work: callable) -> None:
    """``work()`` in a child under an unprivileged uid, as the job handler runs; its failure fails the test."""
    if os.geteuid() != 0:
        work()
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(HANDLER_UID, HANDLER_UID, HANDLER_UID)
            os.setresuid(HANDLER_UID, HANDLER_UID, HANDLER_UID)
            work()
        except BaseException as e:  # noqa: BLE001 - any failure of the child is the test's
            os.write(2, f"{type(e).__name__}: {e}\n".encode())
            os._exit(1)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.fixture
def scratch():
    directory = Path(tempfile.mkdtemp(prefix="scc-removal-"))
    if os.geteuid() == 0:
        os.chown(directory, HANDLER_UID, HANDLER_UID)
    yield directory
    sandbox.remove_job_dir(directory)


def test_a_directory_of_mode_0_is_removed_with_what_it_holds(scratch: Path) -> None:
    def work() -> None:
        job = sandbox.make_job_dir(scratch, "j", {})
        locked = job / sandbox.SPLIT_DIR / "locked"
        locked.mkdir(parents=True)
        (locked / "payload").write_bytes(b"x" * 65536)
        locked.chmod(0)
        (job / sandbox.SPLIT_DIR).chmod(0)
        sandbox.remove_job_dir(job)
        assert not job.exists()

    as_handler(work)


def test_a_tree_thousands_deep_is_removed(scratch: Path) -> None:
    """Deeper than Python's recursion limit, and than PATH_MAX from the job directory."""
    def work() -> None:
        job = sandbox.make_job_dir(scratch, "j", {})
        fd = os.open(job, os.O_RDONLY)
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        sandbox.remove_job_dir(job)
        assert not job.exists()

    as_handler(work)


def test_links_are_removed_not_followed(scratch: Path) -> None:
    def work() -> None:
        victim = scratch / "victim"
        (victim / "inside").mkdir(parents=True)
        (victim / "inside" / "file").write_text("kept")
        job = sandbox.make_job_dir(scratch, "j", {})
        (job / sandbox.SPLIT_DIR).mkdir()
        (job / sandbox.SPLIT_DIR / "to-dir").symlink_to(victim)
        (job / sandbox.SPLIT_DIR / "to-file").symlink_to(victim / "inside" / "file")
        sandbox.remove_job_dir(job)
        assert not job.exists() and (victim / "inside" / "file").read_text() == "kept"

    as_handler(work)


def test_a_handler_start_removes_what_a_crash_left(scratch: Path) -> None:
    def work() -> None:
        job = sandbox.make_job_dir(scratch, "j", {})
        (job / "sub").mkdir()
        (job / "sub").chmod(0)
        job.chmod(0)
        sandbox.prepare_scratch(scratch)
        assert list(scratch.iterdir()) == []

    as_handler(work)


def test_an_output_directory_of_mode_0_is_the_jobs_bad_output_not_the_handlers_failure(scratch: Path) -> None:
    """The compile may fchmod its -gsplit-dwarf directory to 0: a bad output (the client's doing), not an exception
    that reports the server's own failure and logs a traceback."""
    def work() -> None:
        split = sandbox.make_job_dir(scratch, "j", {}) / sandbox.SPLIT_DIR
        split.mkdir()
        (split / "x.o").write_bytes(b"\x7fELF")
        split.chmod(0)
        with pytest.raises(sandbox.OutputError, match="cannot be opened"):
            sandbox.read_output(split, 1 << 20, "x.o")

    as_handler(work)
