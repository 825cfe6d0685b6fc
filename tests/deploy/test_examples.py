"""The example files the README points a new operator to (deploy/examples/) load with
the real readers, name every key each reader knows, and show each optional key at the
default its settings class states (so an example cannot drift from the code)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from clients.sdk.connection_profile import PROFILE_KEYS, ConnectionProfile
from clients.sdk.records import validate_fhir
from coordinator.settings import CoordinatorSettings, NodeAddress
from core.errors import InvalidRequest
from core.record_types import RecordType
from core.settings_table import field_names
from deploy.sample_records import LAB_RESULT_EXAMPLE
from kms_node.settings import NodeSettings, node_config_keys

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
#: "# key = value": an optional setting shown at its default
_COMMENTED = re.compile(r"^# ([a-z_0-9]+) = (.+)$")


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy, as an operator makes one (the CA bundle the profile names beside it)."""
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy)
    (copy / "ca.crt").write_text("a CA bundle\n")
    return copy


def _keys(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys a file sets (top-level table) and the ones it shows commented out."""
    text = path.read_text()
    commented = {}
    for line in text.splitlines():
        if match := _COMMENTED.match(line):
            commented[match[1]] = tomllib.loads(f"v = {match[2]}")["v"]
    return tomllib.loads(text), commented


def _defaults(settings: type[Any]) -> dict[str, Any]:
    return {
        f.name: f.default
        for f in dataclasses.fields(settings)
        if f.default is not dataclasses.MISSING
    }


def _check_keys(path: Path, known: frozenset[str], settings: type[Any]) -> None:
    set_keys, commented = _keys(path)
    assert not set(set_keys) & set(commented), "a key both set and commented out"
    assert set(set_keys) | set(commented) == known
    defaults = _defaults(settings)
    for key, value in commented.items():
        if key in defaults:
            assert value == defaults[key], (key, value, defaults[key])


def test_the_node_example_loads_and_names_every_key(examples: Path) -> None:
    settings = NodeSettings.from_toml(examples / "node.toml", {})
    assert settings.node_id == "node-1"
    assert settings.data_dir == examples / "data"
    assert settings.hsm_pin.file == examples / "pins" / "user-pin"
    _check_keys(examples / "node.toml", node_config_keys(), NodeSettings)


def test_the_coordinator_example_loads_and_names_every_key(examples: Path) -> None:
    settings = CoordinatorSettings.from_toml(examples / "coordinator.toml")
    assert [n.node_id for n in settings.nodes] == ["node-1", "node-2", "node-3"]
    assert settings.threshold == 2
    _check_keys(
        examples / "coordinator.toml", field_names(CoordinatorSettings), CoordinatorSettings
    )
    nodes = tomllib.loads((examples / "coordinator.toml").read_text())["nodes"]
    assert all(set(node) == field_names(NodeAddress) for node in nodes)


def test_the_profile_example_loads_and_names_every_key(examples: Path) -> None:
    profile = ConnectionProfile.load(examples / "profile.toml")
    assert profile.coordinator() == ("127.0.0.1:7100", examples / "ca.crt")
    assert set(tomllib.loads((examples / "profile.toml").read_text())) == PROFILE_KEYS


def test_the_record_example_is_a_lab_result_the_sdk_accepts() -> None:
    document = LAB_RESULT_EXAMPLE.read_bytes()
    assert validate_fhir(document, RecordType.LAB_RESULT) == "Observation"
    with pytest.raises(InvalidRequest, match="a diagnosis record must be a FHIR Condition"):
        validate_fhir(document, RecordType.DIAGNOSIS)
