"""node.toml as hostile or careless input: whatever the file holds, the node refuses it with
a ConfigurationError naming the file and the key, never a traceback, a hang or a setting
that silently disables a protection (a review fed these to `kms-node`)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.settings_table import MAX_SETTINGS_FILE_BYTES
from kms_node.settings import NodeSettings
from tests.kms_node import test_settings

#: the PIN tests' minimal node.toml, with its PIN file named
BASE = test_settings.BASE + 'hsm_pin_file = "secrets/user.pin"\n'


def _config(tmp_path: Path, extra: str = "") -> Path:
    """A valid node.toml with ``extra`` keys, beside its data directory and PIN file."""
    (tmp_path / "data").mkdir(exist_ok=True)
    pin = tmp_path / "secrets" / "user.pin"
    pin.parent.mkdir(exist_ok=True)
    pin.write_text(secrets.token_hex(16))
    pin.chmod(0o600)
    config = tmp_path / "node.toml"
    config.write_text(BASE + extra)
    return config


def _refused(config: Path) -> str:
    with pytest.raises(ConfigurationError) as caught:
        NodeSettings.from_toml(config, {})
    return caught.value.message


# --- the file itself -------------------------------------------------------------------------


@pytest.mark.timeout(10)  # a plain read of a FIFO waits for a writer forever
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_config_that_is_no_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "node.toml"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "device":
        config = Path("/dev/zero")  # a plain read fills the memory, then MemoryError
    else:
        config.mkdir()
    assert _refused(config) == f"node config {config} is not a regular file"


def test_a_config_larger_than_the_bound_is_refused_unparsed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    padding = MAX_SETTINGS_FILE_BYTES - len(config.read_bytes())
    config.write_text(BASE + "#" * (padding - 1) + "\n")  # exactly the bound: read
    assert NodeSettings.from_toml(config, {}).node_id == "node-1"
    config.write_text(BASE + "#" * padding + "\n")
    assert _refused(config) == f"node config {config} is larger than 65536 bytes"


def test_a_config_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.write_bytes(BASE.encode() + b'log_level = "\xff"\n')
    assert _refused(config) == (
        f"cannot read node config {config}: not UTF-8 text (at byte {len(BASE) + 13})"
    )


@contextmanager
def _recursion_limit(limit: int) -> Iterator[None]:
    """The node runs with py_ecc's recursion limit, 100,000 (importing it raises the limit);
    Python's own is 1,000."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def test_arrays_nested_deeper_than_the_parser_recurses_are_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "max_workers = " + "[" * 20_000 + "]" * 20_000 + "\n")
    with _recursion_limit(1000):
        message = _refused(config)
    assert message == f"cannot read node config {config}: arrays or tables nested too deep"


def test_arrays_nested_as_deep_as_the_bound_allows_are_refused_by_type(tmp_path: Path) -> None:
    """At py_ecc's limit the deepest nesting that fits in the bound is parsed, then refused."""
    depth = (MAX_SETTINGS_FILE_BYTES - len(BASE) - len("max_workers = \n")) // 2
    config = _config(tmp_path, "max_workers = " + "[" * depth + "]" * depth + "\n")
    with _recursion_limit(100_000):
        message = _refused(config)
    assert message == f"node config {config}: max_workers must be an integer, got list"


def test_arrays_nested_300000_deep_are_refused_by_size(tmp_path: Path) -> None:
    config = _config(tmp_path, "x = " + "[" * 300_000 + "]" * 300_000 + "\n")
    assert _refused(config) == f"node config {config} is larger than 65536 bytes"


def test_a_missing_or_malformed_config_is_named(tmp_path: Path) -> None:
    assert _refused(tmp_path / "absent.toml") == (
        f"cannot read node config {tmp_path}/absent.toml: No such file or directory"
    )
    config = _config(tmp_path, "node_id = [\n")
    assert _refused(config).startswith(f"cannot read node config {config}: not TOML: ")


# --- each value's type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('registry_start_block = "abc"', "registry_start_block must be an integer, got str"),
        ("max_workers = [1, 2]", "max_workers must be an integer, got list"),
        ("max_workers = inf", "max_workers must be an integer, got float"),
        ("max_workers = 2.0", "max_workers must be an integer, got float"),
        ("processes = true", "processes must be an integer, got bool"),
        ('rate_limit_per_s = "fast"', "rate_limit_per_s must be a number, got str"),
        ("rate_limit_per_s = false", "rate_limit_per_s must be a number, got bool"),
        ("rate_limit_per_s = 1" + "0" * 400, "rate_limit_per_s must be a finite number"),
        ('anchoring = "yes"', "anchoring must be true or false, got str"),
        ("anchoring = 1", "anchoring must be true or false, got int"),
        ("log_level = 10", "log_level must be a string, got int"),
        ("tls_cert = {}", "tls_cert must be a string, got dict"),
        ("softhsm_conf = 1979-05-27", "softhsm_conf must be a string, got date"),
        ("hsm_module = 5", "hsm_module must be a string, got int"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key_and_the_type(
    tmp_path: Path, line: str, message: str
) -> None:
    config = _config(tmp_path, line + "\n")
    assert _refused(config) == f"node config {config}: {message}"


@pytest.mark.parametrize("key", ["node_id", "listen", "data_dir", "hsm_token_label"])
def test_a_required_string_of_another_type_is_refused(tmp_path: Path, key: str) -> None:
    """``str(5)`` would have made node id "5", and ``Path("5")`` a data directory."""
    config = _config(tmp_path)
    config.write_text(BASE.replace(f'{key} = "', f"{key} = 5 #"))
    assert _refused(config) == f"node config {config}: {key} must be a string, got int"


@pytest.mark.parametrize("key", ["hsm_pin_file", "hsm_pin_env"])
def test_a_pin_source_of_another_type_is_refused_without_echoing_it(
    tmp_path: Path, key: str
) -> None:
    pin = str(secrets.randbelow(10**8) + 10**8)  # a PIN written where its source belongs
    config = _config(tmp_path)
    config.write_text(BASE.replace('hsm_pin_file = "secrets/user.pin"', f"{key} = {pin}"))
    message = _refused(config)
    assert message == f"node config {config}: {key} must be a string, got int"
    assert pin not in message


def test_an_integer_for_a_number_setting_is_read_as_a_number(tmp_path: Path) -> None:
    settings = NodeSettings.from_toml(_config(tmp_path, "rate_limit_per_s = 100\n"), {})
    assert settings.rate_limit_per_s == 100.0 and type(settings.rate_limit_per_s) is float


# --- each value's range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # NaN used to pass, and RateLimiter(nan, 200) let every request through
        ("rate_limit_per_s = nan", "rate_limit_per_s must be a finite number"),
        ("rate_limit_per_s = inf", "rate_limit_per_s must be a finite number"),
        ("rate_limit_per_s = 0", "rate_limit_per_s must be positive"),
        ("rate_limit_per_s = -1.5", "rate_limit_per_s must be positive"),
        ("rate_limit_burst = -5", "rate_limit_burst must be at least 1"),
        ("rate_limit_burst = 0", "rate_limit_burst must be at least 1"),
        ("anchor_interval_s = inf", "anchor_interval_s must be a finite number"),
        ("anchor_interval_s = nan", "anchor_interval_s must be a finite number"),
        ("chain_max_age_s = inf", "chain_max_age_s must be a finite number"),
        ("chain_poll_interval_s = -inf", "chain_poll_interval_s must be a finite number"),
        ("index_snapshot_interval_s = nan", "index_snapshot_interval_s must be a finite number"),
        ("kfrag_cache_ttl_s = nan", "kfrag_cache_ttl_s must be a finite number"),
    ],
)
def test_a_number_out_of_its_range_is_refused(tmp_path: Path, line: str, message: str) -> None:
    assert _refused(_config(tmp_path, line + "\n")) == message


@pytest.mark.parametrize("level", ["bogus", "", "warn ing"])
def test_an_unknown_log_level_is_refused_at_validation(tmp_path: Path, level: str) -> None:
    """It used to pass here and fail at logging set-up with a ValueError traceback."""
    message = _refused(_config(tmp_path, f'log_level = "{level}"\n'))
    assert message == "log_level must be one of debug, info, warning, error, critical"


@pytest.mark.parametrize("level", ["debug", "WARNING", "Error"])
def test_a_log_level_is_read_in_any_case(tmp_path: Path, level: str) -> None:
    """core/logs.py upper-cases it, as the logging module names its levels."""
    settings = NodeSettings.from_toml(_config(tmp_path, f'log_level = "{level}"\n'), {})
    assert settings.log_level == level


# --- through the CLI: one line on stderr, no traceback ---------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('log_level = "bogus"\n', "log_level must be one of debug, info, warning"),
        ("max_workers = [1, 2]\n", "max_workers must be an integer, got list"),
    ],
)
def test_the_cli_reports_a_bad_value_in_one_line(tmp_path: Path, extra: str, message: str) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "cli.node", "init", "--config", str(_config(tmp_path, extra))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1
    assert message in ran.stderr and "Traceback" not in ran.stderr
    assert ran.stderr.startswith("kms-node: ") and ran.stderr.count("\n") == 1
