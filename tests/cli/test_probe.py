"""`kmsctl provider probe`'s bounds, checked before any party or chain is reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.kmsctl import MAX_PROBE_READERS, MAX_PROBE_SECONDS
from tests.cli.test_account import kmsctl


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--seconds", "0", "--seconds must be in"),
        ("--seconds", str(MAX_PROBE_SECONDS + 1), "--seconds must be in"),
        ("--readers", "0", "--readers must be in"),
        ("--readers", str(MAX_PROBE_READERS + 1), "--readers must be in"),
    ],
)
def test_a_probe_out_of_bounds_is_refused(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    args = ["provider", "probe", "00" * 32, "--seconds", "1", "--out", str(tmp_path / "p")]
    code, _, err = kmsctl(*args, option, value, "--state-dir", str(tmp_path / "none"))
    assert code == 1
    assert message in err
    assert not (tmp_path / "p").exists()
