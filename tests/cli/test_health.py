"""kms-health's own checks; its runs against real servers: tests/integration."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.health import EXIT_MISCONFIGURED, EXIT_NOT_SERVING, local_target, main
from core.errors import ConfigurationError
from deploy import processes
from deploy.certs import CertFiles, ClusterCa
from kms_node.settings import NodeSettings


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


# -- a node probe over mutual TLS: what is the probe's own configuration (exit 2), and what
# -- is the node's answer (exit 1)


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    """A node's config, TLS from a CA of its own, on a port where nothing listens."""
    ca = ClusterCa.ensure(tmp_path / "tls")
    server = ca.server_cert("node-1")
    (tmp_path / "data").mkdir()
    pin = tmp_path / "secrets" / "user.pin"
    pin.parent.mkdir()
    pin.write_text("1234\n")
    pin.chmod(0o600)
    config = tmp_path / "node.toml"
    config.write_text(
        f'''node_id = "node-1"
listen = "127.0.0.1:{processes.free_port()}"
chain_rpc_url = "http://127.0.0.1:2"
registry_address = "0x0000000000000000000000000000000000000001"
data_dir = "data"
hsm_token_label = "medkms-node-1"
hsm_pin_file = "secrets/user.pin"
tls_ca_cert = "{ca.ca_cert}"
tls_cert = "{server.cert}"
tls_key = "{server.key}"
'''
    )
    return config


@pytest.fixture
def probe_files(node_config: Path) -> CertFiles:
    """The probe's client certificate, from the node's CA."""
    return ClusterCa.ensure(node_config.parent / "tls").client_cert("probe")


def _probe_node(config: Path, cert: Path, key: Path) -> int:
    argv = ["--client-cert", str(cert), "--client-key", str(key), "--timeout", "1"]
    return main(["node", "--config", str(config), *argv])


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kms-health: "), err
    return err


def test_a_probe_key_that_is_not_a_key_is_a_configuration_error_naming_it(
    node_config: Path, probe_files: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "the node is not serving": gRPC would fail the handshake for it, exit 1."""
    bad = node_config.parent / "badkey.pem"
    bad.write_text("not a key\n")
    assert _probe_node(node_config, probe_files.cert, bad) == EXIT_MISCONFIGURED
    assert f"TLS key {bad} is not an unencrypted PEM private key" in _one_line(capsys)


def test_a_probe_key_of_another_certificate_is_a_configuration_error(
    node_config: Path, probe_files: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    other = ClusterCa.ensure(node_config.parent / "tls").client_cert("other")
    assert _probe_node(node_config, probe_files.cert, other.key) == EXIT_MISCONFIGURED
    assert f"TLS key {other.key} is not the key of certificate" in _one_line(capsys)


def test_a_probe_certificate_the_nodes_ca_did_not_issue_is_a_configuration_error(
    node_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = ClusterCa.ensure(tmp_path / "other-ca").client_cert("probe")
    assert _probe_node(node_config, stranger.cert, stranger.key) == EXIT_MISCONFIGURED
    assert f"TLS certificate {stranger.cert} (issuer" in _one_line(capsys)


def test_a_missing_probe_key_is_named(
    node_config: Path, probe_files: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = node_config.parent / "absent.key"
    assert _probe_node(node_config, probe_files.cert, absent) == EXIT_MISCONFIGURED
    assert f"cannot read TLS key {absent}" in _one_line(capsys)


@pytest.mark.parametrize("text", [b"\xff\xfe not UTF-8", b"node_id = ["])
def test_an_unreadable_config_is_a_configuration_error(
    tmp_path: Path, text: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_bytes(text)
    assert main(["node", "--config", str(config)]) == EXIT_MISCONFIGURED
    assert str(config) in _one_line(capsys)


def test_any_error_before_the_probe_asks_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a traceback and exit 1 ("down"): the error's type, not its message, which may
    quote the file."""

    def unexpected(*_args: object) -> None:
        raise UnicodeDecodeError("utf-8", b"pin=1234", 4, 5, "invalid start byte")

    monkeypatch.setattr(NodeSettings, "from_toml", unexpected)
    config = tmp_path / "node.toml"
    assert main(["node", "--config", str(config)]) == EXIT_MISCONFIGURED
    err = _one_line(capsys)
    assert f"cannot set up the node probe from {config} (UnicodeDecodeError)" in err
    assert "1234" not in err


def test_a_config_that_is_a_directory_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["coordinator", "--config", str(tmp_path)]) == EXIT_MISCONFIGURED
    assert f"coordinator config {tmp_path}" in _one_line(capsys)


def test_a_node_with_nothing_listening_is_not_serving(
    node_config: Path, probe_files: CertFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """A good probe and config, and no node on the port: the one case for exit 1 here."""
    assert _probe_node(node_config, probe_files.cert, probe_files.key) == EXIT_NOT_SERVING
    assert "node at 127.0.0.1:" in (err := _one_line(capsys))
    assert "is not serving: UNAVAILABLE" in err
