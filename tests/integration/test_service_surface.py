"""What operators and tools see: health, reflection, node info, metrics, enrollment checks."""

from __future__ import annotations

import urllib.request

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from core.errors import AccessDenied
from deploy.local_cluster import LocalCluster
from proto.kms.v1 import node_pb2
from proto.stubs import NodeStub
from tests.integration.conftest import People, core_file_limit

pytestmark = pytest.mark.cluster


def _addresses(cluster: LocalCluster) -> list[tuple[str, str]]:
    nodes = [(n.address, "kms.v1.KmsNode") for n in cluster.nodes]
    return [*nodes, (cluster.coordinator_address, "kms.v1.Coordinator")]


def test_every_service_reports_health_and_lists_itself_by_reflection(
    cluster: LocalCluster,
) -> None:
    for address, service in _addresses(cluster):
        with cluster.transport.channel(address) as channel:
            # Called by path: the type stubs of HealthStub and ServerReflectionStub leave
            # their methods untyped.
            health_check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            health = health_check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            replies = reflection(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names


def test_node_info_matches_the_registry(cluster: LocalCluster) -> None:
    registered = {n.node_id: n for n in cluster.registry().list_nodes()}
    for node in cluster.nodes:
        with cluster.transport.channel(node.address) as channel:
            info = NodeStub(channel).GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
        assert info.node_id == node.node_id
        assert info.signing_public_key == registered[node.node_id].signing_public_key
        assert info.registry_address.hex() == cluster.registry_address[2:].lower()
        key = load_der_public_key(info.signing_public_key)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert info.signing_algorithm == "ecdsa-p256-sha256"


def _metric(cluster: LocalCluster, node_index: int, line_prefix: str) -> float:
    body = urllib.request.urlopen(cluster.nodes[node_index].metrics_url, timeout=5).read()
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(line_prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_by_outcome(people: People, cluster: LocalCluster) -> None:
    ok = 'kms_node_requests_total{method="Reencrypt",outcome="ok"}'
    denied = 'kms_node_requests_total{method="Reencrypt",outcome="permission_denied"}'
    # Decisions, one per capsule, by reason: what the audit logs hold.
    granted = 'kms_node_decisions_total{decision="granted",reason="granted"}'
    no_grant = 'kms_node_decisions_total{decision="denied",reason="no_grant"}'
    names = (ok, denied, granted, no_grant)
    before = {name: sum(_metric(cluster, i, name) for i in range(5)) for name in names}
    with people.provider() as doctor:
        with pytest.raises(AccessDenied, match="not granted"):
            doctor.read_record(people.lab.record_id)
        people.grant_doctor()
        doctor.read_record(people.lab.record_id)
    after = {name: sum(_metric(cluster, i, name) for i in range(5)) for name in names}
    for name in names:
        assert after[name] >= before[name] + 3, name
    assert _metric(cluster, 0, "kms_node_kfrags_stored") >= 1


def test_node_processes_write_no_core_dumps(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        assert core_file_limit(node.pid) == ["0", "0"], node.node_id
