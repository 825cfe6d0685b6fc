"""Who uses a node's data directory: serving processes share it, maintenance needs it alone,
and one serving instance of the node has it at a time.

A lock file (``node.lock``) in the data directory, locked with ``flock``: every server
process of the node holds a shared lock while it serves; an offline operation such as
``kms-node rotate-kek`` takes an exclusive one and is refused while any process serves.
A second lock file (``instance.lock``) is held exclusively by the one process that
stands for the serving node (its only server process, or the supervisor of several):
a second ``kms-node serve`` on the same directory is refused, where it would otherwise
share the port (``SO_REUSEPORT``) with a second replay memory's worth of rate budget
and a second anchorer. The kernel drops a lock when its process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import PreconditionFailed

LOCK_FILE = "node.lock"
INSTANCE_LOCK_FILE = "instance.lock"


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


def hold_as_the_serving_instance(data_dir: Path) -> int:
    """The serving instance's exclusive lock, held until the process ends (or the
    returned descriptor is closed); :class:`PreconditionFailed` at once if another
    instance serves from ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / INSTANCE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PreconditionFailed(
            f"{data_dir} is in use: another kms-node serves from it (one node, one "
            "serving instance: stop it first)"
        ) from None
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
