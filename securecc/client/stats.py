"""The agent's counters (``securecc stats``) and its one notice that most compiles stayed local.

A job that stays local says why only under SECURECC_VERBOSE=1, so a build
that runs all here by mistake (an option the policy keeps local on every
command line, servers that always refuse) would only look slow.  The agent
counts what each job became (compiled remotely, kept local and why, fallen
back after a failure and why) and the bytes its sessions moved, and once
per agent lifetime it tells the user when most of the compiles it could
have distributed stayed local.

The counters are in memory: an agent lives for a build session (it exits
after SECURECC_AGENT_IDLE seconds without a job), and that is the span
``securecc stats`` reports, since the agent started and since the last
``securecc stats -z``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from typing import NamedTuple

from securecc import __version__
from securecc.client import job as client

NOTICE_AFTER = 10  # compiles seen before the notice may be given: a handful of local ones is no pattern
NATURAL = frozenset({"no source file", "source from standard input", "output to standard output"})
"""Categories (local_category) that stay local in any build, whatever the policy."""

# What a remote failure was, by the words of its RemoteFailure message (the first that matches).
FAILURES = (
    ("is not the one compiled here", "result diverged"),  # securecc.client.verify: before "refused the" (of its report)
    ("cannot check the object", "check failed here"),
    ("refused the", "refused"),  # the job or the connection; not "Connection refused" (unreachable)
    ("kinit", "no Kerberos ticket"),
    ("KDC", "KDC not answering"),
    ("Kerberos", "Kerberos error"),
    ("keytab", "Kerberos error"),
    ("clock skew", "Kerberos error"),
    ("did not answer", "timed out"),
    ("cannot connect", "unreachable"),
    ("closed the connection", "server went away"),
    ("connection to", "connection failed"),
    ("protocol version", "protocol version mismatch"),
    ("backed off", "every server backed off"),
    ("no compile servers", "no servers configured"),
    ("host list", "bad host list"),
    (" -v", "compiler probe failed"),
)


def local_category(reason: str) -> str:
    """A short, stable name for a NotDistributable reason, to count jobs by.

    What varies per command line is cut off, so that a build's thousand
    ``-Wa,-adhln=x.lst`` are one line: ``option -Wa,-v`` -> ``option
    -Wa,...``, ``includes /usr/local/x.h`` -> ``includes /usr/local/...``,
    ``3 source files`` -> ``several source files``.  A short plain value
    stays (``option -march=native``).
    """
    count = re.fullmatch(r"(\d+) source files?", reason)
    if count:
        return "no source file" if count[1] == "0" else "several source files"
    words = []
    for word in reason.split()[:6]:
        if word.startswith("/"):
            word = "/" + "/".join(word.split("/")[1:3]) + "/..."
        elif word.startswith(("@", "'", '"')):
            word = "..."
        elif "," in word:
            word = word[: word.index(",") + 1] + "..."
        elif "=" in word:
            name, _, value = word.partition("=")
            word = word if re.fullmatch(r"[\w-]{1,16}", value) else name + "=..."
        elif word.startswith("-") and "/" in word:
            word = word[: word.index("/")] + "..."
        words.append(word)
    return " ".join(words)[:48] or "unknown"


def failure_category(message: str) -> str:
    """A short name for a RemoteFailure; its message joins one trouble per host tried with "; "."""
    troubles = [t for t in message.split("; ") if not _BUSY.search(t)]
    if not troubles:
        return "busy everywhere"
    for needle, category in FAILURES:
        if any(needle in t for t in troubles):
            return category
    return "other"


_BUSY = re.compile(r" busy \(\d+/\d+\)$")


def compiler_args(argv: list[str]) -> list[str]:
    """The arguments after the compiler's name, as client.run reads ``argv``."""
    return argv[1:] if os.path.basename(argv[0]) in client.MASQUERADE_NAMES else argv[2:]


def natural_category(args: list[str], reason: str) -> str | None:
    """Why a job is local in any build (links, ``-E``, probes like ``gcc -v``, stdin), or None."""
    if any(a in ("-E", "-M", "-MM") for a in args):
        return "preprocessing only (-E, -M)"
    if not any(a in ("-c", "-S") for a in args):
        return "not a compile (link, gcc -v...)"
    category = local_category(reason)
    return category if category in NATURAL else None


def is_probe(args: list[str], cwd: str) -> bool:
    """A configure-time test compile: autoconf's conftest.c, CMake's try_compile, meson's checks.

    A configure script runs hundreds, some meant to fail, and may take any
    output on stderr for a failure (autoconf's ac_c_werror_flag, as when
    it tries -g): they never count toward the notice, so never carry it.
    """
    if "/CMakeFiles/" in cwd + "/" or "/meson-private" in cwd:
        return True
    return any(os.path.basename(a).startswith("conftest") for a in args if not a.startswith("-"))


class Outcome(NamedTuple):
    """What one job counts as: ``kind`` remote, policy, natural or fallback, a category, and whether the
    notice counts it (a compile that could have gone remote, not a configure probe)."""

    kind: str
    category: str
    counted: bool


def outcome_of(inv: client.Invocation, outcome: int | client.LocalCompile, answered: bool) -> Outcome | None:
    """What a finished job counts as; None for a run that was not a compile job (usage, --show-hosts, a
    preprocessing error, which is the user's).  ``answered``: a server returned a Result."""
    if isinstance(outcome, client.LocalCompile):
        args = outcome.argv[1:]
        probe = is_probe(args, inv.cwd)
        if outcome.failure:
            return Outcome("fallback", failure_category(outcome.reason), not probe)
        natural = natural_category(args, outcome.reason)
        if natural is not None:
            return Outcome("natural", natural, False)
        return Outcome("policy", local_category(outcome.reason), not probe)
    if answered:
        return Outcome("remote", "", not is_probe(compiler_args(inv.argv), inv.cwd))
    return None


CACHE_HITS = "result-cache hits: not in the replies; the servers count them (securecc_cache_hits in /metrics)"


class Stats:
    """The agent's counters since it started, and since the last reset (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total: Counter[tuple[str, str]] = Counter()
        self.at_reset: Counter[tuple[str, str]] = Counter()
        self.started = time.time()
        self.reset_at: float | None = None
        self.noticed = False

    def add(self, kind: str, category: str = "", n: int = 1) -> None:
        with self._lock:
            self.total[kind, category] += n

    def job(self, outcome: Outcome) -> str | None:
        """Count a job; the notice to print on its stderr when it is the one that shows most stay local."""
        with self._lock:
            self.total[outcome.kind, outcome.category] += 1
            if not outcome.counted:
                return None
            self.total["notice", "seen"] += 1
            if outcome.kind != "remote":
                self.total["notice", "local"] += 1
                self.total["notice-reason", outcome.category] += 1
            if self.noticed:
                return None
            window = self.total - self.at_reset
            seen, kept = window["notice", "seen"], window["notice", "local"]
            if seen < NOTICE_AFTER or 2 * kept <= seen:
                return None
            self.noticed = True
            reasons = Counter({c: n for (k, c), n in window.items() if k == "notice-reason"})
            top, count = min(reasons.items(), key=lambda item: (-item[1], item[0]))
        return (f"{kept} of the {seen} compiles so far stayed local (mostly {top}: {count}); "
                "SECURECC_VERBOSE=1 shows why for each job, `securecc stats` counts them")

    def reset(self) -> None:
        with self._lock:
            self.at_reset = self.total.copy()
            self.reset_at = time.time()

    def report(self) -> str:
        """``securecc stats``: a table of the counters, since the agent started and since the last reset."""
        with self._lock:
            total, since = self.total.copy(), self.total - self.at_reset
        now = time.time()
        reset = f"reset {duration(now - self.reset_at)} ago" if self.reset_at else "never reset (securecc stats -z)"
        rows: list[tuple[str, str, str]] = [("", "since start", "since reset")]

        def section(label: str, kind: str) -> None:
            all_time, lately = (str(sum(n for (k, _), n in c.items() if k == kind)) for c in (total, since))
            rows.append((label, all_time, lately))
            categories = sorted({c for (k, c) in total if k == kind}, key=lambda c: (-total[kind, c], c))
            rows.extend((f"  {c}", str(total[kind, c]), str(since[kind, c])) for c in categories)

        rows.append(("compiled remotely", str(total["remote", ""]), str(since["remote", ""])))
        section("kept local by policy", "policy")
        section("fell back to local after a failure", "fallback")
        section("local by nature (links, -E, probes, stdin)", "natural")
        rows.append(("Kerberos handshakes (new sessions)", str(total["handshakes", ""]), str(since["handshakes", ""])))
        for label, key in (("bytes sent to servers", "sent"), ("bytes received from servers", "received")):
            rows.append((label, size(total["bytes", key]), size(since["bytes", key])))
        width = max(len(r[0]) for r in rows) + 2
        up = duration(now - self.started)
        lines = [f"securecc agent {__version__} (pid {os.getpid()}): up {up}, counters {reset}"]
        lines += [f"{label:<{width}}{a:>12}{b:>13}" for label, a, b in rows]
        lines.append(CACHE_HITS)
        return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB"):
        if value < 1000:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


USAGE = "usage: securecc stats [-z]   (-z resets the counters)"


def command(stats: Stats, args: list[str]) -> tuple[bytes, bytes, int]:
    """``securecc stats [-z]`` in the agent: its stdout, stderr and exit status."""
    if args == []:
        return stats.report().encode(), b"", 0
    if args == ["-z"]:
        stats.reset()
        return b"securecc: counters reset (securecc stats shows the totals since the agent started, too)\n", b"", 0
    return b"", f"securecc: {USAGE}\n".encode(), 2


def is_command(argv: list[str]) -> bool:
    """``securecc stats ...``, not a compile (the shim sends it only to a running agent)."""
    return len(argv) > 1 and argv[1] == "stats" and os.path.basename(argv[0]) not in client.MASQUERADE_NAMES
