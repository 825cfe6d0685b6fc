"""Audit entries, receipts, checkpoints and log verification (pure; keys from MemoryKeyStore)."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from core import merkle
from core.audit import (
    CHECKPOINT_DOMAIN,
    DENIED,
    GRANTED,
    MAX_ENTRY_BYTES,
    RECEIPT_DOMAIN,
    AuditEntry,
    Checkpoint,
    Receipt,
    verified_leaf_hashes,
    verify_checkpoint,
    verify_checkpoint_consistency,
    verify_log,
    verify_receipt,
    verify_receipt_inclusion,
)
from core.errors import IntegrityError, InvalidRequest
from core.node_identity import MAX_NODE_ID_BYTES
from core.policy import Reason
from core.record_types import RecordType
from kms_node.keystore import P256_ORDER, MemoryKeyStore

NODE = "node-1"
PATIENT = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
REQUESTER = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"


def make_entry(n: int = 1, *, node_id: str = NODE, granted: bool = True) -> AuditEntry:
    return AuditEntry(
        request_id=f"req-{n}",
        node_id=node_id,
        time=1_700_000_000 + n,
        requester=REQUESTER,
        patient=PATIENT,
        record_id=bytes([1]) * 32,
        capsule_hash=bytes([2]) * 32,
        purpose_of_use="TREAT",
        decision=GRANTED if granted else DENIED,
        reason_code=Reason.GRANTED if granted else Reason.GRANT_REVOKED,
        reason=(
            "grant is active and covers this record"
            if granted
            else "grant has been revoked by the patient"
        ),
        block_number=42 + n,
        block_hash=bytes([3]) * 32,
        cfrag_hash=bytes([4]) * 32 if granted else b"",
    )


GOLDEN_ENTRY = (
    '{"block_hash":"0x0303030303030303030303030303030303030303030303030303030303030303",'
    '"block_number":42,'
    '"capsule_hash":"0x0202020202020202020202020202020202020202020202020202020202020202",'
    '"cfrag_hash":"0x0404040404040404040404040404040404040404040404040404040404040404",'
    '"decision":"granted","node_id":"node-1",'
    '"patient":"0x5B38Da6a701c568545dCfcB03FcB875f56beddC4","purpose_of_use":"TREAT",'
    '"reason":"grant is active and covers this record","reason_code":"granted",'
    '"record_id":"0x0101010101010101010101010101010101010101010101010101010101010101",'
    '"request_id":"req-0","requester":"0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2",'
    '"time":1700000000,"v":1}'
)


@pytest.fixture(scope="module")
def keys() -> MemoryKeyStore:
    return MemoryKeyStore()


def public_key(store: MemoryKeyStore) -> bytes:
    return store.signing_public_key()


def signed_receipt(store: MemoryKeyStore, index: int, entry_hash: bytes) -> Receipt:
    unsigned = Receipt(NODE, index, index + 1, entry_hash)
    return dataclasses.replace(unsigned, signature=store.sign(unsigned.canonical_bytes()))


def signed_checkpoint(
    store: MemoryKeyStore, leaves: list[bytes], *, node: str = NODE
) -> Checkpoint:
    unsigned = Checkpoint(node, len(leaves), merkle.root(leaves), 1_700_000_000)
    return dataclasses.replace(unsigned, signature=store.sign(unsigned.canonical_bytes()))


# --- entries -------------------------------------------------------------------------------


def test_canonical_form_is_frozen() -> None:
    entry = dataclasses.replace(make_entry(0), block_number=42)
    assert entry.canonical_bytes() == GOLDEN_ENTRY.encode()
    assert entry.leaf_hash() == merkle.leaf_hash(GOLDEN_ENTRY.encode())
    assert AuditEntry.from_canonical(GOLDEN_ENTRY.encode()) == entry


@pytest.mark.parametrize("reason", list(Reason))
def test_each_reason_is_recorded_as_its_code(reason: Reason) -> None:
    entry = dataclasses.replace(make_entry(7, granted=reason == Reason.GRANTED), reason_code=reason)
    data = entry.canonical_bytes()
    assert b'"reason_code":"' + reason.value.encode() + b'"' in data
    assert AuditEntry.from_canonical(data) == entry


def test_entries_roundtrip_granted_and_denied() -> None:
    for entry in (make_entry(5), make_entry(6, granted=False)):
        data = entry.canonical_bytes()
        assert AuditEntry.from_canonical(data) == entry
        assert json.loads(data)["v"] == 1


GOLDEN_ENTRY_V2 = (
    '{"block_hash":"0x0303030303030303030303030303030303030303030303030303030303030303",'
    '"block_number":42,'
    '"capsule_hash":"0x0202020202020202020202020202020202020202020202020202020202020202",'
    '"cfrag_hash":"0x0404040404040404040404040404040404040404040404040404040404040404",'
    '"decision":"granted","node_id":"node-1",'
    '"patient":"0x5B38Da6a701c568545dCfcB03FcB875f56beddC4","purpose_of_use":"TREAT",'
    '"reason":"grant is active and covers this record","reason_code":"granted",'
    '"record_id":"0x0101010101010101010101010101010101010101010101010101010101010101",'
    '"record_type":1,'
    '"request_id":"req-0","requester":"0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2",'
    '"requester_umbral_key":"0x02050505050505050505050505050505050505050505050505050505050505'
    '0505",'
    '"time":1700000000,"v":2}'
)


def test_a_version_2_entry_records_the_request_and_its_form_is_frozen() -> None:
    entry = dataclasses.replace(
        make_entry(0),
        block_number=42,
        record_type=RecordType.LAB_RESULT,
        requester_umbral_key=b"\x02" + b"\x05" * 32,
    )
    assert entry.version == 2
    assert entry.canonical_bytes() == GOLDEN_ENTRY_V2.encode()
    assert AuditEntry.from_canonical(GOLDEN_ENTRY_V2.encode()) == entry
    assert AuditEntry.from_canonical(entry.canonical_bytes()).record_type is RecordType.LAB_RESULT
    # Version 1 entries (written before) still parse, as version 1.
    assert AuditEntry.from_canonical(GOLDEN_ENTRY.encode()).version == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"record_type": RecordType.IMAGING}, "go together"),
        ({"requester_umbral_key": b"\x02" * 33}, "go together"),
        ({"record_type": 9, "requester_umbral_key": b"\x02" * 33}, "record_type 9 is not known"),
        ({"record_type": True, "requester_umbral_key": b"\x02" * 33}, "must be an integer"),
        ({"record_type": 1, "requester_umbral_key": b"\x02" * 32}, "33-byte compressed point"),
    ],
)
def test_a_request_is_recorded_whole_or_not_at_all(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        dataclasses.replace(make_entry(1), **changes)


def test_entries_hold_identifiers_and_hashes_only() -> None:
    # A new field is a decision about what the audit log reveals: review it here.
    assert [f.name for f in dataclasses.fields(AuditEntry)] == [
        "request_id",
        "node_id",
        "time",
        "requester",
        "patient",
        "record_id",
        "capsule_hash",
        "purpose_of_use",
        "decision",
        "reason_code",
        "reason",
        "block_number",
        "block_hash",
        "cfrag_hash",
        # Version 2: what the request named (a record type, the requester's public key).
        "record_type",
        "requester_umbral_key",
    ]


def _variant(**changes: Any) -> bytes:
    fields = json.loads(make_entry(1).canonical_bytes())
    fields.update(changes)
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b"[" * (MAX_ENTRY_BYTES + 1), "larger than 32768 bytes"),
        (_variant(v=3), "not version 1 or 2"),
        (_variant(v=2), "missing \\['record_type', 'requester_umbral_key'\\]"),
        (_variant(extra="x"), "unknown \\['extra'\\]"),
        (_variant(time=1.5), "time must be an integer"),
        (_variant(block_number=True), "block_number must be an integer"),
        (_variant(record_id="0x" + "AB" * 32), "not in canonical form"),
        (_variant(record_id="01" * 32), "0x-prefixed"),
        (_variant(record_id="0xzz"), "not valid hex"),
        (_variant(decision="maybe"), "decision must be one of"),
        (_variant(requester=REQUESTER.lower()), "checksummed address"),
        (make_entry(1).canonical_bytes().replace(b",", b", ", 1), "not in canonical form"),
        (make_entry(1).canonical_bytes() + b"\n", "not in canonical form"),
        (
            make_entry(1).canonical_bytes().replace(b'"v":1}', b'"v":1,"v":1}'),
            "not in canonical form",
        ),
    ],
)
def test_only_the_canonical_form_parses(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        AuditEntry.from_canonical(data)


def test_deep_nesting_is_a_clean_error_even_with_a_raised_recursion_limit() -> None:
    # web3 imports py_ecc, which raises the limit to 100000; 100000 nested brackets then
    # crash the C JSON parser. An entry is flat: nesting is refused before parsing.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 100_000))
    try:
        with pytest.raises(InvalidRequest, match="audit entry nests deeper than 1 level"):
            AuditEntry.from_canonical(b"[" * MAX_ENTRY_BYTES)
    finally:
        sys.setrecursionlimit(limit)


def test_the_largest_valid_entry_is_within_the_bound() -> None:
    wide = "\U0001f600" * 64  # escaped as a surrogate pair: 12 bytes per character
    entry = dataclasses.replace(
        make_entry(1),
        request_id=wide * 2,
        node_id="n" * MAX_NODE_ID_BYTES,
        purpose_of_use=wide,
        reason=wide * 16,
        reason_code="r" * 64,
    )
    assert len(entry.canonical_bytes()) <= MAX_ENTRY_BYTES
    assert AuditEntry.from_canonical(entry.canonical_bytes()) == entry


def test_a_field_missing_is_named() -> None:
    fields = json.loads(make_entry(1).canonical_bytes())
    del fields["reason"]
    with pytest.raises(InvalidRequest, match="missing \\['reason'\\]"):
        AuditEntry.from_canonical(json.dumps(fields, sort_keys=True).encode())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cfrag_hash": b""}, "cfrag_hash must be set for a granted entry"),
        ({"decision": "denied"}, "cfrag_hash must be set for a granted entry and only then"),
        ({"decision": "allowed"}, "decision must be one of granted, denied"),
        ({"record_id": bytes(31)}, "record_id must be 32 bytes, got 31"),
        ({"capsule_hash": "00" * 32}, "capsule_hash must be bytes"),
        ({"block_hash": b""}, "block_hash must be 32 bytes"),
        ({"cfrag_hash": bytes(16)}, "cfrag_hash must be 32 bytes or empty"),
        ({"time": -1}, "time must be an integer"),
        ({"block_number": 2**64}, "block_number must be an integer"),
        ({"patient": "0x1234"}, "patient must be an EIP-55"),
        ({"requester": REQUESTER.upper()}, "requester must be an EIP-55"),
        ({"reason_code": "Grant Revoked"}, "reason_code must be"),
        ({"reason": ""}, "reason must be a non-empty string"),
        ({"reason": "line\nbreak"}, "printable"),
        ({"node_id": "n" * (MAX_NODE_ID_BYTES + 1)}, "node_id must be"),
        ({"request_id": ""}, "request_id must be a non-empty string"),
    ],
)
def test_malformed_entries_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        dataclasses.replace(make_entry(1), **changes)


def test_all_zero_block_hash_is_allowed_when_unknown() -> None:
    entry = dataclasses.replace(make_entry(1), block_hash=bytes(32))
    assert AuditEntry.from_canonical(entry.canonical_bytes()) == entry


def test_non_ascii_text_is_escaped_deterministically() -> None:
    entry = dataclasses.replace(make_entry(1), reason="accès refusé")
    data = entry.canonical_bytes()
    assert data.isascii()
    assert AuditEntry.from_canonical(data) == entry


# --- receipts and checkpoints --------------------------------------------------------------


def test_receipt_and_checkpoint_encodings_are_frozen() -> None:
    receipt = Receipt(NODE, 7, 8, bytes([9]) * 32)
    assert receipt.canonical_bytes() == (
        b"medkms/receipt/v1\x00"
        + b"\x00\x06node-1"
        + (7).to_bytes(8, "big")
        + (8).to_bytes(8, "big")
        + bytes([9]) * 32
    )
    checkpoint = Checkpoint(NODE, 8, bytes([5]) * 32, 1_700_000_000)
    assert checkpoint.canonical_bytes() == (
        b"medkms/checkpoint/v1\x00"
        + b"\x00\x06node-1"
        + (8).to_bytes(8, "big")
        + bytes([5]) * 32
        + (1_700_000_000).to_bytes(8, "big")
    )
    assert receipt.canonical_bytes().startswith(RECEIPT_DOMAIN)
    assert checkpoint.canonical_bytes().startswith(CHECKPOINT_DOMAIN)


def test_signed_receipt_and_checkpoint_verify(keys: MemoryKeyStore) -> None:
    receipt = signed_receipt(keys, 3, make_entry(3).leaf_hash())
    assert verify_receipt(receipt, public_key(keys))
    checkpoint = signed_checkpoint(keys, [make_entry(n).leaf_hash() for n in range(5)])
    assert verify_checkpoint(checkpoint, public_key(keys))


def test_any_change_breaks_the_signature(keys: MemoryKeyStore) -> None:
    receipt = signed_receipt(keys, 3, make_entry(3).leaf_hash())
    for changes in (
        {"node_id": "node-2"},
        {"leaf_index": 2},
        {"tree_size": 5},
        {"entry_hash": make_entry(4).leaf_hash()},
    ):
        assert not verify_receipt(dataclasses.replace(receipt, **changes), public_key(keys))
    checkpoint = signed_checkpoint(keys, [make_entry(n).leaf_hash() for n in range(5)])
    for changes in (
        {"node_id": "node-2"},
        {"tree_size": 4},
        {"root": merkle.EMPTY_ROOT},
        {"timestamp": 1_700_000_001},
    ):
        assert not verify_checkpoint(dataclasses.replace(checkpoint, **changes), public_key(keys))


def test_domain_separation(keys: MemoryKeyStore) -> None:
    # A signature over a receipt's bytes is never a checkpoint's signature, and vice versa.
    receipt = signed_receipt(keys, 0, make_entry(0).leaf_hash())
    checkpoint = Checkpoint(NODE, 1, merkle.EMPTY_ROOT, 0, signature=receipt.signature)
    assert not verify_checkpoint(checkpoint, public_key(keys))
    assert RECEIPT_DOMAIN not in CHECKPOINT_DOMAIN and CHECKPOINT_DOMAIN not in RECEIPT_DOMAIN


def test_wrong_key_bad_encodings_and_high_s_fail(keys: MemoryKeyStore) -> None:
    receipt = signed_receipt(keys, 1, make_entry(1).leaf_hash())
    other = MemoryKeyStore()
    assert not verify_receipt(receipt, public_key(other))
    # The same signature with s replaced by n - s verifies in plain ECDSA; we take low S only.
    r, s = decode_dss_signature(receipt.signature)
    high_s = dataclasses.replace(receipt, signature=encode_dss_signature(r, P256_ORDER - s))
    assert not verify_receipt(high_s, public_key(keys))
    for signature in (b"", b"\x30\x00", receipt.signature + b"\x00", receipt.signature[:-1]):
        assert not verify_receipt(
            dataclasses.replace(receipt, signature=signature), public_key(keys)
        )
    # Keys that are not P-256 SubjectPublicKeyInfo.
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    k1_der = k1.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for key in (b"", b"garbage", public_key(keys)[:-1], k1_der):
        assert not verify_receipt(receipt, key)


def test_malformed_receipts_and_checkpoints_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="leaf_index must be below tree_size"):
        Receipt(NODE, 3, 3, bytes(32))
    with pytest.raises(InvalidRequest, match="entry_hash must be 32 bytes"):
        Receipt(NODE, 0, 1, bytes(31))
    with pytest.raises(InvalidRequest, match="node_id"):
        Receipt("", 0, 1, bytes(32))
    with pytest.raises(InvalidRequest, match="root must be 32 bytes"):
        Checkpoint(NODE, 0, b"", 0)
    with pytest.raises(InvalidRequest, match="timestamp must be an integer"):
        Checkpoint(NODE, 0, merkle.EMPTY_ROOT, -5)


def test_receipt_inclusion_and_checkpoint_consistency(keys: MemoryKeyStore) -> None:
    leaves = [make_entry(n).leaf_hash() for n in range(13)]
    old, new = signed_checkpoint(keys, leaves[:6]), signed_checkpoint(keys, leaves)
    receipt = signed_receipt(keys, 4, leaves[4])
    proof = merkle.inclusion_proof(4, leaves)
    assert verify_receipt_inclusion(receipt, new, proof)
    assert verify_receipt_inclusion(receipt, old, merkle.inclusion_proof(4, leaves[:6]))
    assert not verify_receipt_inclusion(receipt, old, proof)
    assert not verify_receipt_inclusion(dataclasses.replace(receipt, node_id="node-2"), new, proof)
    consistency = merkle.consistency_proof(6, leaves)
    assert verify_checkpoint_consistency(old, new, consistency)
    assert not verify_checkpoint_consistency(new, old, consistency)
    other_node = signed_checkpoint(keys, leaves, node="node-2")
    assert not verify_checkpoint_consistency(old, other_node, consistency)


def test_verified_leaf_hashes(keys: MemoryKeyStore) -> None:
    leaves = [make_entry(n).leaf_hash() for n in range(4)]
    receipts = [signed_receipt(keys, n, leaves[n]) for n in range(4)]
    assert verified_leaf_hashes(receipts + receipts[:1], public_key(keys)) == dict(
        enumerate(leaves)
    )
    forged = dataclasses.replace(receipts[2], entry_hash=leaves[3])
    with pytest.raises(IntegrityError, match="receipt for entry 2 of node-1 does not verify"):
        verified_leaf_hashes([*receipts, forged], public_key(keys))
    equivocation = signed_receipt(keys, 2, leaves[3])
    with pytest.raises(IntegrityError, match="two receipts for entry 2"):
        verified_leaf_hashes([*receipts, equivocation], public_key(keys))


# --- verify_log ------------------------------------------------------------------------------


def _log(n: int) -> list[bytes]:
    return [make_entry(i, granted=i % 3 != 0).canonical_bytes() for i in range(n)]


def test_verify_log_accepts_an_intact_log(keys: MemoryKeyStore) -> None:
    entries = _log(20)
    leaves = [merkle.leaf_hash(e) for e in entries]
    checkpoint = signed_checkpoint(keys, leaves[:15])
    known = {i: leaves[i] for i in range(20)}
    for served in (entries, list(enumerate(entries))):
        result = verify_log(served, checkpoint, public_key(keys), known_leaf_hashes=known)
        assert result.ok, result.problem
        assert (result.tree_size, result.problem, result.entry_index) == (15, "", None)


def test_verify_log_names_the_changed_entry(keys: MemoryKeyStore) -> None:
    entries = _log(20)
    leaves = [merkle.leaf_hash(e) for e in entries]
    checkpoint = signed_checkpoint(keys, leaves)
    tampered = list(entries)
    tampered[7] = dataclasses.replace(make_entry(7), reason_code="no_grant").canonical_bytes()
    # Without earlier leaf hashes the root mismatch is all there is to say.
    blind = verify_log(tampered, checkpoint, public_key(keys))
    assert (blind.ok, blind.entry_index) == (False, None)
    assert "do not have the checkpoint's root" in blind.problem
    # With them, the entry is named.
    named = verify_log(
        tampered, checkpoint, public_key(keys), known_leaf_hashes=dict(enumerate(leaves))
    )
    assert (named.ok, named.entry_index) == (False, 7)
    assert named.problem == "entry 7 differs from the entry the node vouched for"


def test_verify_log_names_missing_and_garbled_entries(keys: MemoryKeyStore) -> None:
    entries = _log(10)
    leaves = [merkle.leaf_hash(e) for e in entries]
    checkpoint = signed_checkpoint(keys, leaves)
    key = public_key(keys)

    short = verify_log(entries[:8], checkpoint, key)
    assert (short.ok, short.entry_index) == (False, 8)
    assert "the log has 8 entries, the checkpoint covers 10" in short.problem

    rows = [(i, e) for i, e in enumerate(entries) if i != 4]
    gap = verify_log(rows, checkpoint, key)
    assert (gap.entry_index, gap.problem) == (4, "entry 4 is missing: the next row is 5")

    swapped = list(enumerate(entries))
    swapped[2], swapped[3] = swapped[3], swapped[2]
    assert verify_log(swapped, checkpoint, key).entry_index == 2

    garbled = list(entries)
    garbled[3] = entries[3][:-1]
    result = verify_log(garbled, checkpoint, key)
    assert result.entry_index == 3
    assert result.problem.startswith("entry 3 is not a valid audit entry: audit entry is not JSON")

    foreign = list(entries)
    foreign[5] = make_entry(5, node_id="node-2").canonical_bytes()
    assert verify_log(foreign, checkpoint, key).problem == "entry 5 is from node 'node-2'"

    beyond = verify_log(entries, checkpoint, key, known_leaf_hashes={12: leaves[0]})
    assert beyond.entry_index == 12
    assert "a receipt vouches for it" in beyond.problem


def test_verify_log_refuses_an_unsigned_or_foreign_checkpoint(keys: MemoryKeyStore) -> None:
    entries = _log(5)
    checkpoint = signed_checkpoint(keys, [merkle.leaf_hash(e) for e in entries])
    result = verify_log(entries, dataclasses.replace(checkpoint, signature=b""), public_key(keys))
    assert not result.ok and "does not verify" in result.problem
    assert not verify_log(entries, checkpoint, public_key(MemoryKeyStore())).ok


def test_verify_log_of_the_empty_log(keys: MemoryKeyStore) -> None:
    checkpoint = signed_checkpoint(keys, [])
    assert verify_log([], checkpoint, public_key(keys)).ok
