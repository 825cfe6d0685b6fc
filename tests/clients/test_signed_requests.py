"""What the SDK sends is what it signed: each request and enrollment parses as every hop
parses it, carries the id derived from its signature, and recovers to its signer."""

from __future__ import annotations

import time

import pytest
import umbral_pre as umbral
from cryptography.hazmat.primitives.asymmetric import ec

from clients.sdk.identity import Identity
from clients.sdk.signed_requests import REQUEST_VALIDITY_S, RequestSigner, sealed_enrollment
from core.kfrag_delivery import compressed
from core.record_types import RecordType
from core.registry_types import NodeInfo
from core.request_auth import Domain, request_id_of, signer_of
from core.requests import BatchQuery, Enrollment, ReencryptionQuery

DOMAIN = Domain(31337, "0x" + "5f" * 20)


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate("alice")


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate("bob")


def capsule(patient: Identity, record_type: RecordType) -> bytes:
    capsule, _ = umbral.encrypt(patient.record_public_key(record_type), b"k" * 32)
    return bytes(capsule)


def test_a_single_request_is_signed_by_the_grantee(alice: Identity, bob: Identity) -> None:
    signer = RequestSigner(bob.account, bob.umbral_public_key(), DOMAIN)
    lab = capsule(alice, RecordType.LAB_RESULT)
    request = signer.single(alice.address, b"\x01" * 32, RecordType.LAB_RESULT, lab, "ETREAT")
    query = ReencryptionQuery.parse(request, DOMAIN)
    assert (query.patient, query.requester) == (alice.address, bob.address)
    assert (query.record_id, query.record_type, query.capsule_bytes) == (
        b"\x01" * 32,
        RecordType.LAB_RESULT,
        lab,
    )
    assert query.purpose_of_use == "ETREAT"
    assert query.requester_umbral_key == bob.umbral_public_key()
    assert request.request_id == query.request_id == request_id_of(DOMAIN, query.claims())
    assert signer_of(DOMAIN, query.claims(), request.signature) == bob.address
    assert 0 < request.deadline - time.time() <= REQUEST_VALIDITY_S


def test_a_batch_is_signed_by_the_grantee_in_the_order_given(
    alice: Identity, bob: Identity
) -> None:
    signer = RequestSigner(bob.account, bob.umbral_public_key(), DOMAIN)
    refs = [
        (b"\x02" * 32, RecordType.DIAGNOSIS, capsule(alice, RecordType.DIAGNOSIS)),
        (b"\x01" * 32, RecordType.LAB_RESULT, capsule(alice, RecordType.LAB_RESULT)),
    ]
    request = signer.batch(alice.address, refs, validity_s=30)
    batch = BatchQuery.parse(request, DOMAIN)
    assert [(q.record_id, q.record_type, q.capsule_bytes) for q in batch.items] == refs
    first = batch.items[0]
    assert (first.patient, first.requester, first.purpose_of_use) == (
        alice.address,
        bob.address,
        "TREAT",
    )
    assert request.request_id == batch.request_id == request_id_of(DOMAIN, batch.claims())
    assert signer_of(DOMAIN, batch.claims(), request.signature) == bob.address
    assert 0 < request.deadline - time.time() <= 30


def test_each_request_has_a_fresh_nonce(alice: Identity, bob: Identity) -> None:
    signer = RequestSigner(bob.account, bob.umbral_public_key(), DOMAIN)
    lab = capsule(alice, RecordType.LAB_RESULT)
    first, second = (
        signer.single(alice.address, b"\x01" * 32, RecordType.LAB_RESULT, lab) for _ in range(2)
    )
    assert first.nonce != second.nonce
    assert first.request_id != second.request_id


def test_an_enrollment_is_signed_by_the_patient(alice: Identity, bob: Identity) -> None:
    delivery = ec.generate_private_key(ec.SECP256R1())
    node = NodeInfo(
        node_id="node-1",
        endpoint="127.0.0.1:1",
        signing_public_key=b"",
        delivery_public_key=compressed(delivery.public_key()),
        account="0x" + "33" * 20,
        active=True,
    )
    kfrags = {RecordType.LAB_RESULT: b"\x05" * 200, RecordType.DIAGNOSIS: b"\x06" * 200}
    request = sealed_enrollment(
        alice.account, DOMAIN, node, bob.address, bob.umbral_public_key(), kfrags
    )
    enrollment = Enrollment.parse(request)
    assert (enrollment.node_id, enrollment.patient, enrollment.grantee) == (
        "node-1",
        alice.address,
        bob.address,
    )
    assert [k.record_type for k in enrollment.kfrags] == list(kfrags)
    assert signer_of(DOMAIN, enrollment.claims(), request.signature) == alice.address
