from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from eth_account import Account

from clients.sdk.connection_profile import ConnectionProfile
from core.errors import ConfigurationError
from tests.core.test_local_files import refuses_without_waiting

REGISTRY = str(Account.create().address)
FULL = f'''chain_id = 31337
chain_rpc_url = "http://127.0.0.1:8545"
registry_address = "{REGISTRY.lower()}"
coordinator_address = "coordinator.example:7443"
tls_ca_cert = "ca.pem"
threshold = 3
'''


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "ca.pem").write_text("a CA bundle")
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return path


def test_a_full_profile_is_read(tmp_path: Path) -> None:
    profile = ConnectionProfile.load(_write(tmp_path, FULL))
    assert profile.chain_id == 31337
    assert profile.registry_address == REGISTRY  # checksummed
    assert profile.coordinator() == ("coordinator.example:7443", tmp_path / "ca.pem")
    assert profile.threshold == 3


def test_an_admins_profile_names_no_coordinator(tmp_path: Path) -> None:
    text = "\n".join(FULL.splitlines()[:3])
    profile = ConnectionProfile.load(_write(tmp_path, text))
    assert profile.threshold is None
    with pytest.raises(ConfigurationError, match="coordinator_address and tls_ca_cert"):
        profile.coordinator()


def _without(key: str) -> str:
    return "\n".join(line for line in FULL.splitlines() if not line.startswith(key))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (_without("chain_id"), "chain_id is missing"),
        (_without("chain_rpc_url"), "chain_rpc_url is missing"),
        (_without("registry_address"), "registry_address is missing"),
        (FULL + "treshold = 2\n", "unknown key 'treshold'"),
        (FULL.replace("31337", '"31337"'), "chain_id must be an integer"),
        (FULL.replace("31337", "0"), "chain_id must be an integer"),
        (FULL.replace("http://", "ftp://"), "chain_rpc_url must be an http"),
        (FULL.replace(REGISTRY.lower(), "0x1234"), "registry_address must be"),
        (FULL.replace("coordinator.example:7443", "nowhere"), "must look like HOST:PORT"),
        (FULL.replace("ca.pem", "missing.pem"), "missing.pem is not a file"),
        (FULL.replace("threshold = 3", "threshold = 0"), "threshold must be an integer"),
        (FULL.replace("threshold = 3", "threshold = true"), "threshold must be an integer"),
        ("chain_id = [", "is not TOML"),
        ("x" * 20_000, "larger than 16384 bytes"),
    ],
    ids=[
        "no-chain-id",
        "no-url",
        "no-registry",
        "typo",
        "chain-id-text",
        "chain-id-zero",
        "not-http",
        "bad-registry",
        "bad-coordinator",
        "no-ca-file",
        "threshold-zero",
        "threshold-bool",
        "not-toml",
        "oversize",
    ],
)
def test_a_bad_profile_is_a_clear_configuration_error(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigurationError, match=fragment) as excinfo:
        ConnectionProfile.load(path)
    assert str(path) in excinfo.value.message


def test_a_profile_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        ConnectionProfile.load(path)


def test_a_missing_profile_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read profile .*nothing.toml"):
        ConnectionProfile.load(tmp_path / "nothing.toml")


def test_an_integer_of_more_digits_than_python_converts_is_refused(tmp_path: Path) -> None:
    """tomllib raises ValueError (not TOMLDecodeError) past 4300 digits: it was a
    traceback, and its text is no TOML message."""
    path = _write(tmp_path, FULL.replace("chain_id = 31337", "chain_id = " + "9" * 5000))
    with pytest.raises(ConfigurationError) as raised:
        ConnectionProfile.load(path)
    assert raised.value.message == f"profile {path} is not TOML (ValueError)"


def test_arrays_nested_too_deep_for_the_parser_are_refused(tmp_path: Path) -> None:
    """tomllib recurses per ``[``: past the recursion limit it raises RecursionError (at
    Python's default; web3, imported by the suite, raises the limit to 100 000)."""
    path = _write(tmp_path, "chain_id = " + "[" * 5000 + "]" * 5000 + "\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(ConfigurationError) as raised:
            ConnectionProfile.load(path)
    finally:
        sys.setrecursionlimit(limit)
    assert raised.value.message == f"profile {path} is not TOML (RecursionError)"


def test_a_fifo_given_as_the_profile_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "profile.toml"
    os.mkfifo(fifo)
    error = refuses_without_waiting(fifo, lambda: ConnectionProfile.load(fifo))
    assert isinstance(error, ConfigurationError)
    assert error.message == f"profile {fifo} is not a regular file"
