"""The sandbox's layout of a job's tree, as pure code: worked out once per job, and kept no longer."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from securecc import sandbox


def hostile_spec(n: int) -> sandbox.Spec:
    """A job whose paths are as long and as many as jobspec lets through (here, fewer of them)."""
    deep = "/w/" + "d" * 3000
    mounts = tuple((f"include-{k}", f"{deep}/h{k}.h") for k in range(n))
    return sandbox.Spec("/usr/bin/gcc", ["-c"], Path("/nonexistent/j"), deep, "x.c", {}, mounts, preprocessed=False)


def test_a_jobs_layout_is_worked_out_once() -> None:
    spec = hostile_spec(100)
    assert sandbox.tree(spec) is sandbox.tree(spec)
    assert sandbox.tree_files(spec) == list(spec.mounts)


def test_a_jobs_layout_is_kept_no_longer_than_the_job() -> None:
    """The handler lives for weeks and a job may name 20,000 paths of 4 KB: a layout kept in a cache beyond
    its job (an lru_cache of 16 held about 1 GB once its jobs had ended) is memory any client can pin."""
    spec = hostile_spec(200)
    layout = weakref.ref(sandbox.tree(spec))
    del spec
    gc.collect()
    assert layout() is None
