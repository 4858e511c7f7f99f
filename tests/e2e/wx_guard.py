"""Run a command under the seccomp filter systemd installs for MemoryDenyWriteExecute=yes.

``python wx_guard.py PROGRAM ARGS...`` installs the filter, then execs PROGRAM; the
filter stays across exec, as it does for a service. Like systemd's
(``seccomp_memory_deny_write_execute``), it answers EPERM to ``mmap`` asking for
memory both writable and executable, to ``mprotect``/``pkey_mprotect`` adding
execute permission, and to ``shmat`` with SHM_EXEC. Without systemd as PID 1 this
is how the tests check that the daemon (CPython, cryptography, SQLite, aiohttp)
lives with that unit setting.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000

# machine: (AUDIT_ARCH_*, mmap, mprotect, pkey_mprotect, shmat)
ARCHES = {
    "x86_64": (0xC000003E, 9, 10, 329, 30),
    "aarch64": (0xC00000B7, 222, 226, 288, 196),
}

LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
NR_AT, ARCH_AT = 0, 4


def arg_at(n: int) -> int:
    """Offset of the low 32 bits of syscall argument n in struct seccomp_data (little-endian)."""
    return 16 + 8 * n


def program() -> list[tuple[int, int, int, int]]:
    machine = platform.machine()
    if machine not in ARCHES:
        raise SystemExit(f"wx_guard: no syscall numbers for {machine}")
    arch, mmap, mprotect, pkey_mprotect, shmat = ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | EPERM
    # (code, jt, jf, k); jumps count instructions after the current one.
    return [
        (LD_W_ABS, 0, 0, ARCH_AT),            # 0
        (JEQ_K, 1, 0, arch),                  # 1: foreign arch -> allow
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),     # 2
        (LD_W_ABS, 0, 0, NR_AT),              # 3
        (JEQ_K, 5, 0, mmap),                  # 4 -> 10
        (JEQ_K, 9, 0, mprotect),              # 5 -> 15
        (JEQ_K, 8, 0, pkey_mprotect),         # 6 -> 15
        (JEQ_K, 12, 0, shmat),                # 7 -> 20
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),     # 8
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),     # 9 (padding)
        (LD_W_ABS, 0, 0, arg_at(2)),          # 10: mmap prot
        (AND_K, 0, 0, PROT_WRITE | PROT_EXEC),  # 11
        (JEQ_K, 0, 1, PROT_WRITE | PROT_EXEC),  # 12
        (RET_K, 0, 0, deny),                  # 13
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),     # 14
        (LD_W_ABS, 0, 0, arg_at(2)),          # 15: mprotect prot
        (AND_K, 0, 0, PROT_EXEC),             # 16
        (JEQ_K, 0, 1, PROT_EXEC),             # 17
        (RET_K, 0, 0, deny),                  # 18
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),     # 19
        (LD_W_ABS, 0, 0, arg_at(2)),          # 20: shmat shmflg
        (AND_K, 0, 0, SHM_EXEC),              # 21
        (JEQ_K, 0, 1, SHM_EXEC),              # 22
        (RET_K, 0, 0, deny),                  # 23
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),     # 24
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install() -> None:
    instructions = program()
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in instructions)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    prog = SockFprog(len(instructions), ctypes.cast(buffer, ctypes.c_char_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606 - the test gives the command
