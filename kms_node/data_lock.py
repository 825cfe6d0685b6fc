"""Who uses a node's data directory: serving processes share it, maintenance needs it alone.

A lock file (``node.lock``) in the data directory, locked with ``flock``: every server
process of the node holds a shared lock while it serves; an offline operation such as
``kms-node rotate-kek`` takes an exclusive one and is refused while any process serves.
The kernel drops a lock when its process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import PreconditionFailed

LOCK_FILE = "node.lock"


def _lock(data_dir: Path, *, exclusive: bool) -> int:
    """The locked file descriptor; :class:`PreconditionFailed` at once if the lock cannot
    be had (exclusive while the node serves, shared during maintenance)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        what = "the node is running: stop it first" if exclusive else "maintenance is under way"
        raise PreconditionFailed(f"{data_dir} is in use: {what}") from None
    return fd


def hold_while_serving(data_dir: Path) -> None:
    """A server process's shared lock, held until the process ends."""
    _lock(data_dir, exclusive=False)


@contextmanager
def alone(data_dir: Path) -> Iterator[None]:
    """The exclusive lock, for the ``with`` block: no server process runs meanwhile."""
    fd = _lock(data_dir, exclusive=True)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
