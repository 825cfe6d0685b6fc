"""Every node verifies who asks: EIP-712 signatures, deadlines and nonces, on the
real cluster. Each attack gets its exact status, and the node keeps serving."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import umbral_pre as umbral

from clients.sdk.identity import Identity
from clients.sdk.records import parse_envelope
from clients.sdk.signed_requests import sealed_enrollment
from core.record_types import RecordType
from core.request_auth import RequestClaims, sign
from core.requests import address_bytes
from core.umbral_codec import capsule_hash
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from proto.kms.v1 import common_pb2, node_pb2
from proto.stubs import NodeStub
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


def signed_request(
    people: People,
    *,
    signer: Identity | None = None,
    deadline: int | None = None,
    nonce: bytes | None = None,
) -> common_pb2.ReencryptionRequest:
    capsule = parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule
    claims = RequestClaims(
        patient=people.patient.identity.address,
        record_id=people.lab.record_id,
        capsule_hash=capsule_hash(capsule),
        requester_umbral_key=people.doctor.umbral_public_key(),
        nonce=nonce or secrets.token_bytes(32),
        deadline=deadline or int(time.time()) + 60,
        purpose_of_use="TREAT",
    )
    domain = people.registry.signing_domain()
    return common_pb2.ReencryptionRequest(
        patient=address_bytes(people.patient.identity.address),
        record_id=people.lab.record_id,
        record_type=RecordType.LAB_RESULT,
        capsule=capsule,
        requester=address_bytes(people.doctor.address),
        requester_umbral_key=claims.requester_umbral_key,
        purpose_of_use="TREAT",
        deadline=claims.deadline,
        nonce=claims.nonce,
        signature=sign((signer or people.doctor).account, domain, claims),
    )


def refused(people: People, request: common_pb2.ReencryptionRequest) -> grpc.RpcError:
    """The node's refusal of ``request``, after checking it still serves an honest one."""
    with people.cluster.transport.channel(people.cluster.nodes[0].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).Reencrypt(request, timeout=5)
        assert NodeStub(channel).Reencrypt(signed_request(people), timeout=5).fragment.cfrag
    return caught.value


def kill_and_restart(cluster: LocalCluster, node_id: str, *, replay_memory_lost: bool) -> None:
    """Kill the node (kill -9) and start it again; with ``replay_memory_lost``, its
    replay.sqlite deleted in between (as an operator may, or a crash before the unsynced
    memory reached the disk)."""
    node = next(n for n in cluster.nodes if n.node_id == node_id)
    cluster.stop_node(node_id, kill=True)
    try:
        memory = Path(node.config).parent / "replay.sqlite"
        assert memory.exists()
        if replay_memory_lost:
            for lost in (memory, Path(f"{memory}-wal"), Path(f"{memory}-shm")):
                lost.unlink(missing_ok=True)
    finally:
        cluster.start_node(node_id)


@pytest.fixture(autouse=True)
def granted(people: People) -> None:
    people.grant_doctor()


def test_a_replayed_request_is_unauthenticated(people: People, cluster: LocalCluster) -> None:
    request = signed_request(people)
    with cluster.transport.channel(cluster.nodes[1].address) as channel:
        assert NodeStub(channel).Reencrypt(request, timeout=5).fragment.cfrag
    with cluster.transport.channel(cluster.nodes[1].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).Reencrypt(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "nonce already used"
    with cluster.transport.channel(cluster.nodes[1].address) as channel:
        assert NodeStub(channel).Reencrypt(signed_request(people), timeout=5).fragment.cfrag


@pytest.mark.parametrize("memory_lost", [False, True], ids=["memory-kept", "memory-lost"])
def test_a_request_seen_before_a_node_restarted_is_still_a_replay(
    people: People, cluster: LocalCluster, memory_lost: bool
) -> None:
    """The replay memory is on disk (kms_node/replay.py SharedReplayGuard): a node killed
    and started again within the request's window still knows the nonce. An operator may
    also delete replay.sqlite while the node is stopped (or the machine crashed before
    the unsynced memory reached the disk): at start-up the node takes the reads it
    granted within the window from its audit log (ServedBeforeStart), and refuses them
    again."""
    node = cluster.nodes[1]
    request = signed_request(people)
    with cluster.transport.channel(node.address) as channel:
        assert NodeStub(channel).Reencrypt(request, timeout=5).fragment.cfrag
    kill_and_restart(cluster, node.node_id, replay_memory_lost=memory_lost)
    with cluster.transport.channel(node.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).Reencrypt(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == "nonce already used"
        assert NodeStub(channel).Reencrypt(signed_request(people), timeout=5).fragment.cfrag


def test_an_enrollment_received_before_the_replay_memory_was_lost_is_still_refused(
    people: People, cluster: LocalCluster
) -> None:
    """Enrollments are not in the audit log; the kfrag store keeps the nonce of each one
    it stored, in the transaction that stores its kfrags (kms_node/kfrag_store.py). With
    replay.sqlite deleted under the stopped node, an enrollment it received before is
    refused, rather than stored over the patient's later one."""
    node = cluster.nodes[1]
    alice = people.patient.identity
    doctor_key = people.doctor.umbral_public_key()
    registered = next(n for n in people.registry.list_nodes() if n.node_id == node.node_id)

    def enrollment() -> common_pb2.EnrollKeyFragmentRequest:
        kfrag = umbral.generate_kfrags(
            delegating_sk=alice.record_secret_key(RecordType.LAB_RESULT),
            receiving_pk=umbral.PublicKey.from_compressed_bytes(doctor_key),
            signer=alice.kfrag_signer(),
            threshold=1,
            shares=1,
            sign_delegating_key=True,
            sign_receiving_key=True,
        )[0]
        return sealed_enrollment(
            alice.account,
            people.registry.signing_domain(),
            registered,
            people.doctor.address,
            doctor_key,
            {RecordType.LAB_RESULT: bytes(kfrag)},
        )

    first, second = enrollment(), enrollment()
    with cluster.transport.channel(node.address) as channel:
        for sent in (first, second):
            assert NodeStub(channel).EnrollKeyFragment(sent, timeout=10).kfrag_sha256
    kill_and_restart(cluster, node.node_id, replay_memory_lost=True)
    with cluster.transport.channel(node.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).EnrollKeyFragment(first, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (caught.value.details() or "").startswith("enrollment already received")
        assert NodeStub(channel).Reencrypt(signed_request(people), timeout=5).fragment.cfrag


def test_a_second_instance_on_a_nodes_data_directory_is_refused(cluster: LocalCluster) -> None:
    """Started on the config of a node that serves, a second ``kms-node serve`` stops
    before it opens the HSM; it would otherwise share the port (SO_REUSEPORT) with its
    own rate budgets and a second anchorer."""
    node = cluster.nodes[1]
    done = subprocess.run(
        [sys.executable, "-m", "cli.node", "serve", "--config", node.config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "another kms-node serves from it" in done.stderr
    with cluster.transport.channel(node.address) as channel:
        info = NodeStub(channel).GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
    assert info.node_id == node.node_id


def test_an_expired_deadline_is_unauthenticated(people: People) -> None:
    error = refused(people, signed_request(people, deadline=int(time.time()) - 1))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "request deadline has passed"


def test_a_signature_by_someone_else_is_unauthenticated(people: People) -> None:
    mallory = people.new_identity("mallory")
    error = refused(people, signed_request(people, signer=mallory))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "signature is not by the requester"


def test_a_tampered_request_is_unauthenticated(people: People) -> None:
    request = signed_request(people)
    request.purpose_of_use = "HRESCH"
    error = refused(people, request)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_garbled_signature_is_unauthenticated(people: People) -> None:
    request = signed_request(people)
    request.signature = bytes(64) + b"\x1b"
    error = refused(people, request)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_sdk_signs_and_reads(people: People) -> None:
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()
