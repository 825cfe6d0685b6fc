"""The node reports NOT_SERVING while a check fails, SERVING again when none does, and
logs each change once (kms_node/readiness.py)."""

from __future__ import annotations

import os
from pathlib import Path

from structlog.testing import capture_logs

from kms_node.readiness import Readiness, data_dir_writable


def test_each_change_is_reported_and_logged_once() -> None:
    problem: list[str | None] = [None]
    reported: list[bool] = []
    readiness = Readiness([lambda: problem[0]], reported.append)
    with capture_logs() as logs:
        assert readiness.check_now() == []
        problem[0] = "last chain sync was 5.0s ago"
        assert readiness.check_now() == ["last chain sync was 5.0s ago"]
        readiness.check_now()
        problem[0] = None
        readiness.check_now()
    assert reported == [True, False, True]
    assert [e["event"] for e in logs] == ["node_serving", "node_not_serving", "node_serving"]
    assert logs[1]["problems"] == ["last chain sync was 5.0s ago"]


def test_every_failing_check_is_named() -> None:
    readiness = Readiness([lambda: "a", lambda: None, lambda: "b"], lambda _: None)
    assert readiness.check_now() == ["a", "b"]


def test_a_data_directory_that_takes_a_write_passes_and_keeps_nothing(tmp_path: Path) -> None:
    assert data_dir_writable(tmp_path)() is None
    assert list(tmp_path.iterdir()) == []


def test_a_data_directory_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    problem = data_dir_writable(gone)()
    assert problem is not None and str(gone) in problem and "No such file" in problem
    # As root, permissions do not stop a write; a directory replaced by a file does.
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    problem = data_dir_writable(blocked)()
    assert problem is not None and os.strerror(20) in problem  # ENOTDIR
