"""The operators' TLS commands, run as an operator runs them: each party makes its
key and CSR on its own host (here: its own directory), the CA's keeper signs, the
party installs, and a serving node takes a rotated certificate."""

from __future__ import annotations

import datetime
import json
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from cli import coordinator as coordinator_cli
from cli import kmsctl
from cli import node as node_cli
from deploy.certificate_requests import request
from kms_node.settings import NodeSettings
from tests.proto.test_certificate_rotation import Node, Party, served_serial

NODE_CONFIG = """
node_id = "node-7"
listen = "127.0.0.1:7001"
chain_rpc_url = "http://127.0.0.1:8545"
registry_address = "0x0000000000000000000000000000000000000001"
data_dir = "data"
hsm_token_label = "node-7"
hsm_pin_file = "../secrets/pin"
tls_ca_cert = "tls/ca.crt"
tls_cert = "tls/node.crt"
tls_key = "tls/node.key"
"""

COORDINATOR_CONFIG = """
listen = "127.0.0.1:7001"
threshold = 1
nodes = [{ node_id = "node-7", address = "10.0.0.7:7001" }]
chain_rpc_url = "http://127.0.0.1:8545"
registry_address = "0x0000000000000000000000000000000000000001"
tls_ca_cert = "tls/ca.crt"
tls_cert = "tls/server.crt"
tls_key = "tls/server.key"
tls_client_cert = "tls/client.crt"
tls_client_key = "tls/client.key"
"""


def run(main: object, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    assert callable(main)
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def hosts(tmp_path: Path) -> dict[str, Path]:
    """A directory per party: the CA's keeper, a node operator, the coordinator's."""
    dirs = {name: tmp_path / name for name in ("ca", "node", "coordinator")}
    for name in ("node", "coordinator"):
        (dirs[name] / "tls").mkdir(parents=True)
    (dirs["node"] / "node.toml").write_text(NODE_CONFIG)
    (dirs["coordinator"] / "coordinator.toml").write_text(COORDINATOR_CONFIG)
    return dirs


def sign_command(
    hosts: dict[str, Path],
    csr: Path | str,
    role: str,
    out: Path,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
) -> tuple[int, str]:
    """``kmsctl ca sign`` as the CA's keeper runs it."""
    args = ["ca", "sign", "--dir", str(hosts["ca"]), "--csr", str(csr), "--role", role]
    return run(kmsctl.main, [*args, "--out", str(out), *extra], capsys)


def ca_sign(
    hosts: dict[str, Path], csr: Path, role: str, capsys: pytest.CaptureFixture[str]
) -> Path:
    out = hosts["ca"] / f"{csr.stem}-{role}.crt"
    code, text = sign_command(hosts, csr, role, out, capsys)
    assert code == 0, text
    return out


def test_a_node_operator_gets_a_certificate_and_rotates_it_while_serving(
    hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    node_toml = str(hosts["node"] / "node.toml")
    assert run(kmsctl.main, ["ca", "init", "--dir", str(hosts["ca"])], capsys)[0] == 0
    # The CA's certificate travels to the node (the only thing that does, besides the CSR
    # one way and the certificate the other).
    (hosts["node"] / "tls" / "ca.crt").write_bytes((hosts["ca"] / "ca.crt").read_bytes())

    code, out = run(
        node_cli.main, ["tls-request", "--config", node_toml, "--hosts", "127.0.0.1"], capsys
    )
    assert code == 0, out
    made = json.loads(out)
    key = hosts["node"] / "tls" / "node.key"
    assert Path(made["key"]) == key and key.stat().st_mode & 0o777 == 0o600
    signed = ca_sign(hosts, Path(made["csr"]), "node", capsys)
    # The threat model's "valid 90 days by default" (besides 5 minutes' backdating).
    cert = x509.load_pem_x509_certificate(signed.read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=90, minutes=5)
    code, out = run(
        node_cli.main, ["tls-install", "--config", node_toml, "--cert", str(signed)], capsys
    )
    assert code == 0, out
    serial_a = int(json.loads(out)["serial"], 16)

    # A second request without --rotate is refused and leaves the key alone.
    before = key.read_bytes()
    code, out = run(
        node_cli.main, ["tls-request", "--config", node_toml, "--hosts", "127.0.0.1"], capsys
    )
    assert code == 1 and "--rotate" in out and key.read_bytes() == before

    # Serve with the node's own settings, as `kms-node serve` binds its port.
    settings = NodeSettings.from_toml(Path(node_toml))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = settings.transport().add_port(server, "127.0.0.1:0", require_client_cert=True)
    server.start()
    try:
        operator = Party(
            hosts["node"] / "tls" / "ca.crt",
            hosts["ca"] / "operator.crt",
            hosts["ca"] / "operator.key",
        )
        request(operator.key, hosts["ca"] / "operator.csr", "operator", [], rotate=False)
        operator.cert.write_bytes(
            ca_sign(hosts, hosts["ca"] / "operator.csr", "operator-client", capsys).read_bytes()
        )
        node = Node(f"127.0.0.1:{port}", operator, [])
        assert served_serial(node, operator, "node-7") == serial_a

        code, out = run(
            node_cli.main,
            ["tls-request", "--config", node_toml, "--hosts", "127.0.0.1", "--rotate"],
            capsys,
        )
        assert code == 0, out
        assert key.read_bytes() == before  # the new key waits beside the one in use
        signed = ca_sign(hosts, Path(json.loads(out)["csr"]), "node", capsys)
        code, out = run(
            node_cli.main, ["tls-install", "--config", node_toml, "--cert", str(signed)], capsys
        )
        assert code == 0, out
        serial_b = int(json.loads(out)["serial"], 16)
        assert serial_b != serial_a
        assert served_serial(node, operator, "node-7") == serial_b
    finally:
        server.stop(grace=None)


def test_a_certificate_for_the_wrong_role_is_not_installed(
    hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    node_toml = str(hosts["node"] / "node.toml")
    run(kmsctl.main, ["ca", "init", "--dir", str(hosts["ca"])], capsys)
    (hosts["node"] / "tls" / "ca.crt").write_bytes((hosts["ca"] / "ca.crt").read_bytes())
    code, out = run(
        node_cli.main, ["tls-request", "--config", node_toml, "--hosts", "10.0.0.7"], capsys
    )
    assert code == 0, out
    # The CA's keeper refuses to make a node's server request a client certificate...
    csr = json.loads(out)["csr"]
    out_file = hosts["ca"] / "x.crt"
    code, text = sign_command(hosts, csr, "coordinator-client", out_file, capsys)
    assert code == 1 and "names only its holder" in text and not out_file.exists()
    # ...and refuses a request for another name than the one expected.
    code, text = sign_command(hosts, csr, "node", out_file, capsys, "--name", "node-8")
    assert code == 1 and "is for 'node-7', not 'node-8'" in text


def test_the_coordinator_gets_its_server_and_client_certificates(
    hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    toml = str(hosts["coordinator"] / "coordinator.toml")
    run(kmsctl.main, ["ca", "init", "--dir", str(hosts["ca"])], capsys)
    (hosts["coordinator"] / "tls" / "ca.crt").write_bytes((hosts["ca"] / "ca.crt").read_bytes())
    code, out = run(
        coordinator_cli.main,
        ["tls-request", "--config", toml, "--hosts", "kms.example.org,10.0.0.2"],
        capsys,
    )
    assert code == 0, out
    made = json.loads(out)
    server = ca_sign(hosts, Path(made["server"]["csr"]), "coordinator-server", capsys)
    client = ca_sign(hosts, Path(made["client"]["csr"]), "coordinator-client", capsys)
    # Crossed over, each is refused for the other's place.
    code, text = run(
        coordinator_cli.main,
        ["tls-install", "--config", toml, "--server-cert", str(client)],
        capsys,
    )
    assert code == 1 and "is not the key of certificate" in text
    code, out = run(
        coordinator_cli.main,
        [
            "tls-install",
            "--config",
            toml,
            "--server-cert",
            str(server),
            "--client-cert",
            str(client),
        ],
        capsys,
    )
    assert code == 0, out
    installed = json.loads(out)
    assert set(installed) == {"server", "client", "note"}
    cert = x509.load_pem_x509_certificate(
        (hosts["coordinator"] / "tls" / "server.crt").read_bytes()
    )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator", "kms.example.org"]
    for key in ("server.key", "client.key"):
        assert (hosts["coordinator"] / "tls" / key).stat().st_mode & 0o777 == 0o600
