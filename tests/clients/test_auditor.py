"""The auditor against the registry's twin: the nodes, their keys and their anchors come
from the registry, and every decision is judged again at its block. A node here is a real
audit log (in-memory keys) served over loopback gRPC. The same auditor on the real chain
and cluster: tests/integration/test_audit_verify.py."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from clients.audit.audit_report import failures, summary_lines
from clients.audit.auditor import CachedChain, audit_cluster, channel_factory
from clients.sdk.identity import Identity
from core.audit import AuditEntry, Receipt
from core.audit_findings import Check, Verdict
from core.errors import ChainRejected, InvalidRequest
from core.policy import judge
from core.record_types import RecordType, to_mask
from core.registry_types import record_id_of
from kms_node.audit_log import AuditLog
from kms_node.audit_service import AuditService
from kms_node.keystore import MemoryKeyStore
from proto import rpc
from proto.stubs import AUDIT_SERVICE
from proto.transport import Transport
from tests.registry_twin import RegistryTwin

from .conftest import NODE_IDS, register_node

LAB = RecordType.LAB_RESULT
NODE = "node-a"


@dataclass(frozen=True)
class Asked:
    """A doctor's request, as the policy reads it."""

    record_id: bytes
    patient: str
    capsule_hash: bytes
    record_type: RecordType
    requester_umbral_key: bytes
    purpose_of_use: str = "TREAT"


@dataclass
class World:
    """A patient's record granted to a doctor on the twin, and one node that decides the
    doctor's requests, logs them and anchors its log."""

    twin: RegistryTwin
    node_account: LocalAccount
    log: AuditLog
    asked: Asked
    doctor: str
    #: the block the grant was mined in
    granted_block: int = 0
    #: what the node logged, in order
    entries: list[AuditEntry] = dataclasses.field(default_factory=list)

    def decide(self) -> None:
        """The node decides the doctor's request as a node does, at the latest block,
        and logs it."""
        n = len(self.entries)
        state = self.twin.access_state(self.asked.record_id, self.doctor, self.asked.capsule_hash)
        decision = judge(self.asked, state, state.block_timestamp)
        entry = AuditEntry(
            request_id=f"request-{n}",
            node_id=NODE,
            time=state.block_timestamp,
            requester=self.doctor,
            patient=self.asked.patient,
            record_id=self.asked.record_id,
            capsule_hash=self.asked.capsule_hash,
            purpose_of_use=self.asked.purpose_of_use,
            decision="granted" if decision.allowed else "denied",
            reason_code=decision.code,
            reason=decision.reason,
            block_number=state.block_number,
            block_hash=self.twin.block(state.block_number).hash,
            cfrag_hash=hashlib.sha256(b"cfrag %d" % n).digest() if decision.allowed else b"",
            record_type=self.asked.record_type,
            requester_umbral_key=self.asked.requester_umbral_key,
        )
        self.log.append(entry)
        self.entries.append(entry)

    def anchor(self) -> None:
        cp = self.log.checkpoint()
        self.twin.anchor_checkpoint(
            self.node_account,
            node_id=NODE,
            tree_size=cp.tree_size,
            root_hash=cp.root,
            timestamp=cp.timestamp,
            signature=cp.signature,
        )


def serve(log: AuditLog) -> tuple[grpc.Server, str]:
    """The node's Audit service over plaintext loopback gRPC."""
    audit = AuditService(log)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([rpc.service_handler(AUDIT_SERVICE, audit.rpc_methods())])
    port = Transport.plaintext().add_port(server, "127.0.0.1:0", require_client_cert=False)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    admin: LocalAccount = Account.create()
    twin = RegistryTwin(admin)
    keys, node_account = MemoryKeyStore(), Account.create()
    log = AuditLog(tmp_path / "audit.sqlite", keys, NODE)
    server, address = serve(log)
    register_node(
        twin,
        admin,
        NODE,
        endpoint=address,
        signing_public_key=keys.signing_public_key(),
        account=node_account.address,
    )
    alice, doctor = Identity.generate("alice"), Identity.generate("dr-bob")
    twin.grant_provider_role(admin, doctor.address)
    twin.register_patient(alice.account, alice.record_public_keys(), alice.verifying_key())
    capsule = hashlib.sha256(b"the record's capsule").digest()
    twin.anchor_record(
        alice.account,
        patient=alice.address,
        content_hash=hashlib.sha256(b"the record's envelope").digest(),
        storage_uri="blob:the-record",
        record_type=LAB,
        capsule_hash=capsule,
    )
    twin.grant_access(
        alice.account,
        grantee=doctor.address,
        grantee_umbral_key=doctor.umbral_public_key(),
        expires_at=twin.latest_block()[1] + 3600,
        allowed_types_mask=to_mask([LAB]),
    )
    asked = Asked(
        record_id_of(alice.address, capsule),
        alice.address,
        capsule,
        LAB,
        doctor.umbral_public_key(),
    )
    world = World(twin, node_account, log, asked, doctor.address, twin.latest_block()[0])
    # The node serves the doctor; the patient revokes; the node refuses the doctor.
    world.decide()
    twin.revoke_access(alice.account, doctor.address)
    world.decide()
    world.anchor()
    yield world
    server.stop(grace=None)
    log.close()


def test_a_node_whose_decisions_the_registry_bears_out_passes(world: World) -> None:
    report = audit_cluster(world.twin, channel_factory(Transport.plaintext()))
    assert report.ok, report.nodes[0].problems
    assert report.registry_address == world.twin.address
    assert report.block == world.twin.latest_block()[0]
    (node,) = report.nodes
    assert node.node_id == NODE and (node.granted, node.denied) == (1, 1)
    assert report.chain_reads > 0


def test_a_receipt_the_node_did_not_sign_is_reported_as_bad_evidence_not_failed(
    world: World,
) -> None:
    """An app hands the auditor a receipt for the node's entry 0 that the node did not sign
    (a well-formed receipt with a made-up signature): the node passes, so that
    ``kmsctl audit verify`` exits 0, and the summary names the receipt as bad evidence."""
    entry_hash = world.entries[0].leaf_hash()
    forged = Receipt(NODE, 0, 2, entry_hash, signature=b"\x30\x06\x02\x01\x01\x02\x01\x01")
    report = audit_cluster(world.twin, channel_factory(Transport.plaintext()), receipts=[forged])
    assert report.verdict is Verdict.PASSED, report.nodes[0].problems
    assert failures(report) == ""
    (warning,) = [line for line in summary_lines(report) if "bad evidence" in line]
    assert warning.startswith(f"  warning {NODE}: ")
    assert f"the receipt for entry 0 (entry hash {entry_hash.hex()[:16]}" in warning


def test_progress_is_told_of_every_entry_read(world: World) -> None:
    told: list[tuple[str, int, int]] = []
    report = audit_cluster(
        world.twin,
        channel_factory(Transport.plaintext()),
        progress=lambda *args: told.append(args),
    )
    assert report.ok, report.nodes[0].problems
    assert told == [(NODE, 0, 2), (NODE, 1, 2), (NODE, 2, 2)]


def test_a_grant_logged_after_the_revocation_is_caught_at_its_block(world: World) -> None:
    """The node's log says it served the doctor at a block where the registry shows the
    grant revoked: the auditor, judging again at that block, says so."""
    revoked = world.twin.block("latest")
    world.log.append(
        dataclasses.replace(
            world.entries[0],  # the decision to serve, claimed again after the revocation
            request_id="request-late",
            time=revoked.timestamp,
            block_number=revoked.number,
            block_hash=revoked.hash,
        )
    )
    world.anchor()
    report = audit_cluster(world.twin, channel_factory(Transport.plaintext()))
    assert not report.ok
    problems = report.nodes[0].problems
    assert [p.check for p in problems] == [Check.POLICY]


def test_every_registered_node_is_audited_in_registry_order_and_only_those_named(
    twin: RegistryTwin,
) -> None:
    """Nodes come from the registry, never from the nodes: here none answers, and each
    report says so."""
    channels = channel_factory(Transport.plaintext())
    report = audit_cluster(twin, channels)
    assert [n.node_id for n in report.nodes] == list(NODE_IDS)
    assert all(n.verdict is Verdict.COULD_NOT_READ and not n.problems for n in report.nodes)
    assert report.verdict is Verdict.COULD_NOT_READ and not report.ok
    only = audit_cluster(twin, channels, node_ids=["node-2"])
    assert [n.node_id for n in only.nodes] == ["node-2"]
    with pytest.raises(InvalidRequest, match="not registered on-chain: node-9"):
        audit_cluster(twin, channels, node_ids=["node-2", "node-9"])


def test_the_chain_view_reads_each_block_and_state_once_and_keeps_no_failure(
    world: World,
) -> None:
    chain = CachedChain(world.twin)
    asked, twin = world.asked, world.twin
    latest = twin.latest_block()[0]
    assert chain.block(latest) == chain.block(latest) == twin.block(latest)
    states = [
        chain.access_state(asked.record_id, world.doctor, asked.capsule_hash, block=b)
        for b in (world.granted_block, world.granted_block, latest)
    ]
    assert states[0] == states[1]
    assert states[0].grant is not None and states[0].grant.active
    assert states[2].grant is not None and not states[2].grant.active
    assert chain.reads == 3  # one block, two states
    with pytest.raises(ChainRejected):
        chain.block(latest + 1)
    twin.advance_time(1)
    assert chain.block(latest + 1) == twin.block(latest + 1)
    assert chain.reads == 4
    assert chain.checkpoint_anchors(NODE) == twin.checkpoint_anchors(NODE)
    assert chain.checkpoint_anchors("node-9") == []
