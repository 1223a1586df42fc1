"""The sandbox's system call filter, as built: an allowlist of calls this machine's kernel knows by those names, and
none of the calls that reach a network, another process or the kernel's rarer interfaces."""

from __future__ import annotations

import platform

import pyseccomp
import pytest

from securecc import sandbox

# What a compile must never make, whatever is added to the allowlist: sockets (and io_uring, which makes them without
# socket(2)), the interfaces kernel exploits most often reach, another process's memory or descriptors, namespaces
# and mounts, and the calls newer than libseccomp 2.5 that the old denylist let through.
NEVER_ALLOWED = (
    "socket", "socketpair", "connect", "bind", "sendto", "sendmsg", "recvmsg", "getpeername", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key", "request_key",
    "ptrace", "process_vm_readv", "process_vm_writev", "modify_ldt", "mbind", "set_mempolicy", "move_pages",
    "name_to_handle_at", "open_by_handle_at", "fanotify_init", "inotify_init1", "syslog", "uselib", "vhangup", "acct",
    "quotactl", "swapon", "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "kcmp", "process_madvise", "unshare", "setns", "mount",
    "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "memfd_create", "memfd_secret", "personality", "setuid", "setgid", "setgroups", "capset",
    "chown", "fchown", "fchownat", "lchown", "mknod", "mknodat", "seccomp", "landlock_create_ruleset",
    # What an attack on the allowlist used (tests/integration/test_sandbox.py): past RLIMIT_FSIZE, directories the
    # handler cannot remove, locks on host files, the page cache's view of other jobs; ioctl and fcntl only by request.
    "fallocate", "mkdir", "mkdirat", "rmdir", "chmod", "fchmodat", "link", "linkat", "symlink", "symlinkat", "flock",
    "fadvise64", "readahead", "mincore", "ioctl", "fcntl", "prctl", "madvise",
)


def test_every_allowed_call_is_a_real_one() -> None:
    """A misspelt name would be dropped as another architecture's: a call the compile needs, refused."""
    arch = pyseccomp.system_arch()
    unknown = [name for name in sandbox.ALLOWED_SYSCALLS if pyseccomp.resolve_syscall(arch, name) < 0]
    assert unknown == [] or platform.machine() != "x86_64", unknown
    assert len(set(sandbox.ALLOWED_SYSCALLS)) == len(sandbox.ALLOWED_SYSCALLS)


@pytest.mark.parametrize("name", NEVER_ALLOWED)
def test_no_dangerous_call_is_allowed(name: str) -> None:
    assert name not in sandbox.ALLOWED_SYSCALLS


def test_the_filter_compiles_to_one_program() -> None:
    program = sandbox.seccomp_program()
    assert program and len(program) % 8 == 0  # struct sock_filter: 8 bytes an instruction
    assert sandbox.seccomp_program() is program  # built once, at the handler's start


def test_some_calls_are_allowed_only_by_request() -> None:
    import fcntl
    import mmap

    assert set(sandbox.ALLOWED_REQUESTS) == {"ioctl", "fcntl", "prctl", "madvise"}
    assert not {fcntl.F_SETLK, fcntl.F_SETLKW, fcntl.F_OFD_SETLK, fcntl.F_SETLEASE, fcntl.F_NOTIFY, fcntl.F_SETOWN,
                fcntl.F_SETSIG} & set(sandbox.ALLOWED_REQUESTS["fcntl"][1])
    assert 67 not in sandbox.ALLOWED_REQUESTS["prctl"][1]  # PR_SET_MEMORY_MERGE
    assert not {mmap.MADV_MERGEABLE, mmap.MADV_UNMERGEABLE, mmap.MADV_HWPOISON, mmap.MADV_REMOVE} & set(
        sandbox.ALLOWED_REQUESTS["madvise"][1])
