"""EIP-712 request signatures: the digest is the standard one, and each field is bound.

The digest is computed explicitly in core.request_auth; every test here checks
it against eth_account's independent EIP-712 implementation, which wallets agree with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

from core import request_auth
from core.addresses import is_valid
from core.errors import InvalidRequest, Unauthenticated
from core.request_auth import (
    SECP256K1_N,
    BatchClaims,
    Claims,
    DigestSigner,
    Domain,
    EnrollmentClaims,
    RequestClaims,
    authenticate,
    authenticate_digest,
    check_deadline,
    recover_signer,
    request_id_of,
    sign,
    signer_of,
    signing_digest,
    typed_data,
)
from core.umbral_codec import capsule_hash

DOMAIN = Domain(chain_id=31337, registry_address="0x" + "5f" * 20)


@pytest.fixture(params=sorted(request_auth.RECOVERY_BACKENDS))
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test once per signer-recovery implementation (coincurve, pure Python)."""
    monkeypatch.setattr(
        request_auth, "_recover_public_key", request_auth.RECOVERY_BACKENDS[request.param]
    )
    yield request.param


@pytest.fixture(scope="module")
def requester() -> LocalAccount:
    account: LocalAccount = Account.create()
    return account


def _random_address(rng: random.Random) -> str:
    return "0x" + rng.randbytes(20).hex()


def random_request(rng: random.Random, purpose: str = "TREAT") -> RequestClaims:
    return RequestClaims(
        patient=_random_address(rng),
        record_id=rng.randbytes(32),
        capsule_hash=capsule_hash(rng.randbytes(98)),
        requester_umbral_key=rng.randbytes(33),
        nonce=rng.randbytes(32),
        deadline=rng.randrange(2**64),
        purpose_of_use=purpose,
    )


def random_batch(rng: random.Random, size: int, purpose: str = "TREAT") -> BatchClaims:
    return BatchClaims(
        patient=_random_address(rng),
        record_ids=tuple(rng.randbytes(32) for _ in range(size)),
        capsule_hashes=tuple(rng.randbytes(32) for _ in range(size)),
        requester_umbral_key=rng.randbytes(33),
        nonce=rng.randbytes(32),
        deadline=rng.randrange(2**64),
        purpose_of_use=purpose,
    )


def random_enrollment(rng: random.Random, size: int, node_id: str = "node-1") -> EnrollmentClaims:
    return EnrollmentClaims(
        node_id=node_id,
        patient=_random_address(rng),
        grantee=_random_address(rng),
        receiving_key=rng.randbytes(33),
        record_types=tuple(rng.sample(range(6), size)),
        sealed_hashes=tuple(rng.randbytes(32) for _ in range(size)),
        nonce=rng.randbytes(32),
        deadline=rng.randrange(2**64),
    )


def reference_digest(domain: Domain, claims: Claims) -> bytes:
    """eth_account's EIP-712 digest of the JSON a wallet would be shown."""
    # EIP-191: keccak256(0x19 || version || header || body); eth_account did the EIP-712 part.
    message = encode_typed_data(full_message=typed_data(domain, claims))
    return keccak(b"\x19" + message.version + message.header + message.body)


BATCH = random_batch(random.Random(200), 64)
ENROLLMENT = random_enrollment(random.Random(300), 6)
PURPOSES = ["TREAT", "", "ETREAT", "Behandlung für Ärztin 👩‍⚕️", "治疗"]
SAMPLES: list[Claims] = [
    *(random_request(random.Random(i), PURPOSES[i % len(PURPOSES)]) for i in range(10)),
    *(random_batch(random.Random(100 + i), i, PURPOSES[i % len(PURPOSES)]) for i in range(6)),
    BATCH,
    *(random_enrollment(random.Random(400 + i), i, f"node-{i}") for i in range(4)),
    random_enrollment(random.Random(410), 2, "nœud-ü 👩‍⚕️"),
    ENROLLMENT,
    RequestClaims(
        patient="0x" + "11" * 20,
        record_id=bytes(32),
        capsule_hash=bytes(32),
        requester_umbral_key=b"",
        nonce=bytes(32),
        deadline=0,
        purpose_of_use="",
    ),
]


def test_type_strings_are_the_documented_ones() -> None:
    assert Domain.encode_type() == (
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    assert RequestClaims.encode_type() == (
        "ReencryptionRequest(address patient,bytes32 recordId,bytes32 capsuleHash,"
        "bytes requesterUmbralKey,bytes32 nonce,uint64 deadline,string purposeOfUse)"
    )
    assert BatchClaims.encode_type() == (
        "ReencryptionBatch(address patient,bytes32[] recordIds,bytes32[] capsuleHashes,"
        "bytes requesterUmbralKey,bytes32 nonce,uint64 deadline,string purposeOfUse)"
    )
    assert EnrollmentClaims.encode_type() == (
        "KeyFragmentEnrollment(string nodeId,address patient,address grantee,"
        "bytes receivingKey,uint8[] recordTypes,bytes32[] sealedHashes,bytes32 nonce,"
        "uint64 deadline)"
    )


KEY = bytes.fromhex("02" + "ab" * 32)
#: one fixed value of each struct, with its signing digest in ``DOMAIN`` as computed when
#: the structs were first deployed: a signature made before any refactoring stays valid
KNOWN_ANSWERS: list[tuple[Claims, str]] = [
    (
        RequestClaims(
            patient="0x" + "11" * 20,
            record_id=bytes(range(32)),
            capsule_hash=bytes(range(32, 64)),
            requester_umbral_key=KEY,
            nonce=b"\x07" * 32,
            deadline=1_700_000_000,
            purpose_of_use="TREAT",
        ),
        "e9d7d5065c3da6a249b926fa7caf0796bf0eeb2cbdc3109554d2e551e7f94233",
    ),
    (
        BatchClaims(
            patient="0x" + "11" * 20,
            record_ids=(bytes(range(32)), b"\x01" * 32),
            capsule_hashes=(bytes(range(32, 64)), b"\x02" * 32),
            requester_umbral_key=KEY,
            nonce=b"\x07" * 32,
            deadline=1_700_000_000,
            purpose_of_use="ETREAT",
        ),
        "a7849439b87a9806e5a5e7a53894f9f0038af70babd47bd222b4eb42a0c4f4c6",
    ),
    (
        EnrollmentClaims(
            node_id="node-1",
            patient="0x" + "11" * 20,
            grantee="0x" + "22" * 20,
            receiving_key=KEY,
            record_types=(0, 3),
            sealed_hashes=(b"\x03" * 32, b"\x04" * 32),
            nonce=b"\x07" * 32,
            deadline=1_700_000_000,
        ),
        "dd3e19258d49f14e0374842c6877ecfc8e7a5fd0bbdb0e3122ecb994809ff34f",
    ),
]


def test_the_domain_separator_is_the_known_one() -> None:
    assert DOMAIN.separator.hex() == (
        "3c50126bbeb11d4ee6050c7e033b84a2fb6417acfb77ff9d67c8603424390d5e"
    )


@pytest.mark.parametrize(
    ("claims", "digest"), KNOWN_ANSWERS, ids=["request", "batch", "enrollment"]
)
def test_digests_are_the_known_answers(claims: Claims, digest: str) -> None:
    assert signing_digest(DOMAIN, claims).hex() == digest
    assert reference_digest(DOMAIN, claims).hex() == digest


def test_the_wallet_json_shows_each_field_under_its_member() -> None:
    hex_key = "0x02" + "ab" * 32
    patient = "0x" + "11" * 20
    (request, _), (batch, _), (enrollment, _) = KNOWN_ANSWERS
    assert typed_data(DOMAIN, request)["message"] == {
        "patient": patient,
        "recordId": "0x" + bytes(range(32)).hex(),
        "capsuleHash": "0x" + bytes(range(32, 64)).hex(),
        "requesterUmbralKey": hex_key,
        "nonce": "0x" + "07" * 32,
        "deadline": 1_700_000_000,
        "purposeOfUse": "TREAT",
    }
    assert typed_data(DOMAIN, batch)["message"] == {
        "patient": patient,
        "recordIds": ["0x" + bytes(range(32)).hex(), "0x" + "01" * 32],
        "capsuleHashes": ["0x" + bytes(range(32, 64)).hex(), "0x" + "02" * 32],
        "requesterUmbralKey": hex_key,
        "nonce": "0x" + "07" * 32,
        "deadline": 1_700_000_000,
        "purposeOfUse": "ETREAT",
    }
    assert typed_data(DOMAIN, enrollment)["message"] == {
        "nodeId": "node-1",
        "patient": patient,
        "grantee": "0x" + "22" * 20,
        "receivingKey": hex_key,
        "recordTypes": [0, 3],
        "sealedHashes": ["0x" + "03" * 32, "0x" + "04" * 32],
        "nonce": "0x" + "07" * 32,
        "deadline": 1_700_000_000,
    }


@pytest.mark.parametrize("claims", SAMPLES, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("chain_id", [1, 31337, 2**256 - 1])
def test_digest_equals_eth_account(claims: Claims, chain_id: int) -> None:
    domain = Domain(chain_id, "0x" + os.urandom(20).hex())
    digest = signing_digest(domain, claims)
    assert len(digest) == 32
    assert digest == reference_digest(domain, claims)


def test_typed_data_is_wallet_json() -> None:
    claims = SAMPLES[0]
    data = typed_data(DOMAIN, claims)
    assert json.loads(json.dumps(data)) == data
    assert data["primaryType"] == "ReencryptionRequest"
    assert data["domain"] == {
        "name": "medkms",
        "version": "1",
        "chainId": 31337,
        "verifyingContract": DOMAIN.registry_address,
    }
    assert [m["name"] for m in data["types"]["ReencryptionRequest"]] == [
        "patient",
        "recordId",
        "capsuleHash",
        "requesterUmbralKey",
        "nonce",
        "deadline",
        "purposeOfUse",
    ]


@pytest.mark.parametrize(
    "claims", [SAMPLES[0], BATCH, ENROLLMENT], ids=["request", "batch", "enrollment"]
)
def test_sign_recover_roundtrip(claims: Claims, requester: LocalAccount, backend: str) -> None:
    signature = sign(requester, DOMAIN, claims)
    assert len(signature) == 65 and signature[64] in (27, 28)
    digest = signing_digest(DOMAIN, claims)
    assert recover_signer(digest, signature) == requester.address
    assert signer_of(DOMAIN, claims, signature) == requester.address
    # The same signature as a wallet's, and eth_account recovers the same signer.
    message = encode_typed_data(full_message=typed_data(DOMAIN, claims))
    assert bytes(Account.sign_message(message, requester.key).signature) == signature
    assert Account.recover_message(message, signature=signature) == requester.address


@pytest.mark.parametrize(
    "claims", [SAMPLES[0], BATCH, ENROLLMENT], ids=["request", "batch", "enrollment"]
)
def test_a_digest_signer_signs_byte_for_byte_as_sign(
    claims: Claims, requester: LocalAccount
) -> None:
    signer = DigestSigner(requester)
    digest = signing_digest(DOMAIN, claims)
    assert signer.sign(digest) == sign(requester, DOMAIN, claims)
    assert recover_signer(digest, signer.sign(digest)) == requester.address
    assert bytes(requester.key).hex() not in repr(signer)
    with pytest.raises(InvalidRequest, match="digest must be 32 bytes"):
        signer.sign(digest[:31])


def test_a_digest_signer_gives_both_recovery_ids_as_eth_account_does() -> None:
    seen_v = set()
    for _ in range(16):
        account = Account.create()
        digest = signing_digest(DOMAIN, SAMPLES[0])
        signature = DigestSigner(account).sign(digest)
        assert signature == sign(account, DOMAIN, SAMPLES[0])
        seen_v.add(signature[64])
    assert seen_v == {27, 28}


def test_another_key_recovers_another_address(requester: LocalAccount, backend: str) -> None:
    other = Account.create()
    claims = SAMPLES[1]
    signature = sign(other, DOMAIN, claims)
    signer = signer_of(DOMAIN, claims, signature)
    assert signer == other.address
    assert signer != requester.address


def test_many_signatures_recover(backend: str) -> None:
    # Both recovery ids (v = 27 and 28) turn up among a few random signatures.
    seen_v = set()
    for i in range(16):
        account = Account.create()
        claims = random_request(random.Random(i))
        signature = sign(account, DOMAIN, claims)
        seen_v.add(signature[64])
        assert signer_of(DOMAIN, claims, signature) == account.address
    assert seen_v == {27, 28}


def _changed(claims: Claims, name: str) -> Any:
    value = getattr(claims, name)
    if name == "patient":
        return "0x" + "99" * 20
    if name == "deadline":
        return value + 1
    if name == "purpose_of_use":
        return value + "X"
    if isinstance(value, tuple):
        return (*value[:-1], bytes(32)) if value else (bytes(32),)
    return bytes(len(value) or 1) if value != bytes(len(value) or 1) else b"\x01" * len(value)


@pytest.mark.parametrize(
    "name",
    [
        "patient",
        "record_id",
        "capsule_hash",
        "requester_umbral_key",
        "nonce",
        "deadline",
        "purpose_of_use",
    ],
)
def test_every_request_field_is_bound(name: str, requester: LocalAccount, backend: str) -> None:
    claims = SAMPLES[0]
    assert isinstance(claims, RequestClaims)
    signature = sign(requester, DOMAIN, claims)
    changed = dataclasses.replace(claims, **{name: _changed(claims, name)})
    assert signing_digest(DOMAIN, changed) != signing_digest(DOMAIN, claims)
    assert signing_digest(DOMAIN, changed) == reference_digest(DOMAIN, changed)
    # The signature now recovers some other address, never the requester.
    try:
        assert signer_of(DOMAIN, changed, signature) != requester.address
    except Unauthenticated:
        pass


@pytest.mark.parametrize(
    "name",
    [
        "patient",
        "record_ids",
        "capsule_hashes",
        "requester_umbral_key",
        "nonce",
        "deadline",
        "purpose_of_use",
    ],
)
def test_every_batch_field_is_bound(name: str) -> None:
    claims = BATCH
    changed = dataclasses.replace(claims, **{name: _changed(claims, name)})
    assert signing_digest(DOMAIN, changed) != signing_digest(DOMAIN, claims)
    assert signing_digest(DOMAIN, changed) == reference_digest(DOMAIN, changed)


@pytest.mark.parametrize(
    "name",
    [
        "node_id",
        "patient",
        "grantee",
        "receiving_key",
        "record_types",
        "sealed_hashes",
        "nonce",
        "deadline",
    ],
)
def test_every_enrollment_field_is_bound(name: str, requester: LocalAccount) -> None:
    claims = ENROLLMENT
    value = getattr(claims, name)
    if name == "record_types":
        changed_value: Any = (*value[:-1], (value[-1] + 1) % 6)
    elif name in ("node_id", "grantee"):
        changed_value = "node-2" if name == "node_id" else "0x" + "99" * 20
    else:
        changed_value = _changed(claims, name)
    changed = dataclasses.replace(claims, **{name: changed_value})
    assert signing_digest(DOMAIN, changed) != signing_digest(DOMAIN, claims)
    assert signing_digest(DOMAIN, changed) == reference_digest(DOMAIN, changed)
    assert request_id_of(DOMAIN, changed) != request_id_of(DOMAIN, claims)
    signature = sign(requester, DOMAIN, claims)
    try:
        assert signer_of(DOMAIN, changed, signature) != requester.address
    except Unauthenticated:
        pass


def test_a_malformed_enrollment_nonce_is_refused() -> None:
    for nonce in (b"", b"\x01" * 31, b"\x01" * 33):
        with pytest.raises(InvalidRequest, match="nonce must be 32 bytes"):
            dataclasses.replace(ENROLLMENT, nonce=nonce)


@pytest.mark.parametrize("claims", SAMPLES, ids=lambda c: type(c).__name__)
def test_the_request_id_is_the_first_128_bits_of_the_signing_digest(claims: Claims) -> None:
    request_id = request_id_of(DOMAIN, claims)
    assert request_id == reference_digest(DOMAIN, claims)[:16].hex()
    assert len(request_id) == 32 and request_id == request_id.lower()
    # A fresh nonce (what makes each request new) makes a fresh id.
    renewed = dataclasses.replace(claims, nonce=bytes(a ^ 1 for a in claims.nonce))
    assert request_id_of(DOMAIN, renewed) != request_id


def test_batch_order_and_pairing_are_bound() -> None:
    claims = BATCH
    digest = signing_digest(DOMAIN, claims)
    reordered = dataclasses.replace(
        claims,
        record_ids=claims.record_ids[::-1],
        capsule_hashes=claims.capsule_hashes[::-1],
    )
    swapped = dataclasses.replace(
        claims, record_ids=claims.capsule_hashes, capsule_hashes=claims.record_ids
    )
    assert signing_digest(DOMAIN, reordered) != digest
    assert signing_digest(DOMAIN, swapped) != digest


def test_request_and_batch_of_one_differ() -> None:
    single = SAMPLES[0]
    assert isinstance(single, RequestClaims)
    batch = BatchClaims(
        patient=single.patient,
        record_ids=(single.record_id,),
        capsule_hashes=(single.capsule_hash,),
        requester_umbral_key=single.requester_umbral_key,
        nonce=single.nonce,
        deadline=single.deadline,
        purpose_of_use=single.purpose_of_use,
    )
    assert signing_digest(DOMAIN, single) != signing_digest(DOMAIN, batch)


@pytest.mark.parametrize(
    "domain",
    [
        Domain(chain_id=DOMAIN.chain_id + 1, registry_address=DOMAIN.registry_address),
        Domain(chain_id=DOMAIN.chain_id, registry_address="0x" + "60" * 20),
    ],
    ids=["chainId", "verifyingContract"],
)
def test_domain_is_bound(domain: Domain, requester: LocalAccount, backend: str) -> None:
    claims = SAMPLES[0]
    signature = sign(requester, DOMAIN, claims)
    assert signing_digest(domain, claims) != signing_digest(DOMAIN, claims)
    assert signing_digest(domain, claims) == reference_digest(domain, claims)
    assert signer_of(domain, claims, signature) != requester.address


def test_addresses_are_normalised_to_checksum() -> None:
    lower = dataclasses.replace(SAMPLES[0], patient=SAMPLES[0].patient.lower())
    assert lower.patient == SAMPLES[0].patient
    assert signing_digest(DOMAIN, lower) == signing_digest(DOMAIN, SAMPLES[0])
    assert Domain(1, DOMAIN.registry_address.lower()) == Domain(1, DOMAIN.registry_address)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"record_id": b"\x01" * 31}, "record_id must be 32 bytes"),
        ({"capsule_hash": b"\x01" * 33}, "capsule_hash must be 32 bytes"),
        ({"nonce": b""}, "nonce must be 32 bytes"),
        ({"deadline": -1}, "deadline must fit in a uint64"),
        ({"deadline": 2**64}, "deadline must fit in a uint64"),
        ({"deadline": True}, "deadline must be an integer"),
        ({"patient": "0x1234"}, "patient must be a 0x-prefixed 20-byte hex address"),
        ({"patient": "11" * 20}, "patient must be a 0x-prefixed 20-byte hex address"),
    ],
)
def test_malformed_claims_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        dataclasses.replace(SAMPLES[0], **changes)


def test_malformed_batch_is_refused() -> None:
    claims = BATCH
    with pytest.raises(InvalidRequest, match="same length"):
        dataclasses.replace(claims, capsule_hashes=claims.capsule_hashes[1:])
    with pytest.raises(InvalidRequest, match=r"record_ids\[3\] must be 32 bytes"):
        ids = list(claims.record_ids)
        ids[3] = b"\x01" * 20
        dataclasses.replace(claims, record_ids=tuple(ids))


def test_malformed_domain_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="chain_id"):
        Domain(0, DOMAIN.registry_address)
    with pytest.raises(InvalidRequest, match="registry_address"):
        Domain(1, "0x00")


def _with(
    signature: bytes, *, r: int | None = None, s: int | None = None, v: int | None = None
) -> bytes:
    r_bytes = signature[:32] if r is None else r.to_bytes(32, "big")
    s_bytes = signature[32:64] if s is None else s.to_bytes(32, "big")
    v_byte = signature[64:] if v is None else bytes((v,))
    return r_bytes + s_bytes + v_byte


@pytest.fixture(scope="module")
def good_signature(requester: LocalAccount) -> bytes:
    return sign(requester, DOMAIN, SAMPLES[0])


def test_high_s_twin_is_refused(good_signature: bytes, backend: str) -> None:
    # (r, n - s, v ^ 1) is the same signer's other valid ECDSA signature (malleability, EIP-2).
    s = int.from_bytes(good_signature[32:64], "big")
    twin = _with(good_signature, s=SECP256K1_N - s, v=55 - good_signature[64])
    digest = signing_digest(DOMAIN, SAMPLES[0])
    # It really is a valid twin: the curve math alone recovers the same key from it.
    recover = request_auth.RECOVERY_BACKENDS[backend]
    assert recover(digest, twin[:64], twin[64] - 27) == recover(
        digest, good_signature[:64], good_signature[64] - 27
    )
    with pytest.raises(Unauthenticated, match="lower half"):
        recover_signer(digest, twin)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda sig: sig[:64], "must be 65 bytes"),
        (lambda sig: sig + b"\x00", "must be 65 bytes"),
        (lambda sig: b"", "must be 65 bytes"),
        (lambda sig: _with(sig, v=29), "v must be 27 or 28"),
        (lambda sig: _with(sig, v=0), "v must be 27 or 28"),
        (lambda sig: _with(sig, v=1), "v must be 27 or 28"),
        (lambda sig: bytes(64) + b"\x1b", "r is out of range"),
        (lambda sig: _with(sig, r=0), "r is out of range"),
        (lambda sig: _with(sig, r=SECP256K1_N), "r is out of range"),
        (lambda sig: _with(sig, r=2**256 - 1), "r is out of range"),
        (lambda sig: _with(sig, s=0), "s is zero"),
        (lambda sig: _with(sig, s=SECP256K1_N), "lower half"),
        (lambda sig: _with(sig, s=SECP256K1_N // 2 + 1), "lower half"),
    ],
    ids=[
        "64-bytes",
        "66-bytes",
        "empty",
        "v=29",
        "v=0",
        "v=1",
        "zeros",
        "r=0",
        "r=n",
        "r=max",
        "s=0",
        "s=n",
        "s=n/2+1",
    ],
)
def test_malformed_signatures_are_unauthenticated(
    mangle: Any, message: str, good_signature: bytes, backend: str
) -> None:
    digest = signing_digest(DOMAIN, SAMPLES[0])
    with pytest.raises(Unauthenticated, match=message):
        recover_signer(digest, mangle(good_signature))


def test_unrecoverable_r_is_unauthenticated(good_signature: bytes, backend: str) -> None:
    # r = 5 is below n but no curve point has x = 5 (5^3 + 7 = 132 is not a square mod p),
    # so recovery itself fails; that too must be Unauthenticated, not a library error.
    digest = signing_digest(DOMAIN, SAMPLES[0])
    with pytest.raises(Unauthenticated, match="does not recover"):
        recover_signer(digest, _with(good_signature, r=5))


def test_deadline_rules() -> None:
    check_deadline(deadline=1001, now=1000, max_window_s=300)
    check_deadline(deadline=1300, now=1000, max_window_s=300)
    check_deadline(deadline=1001, now=1000.5, max_window_s=300)
    with pytest.raises(Unauthenticated, match="request deadline has passed"):
        check_deadline(deadline=1000, now=1000, max_window_s=300)
    with pytest.raises(Unauthenticated, match="request deadline has passed"):
        check_deadline(deadline=1000, now=1000.5, max_window_s=300)
    with pytest.raises(Unauthenticated, match="request deadline has passed"):
        check_deadline(deadline=0, now=1000, max_window_s=300)
    with pytest.raises(InvalidRequest, match="deadline too far in the future; at most 300 s"):
        check_deadline(deadline=1301, now=1000, max_window_s=300)


def test_authenticate_digest_checks_as_authenticate_does(requester: LocalAccount) -> None:
    claims = SAMPLES[0]
    signature = sign(requester, DOMAIN, claims)
    digest = signing_digest(DOMAIN, claims)
    now = claims.deadline - 10
    authenticate(DOMAIN, claims, signature, requester.address, now=now, max_window_s=300)
    authenticate_digest(
        digest, claims.deadline, signature, requester.address, now=now, max_window_s=300
    )
    other = Account.create().address
    with pytest.raises(Unauthenticated, match="signature is not by the requester"):
        authenticate_digest(digest, claims.deadline, signature, other, now=now, max_window_s=300)
    with pytest.raises(Unauthenticated, match="signature is not by the patient"):
        authenticate_digest(
            digest, claims.deadline, signature, other, now=now, max_window_s=300, who="patient"
        )
    # The digest of other claims (another domain) does not recover the requester.
    elsewhere = signing_digest(Domain(chain_id=1, registry_address=DOMAIN.registry_address), claims)
    with pytest.raises(Unauthenticated, match="signature is not by the requester"):
        authenticate_digest(
            elsewhere, claims.deadline, signature, requester.address, now=now, max_window_s=300
        )
    with pytest.raises(Unauthenticated, match="request deadline has passed"):
        authenticate_digest(
            digest,
            claims.deadline,
            signature,
            requester.address,
            now=claims.deadline,
            max_window_s=300,
        )


def test_a_mixed_case_address_with_a_wrong_checksum_is_refused() -> None:
    good = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
    bad = good[:-1] + "c"
    assert is_valid(good) and is_valid(good.lower()) and is_valid("0x" + good[2:].upper())
    assert not is_valid(bad)
    with pytest.raises(InvalidRequest, match="patient must be"):
        RequestClaims(
            patient=bad,
            record_id=b"\x01" * 32,
            capsule_hash=b"\x02" * 32,
            requester_umbral_key=b"\x02" * 33,
            nonce=b"\x03" * 32,
            deadline=1,
            purpose_of_use="TREAT",
        )
