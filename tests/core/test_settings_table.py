"""Settings read from TOML take each default from the dataclass field that states it."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from core.settings_table import value_or_default
from kms_node.settings import NodeSettings


@dataclasses.dataclass(frozen=True)
class Example:
    required: str
    rate: float = 2.5


def test_a_value_the_table_sets_else_the_fields_default() -> None:
    assert value_or_default({"rate": 9.0}, Example, "rate") == 9.0
    assert value_or_default({}, Example, "rate") == 2.5
    with pytest.raises(KeyError, match="required"):
        value_or_default({}, Example, "required")


def _defaults(settings_class: type[object], loaded: object, skip: set[str]) -> list[str]:
    """Names of fields with a default whose loaded value differs from it."""
    return [
        f.name
        for f in dataclasses.fields(settings_class)  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING
        and f.name not in skip
        and getattr(loaded, f.name) != f.default
    ]


def test_a_minimal_node_config_has_every_default_of_the_dataclass(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    pin = tmp_path / "secrets" / "user.pin"
    pin.parent.mkdir()
    pin.write_text(secrets.token_hex(16))
    pin.chmod(0o600)
    config = tmp_path / "node.toml"
    config.write_text(
        'node_id = "node-1"\nlisten = "127.0.0.1:7001"\n'
        'chain_rpc_url = "http://127.0.0.1:8545"\n'
        'registry_address = "0x' + "ab" * 20 + '"\n'
        'data_dir = "data"\nhsm_token_label = "node-1"\n'
        'hsm_pin_file = "secrets/user.pin"\ndev_plaintext = true\n'
    )
    settings = NodeSettings.from_toml(config, {})
    # The PIN source and dev_plaintext are set above; the rest take the field's default.
    assert _defaults(NodeSettings, settings, {"hsm_pin", "dev_plaintext"}) == []


def test_a_minimal_coordinator_config_has_every_default_of_the_dataclass(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        'listen = "127.0.0.1:7000"\nthreshold = 1\n'
        'chain_rpc_url = "http://127.0.0.1:8545"\n'
        'registry_address = "0x' + "ab" * 20 + '"\ndev_plaintext = true\n'
        '[[nodes]]\nnode_id = "node-1"\naddress = "127.0.0.1:7001"\n'
    )
    settings = CoordinatorSettings.from_toml(config)
    assert _defaults(CoordinatorSettings, settings, {"dev_plaintext"}) == []
