"""The coordinator's settings: bounds checked at start-up, naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from core.errors import ConfigurationError
from proto import rpc

MINIMAL = (
    'listen = "127.0.0.1:7000"\nthreshold = 1\n'
    'chain_rpc_url = "http://127.0.0.1:8545"\n'
    'registry_address = "0x' + "ab" * 20 + '"\ndev_plaintext = true\n'
)
NODE = '[[nodes]]\nnode_id = "node-1"\naddress = "127.0.0.1:7001"\n'


def _load(tmp_path: Path, extra: str = "") -> CoordinatorSettings:
    config = tmp_path / "coordinator.toml"
    config.write_text(MINIMAL + extra + NODE)  # top-level keys before the [[nodes]] table
    return CoordinatorSettings.from_toml(config)


def test_the_request_window_defaults_to_five_minutes_and_is_read_within_its_bounds(
    tmp_path: Path,
) -> None:
    assert _load(tmp_path).request_window_s == 300
    for value in (1, 3600):
        assert _load(tmp_path, f"request_window_s = {value}\n").request_window_s == value


@pytest.mark.parametrize("value", ["0", "-300", "3601"])
def test_a_request_window_out_of_bounds_is_refused_naming_it(tmp_path: Path, value: str) -> None:
    with pytest.raises(
        ConfigurationError, match=r"^request_window_s must be between 1 and 3600 seconds$"
    ):
        _load(tmp_path, f"request_window_s = {value}\n")


def test_a_negative_served_memory_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^served_memory_s must be >= 0$"):
        _load(tmp_path, "served_memory_s = -1\n")


def test_a_threshold_above_what_apps_accept_answers_for_is_refused(tmp_path: Path) -> None:
    """A coordinator's batch answers grow with its threshold, and apps accept answers of
    threshold MAX_THRESHOLD at most (proto/rpc.py)."""
    nodes = "".join(
        f'[[nodes]]\nnode_id = "node-{i}"\naddress = "127.0.0.1:{7001 + i}"\n'
        for i in range(rpc.MAX_THRESHOLD + 1)
    )
    config = tmp_path / "coordinator.toml"
    at_most = MINIMAL.replace("threshold = 1", f"threshold = {rpc.MAX_THRESHOLD}")
    config.write_text(at_most + nodes)
    assert CoordinatorSettings.from_toml(config).threshold == rpc.MAX_THRESHOLD
    config.write_text(
        at_most.replace(f"= {rpc.MAX_THRESHOLD}", f"= {rpc.MAX_THRESHOLD + 1}") + nodes
    )
    with pytest.raises(ConfigurationError, match=r"^threshold must be at most 64: "):
        CoordinatorSettings.from_toml(config)


@pytest.mark.parametrize("node_id", ["", "node 1", "../node-1", "n" * 33])
def test_a_node_id_the_registry_would_refuse_is_refused_naming_it(
    tmp_path: Path, node_id: str
) -> None:
    """The registry's rule for node ids (core/node_identity.py): a coordinator naming a
    node by an id no node can hold would never reach it."""
    config = tmp_path / "coordinator.toml"
    config.write_text(MINIMAL + NODE.replace('"node-1"', f'"{node_id}"'))
    with pytest.raises(ConfigurationError, match=r"^\[\[nodes\]\]: node_id must be 1\.\.32 "):
        CoordinatorSettings.from_toml(config)
    config.write_text(MINIMAL + NODE.replace('"node-1"', '"n' + "1" * 31 + '"'))
    assert CoordinatorSettings.from_toml(config).nodes[0].node_id == "n" + "1" * 31
