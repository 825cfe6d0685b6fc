"""The whole flow against the real cluster, and every refusal the issue names."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from medkms.coordinator.service import MAX_RECONNECT_BACKOFF_MS
from medkms.core.errors import AccessDenied, NotFound, Unavailable
from medkms.core.record_types import RecordType
from medkms.deploy.anvil import increase_time
from medkms.deploy.demo import lab_result
from medkms.deploy.local_cluster import LocalCluster
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
