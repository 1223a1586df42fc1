"""Checking a server's result by compiling the job here too: a server that returns wrong objects is caught.

A signature proves who made an object, not that it is right: a server with a
broken or malicious compiler signs its wrong objects too.  So a sampled
fraction of jobs (``SECURECC_VERIFY_RATE``, 1% by default, 0 to turn it off,
1 for every job) is compiled again by the local compiler into a private
directory, and the objects are compared byte for byte, as securecc promises
them identical.  On a mismatch the job falls back to a local compile (the
user gets this machine's object and one line saying why), the server is
quarantined in the host state (no job goes to it until ``securecc-hosts
--clear``) and the result is reported to it with its own signed statement
(:mod:`securecc.server.divergences`), so its admin sees it in the audit log,
``/metrics`` and ``securecc-monitor``.

Not compared: a job that reads the clock without ``SOURCE_DATE_EPOCH``
(``__TIME__``: no two compiles agree), ``-gsplit-dwarf`` (the object names
its ``.dwo`` by path), and a compile that gives two objects when run twice
here (``-flto`` without ``-frandom-seed``): that is said with
``SECURECC_VERBOSE``, never counted against the server.  Nor is a compile
that fails here (no object to compare: a full ``TMPDIR``, a ulimit, a signal
say nothing of the server's); that job compiles here, unchecked objects are
never used.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from securecc import args as argpolicy
from securecc.client.channel import Channel, RemoteFailure, Timeouts

if TYPE_CHECKING:
    from securecc import protocol as wire
    from securecc.client.hosts import Host, HostState


class Invocation(Protocol):
    """What the check needs of the compile's caller (a :class:`securecc.client.job.Invocation`)."""

    env: Mapping[str, str]
    cwd: str

    def say(self, message: str) -> None: ...

    def verbose(self, message: str) -> None: ...

DEFAULT_RATE = 0.01
_DEPENDENCY_OPTIONS = ("-MD", "-MMD", "-MP", "-MG")  # the dependency file is written by the preprocessing already
_DEPENDENCY_VALUES = ("-MF", "-MT", "-MQ")


class Diverged(RemoteFailure):
    """The server's object is not the one compiled here: compile locally (the host is quarantined already)."""


def sampled(inv: Invocation) -> bool:
    """Whether this job is one to check (``SECURECC_VERIFY_RATE``, a fraction from 0 to 1)."""
    text = inv.env.get("SECURECC_VERIFY_RATE")
    rate = DEFAULT_RATE
    if text:
        try:
            rate = float(text)
            if not 0 <= rate <= 1:
                raise ValueError
        except ValueError:
            inv.say(f"SECURECC_VERIFY_RATE={text!r} is not a fraction from 0 to 1; using {DEFAULT_RATE:g}")
            rate = DEFAULT_RATE
    return rate > 0 and random.random() < rate


def unverifiable(plan: argpolicy.Plan, job: wire.Job) -> str | None:
    """Why comparing this job's objects would prove nothing, or None."""
    from securecc.cachekey import uncacheable

    if plan.split_dwarf:
        return "-gsplit-dwarf objects name their .dwo by path"
    if any(a.startswith("-Wp,") and ",-M" in a for a in plan.cpp_args) or \
            any(a == "-Xpreprocessor" and b.startswith("-M") for a, b in zip(plan.cpp_args, plan.cpp_args[1:])):
        return "-Wp,-M... or -Xpreprocessor -M... would write the dependency file again"
    return uncacheable(job)  # __DATE__/__TIME__ unpinned, __TIMESTAMP__


def check(inv: Invocation, compiler: str, compiler_path: str, plan: argpolicy.Plan, job: wire.Job, host: Host,
          reply: wire.Result, state: HostState, timeouts: Timeouts) -> None:
    """Compile ``job`` here too; raise :class:`Diverged` (after quarantining and reporting ``host``) when the object
    ``reply`` carries is not this machine's."""
    why = unverifiable(plan, job)
    if why:
        inv.verbose(f"{plan.source}: not checking {host.name}'s object against this machine's: {why}")
        return
    try:
        status, here = compile_here(inv, compiler, compiler_path, plan)
        if status == 0 and here == reply.output:
            inv.verbose(f"{plan.source}: {host.name}'s object is the one compiled here")
            return
        if status == 0 and compile_here(inv, compiler, compiler_path, plan) != (status, here):
            inv.verbose(f"{plan.source}: not checking {host.name}'s object: two compiles here give two objects")
            return
    except OSError as e:
        inv.verbose(f"{plan.source}: cannot check {host.name}'s object here: {e.strerror or e}")
        return
    if status != 0 or here is None:
        # No object here to compare: a full TMPDIR, a ulimit, the OOM killer, a signal say nothing of the server's.
        # Its object is not used unchecked either: the job compiles here, where the user sees why it fails.
        raise RemoteFailure(f"cannot check the object from {host.name} (job {reply.job_id}): the compile here "
                            f"{'was killed by signal ' + str(-status) if status < 0 else f'failed (exit {status})'}")
    import hashlib

    detail = f"its {len(reply.output or b'')}-byte object differs from the {len(here)}-byte one compiled here"
    state.quarantine(host, detail, reply.job_id)
    told = report(host, reply, hashlib.sha256(here).hexdigest(), f"{plan.source}: {detail}", timeouts)
    raise Diverged(f"the object from {host.name} (job {reply.job_id}) is not the one compiled here: {detail}; "
                   f"{host.name} is quarantined until 'securecc-hosts --clear {host.name}:{host.port}' ({told})")


def compile_here(inv: Invocation, compiler: str, compiler_path: str, plan: argpolicy.Plan) -> tuple[int, bytes | None]:
    """The local compiler's exit status and output for ``plan``, written into a private directory (its dependency
    options dropped: the job's dependency file is written already); OSError if the compiler cannot be run."""
    import shutil
    import subprocess
    import tempfile

    args, i = [], 0
    while i < len(plan.cpp_args):  # option by option, each with its value: a value is never read as an option
        arg = plan.cpp_args[i]
        group = plan.cpp_args[i:i + 2] if argpolicy.takes_value(arg) else [arg]
        i += len(group)
        if arg not in _DEPENDENCY_OPTIONS and arg not in _DEPENDENCY_VALUES:
            args += group
    directory = tempfile.mkdtemp(prefix="securecc-check-", dir=inv.env.get("TMPDIR") or None)
    try:
        output = os.path.join(directory, os.path.basename(plan.output) or "out")
        done = subprocess.run([compiler, *args, plan.mode, "-o", output], executable=compiler_path, cwd=inv.cwd,
                              env=dict(inv.env), stdin=subprocess.DEVNULL, capture_output=True)
        try:
            with open(output, "rb") as f:
                return done.returncode, f.read()
        except OSError:
            return done.returncode, None
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def report(host: Host, reply: wire.Result, local_sha256: str | None, detail: str, timeouts: Timeouts) -> str:
    """Tell ``host`` its result diverged, with its own statements (it audits and counts it); what became of that."""
    from securecc import protocol as wire

    channel = Channel(host, timeouts=timeouts)
    try:
        channel.authenticate()
        # answered at once by a sound server: one that keeps sending Alive instead must not hold the build
        answer = channel.call(wire.Divergence(reply.attestations, local_sha256, detail[:500]), within=timeouts.io)
    except RemoteFailure as e:
        return f"reporting it failed: {e}"
    finally:
        channel.close()
    if isinstance(answer, wire.Status):
        return "reported to its audit log"
    return f"it refused the report: {getattr(answer, 'message', type(answer).__name__)}"
