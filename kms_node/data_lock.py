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


def _lock(data_dir: Path, name: str, *, exclusive: bool, in_use: str) -> int:
    """The descriptor of ``data_dir/name``, locked; :class:`PreconditionFailed` saying
    ``in_use`` at once if the lock cannot be had."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PreconditionFailed(f"{data_dir} is in use: {in_use}") from None
    return fd


def hold_as_the_serving_instance(data_dir: Path) -> int:
    """The serving instance's exclusive lock, held until the process ends (or the
    returned descriptor is closed); :class:`PreconditionFailed` at once if another
    instance serves from ``data_dir``."""
    return _lock(
        data_dir,
        INSTANCE_LOCK_FILE,
        exclusive=True,
        in_use="another kms-node serves from it (one node, one serving instance: stop it first)",
    )


def hold_while_serving(data_dir: Path) -> None:
    """A server process's shared lock, held until the process ends."""
    _lock(data_dir, LOCK_FILE, exclusive=False, in_use="maintenance is under way")


@contextmanager
def alone(data_dir: Path) -> Iterator[None]:
    """The exclusive lock, for the ``with`` block: no server process runs meanwhile."""
    fd = _lock(data_dir, LOCK_FILE, exclusive=True, in_use="the node is running: stop it first")
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
