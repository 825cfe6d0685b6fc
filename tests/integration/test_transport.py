"""Transport security on the real cluster: nodes speak mutual TLS only, the
coordinator TLS, and a node will not start without TLS unless told it is in
development mode."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator.settings import CoordinatorSettings
from core.errors import ConfigurationError, KmsError
from deploy import certificate_requests
from deploy.certificate_authority import CertificateAuthority
from deploy.certs import LOCAL_HOSTS, ClusterCa
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from kms_node.settings import NodeSettings
from proto.kms.v1 import coordinator_pb2, node_pb2
from proto.stubs import CoordinatorStub, NodeStub
from proto.transport import Transport
from tests.integration.conftest import People
from tests.proto.test_certificate_rotation import served_serial_at

pytestmark = pytest.mark.cluster


def node_info(transport: Transport, address: str, server_name: str | None = None) -> str:
    """GetNodeInfo through ``transport``: the node id, or the failed call's status name."""
    with transport.channel(address, server_name=server_name) as channel:
        try:
            info = NodeStub(channel).GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)
            return e.code().name
    return info.node_id


def test_a_node_refuses_plaintext_and_goes_on_serving_over_mutual_tls(
    cluster: LocalCluster,
) -> None:
    node = cluster.nodes[0]
    for _ in range(3):
        assert node_info(Transport.plaintext(), node.address) == "UNAVAILABLE"
    assert node_info(cluster.transport, node.address, node.node_id) == node.node_id


def test_a_node_refuses_tls_without_a_client_certificate(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    assert node_info(cluster.app_transport, node.address) == "UNAVAILABLE"


def test_a_node_refuses_a_client_certificate_from_another_ca(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    other = ClusterCa.ensure(tmp_path).client_cert("operator")
    assert cluster.transport.ca_cert is not None
    # The node's own certificate checks out (our CA); only the client's is foreign.
    stranger = Transport.tls(cluster.transport.ca_cert, other.cert, other.key)
    node = cluster.nodes[0]
    assert node_info(stranger, node.address) == "UNAVAILABLE"


def test_a_node_refuses_a_server_certificate_as_a_client_certificate(
    cluster: LocalCluster,
) -> None:
    """Certificates carry their role (extended key usage): a node's own server
    certificate, from the right CA, does not open another node."""
    ca = cluster.state_dir / "tls"
    impostor = Transport.tls(ca / "ca.crt", ca / "node-2.crt", ca / "node-2.key")
    assert node_info(impostor, cluster.nodes[0].address) == "UNAVAILABLE"


def test_a_caller_pinning_a_node_id_rejects_another_nodes_certificate(
    cluster: LocalCluster,
) -> None:
    """What the coordinator relies on: on a shared host every node's certificate names
    127.0.0.1, so it checks the node id instead."""
    node_1, node_2 = cluster.nodes[0], cluster.nodes[1]
    assert node_info(cluster.transport, node_1.address, node_2.node_id) == "UNAVAILABLE"
    assert node_info(cluster.transport, node_1.address, node_1.node_id) == node_1.node_id


def test_the_coordinator_serves_apps_over_tls_without_client_certificates(
    cluster: LocalCluster,
) -> None:
    request = coordinator_pb2.GetClusterInfoRequest()
    with cluster.coordinator_channel() as channel:
        info = CoordinatorStub(channel).GetClusterInfo(request, timeout=5)
    assert info.threshold == cluster.threshold
    with Transport.plaintext().channel(cluster.coordinator_address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            CoordinatorStub(channel).GetClusterInfo(request, timeout=5)
    assert isinstance(refused.value, grpc.Call)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_kmsctl_status_reaches_every_service_over_tls(cluster: LocalCluster) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.kmsctl",
            "cluster",
            "status",
            "--state-dir",
            str(cluster.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert set(status["serving"]) == {"coordinator", *(n.node_id for n in cluster.nodes)}
    assert status["tls"]["ca_cert"] == str(cluster.state_dir / "tls" / "ca.crt")


def _config_without_tls(cluster: LocalCluster, tmp_path: Path, extra: str = "") -> Path:
    """node-1's config with its TLS lines dropped (and ``extra`` added)."""
    lines = Path(cluster.nodes[0].config).read_text().splitlines()
    kept = [line for line in lines if not line.startswith("tls_")]
    config = tmp_path / "node.toml"
    config.write_text("\n".join([*kept, extra]) + "\n")
    return config


def test_a_node_without_tls_settings_refuses_to_start(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config_without_tls(cluster, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cli.node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "kms-node: node config is missing TLS settings tls_ca_cert, tls_cert, tls_key; "
        "plaintext is refused unless dev_plaintext = true (development only)"
    )


def test_plaintext_needs_the_explicit_development_mode(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config_without_tls(cluster, tmp_path, "dev_plaintext = true")
    assert NodeSettings.from_toml(config).transport().is_plaintext
    config.write_text(config.read_text().replace("dev_plaintext = true", 'dev_plaintext = "yes"'))
    with pytest.raises(ConfigurationError, match="dev_plaintext must be true or false"):
        NodeSettings.from_toml(config)
    both = _config_without_tls(cluster, tmp_path, "dev_plaintext = true")
    both.write_text(both.read_text() + f'tls_ca_cert = "{cluster.state_dir}/tls/ca.crt"\n')
    with pytest.raises(ConfigurationError, match="sets dev_plaintext = true and tls_ca_cert"):
        NodeSettings.from_toml(both)


def test_a_serving_node_takes_a_rotated_certificate_while_the_doctor_reads(
    cluster: LocalCluster, people: People
) -> None:
    """On the real node process: node-1's operator rotates its certificate the
    operator's way (new key and CSR, signed by the CA, installed) while a doctor
    reads through the coordinator; no read fails and new connections to node-1 are
    shown the new certificate."""
    tls = cluster.state_dir / "tls"
    key, cert, csr = tls / "node-1.key", tls / "node-1.crt", tls / "node-1.csr"
    node = cluster.nodes[0]
    old_serial = served_serial(cluster, node.address, node.node_id)
    people.grant_doctor()
    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def read() -> None:
        nonlocal reads
        with people.provider() as doctor:
            while not stop.is_set():
                try:
                    assert doctor.read_record(people.lab.record_id) == lab_result()
                    reads += 1
                except (KmsError, AssertionError) as e:
                    failures.append(repr(e))
                # Paced well under the coordinator's budget for one requester: a refusal
                # here would be the budget's, not the rotation's.
                time.sleep(1 / (CoordinatorSettings.requester_rate_per_s / 2))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        while reads < 3:
            time.sleep(0.05)
        certificate_requests.request(key, csr, node.node_id, LOCAL_HOSTS, rotate=True)
        authority = CertificateAuthority.open(tls)
        signed = authority.sign(csr.read_bytes(), "node", datetime.datetime.now(datetime.UTC))
        answer = tls / "node-1-renewed.crt"
        answer.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
        certificate_requests.install(
            answer, tls / "ca.crt", cert, key, usage=ExtendedKeyUsageOID.SERVER_AUTH, name="node-1"
        )
        assert served_serial(cluster, node.address, node.node_id) == signed.serial_number
        for _ in range(3):  # new connections, each checked against the new certificate
            assert node_info(cluster.transport, node.address, node.node_id) == node.node_id
        reads_at_rotation = reads
        while reads < reads_at_rotation + 3:
            time.sleep(0.05)
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert signed.serial_number != old_serial


def served_serial(cluster: LocalCluster, address: str, node_id: str) -> int:
    transport = cluster.transport
    assert transport.ca_cert and transport.cert and transport.key
    return served_serial_at(address, node_id, transport.ca_cert, transport.cert, transport.key)
