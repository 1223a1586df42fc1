"""``-march=native`` and friends, turned into the explicit options they mean on this machine.

A server has another CPU, so ``-march=native`` there would build for the
server.  The compiler driver expands it into ``-march=znver3 -mavx2 ...
--param=l1-cache-size=32 ... -mtune=znver3`` before it runs cc1 (its
``-###`` line shows them); the client sends those options instead, and the
server builds for the client's CPU.  The object is the same as a local
compile's except for one thing: with ``-g`` gcc records its switches in
DW_AT_producer, and a ``--param`` given on the command line is recorded
after the other options where the expansion has it in place.  So a job
with debug info that records its switches keeps ``native`` local
(:func:`records_switches`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

NATIVE = re.compile(r"-m(arch|tune|cpu)=native")
_known: dict[tuple[str, str, int, int], list[str]] = {}  # (compiler, option, size, mtime) -> expansion


class NotExpanded(Exception):
    """The compiler did not show what ``native`` means."""


def expansion(compiler: str, option: str) -> list[str]:
    """What ``option`` (``-march=native``...) means to ``compiler`` here, from its ``-###`` line;
    remembered for the agent's lifetime, per compiler binary."""
    try:
        st = os.stat(compiler)
    except OSError as e:
        raise NotExpanded(f"cannot stat {compiler}: {e.strerror}") from None
    key = (compiler, option, st.st_size, st.st_mtime_ns)
    if key not in _known:
        try:
            done = subprocess.run([compiler, "-###", "-c", "-x", "c", os.devnull, option], capture_output=True,
                                  timeout=30, env={**os.environ, "LC_ALL": "C"})
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NotExpanded(f"cannot run {compiler} -###: {e}") from None
        lines = [shlex.split(line) for line in done.stderr.decode(errors="replace").splitlines() if os.devnull in line]
        cc1 = next((words for words in lines if words and os.path.basename(words[0]).startswith("cc1")), None)
        if done.returncode != 0 or cc1 is None or "-quiet" not in cc1[cc1.index(os.devnull):]:
            raise NotExpanded(f"{compiler} -### did not show what {option} means")
        start = cc1.index(os.devnull) + 1
        words = cc1[start : cc1.index("-quiet", start)]
        joined: list[str] = []  # "--param" "l1-cache-size=32" -> "--param=l1-cache-size=32", as gcc records it
        for word in words:
            if joined and joined[-1] == "--param":
                joined[-1] = f"--param={word}"
            else:
                joined.append(word)
        _known[key] = joined
    return _known[key]


def expand(compiler: str, args: list[str]) -> list[str]:
    """``args`` with every ``-m...=native`` replaced by its expansion (unchanged when there is none)."""
    if not any(NATIVE.fullmatch(a) for a in args):
        return args
    return [word for a in args for word in (expansion(compiler, a) if NATIVE.fullmatch(a) else [a])]


def records_switches(args: list[str]) -> bool:
    """Whether debug info would carry the options (the last of ``-g[no-]record-gcc-switches``; on by default)."""
    chosen = [a for a in args if a in ("-grecord-gcc-switches", "-gno-record-gcc-switches")]
    return not chosen or chosen[-1] == "-grecord-gcc-switches"
