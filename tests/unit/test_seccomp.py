"""The sandbox's system call filter, as built: every denied call is one this machine's kernel knows by that name."""

from __future__ import annotations

import platform

import pyseccomp
import pytest

from securecc import sandbox


def test_every_denied_call_is_a_real_one() -> None:
    """A misspelt name would be skipped as a call of another architecture, and silently allowed."""
    arch = pyseccomp.system_arch()
    unknown = [name for name in sandbox.DENIED_SYSCALLS if pyseccomp.resolve_syscall(arch, name) < 0]
    assert unknown == ([] if platform.machine() == "x86_64" else ["modify_ldt"])


def test_the_filter_compiles_to_one_program() -> None:
    program = sandbox.seccomp_program()
    assert program and len(program) % 8 == 0  # struct sock_filter: 8 bytes an instruction
    assert sandbox.seccomp_program() is program  # built once, at the handler's start


def test_a_call_the_library_does_not_know_fails_closed(monkeypatch) -> None:
    """An older libseccomp without io_uring's names would leave io_uring allowed: the filter is not built at all."""
    real = pyseccomp.resolve_syscall
    monkeypatch.setattr(pyseccomp, "resolve_syscall", lambda arch, name: -1 if name == "io_uring_setup" else real(arch, name))
    with pytest.raises(OSError, match="does not know the system call io_uring_setup"):
        sandbox.seccomp_program.__wrapped__()
