"""The provider's SDK client against the registry's twin and a loopback coordinator: it
trusts neither the blob store nor the coordinator, only what the registry holds. The same
client on the real chain and cluster: tests/integration."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import umbral_pre as umbral

from clients.sdk import provider as provider_module
from clients.sdk.blob_store import STORAGE_SCHEME, LocalBlobStore
from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient, StoredRecord
from clients.sdk.provider import ProviderClient, RecordRead
from clients.sdk.records import SealedRecord, open_envelope, parse_envelope, seal
from core.audit import Receipt, verify_receipt
from core.errors import (
    ChainRejected,
    IntegrityError,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
)
from core.record_types import RecordType
from core.registry_types import NodeInfo, record_id_of
from core.request_auth import signer_of
from core.requests import ReencryptionQuery
from core.umbral_codec import capsule_hash, is_umbral_panic
from deploy.sample_records import lab_result
from kms_node.keystore import MemoryKeyStore
from proto.kms.v1 import common_pb2, record_pb2
from tests.forged_cfrags import forged_by_a_reader, forged_to_panic
from tests.registry_twin import RegistryTwin

from .conftest import NODE_IDS, Connect, FakeCoordinator, node_keys

LAB = RecordType.LAB_RESULT


@pytest.fixture
def stored(connect: Connect, alice: Identity) -> StoredRecord:
    patient = connect(PatientClient, alice)
    patient.register()
    return patient.store_record(lab_result(), LAB)


@pytest.fixture
def reader(connect: Connect, doctor: Identity) -> ProviderClient:
    return connect(ProviderClient, doctor)


def kfrags(
    patient: Identity, record_type: RecordType, receiving: bytes
) -> list[umbral.VerifiedKeyFrag]:
    """What the nodes would hold after the patient's grant: 2-of-3 kfrags to ``receiving``."""
    return list(
        umbral.generate_kfrags(
            delegating_sk=patient.record_secret_key(record_type),
            receiving_pk=umbral.PublicKey.from_compressed_bytes(receiving),
            signer=patient.kfrag_signer(),
            threshold=2,
            shares=3,
            sign_delegating_key=True,
            sign_receiving_key=True,
        )
    )


def test_a_record_is_read_with_fragments_verified_against_the_patients_registered_keys(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    twin: RegistryTwin,
    coordinator: FakeCoordinator,
) -> None:
    coordinator.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())
    assert reader.read_record(stored.record_id) == lab_result()
    # The request names the record as the registry holds it and is signed for this
    # registry's domain.
    (request,) = coordinator.reencrypt_requests
    domain = twin.signing_domain()
    query = ReencryptionQuery.parse(request, domain)
    assert query.patient == alice.address and query.record_type == LAB
    assert query.capsule_hash == stored.capsule_hash
    assert signer_of(domain, query.claims(), query.signed.signature) == doctor.address


def test_fragments_for_another_patients_key_do_not_open_the_record(
    reader: ProviderClient,
    stored: StoredRecord,
    doctor: Identity,
    coordinator: FakeCoordinator,
) -> None:
    """A coordinator (or node) that re-encrypts under another delegation gets nothing
    past the client's own verification."""
    coordinator.kfrags = kfrags(Identity.generate("mallory"), LAB, doctor.umbral_public_key())
    with pytest.raises(IntegrityError, match="with 0 valid capsule fragments"):
        reader.read_record(stored.record_id)


@pytest.fixture
def granted(coordinator: FakeCoordinator, alice: Identity, doctor: Identity) -> FakeCoordinator:
    """The coordinator, its nodes holding kfrags of alice's grant to the doctor."""
    coordinator.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())
    return coordinator


def test_fragments_that_do_not_verify_are_reported_and_replaced(
    reader: ProviderClient, stored: StoredRecord, granted: FakeCoordinator
) -> None:
    coordinator = granted
    coordinator.lying = {"node-2"}
    assert reader.read_record(stored.record_id) == lab_result()
    (report,) = coordinator.retries
    assert report.read_id == b"r" * 16
    assert [(r.record_id, r.node_id) for r in report.reported] == [(stored.record_id, "node-2")]
    # Nothing to report: no retry.
    coordinator.lying = set()
    assert reader.read_record(stored.record_id) == lab_result()
    assert len(coordinator.retries) == 1


def test_fragments_that_open_the_record_are_not_verified_one_by_one(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ADR 19: the first read of a kfrag set verifies its fragments; once they opened a
    record, the set's fragments are combined as relayed, and a read that opens verifies
    no fragment on its own (single and batch, any record of the set's type)."""
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    checked = []
    check = ProviderClient._check

    def counted(self: ProviderClient, *args: Any) -> Any:
        checked.append(args)
        return check(self, *args)

    monkeypatch.setattr(ProviderClient, "_check", counted)
    assert reader.read_record(stored.record_id) == lab_result()
    assert len(checked) == 1
    assert reader.read_record(stored.record_id) == lab_result()
    records = [stored.record_id, second.record_id]
    assert reader.read_records(records) == dict.fromkeys(records, lab_result())
    assert len(checked) == 1
    assert granted.retries == []
    # A renewed grant is a new set: verified once again.
    granted.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())
    assert reader.read_record(stored.record_id) == lab_result()
    assert len(checked) == 2


def test_fragments_a_past_reader_forged_are_verified_and_refused_though_they_would_open(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
    blobs: LocalBlobStore,
) -> None:
    """Another grantee who opened the capsule can work out its key seed and make
    fragments, under a precursor of her own, that pass umbral's check and open the true
    DEK for this app, whom the patient may never have delegated to (ADR 19). They are
    of no kfrag set the app verified, so they are verified first: none does, all are
    reported, and the record opens only with the genuine replacements. Even after the
    app has verified the genuine set."""
    carol = Identity.generate("carol")
    carol_sk = carol.umbral_secret_key()
    carols = kfrags(alice, LAB, carol.umbral_public_key())
    pk_a = alice.record_public_key(LAB)
    bob = umbral.PublicKey.from_compressed_bytes(doctor.umbral_public_key())
    envelope = parse_envelope(blobs.get(stored.storage_uri))
    capsule = umbral.Capsule.from_bytes(envelope.capsule)

    def forge(capsule: umbral.Capsule) -> list[bytes]:
        own = [umbral.reencrypt(capsule, k) for k in carols[:2]]
        return forged_by_a_reader(capsule, pk_a, carol_sk, own, bob)

    forged = forge(capsule)
    # Unverified, they would open the record's true key for the doctor.
    cfrags = [umbral.CapsuleFrag.from_bytes(c).skip_verification() for c in forged]
    dek = umbral.decrypt_reencrypted(
        doctor.umbral_secret_key(), pk_a, capsule, cfrags, envelope.encrypted_dek
    )
    assert dek is not None and open_envelope(envelope, bytes(dek)) == lab_result()

    assert reader.read_record(stored.record_id) == lab_result()  # the genuine set, verified
    granted.forge = forge
    assert reader.read_record(stored.record_id) == lab_result()
    (report,) = granted.retries
    assert sorted(r.node_id for r in report.reported) == ["node-1", "node-2"]
    # Without replacements the read fails: the forgery opened nothing.
    granted.retry_error = PreconditionFailed("no read is kept")
    with pytest.raises(PreconditionFailed):
        reader.read_record(stored.record_id)


def test_fragments_crafted_to_make_umbral_panic_are_refused_and_reported(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
) -> None:
    """Fragments that pass umbral's check and combine to the point at infinity make
    umbral-pre 0.11 panic (a BaseException) instead of refusing them. They are of no
    verified set, so they never reach it: verified, refused and reported."""
    pk_a = alice.record_public_key(LAB)
    bob = umbral.PublicKey.from_compressed_bytes(doctor.umbral_public_key())
    template = umbral.reencrypt(
        umbral.encrypt(pk_a, b"any")[0], kfrags(alice, LAB, doctor.umbral_public_key())[0]
    )
    assert reader.read_record(stored.record_id) == lab_result()
    granted.forge = lambda capsule: forged_to_panic(capsule, pk_a, template, bob, 2)
    assert reader.read_record(stored.record_id) == lab_result()
    (report,) = granted.retries
    assert sorted(r.node_id for r in report.reported) == ["node-1", "node-2"]


def test_a_panic_in_umbral_is_a_refusal_to_open_not_a_crash(
    alice: Identity, doctor: Identity
) -> None:
    """Should such fragments reach decryption at all, the panic is caught as umbral's
    refusal would be (the read then verifies them one by one)."""
    pk_a = alice.record_public_key(LAB)
    bob = umbral.PublicKey.from_compressed_bytes(doctor.umbral_public_key())
    capsule, encrypted_dek = umbral.encrypt(pk_a, bytes(32))
    template = umbral.reencrypt(capsule, kfrags(alice, LAB, doctor.umbral_public_key())[0])
    forged = [
        umbral.CapsuleFrag.from_bytes(c).skip_verification()
        for c in forged_to_panic(capsule, pk_a, template, bob, 2)
    ]
    envelope = record_pb2.RecordEnvelope(encrypted_dek=encrypted_dek)
    with pytest.raises(BaseException) as raised:
        umbral.decrypt_reencrypted(doctor.umbral_secret_key(), pk_a, capsule, forged, encrypted_dek)
    assert is_umbral_panic(raised.value)
    assert (
        provider_module._decrypt(doctor.umbral_secret_key(), pk_a, capsule, forged, envelope)
        is None
    )


def test_a_fragment_for_another_capsule_is_found_reported_and_replaced(
    reader: ProviderClient, stored: StoredRecord, alice: Identity, granted: FakeCoordinator
) -> None:
    """A node re-encrypts another of the patient's capsules with its real kfrag: a
    well-formed fragment that parses, and that does not open this record. Only then is
    each fragment verified: the node is reported and its fragment replaced."""
    other, _ = umbral.encrypt(alice.record_secret_key(LAB).public_key(), b"another record")
    granted.foreign = {"node-3": other}
    assert reader.read_record(stored.record_id) == lab_result()
    (report,) = granted.retries
    assert [(r.record_id, r.node_id) for r in report.reported] == [(stored.record_id, "node-3")]


def test_fragments_of_different_kfrag_sets_are_reported_inconsistent_and_replaced(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
) -> None:
    """node-2 answers with a fragment of an earlier kfrag set: it verifies, but the
    fragments cannot be combined. The app reports the record, not a node (it cannot tell
    which set is current), and reads the coordinator's replacements."""
    earlier = kfrags(alice, LAB, doctor.umbral_public_key())
    granted.stale = {"node-2": earlier[1]}
    assert reader.read_record(stored.record_id) == lab_result()
    (report,) = granted.retries
    assert list(report.reported) == []
    assert [bytes(r) for r in report.inconsistent] == [stored.record_id]


def test_a_batch_reports_its_inconsistent_records_in_one_retry(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
) -> None:
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    records = [stored.record_id, second.record_id]
    granted.stale = {"node-3": kfrags(alice, LAB, doctor.umbral_public_key())[2]}
    read = reader.read_records(records)
    assert read == {r: lab_result() for r in records}
    (report,) = granted.retries
    assert [bytes(r) for r in report.inconsistent] == records


def test_a_refused_report_fails_the_read_with_the_coordinators_reason(
    reader: ProviderClient, stored: StoredRecord, granted: FakeCoordinator
) -> None:
    coordinator = granted
    coordinator.lying = {"node-1"}
    coordinator.retry_error = PreconditionFailed("no read is kept")
    with pytest.raises(PreconditionFailed, match="no read is kept") as caught:
        reader.read_record(stored.record_id)
    assert caught.value.request_id == coordinator.reencrypt_requests[-1].request_id


@pytest.mark.parametrize("refused", [False, True], ids=["replaced", "retry-refused"])
def test_a_batch_reports_every_bad_fragment_in_one_retry(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    granted: FakeCoordinator,
    refused: bool,
) -> None:
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    records = [stored.record_id, second.record_id]
    granted.lying = {"node-2", "node-3"}  # one of three left: below the threshold of 2
    if refused:
        granted.retry_error = PreconditionFailed("no read is kept")
    read = reader.read_records(records)
    (report,) = granted.retries
    assert report.read_id == b"b" * 16
    reported = [(r.record_id, r.node_id) for r in report.reported]
    assert reported == [(r, n) for r in records for n in ("node-2", "node-3")]
    for record_id in records:
        outcome = read[record_id]
        if refused:
            assert isinstance(outcome, PreconditionFailed)
            assert outcome.request_id == granted.batch_requests[-1].request_id
        else:
            assert outcome == lab_result()


def test_a_record_the_registry_does_not_know_is_not_found_and_nothing_is_sent(
    reader: ProviderClient, coordinator: FakeCoordinator
) -> None:
    with pytest.raises(NotFound, match="is not in the registry"):
        reader.read_record(b"\x01" * 32)
    assert coordinator.reencrypt_requests == []


@pytest.fixture
def anchor(twin: RegistryTwin, blobs: LocalBlobStore, alice: Identity) -> Callable[..., bytes]:
    """Store ``envelope`` and have Alice anchor it with ``content_hash`` and ``capsule``'s
    hash, as a careless or lying writer might; the record's id."""
    twin.register_patient(alice.account, alice.record_public_keys(), alice.verifying_key())

    def anchor(envelope: bytes, content_hash: bytes, capsule: bytes) -> bytes:
        twin.anchor_record(
            alice.account,
            patient=alice.address,
            content_hash=content_hash,
            storage_uri=blobs.put(envelope),
            record_type=LAB,
            capsule_hash=capsule_hash(capsule),
        )
        return record_id_of(alice.address, capsule_hash(capsule))

    return anchor


def sealed(alice: Identity) -> SealedRecord:
    return seal(alice.address, LAB, lab_result(), alice.record_public_key(LAB))


def test_a_blob_that_does_not_hash_to_the_anchor_is_refused(
    reader: ProviderClient, anchor: Callable[..., bytes], alice: Identity
) -> None:
    record = sealed(alice)
    record_id = anchor(record.envelope, hashlib.sha256(b"another blob").digest(), record.capsule)
    with pytest.raises(IntegrityError, match="does not match the content hash on-chain"):
        reader.read_record(record_id)


def test_an_envelope_of_another_record_is_refused(
    reader: ProviderClient, anchor: Callable[..., bytes], alice: Identity
) -> None:
    record, other = sealed(alice), sealed(alice)
    record_id = anchor(record.envelope, record.content_hash, other.capsule)
    with pytest.raises(IntegrityError, match="stored envelope names a different record"):
        reader.read_record(record_id)


def test_an_envelope_whose_capsule_is_not_the_anchored_one_is_refused(
    reader: ProviderClient, anchor: Callable[..., bytes], alice: Identity
) -> None:
    record, other = sealed(alice), sealed(alice)
    swapped = parse_envelope(record.envelope)
    swapped.capsule = other.capsule
    envelope = swapped.SerializeToString()
    record_id = anchor(envelope, hashlib.sha256(envelope).digest(), record.capsule)
    with pytest.raises(IntegrityError, match="stored capsule is not the one anchored on-chain"):
        reader.read_record(record_id)


def test_anchors_and_patient_keys_are_read_from_the_registry_once(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    twin: RegistryTwin,
    coordinator: FakeCoordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """They never change once on-chain; whether the record is still active, and the
    grant, are the nodes' to judge on every request."""
    reads: list[str] = []
    for view in ("get_record", "get_patient"):
        real = getattr(twin, view)

        def counted(key: object, real: Callable[..., object] = real, view: str = view) -> object:
            reads.append(view)
            return real(key)

        monkeypatch.setattr(twin, view, counted)
    coordinator.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())
    for _ in range(3):
        assert reader.read_record(stored.record_id) == lab_result()
    assert sorted(reads) == ["get_patient", "get_record"]


def test_a_blob_changed_or_erased_after_a_read_is_checked_again(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    blobs: LocalBlobStore,
    coordinator: FakeCoordinator,
) -> None:
    """The client keeps what it parsed (clients/sdk/parsed_objects.py), not what it
    checked: every read fetches the blob again and checks it against the chain."""
    coordinator.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())
    assert reader.read_record(stored.record_id) == lab_result()
    path = blobs.root / stored.storage_uri.removeprefix(STORAGE_SCHEME)
    blob = path.read_bytes()
    path.write_bytes(sealed(alice).envelope)
    with pytest.raises(IntegrityError):
        reader.read_record(stored.record_id)
    path.write_bytes(blob)
    assert reader.read_record(stored.record_id) == lab_result()
    assert blobs.delete(stored.storage_uri)
    with pytest.raises(NotFound):
        reader.read_record(stored.record_id)
    assert len(coordinator.reencrypt_requests) == 2  # none for the refused reads


def test_a_batch_covers_one_patients_records(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    coordinator: FakeCoordinator,
) -> None:
    carol = connect(PatientClient, Identity.generate("carol"))
    carol.register()
    carols = carol.store_record(lab_result(), LAB)
    with pytest.raises(InvalidRequest, match="covers the records of one patient"):
        reader.read_records([stored.record_id, carols.record_id])
    assert coordinator.reencrypt_requests == []


def test_a_batch_names_each_record_once(
    reader: ProviderClient, stored: StoredRecord, coordinator: FakeCoordinator
) -> None:
    """The nodes refuse a batch holding a record twice: say so before anything is sent."""
    for read in (reader.read_records, reader.read_records_with_receipts):
        with pytest.raises(InvalidRequest, match="names each record once"):
            read([stored.record_id, stored.record_id])
    assert coordinator.reencrypt_requests == []


def test_an_emergency_grant_opens_on_the_patients_opt_in(
    twin: RegistryTwin,
    connect: Connect,
    alice: Identity,
    responder: Identity,
) -> None:
    er, patient = connect(ProviderClient, responder), connect(PatientClient, alice)
    patient.register()
    with pytest.raises(ChainRejected) as raised:
        er.open_emergency_access(alice.address, 900)
    assert raised.value.reason == "NotOptedIn"
    patient.opt_in_emergency(responder.address, responder.umbral_public_key(), [LAB], threshold=2)
    block, expires_at = er.open_emergency_access(alice.address, 900)
    grant = twin.get_grant(alice.address, responder.address)
    assert grant is not None and grant.active and grant.emergency
    assert block == twin.latest_block()[0]
    assert expires_at == grant.expires_at == twin.block(block).timestamp + 900


def test_fragments_without_valid_receipts_are_no_proof_for_the_app(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    coordinator: FakeCoordinator,
) -> None:
    """This fake coordinator relays fragments without the nodes' receipts: the plaintext
    is still the record, but an app asking for the receipts is told they are missing."""
    coordinator.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())
    assert reader.read_record(stored.record_id) == lab_result()
    with pytest.raises(IntegrityError, match="malformed receipt") as caught:
        reader.read_record_with_receipts(stored.record_id)
    assert caught.value.request_id


@pytest.mark.parametrize(
    ("lying", "used", "answer"),
    [
        ({"node-2"}, ["node-1", "node-3"], "first"),  # two verify: enough to open
        ({"node-2", "node-3"}, ["node-1", "node-2", "node-3"], "retry"),
    ],
    ids=["opened-at-once", "opened-after-retry"],
)
def test_a_batch_read_returns_the_receipts_of_the_fragments_that_opened_each_record(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    granted: FakeCoordinator,
    lying: set[str],
    used: list[str],
    answer: str,
) -> None:
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    records = [stored.record_id, second.record_id]
    granted.lying, granted.with_receipts = lying, True
    read = reader.read_records_with_receipts(records)
    # The first answer relays leaves 0 to 5 (two records, three nodes); a retry's 6 to 11.
    first_answer = range(0, 6)
    assert len(granted.retries) == 1  # every bad fragment is reported, used or not
    for record_id in records:
        outcome = read[record_id]
        assert isinstance(outcome, RecordRead), outcome
        assert outcome.plaintext == lab_result()
        assert [r.node_id for r in outcome.receipts] == used
        leaves = [r.leaf_index for r in outcome.receipts]
        assert all((leaf in first_answer) == (answer == "first") for leaf in leaves)
    # The plain batch read is the same read without the receipts.
    assert reader.read_records(records) == dict.fromkeys(records, lab_result())


def test_each_receipt_notes_the_request_and_fragment_it_was_kept_for(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    granted: FakeCoordinator,
) -> None:
    """Each receipt is checked to be for this read and its fragment (the entry rebuilt
    from the request, the fragment and the facts sent with the receipt hashes to the
    receipt's entry hash), and notes both, for an auditor holding a receipts file."""
    granted.with_receipts = True
    read = reader.read_record_with_receipts(stored.record_id)
    single = granted.reencrypt_requests[-1].request_id
    assert {r.kept_for_request for r in read.receipts} == {single}
    for r in read.receipts:
        assert granted.entries[r.leaf_index].request_id == single
        assert r.kept_cfrag_hash == granted.entries[r.leaf_index].cfrag_hash
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    batch = reader.read_records_with_receipts([stored.record_id, second.record_id])
    batch_id = granted.batch_requests[-1].request_id
    for record_id, outcome in batch.items():
        assert isinstance(outcome, RecordRead)
        assert {r.kept_for_request for r in outcome.receipts} == {batch_id}
        for r in outcome.receipts:
            assert granted.entries[r.leaf_index].record_id == record_id
            assert r.kept_cfrag_hash == granted.entries[r.leaf_index].cfrag_hash


@pytest.mark.parametrize("receipts", [True, False], ids=["with-receipts", "without"])
def test_a_fragment_changed_after_its_node_logged_it_is_verified_and_reported(
    reader: ProviderClient, stored: StoredRecord, granted: FakeCoordinator, receipts: bool
) -> None:
    """node-2's fragment has a bit of its kfrag signature flipped on the way (decryption
    does not use it, so the fragment would open the record). Its receipt says what node-2 logged,
    so the fragment is verified, found bad, reported and replaced, even on a kfrag set
    the app verified before (ADR 19). Without receipts nothing tells, and it opens the
    record unreported: no harm to what the app reads."""
    granted.with_receipts = receipts
    assert reader.read_record(stored.record_id) == lab_result()  # the set, verified
    granted.changed_after_logging = {"node-2"}
    assert reader.read_record(stored.record_id) == lab_result()
    if receipts:
        (report,) = granted.retries
        assert [r.node_id for r in report.reported] == ["node-2"]
    else:
        assert granted.retries == []


@pytest.mark.parametrize("how", ["another read's receipt", "facts altered"])
def test_a_receipt_not_for_this_read_is_refused_at_read_time(
    reader: ProviderClient, stored: StoredRecord, granted: FakeCoordinator, how: str
) -> None:
    """A relay hands the app node-2's genuine receipt of an earlier read of the same
    record (signed by node-2, for another request), or alters the facts sent with it:
    the entry rebuilt for this read does not hash to what the receipt vouches for."""
    granted.with_receipts = True
    earlier = reader.read_record_with_receipts(stored.record_id)
    kept = next(r for r in earlier.receipts if r.node_id == "node-2")
    facts = granted.entries[kept.leaf_index]

    def swap(node_id: str, receipt: common_pb2.AuditReceipt) -> None:
        if node_id != "node-2":
            return
        if how == "facts altered":
            receipt.entry.time += 1
            return
        receipt.CopyFrom(
            common_pb2.AuditReceipt(
                node_id=kept.node_id,
                leaf_index=kept.leaf_index,
                tree_size=kept.tree_size,
                entry_hash=kept.entry_hash,
                signature=kept.signature,
                entry=common_pb2.EntryFacts(
                    time=facts.time,
                    block_number=facts.block_number,
                    block_hash=facts.block_hash,
                    reason_code=facts.reason_code,
                    reason=facts.reason,
                ),
            )
        )

    granted.tamper_receipt = swap
    with pytest.raises(IntegrityError, match="node 'node-2' that is not for this request") as e:
        reader.read_record_with_receipts(stored.record_id)
    assert e.value.request_id == granted.reencrypt_requests[-1].request_id
    # The record alone is still read: the receipts are the app's evidence, not its key.
    assert reader.read_record(stored.record_id) == lab_result()


def test_a_single_read_after_a_retry_returns_the_replacements_receipts(
    reader: ProviderClient, stored: StoredRecord, granted: FakeCoordinator
) -> None:
    granted.lying, granted.with_receipts = {"node-2", "node-3"}, True
    read = reader.read_record_with_receipts(stored.record_id)
    assert read.plaintext == lab_result()
    assert [(r.node_id, r.leaf_index) for r in read.receipts] == [
        ("node-1", 3),
        ("node-2", 4),
        ("node-3", 5),
    ]


def test_a_batch_without_receipts_opens_but_is_no_proof_for_the_app(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    granted: FakeCoordinator,
) -> None:
    """Each record asked with its receipts is an error naming the request when they are
    missing; the plain batch read still opens them."""
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    records = [stored.record_id, second.record_id]
    assert reader.read_records(records) == dict.fromkeys(records, lab_result())
    read = reader.read_records_with_receipts(records)
    for record_id in records:
        outcome = read[record_id]
        assert isinstance(outcome, IntegrityError)
        assert "malformed receipt" in outcome.message
        assert outcome.request_id == granted.batch_requests[-1].request_id


# --- receipts the coordinator relays are verified ------------------------------------------


def resign(receipt: common_pb2.AuditReceipt, keys: MemoryKeyStore) -> None:
    """Sign ``receipt`` (in place) with ``keys``, as a node holding them would."""
    receipt.signature = keys.sign(Receipt.from_fields(receipt).canonical_bytes())


def forge(how: str) -> Callable[[str, common_pb2.AuditReceipt], None]:
    """What a hostile coordinator does to node-1's receipt (valid format each time)."""

    def tamper(node_id: str, receipt: common_pb2.AuditReceipt) -> None:
        if node_id != "node-1":
            return
        if how == "another node's receipt":  # node-2 did sign it, but not for this fragment
            receipt.node_id = "node-2"
            resign(receipt, node_keys("node-2"))
        elif how == "no signature":
            receipt.signature = b""
        elif how == "garbage signature":
            receipt.signature = b"\x30" * 70
        elif how == "a key not registered":
            resign(receipt, MemoryKeyStore())
        elif how == "another hash":
            receipt.entry_hash = bytes(32)

    return tamper


FORGERIES = [
    "another node's receipt",
    "no signature",
    "garbage signature",
    "a key not registered",
    "another hash",
]


@pytest.mark.parametrize("how", FORGERIES)
def test_a_receipt_node_1_did_not_sign_for_its_fragment_is_refused(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    granted: FakeCoordinator,
    how: str,
) -> None:
    """The coordinator relays node-1's valid fragment with a receipt node-1 did not sign:
    the app is told, naming the request and the node, instead of keeping it as evidence
    against node-1. The plain read (no receipts asked) still opens the record."""
    granted.with_receipts, granted.tamper_receipt = True, forge(how)
    with pytest.raises(IntegrityError, match="'node-1'") as caught:
        reader.read_record_with_receipts(stored.record_id)
    assert caught.value.request_id == granted.reencrypt_requests[-1].request_id
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    records = [stored.record_id, second.record_id]
    read = reader.read_records_with_receipts(records)
    for record_id in records:
        outcome = read[record_id]
        assert isinstance(outcome, IntegrityError), outcome
        assert "'node-1'" in outcome.message
        assert outcome.request_id == granted.batch_requests[-1].request_id
    assert reader.read_record(stored.record_id) == lab_result()


def test_node_keys_are_read_once_and_again_only_when_a_node_re_registers(
    reader: ProviderClient,
    stored: StoredRecord,
    twin: RegistryTwin,
    granted: FakeCoordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node's key changes only when it re-registers: the registry is read on the first
    receipt, then again once a read when a receipt does not verify with the key kept."""
    nodes = twin.list_nodes()
    listed: list[int] = []

    def list_nodes() -> list[NodeInfo]:
        listed.append(1)
        return list(nodes)

    monkeypatch.setattr(twin, "list_nodes", list_nodes)
    granted.with_receipts = True
    assert reader.read_record(stored.record_id) == lab_result()
    assert listed == []  # the plain read verifies no receipt
    for _ in range(3):
        read = reader.read_record_with_receipts(stored.record_id)
        assert [r.node_id for r in read.receipts] == list(NODE_IDS)
        assert all(
            verify_receipt(r, node_keys(r.node_id).signing_public_key()) for r in read.receipts
        )
    assert len(listed) == 1
    # node-1 re-registers with a new key, and signs with it.
    rotated = MemoryKeyStore()
    nodes[0] = dataclasses.replace(nodes[0], signing_public_key=rotated.signing_public_key())
    granted.tamper_receipt = lambda n, r: resign(r, rotated) if n == "node-1" else None
    read = reader.read_record_with_receipts(stored.record_id)
    assert read.receipts[0].node_id == "node-1"
    assert len(listed) == 2
    # A coordinator forging every receipt costs the app one registry read a read, at most.
    granted.tamper_receipt = lambda _n, r: setattr(r, "signature", b"")
    for _ in range(2):
        with pytest.raises(IntegrityError):
            reader.read_record_with_receipts(stored.record_id)
    assert len(listed) == 4


# --- fragments relayed twice ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("echoed", "again"),
    [({"node-1"}, {}), (set(), {"node-1": "node-1"})],
    ids=["same-bytes-twice", "second-fragment-of-a-node"],
)
def test_a_fragment_relayed_twice_is_used_once(
    reader: ProviderClient,
    stored: StoredRecord,
    connect: Connect,
    alice: Identity,
    granted: FakeCoordinator,
    echoed: set[str],
    again: dict[str, str],
) -> None:
    """umbral refuses a fragment twice ("Some of the CapsuleFrags are repeated"): the app
    drops the repeat and opens the record with the distinct ones, keeping one receipt a
    node, and reports nothing (no node sent a bad fragment)."""
    granted.echoed, granted.again, granted.with_receipts = echoed, again, True
    assert reader.read_record(stored.record_id) == lab_result()
    read = reader.read_record_with_receipts(stored.record_id)
    assert [r.node_id for r in read.receipts] == list(NODE_IDS)
    second = connect(PatientClient, alice).store_record(lab_result(), LAB)
    records = [stored.record_id, second.record_id]
    assert reader.read_records(records) == dict.fromkeys(records, lab_result())
    assert granted.retries == []


def test_a_fragment_relayed_again_under_another_nodes_name_is_used_once(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
) -> None:
    """Two nodes answer (2 of 3); the coordinator adds node-1's fragment of another
    re-encryption (other bytes, the same kfrag) as node-3's. It verifies, but umbral
    refuses it with node-1's: it is dropped and the record opens with the two."""
    granted.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())[:2]
    granted.again, granted.with_receipts = {"node-3": "node-1"}, True
    assert reader.read_record(stored.record_id) == lab_result()
    read = reader.read_record_with_receipts(stored.record_id)
    assert [r.node_id for r in read.receipts] == ["node-1", "node-2"]


def test_too_few_distinct_fragments_say_how_many_repeats_were_dropped(
    reader: ProviderClient,
    stored: StoredRecord,
    alice: Identity,
    doctor: Identity,
    granted: FakeCoordinator,
) -> None:
    granted.kfrags = kfrags(alice, LAB, doctor.umbral_public_key())[:1]
    granted.echoed = {"node-1"}
    with pytest.raises(IntegrityError, match=r"with 1 valid .* \(1 repeated fragments dropped\)"):
        reader.read_record(stored.record_id)
