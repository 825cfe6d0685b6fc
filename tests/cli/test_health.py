"""kms-health's own checks; its runs against real servers: tests/integration."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.health import local_target, main
from core.errors import ConfigurationError


@pytest.mark.parametrize(
    ("listen", "target"),
    [("0.0.0.0:7000", "127.0.0.1:7000"), ("[::]:7000", "[::1]:7000"), ("10.0.0.5:7", "10.0.0.5:7")],
)
def test_a_wildcard_listen_address_is_probed_on_loopback(listen: str, target: str) -> None:
    assert local_target(listen) == target


def test_a_malformed_listen_address_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="HOST:PORT"):
        local_target("7000")


@pytest.mark.parametrize("timeout", ["0", "-1", "61"])
def test_a_timeout_out_of_range_is_refused(timeout: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["node", "--config", str(tmp_path / "node.toml"), "--timeout", timeout])
    assert exited.value.code == 2


def test_a_missing_config_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coordinator", "--config", str(tmp_path / "absent.toml")]) == 2
    assert f"cannot read coordinator config {tmp_path}/absent.toml" in capsys.readouterr().err
