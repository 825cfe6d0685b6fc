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
from pathlib import Path

from core.errors import InvalidRequest


def read_regular_file(path: Path, *, max_bytes: int, what: str) -> bytes:
    """The bytes of ``path``; :class:`InvalidRequest` if it is not a regular file or holds
    more than ``max_bytes``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise InvalidRequest(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what} {path} is larger than {max_bytes} bytes")
    return data
