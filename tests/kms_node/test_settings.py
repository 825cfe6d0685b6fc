"""Where a node's PINs may come from (issue 10): one source each, never beside the token
or the data, never readable by others."""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from kms_node.settings import NodeSettings, pin_file_mode_problem

BASE = """\
node_id = "node-1"
listen = "127.0.0.1:1"
chain_rpc_url = "http://127.0.0.1:2"
registry_address = "0x0000000000000000000000000000000000000001"
data_dir = "data"
hsm_token_label = "medkms-node-1"
dev_plaintext = true
"""


def _pin_file(path: Path, mode: int = 0o600) -> str:
    """Write a random PIN to ``path`` with ``mode``; return the PIN."""
    pin = secrets.token_hex(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pin + "\n")
    path.chmod(mode)
    return pin


def _config(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    config = tmp_path / "node.toml"
    config.write_text(BASE + extra)
    return config


def _load(tmp_path: Path, extra: str, environ: dict[str, str] | None = None) -> NodeSettings:
    return NodeSettings.from_toml(_config(tmp_path, extra), environ)


# --- where a PIN file may lie ----------------------------------------------------------------


def test_a_pin_file_outside_the_data_and_token_dirs_is_read(tmp_path: Path) -> None:
    pin = _pin_file(tmp_path / "secrets" / "user.pin")
    so_pin = _pin_file(tmp_path / "secrets" / "so.pin", 0o400)
    settings = _load(
        tmp_path,
        'hsm_pin_file = "secrets/user.pin"\nhsm_so_pin_file = "secrets/so.pin"\n'
        'softhsm_conf = "hsm/softhsm2.conf"\nsofthsm_token_dir = "hsm/tokens"\n',
    )
    assert settings.user_pin() == pin and settings.so_pin() == so_pin
    assert pin not in repr(settings) and so_pin not in repr(settings)


def test_a_pin_file_inside_the_data_dir_is_refused(tmp_path: Path) -> None:
    _pin_file(tmp_path / "data" / "user.pin")
    with pytest.raises(
        ConfigurationError, match=r"inside the data directory \(data_dir\)"
    ) as caught:
        _load(tmp_path, 'hsm_pin_file = "data/user.pin"\n')
    assert "Move the PIN file to a directory of its own" in str(caught.value)


@pytest.mark.parametrize("key", ["hsm_pin_file", "hsm_so_pin_file"])
def test_a_pin_file_inside_the_token_dir_is_refused(tmp_path: Path, key: str) -> None:
    _pin_file(tmp_path / "secrets" / "user.pin")
    _pin_file(tmp_path / "hsm" / "tokens" / "pin")
    other = "hsm_so_pin_file" if key == "hsm_pin_file" else "hsm_pin_file"
    with pytest.raises(ConfigurationError, match=rf"^{key} .* inside the SoftHSM token directory"):
        _load(
            tmp_path,
            f'{key} = "hsm/tokens/pin"\n{other} = "secrets/user.pin"\n'
            'softhsm_conf = "hsm/softhsm2.conf"\nsofthsm_token_dir = "hsm/tokens"\n',
        )


def test_the_token_dir_named_by_softhsm_conf_is_guarded_too(tmp_path: Path) -> None:
    """``serve`` needs no softhsm_token_dir: the configuration names the directory."""
    tokens = tmp_path / "elsewhere" / "tokens"
    conf = tmp_path / "hsm" / "softhsm2.conf"
    conf.parent.mkdir()
    conf.write_text(f"# comment\ndirectories.tokendir = {tokens}\nobjectstore.backend = file\n")
    _pin_file(tokens / "user.pin")
    with pytest.raises(ConfigurationError, match="inside the token directory softhsm_conf names"):
        _load(tmp_path, f'hsm_pin_file = "{tokens}/user.pin"\nsofthsm_conf = "hsm/softhsm2.conf"\n')
    # Beside a softhsm2.conf whose directory holds the tokens: a copy of it takes both.
    conf.write_text(f"directories.tokendir = {conf.parent / 'tokens'}\n")
    _pin_file(conf.parent / "user.pin")
    with pytest.raises(ConfigurationError, match="the directory of softhsm_conf, which holds the"):
        _load(tmp_path, 'hsm_pin_file = "hsm/user.pin"\nsofthsm_conf = "hsm/softhsm2.conf"\n')


def test_a_pin_file_reached_through_a_symlink_is_refused(tmp_path: Path) -> None:
    _pin_file(tmp_path / "data" / "user.pin")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "user.pin").symlink_to(tmp_path / "data" / "user.pin")
    with pytest.raises(
        ConfigurationError, match=r"resolved: .*/data/user.pin\) lies inside the data"
    ):
        _load(tmp_path, 'hsm_pin_file = "secrets/user.pin"\n')
    # A directory link the other way: the data directory is reached through a symlink.
    (tmp_path / "data-link").symlink_to(tmp_path / "data")
    with pytest.raises(ConfigurationError, match="lies inside the data directory"):
        _load(tmp_path, 'hsm_pin_file = "data-link/user.pin"\n')


def test_a_pin_file_reached_through_dotdot_is_refused(tmp_path: Path) -> None:
    _pin_file(tmp_path / "data" / "user.pin")
    (tmp_path / "secrets").mkdir()
    with pytest.raises(ConfigurationError, match="lies inside the data directory"):
        _load(tmp_path, 'hsm_pin_file = "secrets/../data/user.pin"\n')


@pytest.mark.parametrize("command", ["init", "serve", "rotate-kek"])
def test_every_command_refuses_a_pin_file_beside_the_data(tmp_path: Path, command: str) -> None:
    pin = _pin_file(tmp_path / "data" / "user.pin")
    config = _config(tmp_path, 'hsm_pin_file = "data/user.pin"\n')
    ran = _kms_node(command, config)
    assert ran.returncode == 1
    assert ran.stderr.startswith(f"kms-node: hsm_pin_file {tmp_path}/data/user.pin lies inside")
    assert pin not in ran.stderr


def _kms_node(
    command: str, config: Path, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own: it configures logging and loads the PKCS#11
    module for its whole process."""
    return subprocess.run(
        [sys.executable, "-m", "cli.node", command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        check=False,
    )


# --- one source per PIN ----------------------------------------------------------------------


def test_a_pin_from_the_environment(tmp_path: Path) -> None:
    pin = secrets.token_hex(16)
    settings = _load(tmp_path, 'hsm_pin_env = "MEDKMS_HSM_PIN"\n', {"MEDKMS_HSM_PIN": pin})
    assert settings.user_pin() == pin
    for shown in (repr(settings), str(settings.hsm_pin), repr(dataclasses.asdict(settings))):
        assert pin not in shown


def test_the_cli_reads_the_environment_at_start_up(tmp_path: Path) -> None:
    """`kms-node init` with no SoftHSM configuration reads the user PIN before it loads
    the module: with the variable unset it stops at the PIN, with it set at the module."""
    name = "MEDKMS_TEST_HSM_PIN"
    config = _config(
        tmp_path, f'hsm_pin_env = "{name}"\nhsm_module = "{tmp_path}/no-such-module.so"\n'
    )
    environ = {k: v for k, v in os.environ.items() if k != name}
    unset = _kms_node("init", config, environ)
    assert unset.returncode == 1
    assert f"environment variable {name} (named by hsm_pin_env) is not set" in unset.stderr
    pin = secrets.token_hex(16)
    given = _kms_node("init", config, {**environ, name: pin})
    assert given.returncode == 1
    assert "no-such-module.so not found" in given.stderr and pin not in given.stderr


def test_an_empty_or_unset_variable_is_refused_without_echoing_it(tmp_path: Path) -> None:
    settings = _load(tmp_path, 'hsm_pin_env = "MEDKMS_HSM_PIN"\n', {"MEDKMS_HSM_PIN": " \n"})
    with pytest.raises(
        ConfigurationError, match=r"MEDKMS_HSM_PIN \(named by hsm_pin_env\) is empty"
    ):
        settings.user_pin()
    with pytest.raises(ConfigurationError, match="must name an environment variable"):
        _load(tmp_path, 'hsm_pin_env = "1234-not-a-name"\n')


@pytest.mark.parametrize("setting", ["hsm_pin", "hsm_so_pin"])
def test_two_sources_for_one_pin_are_refused(tmp_path: Path, setting: str) -> None:
    _pin_file(tmp_path / "secrets" / "pin")
    keys = {"hsm_pin_file": "secrets/pin", f"{setting}_file": "secrets/pin", f"{setting}_env": "X"}
    with pytest.raises(
        ConfigurationError, match=rf"sets both {setting}_file and {setting}_env: name exactly one"
    ):
        _load(tmp_path, "".join(f'{k} = "{v}"\n' for k, v in keys.items()), {"X": "1234"})


def test_no_source_for_the_user_pin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="names no source for the token's user PIN"):
        _load(tmp_path, "")


def test_the_so_pin_is_needed_only_to_initialise(tmp_path: Path) -> None:
    _pin_file(tmp_path / "secrets" / "user.pin")
    settings = _load(tmp_path, 'hsm_pin_file = "secrets/user.pin"\n')
    with pytest.raises(ConfigurationError, match="hsm_so_pin_file or hsm_so_pin_env is required"):
        settings.so_pin()


# --- who may read a PIN file -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (0o600, None),
        (0o400, None),
        (0o640, "is accessible to its group (mode 0640): chmod 600 it"),
        (0o660, "is accessible to its group (mode 0660)"),
        (0o644, "is accessible to others (mode 0644): chmod 600 it"),
        (0o604, "is accessible to others (mode 0604)"),
    ],
)
def test_a_pin_file_readable_by_group_or_others_is_refused(
    tmp_path: Path, mode: int, refused: str | None
) -> None:
    pin = _pin_file(tmp_path / "secrets" / "user.pin", mode)
    settings = _load(tmp_path, 'hsm_pin_file = "secrets/user.pin"\n')
    if refused is None:
        assert settings.user_pin() == pin
        return
    with pytest.raises(ConfigurationError, match=r"^hsm_pin_file .*/secrets/user.pin ") as caught:
        settings.user_pin()
    assert refused in str(caught.value) and pin not in str(caught.value)


def test_group_read_is_accepted_only_through_the_group_of_a_mounted_secret() -> None:
    """A Kubernetes secret mounted with fsGroup: root-owned, mode 0440, the pod's group."""
    me, pod_group, groups = 1000, 2000, frozenset({2000})

    def mounted_problem(mode: int) -> str | None:
        return pin_file_mode_problem(mode, owner=0, group=pod_group, euid=me, groups=groups)

    assert mounted_problem(0o100440) is None
    assert mounted_problem(0o100400) is None
    assert mounted_problem(0o100460) is not None  # group write
    assert mounted_problem(0o100444) is not None  # world-readable
    # Its own file, or another group's, must be owner-only.
    assert pin_file_mode_problem(0o100440, me, pod_group, euid=me, groups=groups) is not None
    assert pin_file_mode_problem(0o100440, 0, 3000, euid=me, groups=groups) is not None


def test_a_pin_file_must_be_a_regular_file_of_bounded_size(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    os.mkfifo(tmp_path / "secrets" / "user.pin", 0o600)
    settings = _load(tmp_path, 'hsm_pin_file = "secrets/user.pin"\n')
    with pytest.raises(ConfigurationError, match="is not a regular file"):
        settings.user_pin()
    (tmp_path / "secrets" / "user.pin").unlink()
    _pin_file(tmp_path / "secrets" / "user.pin")
    (tmp_path / "secrets" / "user.pin").write_text("x" * 5000)
    with pytest.raises(ConfigurationError, match="is larger than 4096 bytes"):
        settings.user_pin()


def test_a_pin_file_that_is_a_directory_is_named_by_its_key_and_path(tmp_path: Path) -> None:
    """It used to fail as ``kms-node: Is a directory: 3``: the descriptor, not the file."""
    (tmp_path / "secrets").mkdir(mode=0o700)
    settings = _load(tmp_path, 'hsm_pin_file = "secrets"\n')
    with pytest.raises(ConfigurationError) as caught:
        settings.user_pin()
    assert caught.value.message == f"hsm_pin_file {tmp_path}/secrets is not a regular file"
    ran = _kms_node("init", _config(tmp_path, 'hsm_pin_file = "secrets"\n'))
    assert ran.returncode == 1
    assert ran.stderr == f"kms-node: hsm_pin_file {tmp_path}/secrets is not a regular file\n"


# --- confirmation depth (issue 12) -----------------------------------------------------------


def test_confirmations_default_to_none_and_are_read(tmp_path: Path) -> None:
    _pin_file(tmp_path / "secrets" / "user.pin")
    pin = 'hsm_pin_file = "secrets/user.pin"\n'
    assert _load(tmp_path, pin).chain_confirmations == 0
    assert _load(tmp_path, pin + "chain_confirmations = 12\n").chain_confirmations == 12


@pytest.mark.parametrize(
    ("setting", "value", "bounds"),
    [
        ("chain_confirmations", "-1", "0 and 1000"),
        ("chain_confirmations", "1001", "0 and 1000"),
        ("kfrag_cache_ttl_s", "-1", "0 and 3600 seconds"),  # ADR 13
        ("kfrag_cache_ttl_s", "3601", "0 and 3600 seconds"),
        # 0 used to pass here and crash the replay memory at start-up, unnamed
        ("request_window_s", "0", "1 and 3600 seconds"),
        ("request_window_s", "-300", "1 and 3600 seconds"),
        ("request_window_s", "3601", "1 and 3600 seconds"),
    ],
)
def test_bounded_settings_out_of_range_are_refused(
    tmp_path: Path, setting: str, value: str, bounds: str
) -> None:
    _pin_file(tmp_path / "secrets" / "user.pin")
    with pytest.raises(ConfigurationError, match=f"{setting} must be between {bounds}"):
        _load(tmp_path, f'hsm_pin_file = "secrets/user.pin"\n{setting} = {value}\n')


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_replay_memory_that_holds_no_nonce_is_refused(tmp_path: Path, value: str) -> None:
    """0 used to pass here and crash the replay memory at start-up, unnamed."""
    _pin_file(tmp_path / "secrets" / "user.pin")
    with pytest.raises(ConfigurationError, match="replay_max_entries must be at least 1"):
        _load(tmp_path, f'hsm_pin_file = "secrets/user.pin"\nreplay_max_entries = {value}\n')


# --- unwrapped kfrags kept in memory (ADR 13) ------------------------------------------------


def test_the_kfrag_cache_ttl_defaults_to_a_minute_and_is_read(tmp_path: Path) -> None:
    _pin_file(tmp_path / "secrets" / "user.pin")
    pin = 'hsm_pin_file = "secrets/user.pin"\n'
    assert _load(tmp_path, pin).kfrag_cache_ttl_s == 60.0
    assert _load(tmp_path, pin + "kfrag_cache_ttl_s = 0\n").kfrag_cache_ttl_s == 0.0


# --- how far ahead a signed request's deadline may lie -------------------------------------


def test_the_request_window_defaults_to_five_minutes_and_is_read_within_its_bounds(
    tmp_path: Path,
) -> None:
    _pin_file(tmp_path / "secrets" / "user.pin")
    pin = 'hsm_pin_file = "secrets/user.pin"\n'
    assert _load(tmp_path, pin).request_window_s == 300
    for value in (1, 3600):
        assert _load(tmp_path, pin + f"request_window_s = {value}\n").request_window_s == value


@pytest.mark.parametrize("node_id", ["", "node 1", "../node-1", "n" * 33, "nöde"])
def test_a_node_id_the_registry_would_refuse_is_refused_at_start_up(
    tmp_path: Path, node_id: str
) -> None:
    """The registry's rule (core/node_identity.py), checked before the node opens anything:
    the id names its files, its metrics and its entries in every audit log."""
    _pin_file(tmp_path / "secrets" / "user.pin")
    config = _config(tmp_path, 'hsm_pin_file = "secrets/user.pin"\n')
    assert NodeSettings.from_toml(config).node_id == "node-1"
    config.write_text(config.read_text().replace('"node-1"', f'"{node_id}"'))
    with pytest.raises(ConfigurationError, match=r"^node_id must be 1\.\.32 letters, digits"):
        NodeSettings.from_toml(config)
