"""The node's enrollment and re-encryption logic, on in-memory twins of the HSM
and the registry (fast). The same paths run against SoftHSM and anvil in
tests/integration."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import umbral_pre as umbral

from clients.sdk.identity import Identity
from clients.sdk.signed_requests import REQUEST_VALIDITY_S, sealed_enrollment
from core import capsule_cache
from core.audit import Receipt, verify_receipt
from core.errors import (
    AccessDenied,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from core.rate_limit import ENROLLMENT_COST, RateLimiter
from core.record_types import RecordType, to_mask
from core.registry_interface import GrantReader
from core.registry_types import (
    AccessRevoked,
    AccessState,
    BlockRef,
    CheckpointAnchor,
    EmergencyOptIn,
    EmergencyOptInChanged,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    RecordInfo,
)
from core.request_auth import BatchClaims, Domain, RequestClaims, request_id_of, sign
from core.requests import address_bytes
from core.umbral_codec import capsule_hash, load_capsule
from kms_node.audit_log import AuditLog
from kms_node.keystore import MemoryKeyStore
from kms_node.kfrag_cache import KfragCache
from kms_node.kfrag_store import KfragStore
from kms_node.replay import ReplayGuard, ServedBeforeStart
from kms_node.service import (
    ENROLLMENT_REPLAYED,
    UNKNOWN_PATIENT_READS_PER_S,
    UNKNOWN_RECORD_READS_PER_S,
    IndexedState,
    NodeService,
)
from proto.kms.v1 import common_pb2, node_pb2

NOW = 1_800_000_000
#: the test node's rate limit burst (its clock stands still: nothing refills)
BURST = 60
DOMAIN = Domain(31337, "0x" + "ab" * 20)


class MemoryRegistry:
    """Just enough registry for one patient, one grantee and one record, all at block 7:
    the chain (a RegistryReader) and the node's index (an IndexedState) at once."""

    def __init__(self) -> None:
        self.patients: dict[str, PatientInfo] = {}
        self.grants: dict[tuple[str, str], GrantInfo] = {}
        self.records: dict[bytes, RecordInfo] = {}
        self.opt_ins: dict[tuple[str, str], EmergencyOptIn] = {}

    @property
    def address(self) -> str:
        return DOMAIN.registry_address

    def signing_domain(self) -> Domain:
        return DOMAIN

    def latest_block(self) -> tuple[int, int]:
        return 7, NOW

    def block_of_transaction(self, tx_hash: str) -> int:
        raise AssertionError("the node sends no transactions")

    def list_nodes(self) -> list[NodeInfo]:
        raise AssertionError("the node does not list the nodes")

    def checkpoint_anchors(
        self, node_id: str, from_block: int = 0, to_block: int | None = None
    ) -> list[CheckpointAnchor]:
        raise AssertionError("the node does not read its anchors back")

    def get_patient(self, address: str) -> PatientInfo | None:
        return self.patients.get(address)

    def is_registered(self, address: str) -> bool:
        return address in self.patients

    def get_record(self, record_id: bytes) -> RecordInfo | None:
        return self.records.get(record_id)

    def get_grant(
        self, patient: str, grantee: str, *, block: int | None = None
    ) -> GrantInfo | None:
        return self.grants.get((patient, grantee))

    def get_emergency_opt_in(self, patient: str, responder: str) -> EmergencyOptIn | None:
        return self.opt_ins.get((patient, responder))

    def block(self, identifier: int | str = "latest") -> BlockRef:
        return BlockRef(7, b"\x77" * 32, NOW)

    def index_block(self) -> int:
        return 7

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        record = self.records.get(record_id)
        grant = self.grants.get((record.patient, grantee)) if record else None
        retired = any(
            r.capsule_hash == capsule_hash and not r.active for r in self.records.values()
        )
        # At block 7, named by its hash as the node's grant index names it.
        return AccessState(
            record,
            grant,
            block_number=7,
            block_timestamp=NOW,
            block_hash=self.block(7).hash,
            capsule_retired=retired,
        )


@dataclasses.dataclass
class World:
    node: NodeService
    registry: MemoryRegistry
    replay: ReplayGuard
    kfrags: KfragStore
    alice: Identity
    bob: Identity
    capsule: umbral.Capsule
    record_id: bytes
    audit: AuditLog
    keystore: MemoryKeyStore
    unwrapped: KfragCache

    def kfrag(
        self,
        signer: umbral.Signer | None = None,
        record_type: RecordType = RecordType.LAB_RESULT,
        receiving_key: bytes | None = None,
    ) -> bytes:
        receiving = receiving_key or self.bob.umbral_public_key()
        return bytes(
            umbral.generate_kfrags(
                delegating_sk=self.alice.record_secret_key(record_type),
                receiving_pk=umbral.PublicKey.from_compressed_bytes(receiving),
                signer=signer or self.alice.kfrag_signer(),
                threshold=1,
                shares=1,
                sign_delegating_key=True,
                sign_receiving_key=True,
            )[0]
        )

    def enrollment(
        self,
        kfrags: dict[RecordType, bytes],
        *,
        patient: Identity | None = None,
        receiving_key: bytes | None = None,
        node: NodeInfo | None = None,
        signed_at: int = NOW,
    ) -> common_pb2.EnrollKeyFragmentRequest:
        """Sealed to this node and signed by ``patient`` (alice unless given) at
        ``signed_at``, for alice."""
        info = self.node.node_info()
        node = node or NodeInfo(
            node_id=info.node_id,
            endpoint="memory",
            signing_public_key=info.signing_public_key,
            delivery_public_key=info.delivery_public_key,
            account="0x" + info.account.hex(),
            active=True,
        )
        request = sealed_enrollment(
            (patient or self.alice).account,
            DOMAIN,
            node,
            self.bob.address,
            receiving_key or self.bob.umbral_public_key(),
            kfrags,
            now=signed_at,
        )
        request.patient = address_bytes(self.alice.address)
        return request

    def enroll(
        self, kfrag: bytes, record_type: RecordType = RecordType.LAB_RESULT
    ) -> common_pb2.EnrollKeyFragmentResponse:
        return self.node.enroll(self.enrollment({record_type: kfrag}))

    def request(
        self,
        signer: Identity | None = None,
        nonce: bytes = b"\x07" * 32,
        deadline: int = NOW + 60,
        umbral_key: bytes | None = None,
        requester: Identity | None = None,
    ) -> common_pb2.ReencryptionRequest:
        """A request by ``requester`` (bob unless given), signed by ``signer`` (the
        requester unless given)."""
        requester = requester or self.bob
        claims = RequestClaims(
            patient=self.alice.address,
            record_id=self.record_id,
            capsule_hash=capsule_hash(bytes(self.capsule)),
            requester_umbral_key=umbral_key or requester.umbral_public_key(),
            nonce=nonce,
            deadline=deadline,
            purpose_of_use="TREAT",
        )
        return common_pb2.ReencryptionRequest(
            patient=address_bytes(self.alice.address),
            record_id=self.record_id,
            record_type=RecordType.LAB_RESULT,
            capsule=bytes(self.capsule),
            requester=address_bytes(requester.address),
            requester_umbral_key=claims.requester_umbral_key,
            purpose_of_use="TREAT",
            deadline=deadline,
            nonce=nonce,
            signature=sign((signer or requester).account, DOMAIN, claims),
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def make_world(tmp_path: Path) -> World:
    """A node with one enrolled-to-be patient (alice), grantee (bob) and record."""
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    registry = MemoryRegistry()
    registry.patients[alice.address] = PatientInfo(
        alice.address, alice.record_public_keys(), alice.verifying_key()
    )
    registry.grants[(alice.address, bob.address)] = GrantInfo(
        patient=alice.address,
        grantee=bob.address,
        grantee_umbral_key=bob.umbral_public_key(),
        expires_at=NOW + 3600,
        allowed_types_mask=to_mask([RecordType.LAB_RESULT]),
        active=True,
        granted_at=NOW,
    )
    capsule, _ = umbral.encrypt(alice.record_public_key(RecordType.LAB_RESULT), b"d" * 32)
    record_id = b"\x09" * 32
    registry.records[record_id] = RecordInfo(
        record_id=record_id,
        patient=alice.address,
        content_hash=b"\x01" * 32,
        storage_uri="blob:x",
        record_type=RecordType.LAB_RESULT,
        capsule_hash=capsule_hash(bytes(capsule)),
        creator=alice.address,
        active=True,
        created_at=NOW,
    )
    kfrags = KfragStore(tmp_path / "kfrags.sqlite")
    replay = ReplayGuard(max_window_s=300, max_entries=100)
    keystore = MemoryKeyStore()
    audit = AuditLog(tmp_path / "audit.sqlite", keystore, "node-t")
    unwrapped = KfragCache()
    node = NodeService(
        node_id="node-t",
        keystore=keystore,
        kfrags=kfrags,
        registry=registry,
        index=registry,
        registry_address=DOMAIN.registry_address,
        chain_id=DOMAIN.chain_id,
        replay=replay,
        limiter=RateLimiter(rate_per_s=1, burst=BURST, clock=lambda: NOW),
        audit=audit,
        clock=lambda: NOW,
        unwrapped=unwrapped,
    )
    return World(
        node, registry, replay, kfrags, alice, bob, capsule, record_id, audit, keystore, unwrapped
    )


def test_enrolled_kfrag_is_stored_wrapped_and_reencrypts(world: World) -> None:
    kfrag = world.kfrag()
    response = world.enroll(kfrag)
    stored = world.kfrags.get(world.alice.address, world.bob.address, RecordType.LAB_RESULT)
    assert stored is not None
    assert kfrag not in stored.wrapped
    assert list(response.kfrag_sha256) == [stored.kfrag_sha256]
    cfrag = umbral.CapsuleFrag.from_bytes(world.node.reencrypt(world.request()).fragment.cfrag)
    cfrag.verify(
        world.capsule,
        umbral.PublicKey.from_compressed_bytes(world.alice.verifying_key()),
        world.alice.record_public_key(RecordType.LAB_RESULT),
        umbral.PublicKey.from_compressed_bytes(world.bob.umbral_public_key()),
    )


def test_kfrag_signed_by_someone_else_is_refused(world: World) -> None:
    with pytest.raises(Unauthenticated):
        world.enroll(world.kfrag(signer=umbral.Signer(umbral.SecretKey.random())))
    assert world.kfrags.count() == 0


def test_enrollment_needs_a_registered_patient_and_an_active_grant(world: World) -> None:
    kfrag = world.kfrag()
    grant = world.registry.grants[(world.alice.address, world.bob.address)]
    world.registry.grants[(world.alice.address, world.bob.address)] = dataclasses.replace(
        grant, active=False
    )
    with pytest.raises(PreconditionFailed, match="no active grant or emergency opt-in"):
        world.enroll(kfrag)
    del world.registry.patients[world.alice.address]
    with pytest.raises(PreconditionFailed, match="not registered"):
        world.enroll(kfrag)


def test_denied_request_never_touches_the_kfrag(world: World) -> None:
    world.enroll(world.kfrag())
    key = (world.alice.address, world.bob.address)
    world.registry.grants[key] = dataclasses.replace(world.registry.grants[key], active=False)
    with pytest.raises(AccessDenied, match="revoked"):
        world.node.reencrypt(world.request())


def test_node_without_a_kfrag_for_the_grant_says_so(world: World) -> None:
    with pytest.raises(PreconditionFailed, match="holds no lab_result key fragment"):
        world.node.reencrypt(world.request())


def test_kfrag_for_an_earlier_grant_key_is_not_used(world: World) -> None:
    world.enroll(world.kfrag())
    key = (world.alice.address, world.bob.address)
    new_key = bytes(umbral.SecretKey.random().public_key().to_compressed_bytes())
    world.registry.grants[key] = dataclasses.replace(
        world.registry.grants[key], grantee_umbral_key=new_key
    )
    request = world.request(umbral_key=new_key)
    with pytest.raises(PreconditionFailed, match="holds no lab_result key fragment"):
        world.node.reencrypt(request)


def test_malformed_request_is_refused_before_any_lookup(world: World) -> None:
    request = world.request()
    request.capsule = b"junk"
    with pytest.raises(InvalidRequest, match="capsule"):
        world.node.reencrypt(request)


def test_node_info_names_the_node_and_its_hsm_key(world: World) -> None:
    info = world.node.node_info()
    assert info.node_id == "node-t"
    assert info.chain_id == 31337
    assert len(info.signing_public_key) > 60


def test_a_request_signed_by_someone_else_is_unauthenticated(world: World) -> None:
    world.enroll(world.kfrag())
    with pytest.raises(Unauthenticated, match="signature is not by the requester"):
        world.node.reencrypt(world.request(signer=world.alice))


def test_a_forged_read_is_refused_before_its_capsules_are_parsed(world: World) -> None:
    """Parsing is a request's costly check (about 0.25 ms a capsule): a single read or a
    batch of 64 whose signature does not cover its capsules is refused for that and costs
    no parse; the same read as signed parses its capsule."""
    world.enroll(world.kfrag())
    zeros = bytes(len(bytes(world.capsule)))  # the right size; not a capsule
    single = world.request()
    single.capsule = zeros
    batch = batch_request(world, b"\x83" * 32, count=64)
    for ref in batch.capsules:
        ref.capsule = zeros
    with patch.object(capsule_cache, "load_capsule", wraps=load_capsule) as parse:
        with pytest.raises(Unauthenticated, match="signature is not by the requester"):
            world.node.reencrypt(single)
        with pytest.raises(Unauthenticated, match="signature is not by the requester"):
            world.node.reencrypt_batch(batch)
        del batch.capsules[32:]  # a call holds 64 capsules in all
        results = world.node.reencrypt_many(many(single, batch)).results
        assert [r.refusal.status for r in results] == ["UNAUTHENTICATED"] * 2
        assert parse.call_count == 0
        world.node.reencrypt(world.request(nonce=b"\x84" * 32))
        assert parse.call_count == 1
        signed_over_zeros = _signed_over(world, world.request(nonce=b"\x85" * 32), zeros)
        with pytest.raises(InvalidRequest, match="^capsule is not a valid Umbral capsule"):
            world.node.reencrypt(signed_over_zeros)
        assert parse.call_count == 2


def _signed_over(
    world: World, request: common_pb2.ReencryptionRequest, capsule: bytes
) -> common_pb2.ReencryptionRequest:
    """``request`` carrying ``capsule`` instead, signed again by bob over it."""
    request.capsule = capsule
    claims = RequestClaims(
        patient=world.alice.address,
        record_id=bytes(request.record_id),
        capsule_hash=capsule_hash(capsule),
        requester_umbral_key=bytes(request.requester_umbral_key),
        nonce=bytes(request.nonce),
        deadline=request.deadline,
        purpose_of_use=request.purpose_of_use,
    )
    request.signature = sign(world.bob.account, DOMAIN, claims)
    return request


def test_a_replayed_request_is_refused(world: World) -> None:
    world.enroll(world.kfrag())
    request = world.request(nonce=b"\x42" * 32)
    world.node.reencrypt(request)
    with pytest.raises(Unauthenticated, match="nonce already used"):
        world.node.reencrypt(request)


def test_a_replay_the_replay_memory_lost_is_refused_from_the_audit_log(
    world: World, tmp_path: Path
) -> None:
    """The node restarts on a fresh replay memory (deleted, an older copy, a machine
    crash before it reached the disk): the audit log names the read it granted."""
    world.enroll(world.kfrag())
    request = world.request(nonce=b"\x43" * 32)
    world.node.reencrypt(request)
    key = (world.alice.address, world.bob.address)
    grant = world.registry.grants[key]
    world.registry.grants[key] = dataclasses.replace(grant, active=False)
    refused = world.request(nonce=b"\x44" * 32)
    with pytest.raises(AccessDenied):
        world.node.reencrypt(refused)
    world.registry.grants[key] = grant
    restarted = node_on(
        world,
        tmp_path,
        ChainReads(world.registry),
        world.registry,
        audit=world.audit,
        served_before_start=ServedBeforeStart.from_audit_log(world.audit.newest_first(), 300, NOW),
    )
    with pytest.raises(Unauthenticated, match="nonce already used"):
        restarted.reencrypt(request)
    assert restarted.reencrypt(refused).fragment.cfrag  # a refusal spent no nonce
    assert restarted.reencrypt(world.request(nonce=b"\x45" * 32)).fragment.cfrag


def test_an_expired_deadline_is_refused(world: World) -> None:
    world.enroll(world.kfrag())
    with pytest.raises(Unauthenticated, match="deadline has passed"):
        world.node.reencrypt(world.request(deadline=NOW - 1))
    with pytest.raises(InvalidRequest, match="too far in the future"):
        world.node.reencrypt(world.request(deadline=NOW + 3600))


def test_a_tampered_field_breaks_the_signature(world: World) -> None:
    world.enroll(world.kfrag())
    request = world.request()
    request.purpose_of_use = "HRESCH"
    with pytest.raises(Unauthenticated):
        world.node.reencrypt(request)


def test_a_requester_over_its_rate_is_resource_exhausted(world: World) -> None:
    world.enroll(world.kfrag())  # spends the patient's budget, not bob's
    for i in range(BURST):
        world.node.reencrypt(world.request(nonce=i.to_bytes(32, "big")))
    with pytest.raises(ResourceExhausted, match="rate limit"):
        world.node.reencrypt(world.request(nonce=b"\x09" * 32))


def test_revocation_shreds_the_kfrag_but_not_a_renewed_grant(world: World) -> None:
    world.enroll(world.kfrag())
    key = (world.alice.address, world.bob.address)
    revoked = AccessRevoked(9, NOW, world.alice.address, world.bob.address)
    # A revocation that a later grant superseded (history replayed at start-up).
    world.node.shred_revoked([revoked])
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is not None
    world.registry.grants[key] = dataclasses.replace(world.registry.grants[key], active=False)
    world.node.shred_revoked([revoked])
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is None


def test_every_decision_is_audited_and_the_receipt_verifies(world: World) -> None:
    world.enroll(world.kfrag())
    fragment = world.node.reencrypt(world.request(nonce=b"\x31" * 32)).fragment
    receipt = Receipt(
        node_id=fragment.receipt.node_id,
        leaf_index=fragment.receipt.leaf_index,
        tree_size=fragment.receipt.tree_size,
        entry_hash=fragment.receipt.entry_hash,
        signature=fragment.receipt.signature,
    )
    assert verify_receipt(receipt, world.node.node_info().signing_public_key)
    entry = world.audit.entry(receipt.leaf_index)
    assert entry.decision == "granted"
    assert entry.cfrag_hash == hashlib.sha256(fragment.cfrag).digest()
    assert entry.requester == world.bob.address
    # What the request named, so an auditor can judge every rule again.
    assert (entry.version, entry.record_type) == (2, RecordType.LAB_RESULT)
    assert entry.requester_umbral_key == world.bob.umbral_public_key()
    key = (world.alice.address, world.bob.address)
    world.registry.grants[key] = dataclasses.replace(world.registry.grants[key], active=False)
    with pytest.raises(AccessDenied):
        world.node.reencrypt(world.request(nonce=b"\x32" * 32))
    denied = world.audit.entry(world.audit.size() - 1)
    assert (denied.decision, denied.reason_code) == ("denied", "grant_revoked")


def signed_claims(request: common_pb2.ReencryptionRequest) -> RequestClaims:
    """What the requester signed, rebuilt from the wire (not through the node's parser)."""
    return RequestClaims(
        patient="0x" + request.patient.hex(),
        record_id=request.record_id,
        capsule_hash=capsule_hash(request.capsule),
        requester_umbral_key=request.requester_umbral_key,
        nonce=request.nonce,
        deadline=request.deadline,
        purpose_of_use=request.purpose_of_use,
    )


def test_the_audit_entry_carries_the_id_derived_from_the_signed_request(world: World) -> None:
    world.enroll(world.kfrag())
    request = world.request(nonce=b"\x34" * 32)
    signed_id = request_id_of(DOMAIN, signed_claims(request))
    # A relay that rewrites the id is refused, and nothing is audited or spent...
    request.request_id = "rewritten-by-relay"
    with pytest.raises(InvalidRequest, match=f"request_id must be empty or .* {signed_id}"):
        world.node.reencrypt(request)
    assert world.audit.size() == 0
    # ...one that drops it, or echoes the right one, gets the signed id in the log.
    request.request_id = ""
    leaf = world.node.reencrypt(request).fragment.receipt.leaf_index
    assert world.audit.entry(leaf).request_id == signed_id
    echoed = world.request(nonce=b"\x35" * 32)
    echoed.request_id = request_id_of(DOMAIN, signed_claims(echoed))
    leaf = world.node.reencrypt(echoed).fragment.receipt.leaf_index
    assert world.audit.entry(leaf).request_id == echoed.request_id


def test_audit_fails_closed(world: World) -> None:
    world.enroll(world.kfrag())
    world.audit.close()
    with pytest.raises(Unavailable, match="audit"):
        world.node.reencrypt(world.request(nonce=b"\x33" * 32))


# --- sealed, signed enrollment -------------------------------------------------------------


def test_enrollment_signed_by_someone_other_than_the_patient_is_refused(world: World) -> None:
    mallory = Identity.generate("mallory")
    request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, patient=mallory)
    with pytest.raises(Unauthenticated, match="signature is not by the patient"):
        world.node.enroll(request)
    assert world.kfrags.count() == 0


def test_enrollment_sealed_to_another_node_is_refused(world: World) -> None:
    request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()})
    request.node_id = "node-other"
    with pytest.raises(InvalidRequest, match="sealed to node 'node-other'"):
        world.node.enroll(request)
    # Sealed to another node's key but labelled for this node: the signature still
    # covers it, but the HSM cannot open it.
    other = NodeInfo(
        "node-t", "x", b"", MemoryKeyStore().delivery_public_key(), "0x" + "00" * 20, True
    )
    with pytest.raises(Unauthenticated, match="does not open"):
        world.node.enroll(world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, node=other))
    assert world.kfrags.count() == 0


def test_a_tampered_sealed_kfrag_breaks_the_patient_signature(world: World) -> None:
    request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()})
    sealed = bytearray(request.kfrags[0].sealed)
    sealed[20] ^= 1
    request.kfrags[0].sealed = bytes(sealed)
    with pytest.raises(Unauthenticated, match="signature is not by the patient"):
        world.node.enroll(request)


def test_kfrag_for_another_receiving_key_is_refused(world: World) -> None:
    other = bytes(umbral.SecretKey.random().public_key().to_compressed_bytes())
    kfrag = world.kfrag(receiving_key=other)
    # Claimed for the grant's key: the kfrag does not verify against it.
    with pytest.raises(Unauthenticated, match="does not verify"):
        world.enroll(kfrag)
    # Claimed for the key it was made for: no grant names that key.
    with pytest.raises(PreconditionFailed, match="names this receiving key"):
        world.node.enroll(world.enrollment({RecordType.LAB_RESULT: kfrag}, receiving_key=other))
    assert world.kfrags.count() == 0


def test_kfrag_from_another_record_types_key_is_refused(world: World) -> None:
    key = (world.alice.address, world.bob.address)
    world.registry.grants[key] = dataclasses.replace(
        world.registry.grants[key],
        allowed_types_mask=to_mask([RecordType.LAB_RESULT, RecordType.DIAGNOSIS]),
    )
    diagnosis_kfrag = world.kfrag(record_type=RecordType.DIAGNOSIS)
    with pytest.raises(Unauthenticated, match="registered lab_result key"):
        world.enroll(diagnosis_kfrag, RecordType.LAB_RESULT)


def test_kfrag_for_a_type_the_grant_does_not_cover_is_refused(world: World) -> None:
    kfrag = world.kfrag(record_type=RecordType.DIAGNOSIS)
    with pytest.raises(AccessDenied, match="does not cover record type diagnosis"):
        world.enroll(kfrag, RecordType.DIAGNOSIS)
    assert world.kfrags.count() == 0


def test_a_capsule_of_another_type_is_refused(world: World) -> None:
    world.enroll(world.kfrag())
    request = world.request()
    request.record_type = RecordType.DIAGNOSIS
    with pytest.raises(AccessDenied, match="not the record's type"):
        world.node.reencrypt(request)


def test_emergency_kfrags_lie_dormant_until_a_window_opens(world: World) -> None:
    key = (world.alice.address, world.bob.address)
    del world.registry.grants[key]
    world.registry.opt_ins[key] = EmergencyOptIn(
        world.alice.address,
        world.bob.address,
        world.bob.umbral_public_key(),
        to_mask([RecordType.LAB_RESULT]),
        True,
    )
    world.enroll(world.kfrag())
    with pytest.raises(AccessDenied, match="has not granted"):
        world.node.reencrypt(world.request())
    # A revocation while the opt-in stands keeps the dormant kfrags.
    world.node.shred_revoked([AccessRevoked(9, NOW, *key)])
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is not None
    world.registry.opt_ins[key] = dataclasses.replace(world.registry.opt_ins[key], active=False)
    world.node.shred_revoked(
        [EmergencyOptInChanged(10, NOW, *key, world.bob.umbral_public_key(), 2, False)]
    )
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is None


def test_enrolling_a_narrower_grant_shreds_the_dropped_types(world: World) -> None:
    key = (world.alice.address, world.bob.address)
    both = to_mask([RecordType.LAB_RESULT, RecordType.DIAGNOSIS])
    world.registry.grants[key] = dataclasses.replace(
        world.registry.grants[key], allowed_types_mask=both
    )
    world.node.enroll(
        world.enrollment(
            {
                RecordType.LAB_RESULT: world.kfrag(),
                RecordType.DIAGNOSIS: world.kfrag(record_type=RecordType.DIAGNOSIS),
            }
        )
    )
    assert world.kfrags.get(*key, RecordType.DIAGNOSIS) is not None
    world.registry.grants[key] = dataclasses.replace(
        world.registry.grants[key], allowed_types_mask=to_mask([RecordType.LAB_RESULT])
    )
    world.enroll(world.kfrag())
    assert world.kfrags.get(*key, RecordType.DIAGNOSIS) is None
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is not None


def test_a_responder_with_an_ordinary_grant_keeps_both_sets_of_kfrags(world: World) -> None:
    key = (world.alice.address, world.bob.address)
    world.registry.opt_ins[key] = EmergencyOptIn(
        world.alice.address,
        world.bob.address,
        world.bob.umbral_public_key(),
        to_mask([RecordType.DIAGNOSIS]),
        True,
    )
    world.enroll(world.kfrag())  # the ordinary lab-result grant
    world.enroll(world.kfrag(record_type=RecordType.DIAGNOSIS), RecordType.DIAGNOSIS)
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is not None
    assert world.kfrags.get(*key, RecordType.DIAGNOSIS) is not None


def test_revoking_a_responders_grant_keeps_only_what_the_opt_in_covers(world: World) -> None:
    key = (world.alice.address, world.bob.address)
    world.registry.opt_ins[key] = EmergencyOptIn(
        world.alice.address,
        world.bob.address,
        world.bob.umbral_public_key(),
        to_mask([RecordType.DIAGNOSIS]),
        True,
    )
    world.enroll(world.kfrag())  # the ordinary lab-result grant
    world.enroll(world.kfrag(record_type=RecordType.DIAGNOSIS), RecordType.DIAGNOSIS)
    world.registry.grants[key] = dataclasses.replace(world.registry.grants[key], active=False)
    world.node.shred_revoked([AccessRevoked(9, NOW, *key)])
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is None
    assert world.kfrags.get(*key, RecordType.DIAGNOSIS) is not None


# --- refusals are cheap (issue 10: no single party can starve the nodes) ---------------------


class ChainReads:
    """The registry's chain reads, counted; the index is judged separately."""

    def __init__(self, registry: MemoryRegistry) -> None:
        self.registry = registry
        self.access_reads = 0
        self.block_number = 7

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        self.access_reads += 1
        state = self.registry.access_state(record_id, grantee, capsule_hash)
        return dataclasses.replace(state, block_number=self.block_number)


class StaleIndex:
    """An index that has not seen the grant yet, at block ``block``."""

    def __init__(self, registry: MemoryRegistry) -> None:
        self.registry = registry
        self.block = 7

    def index_block(self) -> int:
        return self.block

    def is_registered(self, address: str) -> bool:
        return self.registry.is_registered(address)

    def access_state(self, record_id: bytes, grantee: str, capsule_hash: bytes) -> AccessState:
        state = self.registry.access_state(record_id, grantee, capsule_hash)
        return dataclasses.replace(state, grant=None, block_number=self.block)


def node_on(
    world: World,
    tmp_path: Path,
    chain: GrantReader,
    index: IndexedState,
    *,
    burst: int = 100,
    limiter: RateLimiter | None = None,
    audit: AuditLog | None = None,
    served_before_start: ServedBeforeStart | None = None,
    processes: int = 1,
) -> NodeService:
    """A node of the world's keystore and kfrags reading ``chain`` and ``index``; its
    requester limiter allows ``burst`` at 1/s unless ``limiter`` is given."""
    return NodeService(
        node_id="node-t",
        keystore=world.keystore,
        kfrags=world.kfrags,
        registry=chain,
        index=index,
        registry_address=DOMAIN.registry_address,
        chain_id=DOMAIN.chain_id,
        replay=ReplayGuard(max_window_s=300, max_entries=100),
        limiter=limiter or RateLimiter(rate_per_s=1, burst=burst, clock=lambda: NOW),
        audit=audit or AuditLog(tmp_path / "audit-2.sqlite", world.keystore, "node-t"),
        clock=lambda: NOW,
        served_before_start=served_before_start,
        processes=processes,
    )


def test_a_requester_without_a_kfrag_here_is_refused_without_a_chain_read(
    world: World, tmp_path: Path
) -> None:
    chain, index = ChainReads(world.registry), StaleIndex(world.registry)
    node = node_on(world, tmp_path, chain, index)
    for nonce in (b"\x01" * 32, b"\x02" * 32):
        with pytest.raises(AccessDenied, match="has not granted access"):
            node.reencrypt(world.request(nonce=nonce))
    assert chain.access_reads == 0


def test_a_grant_mined_after_a_refusal_is_honoured_while_the_index_lags(
    world: World, tmp_path: Path
) -> None:
    world.enroll(world.kfrag())  # bob holds a kfrag here: a fresh grant must be honoured
    key = (world.alice.address, world.bob.address)
    grant = world.registry.grants.pop(key)
    chain, index = ChainReads(world.registry), StaleIndex(world.registry)
    node = node_on(world, tmp_path, chain, index)
    with pytest.raises(AccessDenied, match="not granted access"):
        node.reencrypt(world.request(nonce=b"\x01" * 32))  # confirmed: no grant at block 7
    # The grant is mined in block 8; the index has not seen it yet. A confirmation
    # remembered from block 7 would hide it (found in CI): every confirmation is read.
    world.registry.grants[key] = grant
    chain.block_number = 8
    node.reencrypt(world.request(nonce=b"\x02" * 32))
    assert chain.access_reads == 2


def test_a_refused_request_costs_ten_served_ones(world: World, tmp_path: Path) -> None:
    chain, index = ChainReads(world.registry), StaleIndex(world.registry)
    node = node_on(world, tmp_path, chain, index, burst=12)
    with pytest.raises(AccessDenied):
        node.reencrypt(world.request(nonce=b"\x01" * 32))  # 1 + 9: two tokens left
    with pytest.raises(AccessDenied):
        node.reencrypt(world.request(nonce=b"\x02" * 32))  # in debt now
    with pytest.raises(ResourceExhausted, match="rate limit"):
        node.reencrypt(world.request(nonce=b"\x03" * 32))


# --- enrollment replay ---------------------------------------------------------------------


@dataclasses.dataclass
class PatientReads:
    count: int = 0


def count_patient_reads(registry: MemoryRegistry) -> PatientReads:
    """Count the registry's get_patient calls (chain reads) from now on."""
    reads = PatientReads()
    get_patient = registry.get_patient

    def counted(address: str) -> PatientInfo | None:
        reads.count += 1
        return get_patient(address)

    registry.get_patient = counted  # type: ignore[method-assign]
    return reads


def test_a_replayed_enrollment_is_refused_before_any_chain_read(world: World) -> None:
    enrollment = world.enrollment({RecordType.LAB_RESULT: world.kfrag()})
    world.node.enroll(enrollment)
    reads = count_patient_reads(world.registry)
    with pytest.raises(Unauthenticated, match="enrollment already received"):
        world.node.enroll(enrollment)
    assert reads.count == 0
    # The patient enrolls again with a fresh signature: her keys are read from the chain
    # (the index keeps only who registered), outside the budget for unknown patients.
    world.node.enroll(world.enrollment({RecordType.LAB_RESULT: world.kfrag()}))
    assert reads.count == 1
    assert ENROLLMENT_REPLAYED.startswith("enrollment already received")


def test_an_enrollment_the_replay_memory_lost_is_refused_by_the_kfrag_store(
    world: World, tmp_path: Path
) -> None:
    """The node restarts on a fresh replay memory: the enrollment it stored before is
    still refused, and the kfrags of her later enrollment stay."""
    first = world.enrollment({RecordType.LAB_RESULT: world.kfrag()})
    world.node.enroll(first)
    second = world.node.enroll(world.enrollment({RecordType.LAB_RESULT: world.kfrag()}))
    restarted = node_on(world, tmp_path, ChainReads(world.registry), world.registry)
    with pytest.raises(Unauthenticated, match="enrollment already received"):
        restarted.enroll(first)
    stored = world.kfrags.get(world.alice.address, world.bob.address, RecordType.LAB_RESULT)
    assert stored is not None and [stored.kfrag_sha256] == list(second.kfrag_sha256)


def test_an_older_enrollment_relayed_late_does_not_replace_a_later_one(world: World) -> None:
    """A relay holds back the patient's enrollment and delivers it after the one she
    signed next: its kfrags would not combine with the other nodes' new set."""
    held_back = world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, signed_at=NOW - 20)
    later = world.node.enroll(world.enrollment({RecordType.LAB_RESULT: world.kfrag()}))
    with pytest.raises(PreconditionFailed, match="from a later enrollment"):
        world.node.enroll(held_back)
    stored = world.kfrags.get(world.alice.address, world.bob.address, RecordType.LAB_RESULT)
    assert stored is not None and [stored.kfrag_sha256] == list(later.kfrag_sha256)
    assert stored.enrolled_deadline == NOW + REQUEST_VALIDITY_S


def test_enrollments_cost_the_patient_ten_requests_each(world: World) -> None:
    """An enrollment spends ENROLLMENT_COST (10) of the patient's budget, before its
    nonce is looked at: once she has spent it, even a replay of her enrollment is
    RESOURCE_EXHAUSTED (the nonce memory is not consulted). The grantee's budget is
    untouched."""
    assert ENROLLMENT_COST == 10
    enrollments = BURST // ENROLLMENT_COST
    first = world.enrollment({RecordType.LAB_RESULT: world.kfrag()})
    world.node.enroll(first)
    for _ in range(enrollments - 1):
        world.enroll(world.kfrag())
    with pytest.raises(ResourceExhausted, match="rate limit"):
        world.enroll(world.kfrag())
    with pytest.raises(ResourceExhausted, match="rate limit"):
        world.node.enroll(first)
    for i in range(BURST):
        world.node.reencrypt(world.request(nonce=i.to_bytes(32, "big")))


def test_an_enrollment_nobody_could_grant_spends_no_nonce(world: World) -> None:
    # A stranger signing as a patient of their own, unregistered: refused after the
    # chain read, and the node's nonce memory keeps nothing of it.
    mallory = Identity.generate("mallory")
    request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, patient=mallory)
    request.patient = address_bytes(mallory.address)
    with pytest.raises(PreconditionFailed, match="not registered"):
        world.node.enroll(request)
    # Nor does the patient's enrollment before her grant exists: she may send it again.
    key = (world.alice.address, world.bob.address)
    grant = world.registry.grants.pop(key)
    early = world.enrollment({RecordType.LAB_RESULT: world.kfrag()})
    with pytest.raises(PreconditionFailed, match="write the grant first"):
        world.node.enroll(early)
    assert len(world.replay) == 0
    world.registry.grants[key] = grant
    world.node.enroll(early)
    assert len(world.replay) == 1


def test_an_enrollment_that_fails_in_the_hsm_spends_its_nonce(world: World) -> None:
    # Past the grant check the nonce is used up, whatever happens next: a kfrag that
    # does not verify is not verified again by replaying it.
    bad = world.enrollment(
        {RecordType.LAB_RESULT: world.kfrag(signer=umbral.Signer(umbral.SecretKey.random()))}
    )
    with pytest.raises(Unauthenticated, match="does not verify"):
        world.node.enroll(bad)
    with pytest.raises(Unauthenticated, match="enrollment already received"):
        world.node.enroll(bad)
    assert world.kfrags.count() == 0


def test_a_node_of_several_processes_splits_its_node_wide_chain_budgets(
    world: World, tmp_path: Path
) -> None:
    """Each server process has its own NodeService: the budget for chain reads about
    patients the node has not seen register is the node's, split between them."""
    processes = 2
    node = node_on(world, tmp_path, ChainReads(world.registry), world.registry, processes=processes)
    reads = count_patient_reads(world.registry)
    share = int(UNKNOWN_PATIENT_READS_PER_S) // processes
    for i in range(share + 1):
        stranger = Identity.generate(f"stranger-{i}")
        request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, patient=stranger)
        request.patient = address_bytes(stranger.address)
        expected = PreconditionFailed if i < share else ResourceExhausted
        with pytest.raises(expected):
            node.enroll(request)
    assert reads.count == share


def test_enrollments_by_unregistered_signers_get_a_few_chain_reads_a_second(
    world: World,
) -> None:
    reads = count_patient_reads(world.registry)
    budget = int(UNKNOWN_PATIENT_READS_PER_S)
    for i in range(budget):
        stranger = Identity.generate(f"stranger-{i}")
        request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, patient=stranger)
        request.patient = address_bytes(stranger.address)
        with pytest.raises(PreconditionFailed, match="not registered"):
            world.node.enroll(request)
    stranger = Identity.generate("one-more")
    request = world.enrollment({RecordType.LAB_RESULT: world.kfrag()}, patient=stranger)
    request.patient = address_bytes(stranger.address)
    with pytest.raises(ResourceExhausted, match="patients this node has not seen register"):
        world.node.enroll(request)
    assert reads.count == budget
    world.enroll(world.kfrag())  # a registered patient is not held up: the index knows her


def test_a_record_the_index_does_not_know_yet_is_looked_up_within_a_budget(
    world: World, tmp_path: Path
) -> None:
    chain, index = ChainReads(world.registry), StaleIndex(world.registry)
    index.access_state = lambda record_id, grantee, capsule_hash: AccessState(  # type: ignore[method-assign]
        None, None, index.block, NOW
    )
    node = node_on(world, tmp_path, chain, index, burst=1000)
    del world.registry.grants[(world.alice.address, world.bob.address)]
    # A stranger (no kfrag here) asks for a record anchored a moment ago: the chain
    # says what is true, that the patient granted it nothing, a few times a second.
    budget = int(UNKNOWN_RECORD_READS_PER_S)
    for i in range(budget):
        chain.block_number = index.block = 8 + i  # a new block each time: no reuse
        with pytest.raises(AccessDenied, match="has not granted access"):
            node.reencrypt(world.request(nonce=i.to_bytes(32, "big")))
    chain.block_number = index.block = 8 + budget
    with pytest.raises(NotFound, match="not in the registry"):
        node.reencrypt(world.request(nonce=b"\xff" * 32))
    assert chain.access_reads == budget


def _cfrag_verifies(world: World, response: Any) -> None:
    umbral.CapsuleFrag.from_bytes(response.fragment.cfrag).verify(
        world.capsule,
        umbral.PublicKey.from_compressed_bytes(world.alice.verifying_key()),
        world.alice.record_public_key(RecordType.LAB_RESULT),
        umbral.PublicKey.from_compressed_bytes(world.bob.umbral_public_key()),
    )


def test_a_grants_next_reads_skip_the_unwrap_and_the_capsule_parse(world: World) -> None:
    world.enroll(world.kfrag())
    with (
        patch.object(world.keystore, "unwrap", wraps=world.keystore.unwrap) as unwrap,
        patch.object(capsule_cache, "load_capsule", wraps=load_capsule) as parse,
    ):
        for n in range(3):
            _cfrag_verifies(world, world.node.reencrypt(world.request(nonce=bytes([n]) * 32)))
    assert unwrap.call_count == 1
    assert parse.call_count == 1
    assert len(world.unwrapped) == 1


def test_a_refused_requests_capsule_is_parsed_every_time(world: World) -> None:
    """Only served capsules are kept: a stranger's cannot push them out."""
    with patch.object(capsule_cache, "load_capsule", wraps=load_capsule) as parse:
        for n in range(2):
            with pytest.raises(PreconditionFailed):
                world.node.reencrypt(world.request(nonce=bytes([n]) * 32))
    assert parse.call_count == 2


def test_shredding_drops_the_unwrapped_kfrag_at_once(world: World) -> None:
    world.enroll(world.kfrag())
    world.node.reencrypt(world.request())
    assert len(world.unwrapped) == 1
    key = (world.alice.address, world.bob.address)
    world.registry.grants[key] = dataclasses.replace(world.registry.grants[key], active=False)
    world.node.shred_revoked([AccessRevoked(9, NOW, *key)])
    assert len(world.unwrapped) == 0


def test_a_read_that_reaches_the_store_while_it_is_shredded_keeps_no_kfrag(
    world: World,
) -> None:
    """A read judged before the revocation reached the index, whose re-encryption runs
    while the shredding is under way (after the cache was emptied, before the stored
    kfrag is deleted): it is served, as judged, but its unwrapped kfrag must not stay
    in the cache after the shredding."""
    world.enroll(world.kfrag())
    key = (world.alice.address, world.bob.address)
    granted = world.registry.grants[key]
    delete = world.kfrags.delete

    def delete_after_a_racing_read(*args: Any, **kwargs: Any) -> bool:
        world.registry.grants[key] = granted  # as the racing read was judged
        _cfrag_verifies(world, world.node.reencrypt(world.request()))
        world.registry.grants[key] = dataclasses.replace(granted, active=False)
        return delete(*args, **kwargs)

    world.registry.grants[key] = dataclasses.replace(granted, active=False)
    with patch.object(world.kfrags, "delete", side_effect=delete_after_a_racing_read):
        world.node.shred_revoked([AccessRevoked(9, NOW, *key)])
    assert world.kfrags.get(*key, RecordType.LAB_RESULT) is None
    assert len(world.unwrapped) == 0


def test_a_shredding_that_cannot_read_the_chain_still_drops_the_unwrapped_kfrag(
    world: World,
) -> None:
    world.enroll(world.kfrag())
    world.node.reencrypt(world.request())
    key = (world.alice.address, world.bob.address)
    with (
        patch.object(world.registry, "get_grant", side_effect=Unavailable("chain down")),
        pytest.raises(Unavailable),
    ):
        world.node.shred_revoked([AccessRevoked(9, NOW, *key)])
    assert len(world.unwrapped) == 0


def test_a_new_enrollment_is_served_with_the_new_kfrag(world: World) -> None:
    world.enroll(world.kfrag())
    world.node.reencrypt(world.request(nonce=b"\x01" * 32))
    world.enroll(world.kfrag())
    assert len(world.unwrapped) == 0
    with patch.object(world.keystore, "unwrap", wraps=world.keystore.unwrap) as unwrap:
        _cfrag_verifies(world, world.node.reencrypt(world.request(nonce=b"\x02" * 32)))
    assert unwrap.call_count == 1


# --- several signed reads in one call (ReencryptMany, ADR 16) ------------------------------


def batch_request(
    world: World, nonce: bytes, count: int = 2
) -> common_pb2.ReencryptionBatchRequest:
    """Bob's batch asking for the world's one capsule ``count`` times over distinct ids
    (the ids after the first are unknown to the registry: refused, each on its own)."""
    record_ids = [world.record_id] + [bytes([0x70 + i]) * 32 for i in range(1, count)]
    hash_ = capsule_hash(bytes(world.capsule))
    claims = BatchClaims(
        patient=world.alice.address,
        record_ids=tuple(record_ids),
        capsule_hashes=(hash_,) * count,
        requester_umbral_key=world.bob.umbral_public_key(),
        nonce=nonce,
        deadline=NOW + 60,
        purpose_of_use="TREAT",
    )
    return common_pb2.ReencryptionBatchRequest(
        patient=address_bytes(world.alice.address),
        capsules=[
            common_pb2.CapsuleRef(
                record_id=r, capsule=bytes(world.capsule), record_type=RecordType.LAB_RESULT
            )
            for r in record_ids
        ],
        requester=address_bytes(world.bob.address),
        requester_umbral_key=claims.requester_umbral_key,
        purpose_of_use="TREAT",
        deadline=NOW + 60,
        nonce=nonce,
        signature=sign(world.bob.account, DOMAIN, claims),
    )


def many(*reads: common_pb2.ReencryptionRequest | common_pb2.ReencryptionBatchRequest) -> Any:
    return node_pb2.ReencryptManyRequest(
        reads=[
            node_pb2.NodeRead(single=r)
            if isinstance(r, common_pb2.ReencryptionRequest)
            else node_pb2.NodeRead(batch=r)
            for r in reads
        ]
    )


def test_one_call_of_many_reads_judges_each_as_if_alone(world: World) -> None:
    """Good, forged, malformed, replayed and refused reads side by side: each gets what
    its lone call would have, and only the judged ones leave audit entries, all made
    durable in one commit."""
    world.enroll(world.kfrag())
    replayed = world.request(nonce=b"\x51" * 32)
    world.node.reencrypt(replayed)
    malformed = world.request(nonce=b"\x52" * 32)
    malformed.requester_umbral_key = b"\x02" * 5
    size_before = world.audit.size()
    with patch.object(world.audit, "append_many", wraps=world.audit.append_many) as appends:
        response = world.node.reencrypt_many(
            many(
                world.request(nonce=b"\x53" * 32),
                world.request(nonce=b"\x54" * 32, signer=world.alice),
                malformed,
                replayed,
                batch_request(world, b"\x55" * 32, count=3),
                world.request(nonce=b"\x56" * 32, deadline=NOW - 1),
                world.request(nonce=b"\x57" * 32),
            )
        )
    assert appends.call_count == 1
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["single", "refusal", "refusal", "refusal", "batch", "refusal", "single"]
    refusals = [response.results[i].refusal for i in (1, 2, 3, 5)]
    assert [r.status for r in refusals] == [
        "UNAUTHENTICATED",
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
    ]
    assert "nonce already used" in refusals[2].message
    assert "deadline has passed" in refusals[3].message
    # Two singles and a batch of three were judged: five entries, each with its receipt.
    assert world.audit.size() == size_before + 5
    key = world.node.node_info().signing_public_key
    granted = [response.results[0].single.fragment, response.results[6].single.fragment]
    outcomes = response.results[4].batch.outcomes
    assert outcomes[0].fragment.cfrag and [o.status for o in outcomes[1:]] == ["NOT_FOUND"] * 2
    for fragment in [*granted, outcomes[0].fragment]:
        entry = world.audit.entry(fragment.receipt.leaf_index)
        assert entry.decision == "granted"
        assert entry.cfrag_hash == hashlib.sha256(fragment.cfrag).digest()
        assert verify_receipt(Receipt.from_fields(fragment.receipt), key)
        _cfrag_verifies(world, node_pb2.ReencryptResponse(fragment=fragment))
    for outcome in outcomes[1:]:
        entry = world.audit.entry(outcome.receipt.leaf_index)
        assert (entry.decision, entry.record_id) == ("denied", bytes(outcome.record_id))
        assert verify_receipt(Receipt.from_fields(outcome.receipt), key)


def test_the_same_read_twice_in_one_call_is_served_once(world: World) -> None:
    world.enroll(world.kfrag())
    request = world.request(nonce=b"\x61" * 32)
    response = world.node.reencrypt_many(many(request, request))
    first, second = response.results
    assert first.single.fragment.cfrag
    assert (second.refusal.status, second.refusal.message) == (
        "UNAUTHENTICATED",
        "nonce already used",
    )


def test_reads_in_one_call_spend_the_same_rate_as_alone(world: World) -> None:
    world.enroll(world.kfrag())
    reads = [world.request(nonce=i.to_bytes(32, "big")) for i in range(BURST + 2)]
    served = 0
    for start in range(0, len(reads), 16):
        response = world.node.reencrypt_many(many(*reads[start : start + 16]))
        served += sum(1 for r in response.results if r.HasField("single"))
        exhausted = [r.refusal for r in response.results if r.HasField("refusal")]
        assert all(r.status == "RESOURCE_EXHAUSTED" for r in exhausted)
    assert served == BURST


def test_reads_of_another_requester_in_one_call_are_charged_to_that_requester(
    world: World,
) -> None:
    """A stranger's refused reads riding in the doctor's call cost the stranger, not the
    doctor: the doctor's budget afterwards is what one lone read would have left."""
    world.enroll(world.kfrag())
    carol = Identity.generate("carol")
    strangers = [world.request(nonce=bytes([0x80 + i]) * 32, requester=carol) for i in range(15)]
    response = world.node.reencrypt_many(many(world.request(nonce=b"\x71" * 32), *strangers))
    assert response.results[0].single.fragment.cfrag
    assert {r.refusal.status for r in response.results[1:]} == {"PERMISSION_DENIED"}
    with pytest.raises(ResourceExhausted):
        world.node.reencrypt(world.request(nonce=b"\x72" * 32, requester=carol))
    for i in range(BURST - 1):
        assert world.node.reencrypt(world.request(nonce=(1000 + i).to_bytes(32, "big")))
    with pytest.raises(ResourceExhausted):
        world.node.reencrypt(world.request(nonce=b"\x73" * 32))


def test_a_call_too_large_is_refused_as_a_whole(world: World) -> None:
    world.enroll(world.kfrag())
    with pytest.raises(InvalidRequest, match="1 to 16 reads"):
        world.node.reencrypt_many(many(*[world.request(nonce=bytes([i]) * 32) for i in range(17)]))
    with pytest.raises(InvalidRequest, match="1 to 16 reads"):
        world.node.reencrypt_many(node_pb2.ReencryptManyRequest())
    big = batch_request(world, b"\x62" * 32, count=40)
    with pytest.raises(InvalidRequest, match="at most 64 capsules"):
        world.node.reencrypt_many(many(big, big))
    assert world.audit.size() == 0


def test_an_empty_read_is_refused_alone(world: World) -> None:
    world.enroll(world.kfrag())
    request = many(world.request(nonce=b"\x63" * 32))
    request.reads.add()
    good, empty = world.node.reencrypt_many(request).results
    assert good.single.fragment.cfrag
    assert empty.refusal.status == "INVALID_ARGUMENT"


def test_a_call_whose_audit_fails_answers_nothing(world: World) -> None:
    world.enroll(world.kfrag())
    world.audit.close()
    with pytest.raises(Unavailable, match="audit"):
        world.node.reencrypt_many(
            many(world.request(nonce=b"\x64" * 32), world.request(nonce=b"\x65" * 32))
        )


# --- a kfrag holder's refused capsules, against the node's default limits ------------------


class LimiterClock:
    """The requester limiter's clock; the node's own stands still at NOW."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


def expired_holder_node(world: World, tmp_path: Path, clock: LimiterClock) -> NodeService:
    """A node where bob holds a kfrag but his grant has expired (every capsule he asks
    for is refused), with the requester limiter server.py builds from the default
    settings for a node of one process."""
    from kms_node.settings import NodeSettings

    world.enroll(world.kfrag())
    key = (world.alice.address, world.bob.address)
    world.registry.grants[key] = dataclasses.replace(world.registry.grants[key], expires_at=NOW)
    limiter = RateLimiter.share_of(
        NodeSettings.rate_limit_per_s, NodeSettings.rate_limit_burst, 1, clock=clock
    )
    return node_on(world, tmp_path, world.registry, world.registry, limiter=limiter)


def test_a_kfrag_holders_refused_request_costs_ten_of_the_default_burst(
    world: World, tmp_path: Path
) -> None:
    """The clock standing still, the default burst (200) pays for 200 / 10 = 20 refused
    requests; the 21st is over the rate."""
    from core.rate_limit import REFUSAL_COST
    from kms_node.settings import NodeSettings

    node = expired_holder_node(world, tmp_path, LimiterClock())
    assert world.kfrags.holds(world.alice.address, world.bob.address)
    refusals = NodeSettings.rate_limit_burst // REFUSAL_COST
    for i in range(refusals):
        with pytest.raises(AccessDenied, match="grant expired"):
            node.reencrypt(world.request(nonce=bytes([0x80, i]) * 16))
    with pytest.raises(ResourceExhausted, match="rate limit for this requester"):
        node.reencrypt(world.request(nonce=b"\x81" * 32))


def test_a_fully_refused_64_capsule_batch_leaves_at_most_one_burst_of_debt(
    world: World, tmp_path: Path
) -> None:
    """64 refused capsules cost 1 + 63/4 + 64 x 9 = 592.75 tokens, but the debt stops at
    one burst (200): the next request is admitted once that burst and its own token
    have refilled, (200 + 1) / 100 s later, not (392.75 + 1) / 100 s."""
    from kms_node.settings import NodeSettings

    clock = LimiterClock()
    node = expired_holder_node(world, tmp_path, clock)
    outcomes = node.reencrypt_batch(batch_request(world, b"\x82" * 32, count=64)).outcomes
    assert len(outcomes) == 64 and all(o.status and not o.fragment.cfrag for o in outcomes)
    rate, burst = NodeSettings.rate_limit_per_s, NodeSettings.rate_limit_burst
    clock.now = burst / rate - 0.01  # still in debt
    with pytest.raises(ResourceExhausted, match="rate limit for this requester"):
        node.reencrypt(world.request(nonce=b"\x83" * 32))
    clock.now = burst / rate + 2 / rate  # the burst of debt repaid: admitted, and judged
    with pytest.raises(AccessDenied, match="grant expired"):
        node.reencrypt(world.request(nonce=b"\x84" * 32))
