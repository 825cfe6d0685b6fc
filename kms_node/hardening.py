"""Process hardening for a node: its memory holds unwrapped kfrags (for up to
``kfrag_cache_ttl_s`` after their unwrap, ADR 13), the HSM session and the user PIN, so it must
not end up in a core dump or be readable by other processes of the same user.

- ``RLIMIT_CORE`` 0: a crash writes no core file;
- ``PR_SET_DUMPABLE`` 0 (Linux): no core dump either way, and processes of the same
  user can neither ptrace the node nor read its ``/proc/<pid>/mem``; only root can.
  (Profilers such as py-spy then need root as well.)
"""

from __future__ import annotations

import ctypes
import resource
import sys

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def forbid_core_dumps() -> None:
    """Apply both settings to this process; raises OSError if the kernel refuses."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, "prctl(PR_SET_DUMPABLE, 0) failed")


def is_dumpable() -> bool:
    """Whether this process may be core-dumped or traced by its user (Linux)."""
    if not sys.platform.startswith("linux"):
        return resource.getrlimit(resource.RLIMIT_CORE)[0] != 0
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
