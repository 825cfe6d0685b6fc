"""Reading a local file the SDK or ``kmsctl`` is pointed at (clients/sdk/input_files.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from clients.sdk.input_files import load_json, load_json_object
from core.errors import InvalidRequest
from tests.core.test_local_files import refuses_without_waiting

#: each reader of the module, on a file given as a "record file"
READERS: dict[str, Callable[[Path], object]] = {
    "load_json": lambda path: load_json(path, max_bytes=100, max_depth=2, what="record file"),
    "load_json_object": lambda path: load_json_object(
        path, max_bytes=100, max_depth=2, what="record file"
    ),
}


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_a_fifo_is_refused_without_waiting_for_a_writer(
    tmp_path: Path, read: Callable[[Path], object]
) -> None:
    """``kmsctl ... --receipts FIFO`` (or a password file, a record file) used to hang."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = refuses_without_waiting(fifo, lambda: read(fifo))
    assert isinstance(error, InvalidRequest)
    assert error.message == f"record file {fifo} is not a regular file"


def test_a_number_json_makes_infinite_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(b'{"n": 1e400}')
    with pytest.raises(InvalidRequest, match=f"^state {path} is not JSON: a number too large"):
        load_json_object(path, max_bytes=100, max_depth=1, what="state")
