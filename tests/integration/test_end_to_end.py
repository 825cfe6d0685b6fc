"""The whole flow against the real cluster, and every refusal the issue names."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import umbral_pre as umbral

from clients.sdk.provider import ProviderClient
from clients.sdk.records import parse_envelope
from clients.sdk.timeouts import Timeouts
from coordinator.node_pool import LATENCY_STALE_S
from core.audit import Receipt, verify_receipt
from core.errors import AccessDenied, NotFound, Unavailable
from core.record_types import RecordType
from deploy.anvil import increase_time
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from proto.kms.v1 import common_pb2
from proto.rpc import MAX_RECONNECT_BACKOFF_MS
from proto.stubs import CoordinatorStub, NodeStub
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


def test_patient_to_doctor_3_of_5(people: People) -> None:
    people.grant_doctor()
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()


def test_refused_without_a_grant(people: People) -> None:
    with people.provider() as doctor, pytest.raises(AccessDenied, match="not granted access"):
        doctor.read_record(people.lab.record_id)


def test_refused_after_expiry_by_chain_time(people: People) -> None:
    people.grant_doctor(duration_s=60)
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()
        increase_time(people.cluster.rpc_url, 120)
        people.patient.await_nodes(people.registry.latest_block()[0])
        with pytest.raises(AccessDenied, match="grant expired at"):
            doctor.read_record(people.lab.record_id)


def test_refused_after_revocation(people: People) -> None:
    people.grant_doctor()
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()
        people.patient.await_nodes(people.patient.revoke(people.doctor.address))
        with pytest.raises(AccessDenied, match="revoked"):
            doctor.read_record(people.lab.record_id)


def test_refused_for_a_deactivated_record(people: People) -> None:
    people.grant_doctor()
    people.patient.await_nodes(people.patient.deactivate(people.lab.record_id))
    with people.provider() as doctor, pytest.raises(AccessDenied, match="deactivated"):
        doctor.read_record(people.lab.record_id)


def test_refused_for_a_requester_who_is_not_the_grantee(people: People) -> None:
    people.grant_doctor()
    other = people.new_identity("dr-eve", provider=True)
    with people.provider(other) as eve, pytest.raises(AccessDenied, match="not granted access"):
        eve.read_record(people.lab.record_id)


def test_refused_for_a_record_type_the_grant_does_not_allow(people: People) -> None:
    people.grant_doctor([RecordType.LAB_RESULT])
    with people.provider() as doctor, pytest.raises(AccessDenied, match="record type diagnosis"):
        doctor.read_record(people.condition.record_id)


def test_unknown_record_is_not_found(people: People) -> None:
    with people.provider() as doctor, pytest.raises(NotFound):
        doctor.read_record(b"\x42" * 32)


def _restart(cluster: LocalCluster, node_ids: list[str]) -> None:
    for node_id in node_ids:
        cluster.start_node(node_id)
    # The coordinator retries a node that was down after at most this backoff.
    time.sleep(MAX_RECONNECT_BACKOFF_MS / 1000 + 0.3)


@pytest.fixture
def restart_stopped_nodes(cluster: LocalCluster) -> Iterator[list[str]]:
    stopped: list[str] = []
    yield stopped
    _restart(cluster, stopped)


def test_served_with_two_of_five_nodes_stopped(
    people: People, cluster: LocalCluster, restart_stopped_nodes: list[str]
) -> None:
    people.grant_doctor()
    for node_id in ["node-2", "node-4"]:
        cluster.stop_node(node_id)
        restart_stopped_nodes.append(node_id)
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()


def test_clear_error_with_three_of_five_nodes_stopped(
    people: People, cluster: LocalCluster, restart_stopped_nodes: list[str]
) -> None:
    people.grant_doctor()
    down = ["node-1", "node-3", "node-5"]
    for node_id in down:
        cluster.stop_node(node_id)
        restart_stopped_nodes.append(node_id)
    with people.provider() as doctor, pytest.raises(Unavailable) as caught:
        doctor.read_record(people.lab.record_id)
    assert caught.value.grpc_status == "UNAVAILABLE"
    message = caught.value.message
    assert "of 3 required capsule fragments" in message
    for node_id in down:
        assert f"{node_id} (UNAVAILABLE" in message


def _coordinator_metrics(cluster: LocalCluster) -> str:
    with urllib.request.urlopen(cluster.coordinator_metrics_url, timeout=5) as answer:
        return str(answer.read().decode())


def _last_served_by(cluster: LocalCluster) -> list[str]:
    """The nodes whose fragments served the coordinator's last read, best first."""
    served: list[str] = []
    for line in (cluster.state_dir / "logs" / "coordinator.log").read_text().splitlines():
        if line.startswith("{") and '"reencrypt_served"' in line:
            served = list(json.loads(line)["nodes"])
    assert served, "the coordinator has served no read"
    return served


def _rotation_events(cluster: LocalCluster, node_id: str) -> list[str]:
    events = []
    for line in (cluster.state_dir / "logs" / "coordinator.log").read_text().splitlines():
        if not line.startswith("{"):
            continue  # gRPC's own C-core lines
        entry = json.loads(line)
        if entry.get("node_id") == node_id and "rotation" in entry["event"]:
            events.append(entry["event"])
    return events


def test_a_hung_node_leaves_rotation_and_is_probed_back_when_it_recovers(
    people: People, cluster: LocalCluster
) -> None:
    people.grant_doctor()
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()
    # A node that served that read: most likely asked first again; if the pool passes
    # it over, it is asked anyway once its latency is stale.
    hung = _last_served_by(cluster)[0]
    pid = cluster.node(hung).pid
    before = _rotation_events(cluster, hung)
    os.kill(pid, signal.SIGSTOP)  # hung: it holds its connections and answers nothing
    try:
        deadline = time.monotonic() + 3 * LATENCY_STALE_S
        with people.provider() as doctor:
            while not _rotation_events(cluster, hung)[len(before) :]:
                assert time.monotonic() < deadline, "the hung node never left rotation"
                assert doctor.read_record(people.lab.record_id) == lab_result()
                time.sleep(0.05)
        assert _rotation_events(cluster, hung)[len(before) :] == ["node_out_of_rotation"]
        # Operators see it too: the coordinator's /metrics.
        exposed = _coordinator_metrics(cluster)
        assert f'kms_coordinator_node_in_rotation{{node="{hung}"}} 0.0' in exposed
        others = [n.node_id for n in cluster.nodes if n.node_id != hung]
        assert f'kms_coordinator_node_in_rotation{{node="{others[0]}"}} 1.0' in exposed
        abandoned = re.search(
            rf'kms_coordinator_node_abandoned_total{{node="{hung}"}} ([0-9.]+)', exposed
        )
        assert abandoned and float(abandoned.group(1)) >= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    # Recovered, it is probed when its cooldown ends and put back in rotation.
    deadline = time.monotonic() + 60
    with people.provider() as doctor:
        while "node_back_in_rotation" not in _rotation_events(cluster, hung)[len(before) :]:
            assert time.monotonic() < deadline, "the recovered node was never probed back in"
            assert doctor.read_record(people.lab.record_id) == lab_result()
            time.sleep(0.2)


def test_an_app_reads_again_as_soon_as_the_coordinator_is_back(
    people: People, cluster: LocalCluster
) -> None:
    people.grant_doctor()
    impatient = ProviderClient(
        people.doctor,
        registry=people.registry,
        blobs=cluster.blob_store(),
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
        timeouts=Timeouts(fan_out_s=1.5),
    )
    with people.provider() as doctor, impatient:
        assert doctor.read_record(people.lab.record_id) == lab_result()
        cluster.stop_coordinator()
        try:
            # Down long enough for gRPC's default backoff to have grown past 3 s.
            time.sleep(6)
            # Within its timeout a read waits for the coordinator, then names it.
            with pytest.raises(Unavailable, match="^coordinator: "):
                impatient.read_record(people.lab.record_id)
        finally:
            cluster.start_coordinator()
        # The same client, on the same channel: served at once, no UNAVAILABLE.
        assert doctor.read_record(people.lab.record_id) == lab_result()


def test_cluster_status_names_a_stopped_node_and_await_nodes_waits_for_it(
    people: People, cluster: LocalCluster, restart_stopped_nodes: list[str]
) -> None:
    # Through the coordinator, with no certificate for the nodes: every node's index block.
    head = people.registry.latest_block()[0]
    people.patient.await_nodes(head)
    status = people.patient.cluster_status()
    assert [n.node_id for n in status.nodes] == [n.node_id for n in cluster.nodes]
    assert all(not n.status and n.index_block >= head for n in status.nodes)

    cluster.stop_node("node-3")
    restart_stopped_nodes.append("node-3")
    stopped = {n.node_id: n for n in people.patient.cluster_status().nodes}["node-3"]
    assert (stopped.status, stopped.index_block) == ("UNAVAILABLE", 0)
    with pytest.raises(Unavailable, match=f"nodes not at block {head} after 0.3s: node-3: "):
        people.patient.await_nodes(head, timeout_s=0.3)


def test_kfrags_survive_a_node_killed_with_sigkill(
    people: People, cluster: LocalCluster, restart_stopped_nodes: list[str]
) -> None:
    people.grant_doctor()
    cluster.stop_node("node-1", kill=True)
    _restart(cluster, ["node-1"])
    # With two others down, node-1's restored kfrag is needed to reach the threshold.
    for node_id in ["node-2", "node-3"]:
        cluster.stop_node(node_id)
        restart_stopped_nodes.append(node_id)
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()


def test_batch_read_gives_each_record_its_own_outcome(people: People) -> None:
    labs = [people.lab] + [
        people.patient.store_record(lab_result(), RecordType.LAB_RESULT) for _ in range(4)
    ]
    people.grant_doctor([RecordType.LAB_RESULT])
    wanted = [r.record_id for r in labs] + [people.condition.record_id]
    with people.provider() as doctor:
        results = doctor.read_records(wanted)
    assert set(results) == set(wanted)
    for record in labs:
        assert results[record.record_id] == lab_result()
    refused = results[people.condition.record_id]
    assert isinstance(refused, AccessDenied)
    assert "record type diagnosis" in refused.message


def test_batch_of_64_through_one_node(people: People, cluster: LocalCluster) -> None:
    """The node's batch RPC unwraps the kfrag once and re-encrypts every capsule."""
    people.grant_doctor([RecordType.LAB_RESULT])
    blobs = cluster.blob_store()
    capsule = parse_envelope(blobs.get(people.lab.storage_uri)).capsule
    lab = RecordType.LAB_RESULT
    refs = [common_pb2.CapsuleRef(record_id=people.lab.record_id, record_type=lab, capsule=capsule)]
    for i in range(63):
        capsule_i, _ = umbral.encrypt(umbral.SecretKey.random().public_key(), b"k" * 32)
        refs.append(
            common_pb2.CapsuleRef(
                record_id=bytes([i + 1]) * 32, record_type=lab, capsule=bytes(capsule_i)
            )
        )

    def signed(refs: list[common_pb2.CapsuleRef]) -> common_pb2.ReencryptionBatchRequest:
        triples = [(r.record_id, RecordType(r.record_type), r.capsule) for r in refs]
        return people.doctor_signer().batch(people.patient.identity.address, triples)

    with cluster.transport.channel(cluster.nodes[0].address) as channel:
        response = NodeStub(channel).ReencryptBatch(signed(refs), timeout=10)
        assert len(response.outcomes) == 64
        assert response.outcomes[0].fragment.cfrag and not response.outcomes[0].status
        assert {o.status for o in response.outcomes[1:]} == {"NOT_FOUND"}
        # Every decision is audited; the batch's receipts share one HSM signature and
        # each verifies, with its path, against the node's key registered on-chain.
        key = next(
            n.signing_public_key
            for n in people.registry.list_nodes()
            if n.node_id == cluster.nodes[0].node_id
        )
        receipts = [Receipt.from_fields(o.receipt) for o in response.outcomes]
        assert len({r.signature for r in receipts}) == 1
        assert all(verify_receipt(r, key) for r in receipts)
        refs.append(common_pb2.CapsuleRef(record_id=b"\x77" * 32, record_type=lab, capsule=capsule))
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).ReencryptBatch(signed(refs), timeout=10)
        assert isinstance(caught.value, grpc.Call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 to 64 capsules" in caught.value.details()


def test_erasure_deletes_the_blob_and_every_node_refuses(people: People) -> None:
    """The doctor read the record (every node keeps its capsule and the grant's kfrag,
    ADR 13) and kept its capsule; after the erasure no node re-encrypts it again."""
    people.grant_doctor()
    capsule = parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule
    request = people.doctor_signer().single(
        people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
    )
    for node in people.cluster.nodes:  # every node serves it, and keeps what it used
        with people.cluster.transport.channel(node.address) as channel:
            NodeStub(channel).Reencrypt(request, timeout=5)
    people.patient.await_nodes(people.patient.erase(people.lab.record_id))
    with pytest.raises(NotFound, match="erased"):
        people.cluster.blob_store().get(people.lab.storage_uri)
    record = people.registry.get_record(people.lab.record_id)
    assert record is not None and not record.active
    assert record.content_hash == people.lab.content_hash  # the chain keeps the hash
    request = people.doctor_signer().single(
        people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
    )
    people.every_node_refuses(request, "deactivated")


def test_every_fragment_carries_a_receipt_signed_by_its_registered_node(
    people: People, cluster: LocalCluster
) -> None:
    people.grant_doctor()
    capsule = parse_envelope(cluster.blob_store().get(people.lab.storage_uri)).capsule
    request = people.doctor_signer().single(
        people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
    )
    keys = {n.node_id: n.signing_public_key for n in people.registry.list_nodes()}
    with cluster.coordinator_channel() as channel:
        response = CoordinatorStub(channel).Reencrypt(request, timeout=10)
    assert len(response.fragments) == cluster.threshold
    for fragment in response.fragments:
        r = fragment.receipt
        receipt = Receipt.from_fields(r)
        assert receipt.node_id == fragment.node_id
        assert verify_receipt(receipt, keys[fragment.node_id])
