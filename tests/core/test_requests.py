"""Every field of an incoming request is checked with a message a person can act on."""

from __future__ import annotations

import pytest
import umbral_pre as umbral

from core.errors import InvalidRequest
from core.request_auth import Domain, request_id_of, signing_digest
from core.requests import BatchQuery, Enrollment, ReencryptionQuery, parse_capsules
from proto.kms.v1 import common_pb2

DOMAIN = Domain(31337, "0x" + "ab" * 20)


@pytest.fixture(scope="module")
def valid() -> common_pb2.ReencryptionRequest:
    sk = umbral.SecretKey.random()
    capsule, _ = umbral.encrypt(sk.public_key(), b"x" * 32)
    return common_pb2.ReencryptionRequest(
        patient=b"\x11" * 20,
        record_id=b"\x01" * 32,
        capsule=bytes(capsule),
        requester=b"\x22" * 20,
        requester_umbral_key=bytes(umbral.SecretKey.random().public_key().to_compressed_bytes()),
        purpose_of_use="TREAT",
        deadline=2_000_000_000,
        nonce=b"\x05" * 32,
        signature=b"\x00" * 65,
    )


def _copy(msg: common_pb2.ReencryptionRequest) -> common_pb2.ReencryptionRequest:
    copy = common_pb2.ReencryptionRequest()
    copy.CopyFrom(msg)
    return copy


def test_valid_request_parses(valid: common_pb2.ReencryptionRequest) -> None:
    query = ReencryptionQuery.parse(valid, DOMAIN)
    assert query.patient == "0x" + "11" * 20
    assert query.requester.lower() == "0x" + "22" * 20
    assert query.capsule_bytes == valid.capsule


def test_the_request_id_is_derived_from_the_signed_request(
    valid: common_pb2.ReencryptionRequest,
) -> None:
    query = ReencryptionQuery.parse(valid, DOMAIN)
    # 128 bits of the EIP-712 digest the requester signs, as 32 hex digits.
    assert query.request_id == signing_digest(DOMAIN, query.claims())[:16].hex()
    assert query.request_id == request_id_of(DOMAIN, query.claims())
    # The digest kept for the signature check is that of the claims, in this domain.
    assert query.digest == signing_digest(DOMAIN, query.claims())
    # An echo of it is accepted; the same request in another domain has another id.
    echoed = _copy(valid)
    echoed.request_id = query.request_id
    assert ReencryptionQuery.parse(echoed, DOMAIN).request_id == query.request_id
    assert ReencryptionQuery.parse(valid, Domain(1, DOMAIN.registry_address)).request_id != (
        query.request_id
    )
    # Every signed field is in it, the nonce too: a fresh nonce, a fresh id.
    renewed = _copy(valid)
    renewed.nonce = b"\x06" * 32
    assert ReencryptionQuery.parse(renewed, DOMAIN).request_id != query.request_id


@pytest.mark.parametrize("echo", ["req-1", "A" * 32, "0" * 32, "x" * 1000])
def test_a_request_id_that_is_not_the_derived_one_is_refused(
    valid: common_pb2.ReencryptionRequest, echo: str
) -> None:
    msg = _copy(valid)
    msg.request_id = echo
    derived = ReencryptionQuery.parse(valid, DOMAIN).request_id
    with pytest.raises(InvalidRequest, match=f"request_id must be empty or .* {derived}$"):
        ReencryptionQuery.parse(msg, DOMAIN)


def test_a_batch_has_one_id_derived_from_its_signature(
    valid: common_pb2.ReencryptionRequest,
) -> None:
    refs = [
        common_pb2.CapsuleRef(record_id=bytes([i]) * 32, capsule=valid.capsule) for i in range(1, 4)
    ]
    batch = common_pb2.ReencryptionBatchRequest(
        patient=valid.patient,
        capsules=refs,
        requester=valid.requester,
        requester_umbral_key=valid.requester_umbral_key,
        purpose_of_use="TREAT",
        deadline=valid.deadline,
        nonce=valid.nonce,
        signature=valid.signature,
    )
    query = BatchQuery.parse(batch, DOMAIN)
    assert query.request_id == request_id_of(DOMAIN, query.claims())
    assert {q.request_id for q in query.items} == {query.request_id}
    # Each item carries the batch's digest: the signature over the whole batch is checked.
    assert {q.digest for q in query.items} == {signing_digest(DOMAIN, query.claims())}
    batch.request_id = "rewritten"
    with pytest.raises(InvalidRequest, match="request_id must be empty or"):
        BatchQuery.parse(batch, DOMAIN)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("patient", b"\x11" * 19, "patient must be a 20-byte address"),
        ("patient", b"\x00" * 20, "zero address"),
        ("requester", b"", "requester must be a 20-byte address"),
        ("record_id", b"\x01" * 33, "record_id must be 32 bytes"),
        ("capsule", b"garbage", "capsule must be 105 bytes"),
        ("capsule", b"\x00" * 105, "not a valid Umbral capsule"),
        ("capsule", b"\x01" * 100_000, "capsule must be 105 bytes"),
        ("requester_umbral_key", b"\x02" + b"\xff" * 32, "not a compressed secp256k1 point"),
        ("purpose_of_use", "SHOPPING", "purpose_of_use 'SHOPPING' is not one of"),
        ("request_id", "bad id with spaces", "request_id must be"),
        ("request_id", "x" * 65, "request_id must be"),
        ("nonce", b"\x01" * 31, "nonce must be 32 bytes"),
        ("signature", b"", "signature must be a 65-byte EIP-712 signature"),
        ("deadline", 0, "deadline is required"),
    ],
)
def test_bad_fields_are_refused_by_name(
    valid: common_pb2.ReencryptionRequest, field: str, value: object, fragment: str
) -> None:
    msg = _copy(valid)
    setattr(msg, field, value)
    with pytest.raises(InvalidRequest, match=fragment):
        # the capsule's content is checked when a server parses it, after the signature
        parse_capsules([ReencryptionQuery.parse(msg, DOMAIN)])


def _enrollment(**changes: object) -> common_pb2.EnrollKeyFragmentRequest:
    fields: dict[str, object] = dict(
        node_id="node-1",
        patient=b"\x11" * 20,
        grantee=b"\x22" * 20,
        receiving_key=bytes(umbral.SecretKey.random().public_key().to_compressed_bytes()),
        kfrags=[
            common_pb2.SealedKeyFragment(
                record_type=1, ephemeral_public_key=b"\x02" * 33, sealed=b"\x00" * 350
            )
        ],
        deadline=2_000_000_000,
        nonce=b"\x05" * 32,
        signature=b"\x00" * 65,
    )
    fields.update(changes)
    return common_pb2.EnrollKeyFragmentRequest(**fields)  # type: ignore[arg-type]


def test_valid_enrollment_parses_and_binds_each_sealed_kfrag() -> None:
    enrollment = Enrollment.parse(_enrollment())
    claims = enrollment.claims()
    assert claims.record_types == (1,)
    assert claims.sealed_hashes == (enrollment.kfrags[0].sha256,)
    assert claims.node_id == "node-1"
    assert (claims.nonce, claims.deadline) == (b"\x05" * 32, 2_000_000_000)


def _sealed(record_type: int = 1, key: bytes = b"\x02" * 33, size: int = 350) -> object:
    return common_pb2.SealedKeyFragment(
        record_type=record_type, ephemeral_public_key=key, sealed=b"\x00" * size
    )


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"patient": b"\x22" * 20}, "grantee must differ"),
        ({"node_id": ""}, "node_id must be 1-32"),
        ({"kfrags": []}, "1 to 6 sealed kfrags"),
        ({"kfrags": [_sealed(), _sealed()]}, "listed twice"),
        ({"kfrags": [_sealed(record_type=9)]}, r"kfrags\[0\].record_type must be 0..5"),
        ({"kfrags": [_sealed(key=b"\x02" * 65)]}, "ephemeral_public_key must be a 33-byte"),
        ({"kfrags": [_sealed(size=4)]}, r"kfrags\[0\].sealed must be"),
        ({"kfrags": [_sealed(size=4096)]}, r"kfrags\[0\].sealed must be"),
        ({"signature": b""}, "signature must be a 65-byte"),
        ({"deadline": 0}, "deadline is required"),
        ({"nonce": b""}, "nonce must be 32 bytes"),
        ({"nonce": b"\x05" * 33}, "nonce must be 32 bytes"),
        ({"receiving_key": b"\x02" * 5}, "receiving_key"),
    ],
)
def test_bad_enrollments_are_refused_by_name(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        Enrollment.parse(_enrollment(**changes))
