"""Every node anchors its audit checkpoints on-chain; an auditor checks the anchors against
the node's registered key and the node's own log (RFC 9162 consistency proofs)."""

from __future__ import annotations

import itertools
import time

import pytest

from clients.sdk.records import parse_envelope
from core.audit import Checkpoint, verify_checkpoint, verify_checkpoint_consistency
from core.record_types import RecordType
from deploy.local_cluster import LocalCluster
from deploy.metrics_scrape import scrape
from deploy.sample_records import lab_result
from proto.kms.v1 import audit_pb2
from proto.stubs import AuditStub, NodeStub
from tests.integration.conftest import People
from tests.integration.test_audit_service import checkpoint_of

pytestmark = pytest.mark.cluster

#: the local cluster anchors every 2 s (deploy/local_cluster.py); generous for a loaded CI
ANCHOR_WAIT_S = 20.0


def test_every_nodes_anchors_verify_against_its_key_and_its_log(
    people: People, cluster: LocalCluster
) -> None:
    people.grant_doctor()
    with people.provider() as doctor:
        for _ in range(3):
            assert doctor.read_record(people.lab.record_id) == lab_result()
    # A decision at every node for sure (the coordinator asks only a threshold of them).
    capsule = parse_envelope(cluster.blob_store().get(people.lab.storage_uri)).capsule
    for node in cluster.nodes:
        request = people.doctor_signer().single(
            people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
        )
        with cluster.transport.channel(node.address) as channel:
            assert NodeStub(channel).Reencrypt(request, timeout=5).fragment.cfrag

    registered = {n.node_id: n for n in people.registry.list_nodes()}
    start_block = int(cluster.data["chain"]["registry_start_block"])
    for node in cluster.nodes:
        key = registered[node.node_id].signing_public_key
        with cluster.transport.channel(node.address) as channel:
            audit = AuditStub(channel)
            served = checkpoint_of(audit)
            assert served.tree_size > 0
            deadline = time.monotonic() + ANCHOR_WAIT_S
            while (people.registry.latest_checkpoint(node.node_id) or (0,))[0] < served.tree_size:
                assert time.monotonic() < deadline, f"{node.node_id} did not anchor in time"
                time.sleep(0.2)

            anchors = [
                Checkpoint(a.node_id, a.tree_size, a.root_hash, a.timestamp, a.signature)
                for a in people.registry.checkpoint_anchors(node.node_id, start_block)
            ]
            now = checkpoint_of(audit)
            assert verify_checkpoint(now, key)
            # Every anchor is signed by the node's registered key, and each one (and the
            # node's log now) extends the one before: the node never anchored a fork.
            for old, new in itertools.pairwise([*anchors, now]):
                assert verify_checkpoint(old, key)
                assert old.tree_size <= new.tree_size
                proof = audit.GetConsistencyProof(
                    audit_pb2.ConsistencyProofRequest(
                        old_size=old.tree_size, new_size=new.tree_size
                    ),
                    timeout=5,
                )
                assert verify_checkpoint_consistency(old, new, list(proof.hashes))

        assert scrape(node.metrics_url)["kms_node_audit_log_diverges_from_anchor"] == 0
        # The node sets its gauge once it has the transaction's receipt, a poll after the
        # block that the registry read above already saw.
        deadline = time.monotonic() + ANCHOR_WAIT_S
        while scrape(node.metrics_url)["kms_node_audit_anchored_tree_size"] < (served.tree_size):
            assert time.monotonic() < deadline, f"{node.node_id} never reported its anchor"
            time.sleep(0.1)
