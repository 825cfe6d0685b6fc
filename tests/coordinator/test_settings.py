"""The coordinator's settings: bounds checked at start-up, naming the setting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from core.errors import ConfigurationError
from core.settings_table import MAX_SETTINGS_FILE_BYTES
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


def _refused(config: Path) -> str:
    with pytest.raises(ConfigurationError) as caught:
        CoordinatorSettings.from_toml(config)
    return caught.value.message


# --- the file itself: refused naming it, never a traceback or a hang ------------------------


@pytest.mark.timeout(10)  # a plain read of a FIFO waits for a writer forever
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_config_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "coordinator.toml"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "device":
        config = Path("/dev/zero")  # a plain read fills the memory, then MemoryError
    else:
        config.mkdir()
    assert _refused(config) == f"coordinator config {config} is not a regular file"


def test_a_config_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(MINIMAL + NODE + "#" * MAX_SETTINGS_FILE_BYTES + "\n")
    assert _refused(config) == f"coordinator config {config} is larger than 65536 bytes"


def test_a_config_that_is_not_utf8_or_not_toml_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_bytes(b"\xff" + (MINIMAL + NODE).encode())
    assert _refused(config) == (
        f"cannot read coordinator config {config}: not UTF-8 text (at byte 0)"
    )
    config.write_text("threshold = \n")
    assert _refused(config).startswith(f"cannot read coordinator config {config}: not TOML: ")


def test_arrays_nested_deeper_than_the_parser_recurses_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text("nodes = " + "[" * 20_000 + "]" * 20_000 + "\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's own: importing py_ecc raises it to 100,000
    try:
        message = _refused(config)
    finally:
        sys.setrecursionlimit(limit)
    assert message == f"cannot read coordinator config {config}: arrays or tables nested too deep"


# --- each value's type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # used to escape as TypeError: 'int' object is not iterable
        (MINIMAL + "nodes = 5\n", "nodes must be an array, got int"),
        (MINIMAL + 'nodes = ["a"]\n', "[[nodes]] 1 must be a table, got str"),
        (MINIMAL + NODE + '[[nodes]]\nnode_id = 2\naddress = "h:1"\n', None),
        (MINIMAL.replace("threshold = 1", 'threshold = "1"') + NODE, "threshold must be an "),
        (MINIMAL.replace("threshold = 1", "threshold = true") + NODE, "threshold must be an "),
        (MINIMAL.replace("threshold = 1", "threshold = 1.0") + NODE, "threshold must be an "),
        (MINIMAL + 'node_timeout_s = "3"\n' + NODE, "node_timeout_s must be a number, got str"),
        (MINIMAL + "requester_burst = 1e3\n" + NODE, "requester_burst must be an integer, got"),
        (MINIMAL + 'verify_every_fragment = "yes"\n' + NODE, "verify_every_fragment must be "),
        (MINIMAL + "tls_cert = 5\n" + NODE, "tls_cert must be a string, got int"),
        (MINIMAL + "log_level = []\n" + NODE, "log_level must be a string, got list"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key_and_the_type(
    tmp_path: Path, text: str, message: str | None
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(text)
    if message is None:  # a key of a [[nodes]] table: named with the table's place
        assert _refused(config) == (
            f"coordinator config {config} [[nodes]] 2: node_id must be a string, got int"
        )
    else:
        assert _refused(config).startswith(f"coordinator config {config}: {message}")


def test_an_integer_for_a_number_setting_is_read_as_a_number(tmp_path: Path) -> None:
    settings = _load(tmp_path, "node_timeout_s = 2\n")
    assert settings.node_timeout_s == 2.0 and type(settings.node_timeout_s) is float


# --- each value's range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("node_timeout_s = nan", "node_timeout_s must be a finite number"),
        ("node_timeout_s = inf", "node_timeout_s must be a finite number"),
        ("served_memory_s = nan", "served_memory_s must be a finite number"),
        ("served_memory_s = inf", "served_memory_s must be a finite number"),
        ("patient_cache_s = inf", "patient_cache_s must be a finite number"),
        ("patient_cache_s = -1", "patient_cache_s must be >= 0"),
        ("requester_rate_per_s = nan", "requester_rate_per_s must be a finite number"),
        ("peer_refusals_per_s = -inf", "peer_refusals_per_s must be a finite number"),
        ("node_timeout_s = 0", "node_timeout_s must be positive"),
        ("requester_burst = 0", "requester_burst and peer_refusal_burst must be at least 1"),
        ("peer_refusal_burst = -5", "requester_burst and peer_refusal_burst must be at least 1"),
    ],
)
def test_a_number_out_of_its_range_is_refused(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _load(tmp_path, line + "\n")
    assert caught.value.message == message


def test_an_unknown_log_level_is_refused_at_validation(tmp_path: Path) -> None:
    """It used to pass here and fail at logging set-up with a ValueError traceback."""
    with pytest.raises(ConfigurationError) as caught:
        _load(tmp_path, 'log_level = "bogus"\n')
    assert caught.value.message == "log_level must be one of debug, info, warning, error, critical"
    assert _load(tmp_path, 'log_level = "DEBUG"\n').log_level == "DEBUG"
