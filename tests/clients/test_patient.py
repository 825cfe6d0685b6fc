"""The patient's SDK client against the registry's twin and a loopback coordinator: what
it writes on-chain, in which order, and what it makes of the answers. The same client on
the real chain and cluster: tests/integration."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import pytest
from eth_account.signers.local import LocalAccount

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.identity import Identity
from clients.sdk.patient import GrantOutcome, PatientClient
from clients.sdk.records import parse_envelope
from clients.sdk.timeouts import Timeouts
from core.errors import (
    ChainRejected,
    ChainUnavailable,
    ConfigurationError,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from core.record_types import RecordType, to_mask
from core.registry_types import record_id_of
from core.umbral_codec import capsule_hash
from deploy.sample_records import diagnosis, lab_result
from proto.kms.v1 import common_pb2, coordinator_pb2
from tests.registry_twin import RegistryTwin

from .conftest import NODE_IDS, Connect, FakeCoordinator, clear_kfrag_hashes

LAB = RecordType.LAB_RESULT


@pytest.fixture
def patient(connect: Connect, alice: Identity) -> PatientClient:
    """Alice's client, registered."""
    client = connect(PatientClient, alice)
    client.register()
    return client


def test_register_writes_the_patients_keys_once(patient: PatientClient, twin: RegistryTwin) -> None:
    info = twin.get_patient(patient.identity.address)
    assert info is not None
    assert info.umbral_public_keys == patient.identity.record_public_keys()
    assert info.verifying_key == patient.identity.verifying_key()
    block = twin.latest_block()[0]
    patient.register()  # already registered: nothing is sent (a second one would revert)
    assert twin.latest_block()[0] == block


def test_a_refused_anchor_leaves_no_blob_behind(
    connect: Connect, alice: Identity, blobs: LocalBlobStore
) -> None:
    unregistered = connect(PatientClient, alice)
    with pytest.raises(ChainRejected, match="PatientNotRegistered"):
        unregistered.store_record(lab_result(), LAB)
    assert list(blobs.root.iterdir()) == []


def test_an_anchor_that_may_yet_be_mined_keeps_its_blob(
    patient: PatientClient,
    twin: RegistryTwin,
    blobs: LocalBlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unanswered(*args: object, **kwargs: object) -> None:
        raise ChainUnavailable("anchorRecord: transaction not mined within 60s")

    monkeypatch.setattr(twin, "anchor_record", unanswered)
    with pytest.raises(ChainUnavailable):
        patient.store_record(lab_result(), LAB)
    assert len(list(blobs.root.iterdir())) == 1


def test_a_stored_record_is_anchored_as_its_envelope_says(
    patient: PatientClient, twin: RegistryTwin, blobs: LocalBlobStore
) -> None:
    stored = patient.store_record(lab_result(), LAB)
    envelope = blobs.get(stored.storage_uri)
    record = twin.get_record(stored.record_id)
    assert record is not None
    assert stored.record_id == record_id_of(patient.identity.address, stored.capsule_hash)
    assert record.patient == record.creator == patient.identity.address
    assert record.record_type == LAB and record.active
    assert record.storage_uri == stored.storage_uri
    assert record.content_hash == stored.content_hash == hashlib.sha256(envelope).digest()
    assert record.capsule_hash == capsule_hash(parse_envelope(envelope).capsule)


def test_a_grant_is_written_on_chain_then_enrolled_at_every_active_node(
    patient: PatientClient,
    twin: RegistryTwin,
    admin: LocalAccount,
    doctor: Identity,
    coordinator: FakeCoordinator,
) -> None:
    twin.set_node_active(admin, node_id="node-3", active=False)
    _, chain_now = twin.latest_block()
    outcome = patient.grant(
        doctor.address,
        doctor.umbral_public_key(),
        [LAB, RecordType.DIAGNOSIS],
        duration_s=3600,
        threshold=2,
    )
    grant = twin.get_grant(patient.identity.address, doctor.address)
    assert grant is not None and grant.active
    # Chain time, not the wall clock: the grant lasts from the block it is mined in.
    assert outcome.expires_at == grant.expires_at == chain_now + 3600
    assert grant.allowed_types_mask == to_mask([LAB, RecordType.DIAGNOSIS])
    assert grant.grantee_umbral_key == doctor.umbral_public_key()
    assert [e.node_id for e in coordinator.enrollments] == ["node-1", "node-2"]
    assert all(len(e.kfrags) == 2 for e in coordinator.enrollments)
    # Each node confirms the SHA-256 of the clear kfrags it opened (which the coordinator
    # cannot compute), not of the sealed bytes it was handed.
    assert outcome == GrantOutcome(
        grantee=doctor.address,
        expires_at=grant.expires_at,
        allowed_types=frozenset({LAB, RecordType.DIAGNOSIS}),
        threshold=2,
        enrolled={e.node_id: clear_kfrag_hashes(e) for e in coordinator.enrollments},
        failed={},
    )
    sealed = {hashlib.sha256(k.sealed).digest() for e in coordinator.enrollments for k in e.kfrags}
    assert sealed.isdisjoint(h for hashes in outcome.enrolled.values() for h in hashes)


Forgery = Callable[[common_pb2.EnrollKeyFragmentRequest], common_pb2.EnrollKeyFragmentResponse]


def _claim(hashes: Callable[[common_pb2.EnrollKeyFragmentRequest], list[bytes]]) -> Forgery:
    """A made-up success for the enrolling node, with ``hashes`` of its enrollment."""
    return lambda e: common_pb2.EnrollKeyFragmentResponse(node_id=e.node_id, kfrag_sha256=hashes(e))


#: what a hostile coordinator may claim a node answered, none of it what the node stored
FORGERIES: dict[str, Forgery] = {
    "hashes of the sealed kfrags": _claim(
        lambda e: [hashlib.sha256(k.sealed).digest() for k in e.kfrags]
    ),
    "no hashes": _claim(lambda e: []),
    "made-up hashes": _claim(lambda e: [bytes(32)] * len(e.kfrags)),
    "one hash short": _claim(lambda e: clear_kfrag_hashes(e)[:-1]),
    "one hash too many": _claim(lambda e: [*clear_kfrag_hashes(e), clear_kfrag_hashes(e)[0]]),
    "the hashes out of order": _claim(lambda e: clear_kfrag_hashes(e)[::-1]),
    "another node's id": lambda e: common_pb2.EnrollKeyFragmentResponse(
        node_id="node-1", kfrag_sha256=clear_kfrag_hashes(e)
    ),
}


@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_claimed_enrollment_the_node_did_not_confirm_is_a_failure(
    patient: PatientClient, doctor: Identity, coordinator: FakeCoordinator, forgery: Forgery
) -> None:
    coordinator.forged = {"node-2": forgery}
    outcome = patient.grant(
        doctor.address,
        doctor.umbral_public_key(),
        [LAB, RecordType.DIAGNOSIS],
        duration_s=60,
        threshold=2,
    )
    assert sorted(outcome.enrolled) == ["node-1", "node-3"]
    assert list(outcome.failed) == ["node-2"]
    assert "the node's confirmation does not match what was sent" in outcome.failed["node-2"]


def test_a_coordinator_claiming_every_node_stored_the_kfrags_does_not_make_a_grant(
    patient: PatientClient, twin: RegistryTwin, doctor: Identity, coordinator: FakeCoordinator
) -> None:
    coordinator.forged = {
        "node-1": FORGERIES["hashes of the sealed kfrags"],
        "node-2": FORGERIES["no hashes"],
        "node-3": FORGERIES["made-up hashes"],
    }
    with pytest.raises(Unavailable) as raised:
        patient.grant(doctor.address, doctor.umbral_public_key(), [LAB], duration_s=60, threshold=2)
    assert "written on-chain but only 0 of 2 required nodes accepted kfrags" in raised.value.message
    for node_id in NODE_IDS:
        assert f"{node_id}: the node's confirmation does not match what was sent" in (
            raised.value.message
        )
    grant = twin.get_grant(patient.identity.address, doctor.address)
    assert grant is not None and grant.active


def test_a_grant_fewer_nodes_accepted_than_the_threshold_is_unavailable_but_on_chain(
    patient: PatientClient, twin: RegistryTwin, doctor: Identity, coordinator: FakeCoordinator
) -> None:
    coordinator.refusing = {"node-1": "disk full", "node-2": "disk full"}
    with pytest.raises(Unavailable) as raised:
        patient.grant(doctor.address, doctor.umbral_public_key(), [LAB], duration_s=60, threshold=2)
    assert "written on-chain but only 1 of 2 required nodes accepted kfrags" in raised.value.message
    assert "node-1: PERMISSION_DENIED: disk full" in raised.value.message
    grant = twin.get_grant(patient.identity.address, doctor.address)
    assert grant is not None and grant.active


def test_failures_below_the_threshold_are_reported_in_the_outcome(
    patient: PatientClient, doctor: Identity, coordinator: FakeCoordinator
) -> None:
    coordinator.refusing = {"node-2": "stopped"}
    outcome = patient.grant(
        doctor.address, doctor.umbral_public_key(), [LAB], duration_s=60, threshold=2
    )
    assert sorted(outcome.enrolled) == ["node-1", "node-3"]
    assert outcome.failed == {"node-2": "PERMISSION_DENIED: stopped"}


@pytest.mark.parametrize(
    ("types", "duration_s", "threshold", "message"),
    [
        ([], 60, 2, "at least one record type"),
        ([LAB], 0, 2, "duration_s must be positive"),
        ([LAB], 60, 4, "threshold 4 needs between 1 and 3 active nodes"),
        ([LAB], 60, 0, "threshold 0 needs between 1 and 3 active nodes"),
    ],
)
def test_a_grant_the_cluster_cannot_serve_is_refused_before_anything_is_sent(
    patient: PatientClient,
    twin: RegistryTwin,
    doctor: Identity,
    coordinator: FakeCoordinator,
    types: list[RecordType],
    duration_s: int,
    threshold: int,
    message: str,
) -> None:
    block = twin.latest_block()[0]
    with pytest.raises(InvalidRequest, match=message):
        patient.grant(
            doctor.address,
            doctor.umbral_public_key(),
            types,
            duration_s=duration_s,
            threshold=threshold,
        )
    assert twin.latest_block()[0] == block
    assert coordinator.enrollments == []


def test_the_registry_refusing_a_grant_enrolls_nothing(
    patient: PatientClient, coordinator: FakeCoordinator
) -> None:
    stranger = Identity.generate("not-a-provider")
    with pytest.raises(ChainRejected) as raised:
        patient.grant(
            stranger.address, stranger.umbral_public_key(), [LAB], duration_s=60, threshold=2
        )
    assert raised.value.reason == "GranteeNotProvider"
    assert coordinator.enrollments == []


def test_revoke_returns_the_block_from_which_the_grant_is_inactive(
    patient: PatientClient, twin: RegistryTwin, doctor: Identity
) -> None:
    patient.grant(doctor.address, doctor.umbral_public_key(), [LAB], duration_s=60, threshold=2)
    block = patient.revoke(doctor.address)
    before = twin.get_grant(patient.identity.address, doctor.address, block=block - 1)
    after = twin.get_grant(patient.identity.address, doctor.address, block=block)
    assert before is not None and before.active
    assert after is not None and not after.active


def test_erase_deactivates_the_record_and_deletes_its_blob(
    patient: PatientClient, twin: RegistryTwin, blobs: LocalBlobStore
) -> None:
    stored = patient.store_record(diagnosis(), RecordType.DIAGNOSIS)
    block = patient.erase(stored.record_id)
    address, capsule = patient.identity.address, stored.capsule_hash
    before = twin.access_state(stored.record_id, address, capsule, block=block - 1)
    after = twin.access_state(stored.record_id, address, capsule, block=block)
    assert before.record is not None and before.record.active and not before.capsule_retired
    assert after.record is not None and not after.record.active and after.capsule_retired
    with pytest.raises(NotFound):
        blobs.get(stored.storage_uri)
    # Erasing again sends nothing (a second deactivation would revert) and says where the
    # chain is.
    assert patient.erase(stored.record_id) == twin.latest_block()[0] == block


def test_erasing_a_record_the_registry_does_not_know_is_not_found(
    patient: PatientClient, twin: RegistryTwin
) -> None:
    block = twin.latest_block()[0]
    with pytest.raises(NotFound, match="is not in the registry"):
        patient.erase(bytes(32))
    assert twin.latest_block()[0] == block


def test_allow_writer_lets_a_provider_anchor_for_the_patient_until_stopped(
    patient: PatientClient, twin: RegistryTwin, doctor: Identity
) -> None:
    def anchor(capsule: bytes) -> str:
        return twin.anchor_record(
            doctor.account,
            patient=patient.identity.address,
            content_hash=b"c" * 32,
            storage_uri="blob:written-by-the-doctor",
            record_type=LAB,
            capsule_hash=capsule,
        )

    with pytest.raises(ChainRejected) as raised:
        anchor(b"1" * 32)
    assert raised.value.reason == "NotRecordWriter"
    patient.allow_writer(doctor.address)
    anchor(b"2" * 32)
    patient.allow_writer(doctor.address, allowed=False)
    with pytest.raises(ChainRejected) as raised:
        anchor(b"3" * 32)
    assert raised.value.reason == "NotRecordWriter"


def test_an_emergency_opt_in_is_standing_consent_and_opting_out_withdraws_it(
    patient: PatientClient, twin: RegistryTwin, responder: Identity, coordinator: FakeCoordinator
) -> None:
    outcome = patient.opt_in_emergency(
        responder.address, responder.umbral_public_key(), [LAB], threshold=2
    )
    assert outcome.expires_at == 0  # no grant yet: the responder opens one when needed
    assert sorted(outcome.enrolled) == list(NODE_IDS)
    opt_in = twin.get_emergency_opt_in(patient.identity.address, responder.address)
    assert opt_in is not None and opt_in.active
    assert opt_in.allowed_types_mask == to_mask([LAB])
    block = patient.opt_out_emergency(responder.address)
    opt_out = twin.get_emergency_opt_in(patient.identity.address, responder.address)
    assert opt_out is not None and not opt_out.active
    assert block == twin.latest_block()[0]


def test_await_nodes_returns_once_every_node_is_at_the_block(
    patient: PatientClient, coordinator: FakeCoordinator
) -> None:
    coordinator.index_block = 12
    assert patient.await_nodes(12) < 1.0


def test_await_nodes_names_the_nodes_still_behind(
    patient: PatientClient, coordinator: FakeCoordinator
) -> None:
    coordinator.index_block = 11
    with pytest.raises(Unavailable, match="nodes not at block 12 after 0.1s: node-1: at block 11"):
        patient.await_nodes(12, timeout_s=0.1)


def _at(block: int, *node_ids: str) -> list[coordinator_pb2.NodeStatus]:
    return [coordinator_pb2.NodeStatus(node_id=n, index_block=block) for n in node_ids]


@pytest.mark.parametrize(
    ("statuses", "lagging"),
    [
        (
            [],
            "node-1: missing from the coordinator's status; node-2: missing from the "
            "coordinator's status; node-3: missing from the coordinator's status",
        ),
        (_at(12, "node-1", "node-2"), "node-3: missing from the coordinator's status"),
        (
            _at(12, "node-1", "node-2", "node-2", "node-3"),
            "node-2: named 2 times in the coordinator's status",
        ),
        (
            _at(12, "node-1", "node-2", "node-2"),
            "node-3: missing from the coordinator's status; "
            "node-2: named 2 times in the coordinator's status",
        ),
    ],
    ids=["no nodes", "a node missing", "a node twice", "a node twice in place of another"],
)
def test_await_nodes_is_not_satisfied_by_a_status_that_does_not_name_every_node_once(
    patient: PatientClient,
    coordinator: FakeCoordinator,
    statuses: list[coordinator_pb2.NodeStatus],
    lagging: str,
) -> None:
    coordinator.statuses = statuses
    with pytest.raises(Unavailable) as raised:
        patient.await_nodes(12, timeout_s=0.1)
    assert raised.value.message == f"nodes not at block 12 after 0.1s: {lagging}"


def test_await_nodes_waits_for_the_nodes_active_in_the_registry(
    patient: PatientClient, twin: RegistryTwin, admin: LocalAccount, coordinator: FakeCoordinator
) -> None:
    coordinator.statuses = []
    fill = threading.Timer(0.3, lambda: setattr(coordinator, "statuses", _at(12, *NODE_IDS)))
    fill.start()
    try:
        assert patient.await_nodes(12, timeout_s=5.0) >= 0.3  # kept asking until all came
    finally:
        fill.cancel()
    # A node no longer active in the registry is not waited for.
    twin.set_node_active(admin, node_id="node-3", active=False)
    coordinator.statuses = _at(12, "node-1", "node-2")
    assert patient.await_nodes(12) < 1.0
    coordinator.statuses = _at(12, "node-1", "node-3")
    with pytest.raises(Unavailable, match="node-2: missing from the coordinator's status$"):
        patient.await_nodes(12, timeout_s=0.1)


@pytest.mark.parametrize("field", ["fan_out_s", "status_s"])
@pytest.mark.parametrize("value", [0, -1.0, True, "10"])
def test_timeouts_are_positive_numbers(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"{field} must be a positive number"):
        Timeouts(**{field: value})  # type: ignore[arg-type]
