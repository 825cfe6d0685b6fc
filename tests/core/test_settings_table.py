"""Settings read from TOML take each default from the dataclass field that states it."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from core.errors import ConfigurationError
from core.settings_table import reject_unknown_keys, value_or_default
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


def test_an_unknown_key_is_refused_by_name_with_the_closest_known_one() -> None:
    reject_unknown_keys({"rate": 1}, ["rate", "required"], where="x.toml")
    with pytest.raises(ConfigurationError) as excinfo:
        reject_unknown_keys({"rates": 1}, ["rate", "required"], where="x.toml")
    assert excinfo.value.message.startswith("x.toml: unknown key 'rates' (did you mean 'rate'?)")
    assert "known: rate, required" in excinfo.value.message


MINIMAL_NODE = (
    'node_id = "node-1"\nlisten = "127.0.0.1:7001"\n'
    'chain_rpc_url = "http://127.0.0.1:8545"\n'
    'registry_address = "0x' + "ab" * 20 + '"\n'
    'data_dir = "data"\nhsm_token_label = "node-1"\n'
    'hsm_pin_file = "secrets/user.pin"\ndev_plaintext = true\n'
)
MINIMAL_COORDINATOR = (
    'listen = "127.0.0.1:7000"\nthreshold = 1\n'
    'chain_rpc_url = "http://127.0.0.1:8545"\n'
    'registry_address = "0x' + "ab" * 20 + '"\ndev_plaintext = true\n'
    '[[nodes]]\nnode_id = "node-1"\naddress = "127.0.0.1:7001"\n'
)


def _node_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    pin = tmp_path / "secrets" / "user.pin"
    pin.parent.mkdir(exist_ok=True)
    pin.write_text(secrets.token_hex(16))
    pin.chmod(0o600)
    config = tmp_path / "node.toml"
    config.write_text(text)
    return config


def test_a_minimal_node_config_has_every_default_of_the_dataclass(tmp_path: Path) -> None:
    settings = NodeSettings.from_toml(_node_config(tmp_path, MINIMAL_NODE), {})
    # The PIN source and dev_plaintext are set above; the rest take the field's default.
    assert _defaults(NodeSettings, settings, {"hsm_pin", "dev_plaintext"}) == []


def test_a_minimal_coordinator_config_has_every_default_of_the_dataclass(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(MINIMAL_COORDINATOR)
    settings = CoordinatorSettings.from_toml(config)
    assert _defaults(CoordinatorSettings, settings, {"dev_plaintext"}) == []


def test_a_typo_in_node_toml_is_refused_naming_the_key_and_the_file(tmp_path: Path) -> None:
    # Silently ignored, this typo would leave the node judging at the head of a chain
    # that reorganises.
    config = _node_config(tmp_path, MINIMAL_NODE + "chain_confirmation = 3\n")
    with pytest.raises(ConfigurationError) as excinfo:
        NodeSettings.from_toml(config, {})
    assert f"node config {config}: unknown key 'chain_confirmation'" in excinfo.value.message
    assert "did you mean 'chain_confirmations'?" in excinfo.value.message
    # Both sources of each PIN are keys it knows.
    env = _node_config(tmp_path, MINIMAL_NODE + 'hsm_so_pin_env = "SO_PIN"\n')
    assert NodeSettings.from_toml(env, {"SO_PIN": "x"}).hsm_so_pin is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL_COORDINATOR.replace("threshold", "treshold"), "unknown key 'treshold'"),
        (MINIMAL_COORDINATOR + 'adress = "x"\n', r"\[\[nodes\]\] 1: unknown key 'adress'"),
    ],
)
def test_a_typo_in_coordinator_toml_is_refused_naming_the_key_and_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(text)
    with pytest.raises(ConfigurationError, match=f"coordinator config {config}.*{message}"):
        CoordinatorSettings.from_toml(config)
