"""A threshold high enough that a full batch's answer outgrows the 256 KiB that every
hop's requests are held to: a 7-of-7 cluster, 64 records read in one call. The answer
carries 7 fragments a record, each with its receipt (about 700 bytes): about 320 KiB.
Before answers were sized by the threshold, the coordinator refused to send it
("Sent message larger than max (326022 vs. 262144)")."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from clients.sdk.provider import RecordRead
from clients.sdk.records import parse_envelope
from contracts.registry import RegistryClient
from core.record_types import RecordType
from core.requests import MAX_BATCH
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from proto import rpc
from proto.stubs import CoordinatorStub
from tests.integration.conftest import People

NODES = 7


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.up(tmp_path_factory.mktemp("seven"), nodes=NODES, threshold=NODES)
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def registry(cluster: LocalCluster) -> RegistryClient:
    return cluster.registry()


def test_a_full_batch_at_a_high_threshold_is_answered_in_one_call(people: People) -> None:
    more = [
        people.patient.store_record(lab_result(), RecordType.LAB_RESULT)
        for _ in range(MAX_BATCH - 1)
    ]
    ids = [people.lab.record_id, *(r.record_id for r in more)]
    people.grant_doctor()
    with people.provider() as doctor:
        read = doctor.read_records_with_receipts(ids)
    assert set(read) == set(ids)
    for outcome in read.values():
        assert isinstance(outcome, RecordRead), outcome
        assert outcome.plaintext == lab_result()
        assert sorted(r.node_id for r in outcome.receipts) == [
            f"node-{i}" for i in range(1, NODES + 1)
        ]
    # The same batch sent raw: the answer is larger than a request may be, and a channel
    # with the default bounds refuses it; an app's channel takes it.
    blobs = people.cluster.blob_store()
    capsules = [
        (r.record_id, RecordType.LAB_RESULT, parse_envelope(blobs.get(r.storage_uri)).capsule)
        for r in [people.lab, *more]
    ]
    patient = people.patient.identity.address
    transport, address = people.cluster.app_transport, people.cluster.coordinator_address
    with transport.channel(address) as default:
        with pytest.raises(grpc.RpcError) as refused:
            CoordinatorStub(default).ReencryptBatch(
                people.doctor_signer().batch(patient, capsules), timeout=30
            )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with transport.channel(address, options=rpc.APP_CHANNEL_OPTIONS) as app:
        answer = CoordinatorStub(app).ReencryptBatch(
            people.doctor_signer().batch(patient, capsules), timeout=30
        )
    assert [len(r.fragments) for r in answer.results] == [NODES] * MAX_BATCH
    assert rpc.MAX_MESSAGE_BYTES < answer.ByteSize() <= rpc.coordinator_answer_bytes(NODES)
