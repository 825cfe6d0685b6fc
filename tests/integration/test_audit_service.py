"""An auditor reads a node's log over gRPC and checks it with RFC 9162 proofs."""

from __future__ import annotations

import grpc
import pytest

from clients.sdk.records import parse_envelope
from core.audit import (
    AuditEntry,
    Checkpoint,
    Receipt,
    verify_checkpoint,
    verify_checkpoint_consistency,
    verify_log,
    verify_receipt_inclusion,
)
from core.record_types import RecordType
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from proto.kms.v1 import audit_pb2
from proto.stubs import AuditStub, NodeStub
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


def checkpoint_of(stub: AuditStub) -> Checkpoint:
    cp = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5)
    return Checkpoint(cp.node_id, cp.tree_size, cp.root, cp.timestamp, cp.signature)


def test_an_auditor_verifies_the_log_receipts_and_consistency(
    people: People, cluster: LocalCluster
) -> None:
    node = cluster.nodes[0]
    key = {n.node_id: n.signing_public_key for n in people.registry.list_nodes()}[node.node_id]
    with cluster.transport.channel(node.address) as channel:
        audit = AuditStub(channel)
        before = checkpoint_of(audit)
        people.grant_doctor()
        with people.provider() as doctor:
            assert doctor.read_record(people.lab.record_id) == lab_result()
        # A decision at this node for sure, with its receipt.
        capsule = parse_envelope(cluster.blob_store().get(people.lab.storage_uri)).capsule
        capsule_request = people.doctor_signer().single(
            people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
        )
        fragment = NodeStub(channel).Reencrypt(capsule_request, timeout=5).fragment
        r = fragment.receipt
        receipt = Receipt.from_fields(r)
        after = checkpoint_of(audit)

        assert verify_checkpoint(before, key) and verify_checkpoint(after, key)
        assert after.tree_size > before.tree_size
        consistency = audit.GetConsistencyProof(
            audit_pb2.ConsistencyProofRequest(old_size=before.tree_size, new_size=after.tree_size),
            timeout=5,
        )
        if before.tree_size:
            assert verify_checkpoint_consistency(before, after, list(consistency.hashes))
        inclusion = audit.GetInclusionProof(
            audit_pb2.InclusionProofRequest(
                leaf_index=receipt.leaf_index, tree_size=after.tree_size
            ),
            timeout=5,
        )
        assert verify_receipt_inclusion(receipt, after, list(inclusion.hashes))

        entries = [
            (e.leaf_index, e.entry)
            for e in audit.GetEntries(
                audit_pb2.GetEntriesRequest(start=0, end=after.tree_size), timeout=10
            )
        ]
        assert verify_log(entries, after, key).ok
        mine = AuditEntry.from_canonical(entries[receipt.leaf_index][1])
        assert (mine.decision, mine.requester) == ("granted", people.doctor.address)

        with pytest.raises(grpc.RpcError) as caught:
            list(audit.GetEntries(audit_pb2.GetEntriesRequest(start=5, end=2), timeout=5))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
