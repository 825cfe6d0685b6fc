"""Reading a local file a person pointed a program at (a config, a key, a receipts file):
the one place the programs open such a file, so that each is read the same careful way.

A file is input like any other. It is opened without blocking and must be a regular file,
so a FIFO or a device (``/dev/zero``) is refused at once rather than hanging the program
or filling its memory; and it is read bounded in size: ``max_bytes + 1`` bytes at most.
``OSError`` (missing, unreadable) is the caller's to report, with its own
words for what the file is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from core.errors import InvalidRequest


def read_regular_file(
    path: Path,
    *,
    max_bytes: int,
    what: str,
    check: Callable[[os.stat_result], str | None] | None = None,
) -> bytes:
    """The bytes of ``path``; :class:`InvalidRequest` if it is not a regular file or holds
    more than ``max_bytes``. ``check``, if given, judges the file opened (its status, from
    the descriptor the bytes are then read from, so not a file swapped in after): what is
    wrong with it (``"is accessible to others"``), refused naming the file, or None."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # on the raw descriptor: fdopen refuses a directory with an error naming only the
        # descriptor's number
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"{what} {path} is not a regular file")
        problem = check(info) if check is not None else None
        if problem is not None:
            raise InvalidRequest(f"{what} {path} {problem}")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what} {path} is larger than {max_bytes} bytes")
    return data
