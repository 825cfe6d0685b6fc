"""Reading a local file a person pointed a program at: a regular file only, bounded in size.

:func:`refuses_without_waiting` is for every reader of such a file: a FIFO must be refused
at once, and a reader that waits on one fails the test instead of hanging the suite."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import InvalidRequest
from core.local_files import read_regular_file

#: how long a reader may take to refuse a FIFO before it counts as waiting on it
PATIENCE_SECONDS = 5.0


def refuses_without_waiting(fifo: Path, read: Callable[[], object]) -> BaseException:
    """What ``read`` raised, given that it reads ``fifo``; fails the test if it waited for
    a writer (a blocking ``open``), and then opens the FIFO for writing to free it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read()
            outcome.append(None)
        except BaseException as e:  # handed to the test
            outcome.append(e)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(PATIENCE_SECONDS)
    if reader.is_alive():
        # The reader is blocked in open(): a writer's open and close let it go on.
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join(PATIENCE_SECONDS)
        pytest.fail(f"reading {fifo} waited for a writer instead of refusing the FIFO")
    assert outcome, "the reader thread ended without an outcome"
    error = outcome[0]
    assert error is not None, f"reading the FIFO {fifo} succeeded"
    return error


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_at_once(fifo: Path) -> None:
    error = refuses_without_waiting(
        fifo, lambda: read_regular_file(fifo, max_bytes=100, what="config")
    )
    assert isinstance(error, InvalidRequest)
    assert error.message == f"config {fifo} is not a regular file"


def test_a_device_is_refused_unread() -> None:
    # /dev/zero never ends: read to its bound, it would fill the memory of a large one.
    with pytest.raises(InvalidRequest, match="^key file /dev/zero is not a regular file$"):
        read_regular_file(Path("/dev/zero"), max_bytes=1 << 40, what="key file")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    # On Linux a directory opens read-only; fstat then tells it from a file.
    with pytest.raises(InvalidRequest, match=f"^receipts {tmp_path} is not a regular file$"):
        read_regular_file(tmp_path, max_bytes=100, what="receipts")


def test_a_file_of_the_bound_is_read_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, max_bytes=100, what="f") == b"x" * 100
    path.write_bytes(b"x" * 101)
    with pytest.raises(InvalidRequest, match=f"^profile {path} is larger than 100 bytes$"):
        read_regular_file(path, max_bytes=100, what="profile")


def test_an_empty_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert read_regular_file(path, max_bytes=0, what="f") == b""


def test_a_missing_file_is_the_callers_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised:
        read_regular_file(tmp_path / "absent", max_bytes=100, what="f")
    assert raised.value.filename == str(tmp_path / "absent")


def test_the_descriptor_is_not_left_open(tmp_path: Path, fifo: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        read_regular_file(path, max_bytes=100, what="f")
        with pytest.raises(InvalidRequest):
            read_regular_file(path, max_bytes=5, what="f")
        with pytest.raises(InvalidRequest):
            read_regular_file(fifo, max_bytes=5, what="f")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_check_judges_the_file_opened_and_its_problem_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(b"1234")
    path.chmod(0o644)
    seen: list[int] = []

    def no_others(info: os.stat_result) -> str | None:
        seen.append(info.st_ino)
        return "is readable by others" if info.st_mode & 0o004 else None

    with pytest.raises(InvalidRequest, match=f"^pin {path} is readable by others$"):
        read_regular_file(path, max_bytes=100, what="pin", check=no_others)
    assert seen == [path.stat().st_ino]
    path.chmod(0o600)
    assert read_regular_file(path, max_bytes=100, what="pin", check=no_others) == b"1234"
    # a FIFO is refused before any check sees it
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidRequest, match="is not a regular file"):
        read_regular_file(fifo, max_bytes=100, what="pin", check=no_others)
    assert len(seen) == 2
