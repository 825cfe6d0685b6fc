"""Reading a local file the SDK or ``kmsctl`` is pointed at: a file is input like any other,
so it is read as :mod:`core.local_files` reads one (a regular file only: a FIFO or a device
is refused, never waited on; bounded in size: a 2 GB "receipts file" is refused after
``max_bytes + 1`` bytes, not read into memory) and, if JSON, parsed bounded in nesting
(:mod:`core.bounded_json`). ``OSError`` is the caller's to report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core import bounded_json
from core.local_files import read_regular_file


def load_json(path: Path, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """The JSON document in ``path``, within both bounds."""
    data = read_regular_file(path, max_bytes=max_bytes, what=what)
    return bounded_json.loads(data, max_bytes=max_bytes, max_depth=max_depth, what=f"{what} {path}")


def load_json_object(
    path: Path, *, max_bytes: int, max_depth: int, what: str, max_containers: int | None = None
) -> dict[str, Any]:
    """:func:`load_json`, for a file that must hold a JSON object; with ``max_containers``,
    one that opens at most that many arrays and objects in all."""
    data = read_regular_file(path, max_bytes=max_bytes, what=what)
    return bounded_json.loads_object(
        data,
        max_bytes=max_bytes,
        max_depth=max_depth,
        what=f"{what} {path}",
        max_containers=max_containers,
    )
