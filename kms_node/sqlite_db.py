"""Opening the node's SQLite databases (kfrags, audit log) the same careful way.

Owner-only files (SQLite gives its -wal and -shm files the database file's mode),
WAL so that several node processes can share a file, ``synchronous = FULL`` so a
committed write survives kill -9 and power loss, and a busy timeout because
other processes of the node may be writing. SQLite errors become ``Unavailable``
with the store's name; its messages ("database is locked") hold no data and no
path.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from core.errors import Unavailable


def unavailable(what: str, e: sqlite3.Error) -> Unavailable:
    return Unavailable(f"{what} unavailable: {e}")


def open_durable(
    path: Path,
    what: str,
    prepare: Callable[[sqlite3.Connection], None],
    *,
    busy_timeout_ms: int = 5000,
    extra_pragmas: tuple[str, ...] = (),
) -> sqlite3.Connection:
    """Open (creating) ``path`` and run ``prepare`` on it (schema, checks); the
    connection is closed again if anything fails."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except OSError as e:
        raise Unavailable(f"cannot open the {what}: {e.strerror}") from e
    except sqlite3.Error as e:
        raise unavailable(what, e) from e
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        for pragma in extra_pragmas:
            conn.execute(f"PRAGMA {pragma}")
        prepare(conn)
    except sqlite3.Error as e:
        conn.close()
        raise unavailable(what, e) from e
    except BaseException:
        conn.close()
        raise
    return conn
