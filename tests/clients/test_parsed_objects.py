"""The provider's parses, kept under the bytes they came from (clients/sdk/parsed_objects.py)."""

from __future__ import annotations

import pytest
import umbral_pre as umbral

from clients.sdk import parsed_objects
from clients.sdk.identity import Identity
from clients.sdk.parsed_objects import ParsedObjects
from clients.sdk.records import parse_envelope, seal
from core.errors import IntegrityError, InvalidRequest
from core.record_types import RecordType
from deploy.sample_records import lab_result


def key_bytes() -> bytes:
    return bytes(umbral.SecretKey.random().public_key().to_compressed_bytes())


def envelope_blob(patient: Identity) -> bytes:
    key = patient.record_public_key(RecordType.LAB_RESULT)
    return seal(patient.address, RecordType.LAB_RESULT, lab_result(), key).envelope


def test_the_same_bytes_are_parsed_once_and_other_bytes_afresh() -> None:
    parsed = ParsedObjects()
    first, second = key_bytes(), key_bytes()
    key = parsed.public_key(first)
    assert parsed.public_key(first) is key
    assert bytes(parsed.public_key(second).to_compressed_bytes()) == second
    assert bytes(key.to_compressed_bytes()) == first


def test_an_envelope_is_kept_under_its_blobs_hash_so_a_changed_blob_is_parsed_again() -> None:
    parsed = ParsedObjects()
    alice = Identity.generate("alice")
    blob, other = envelope_blob(alice), envelope_blob(alice)
    envelope = parsed.envelope(blob)
    assert parsed.envelope(blob) is envelope
    assert envelope == parse_envelope(blob)
    assert parsed.envelope(other) == parse_envelope(other) != envelope
    capsule = parsed.capsule(envelope.capsule)
    assert parsed.capsule(envelope.capsule) is capsule
    assert bytes(capsule) == envelope.capsule


def test_what_does_not_parse_is_refused_every_time_and_never_kept() -> None:
    parsed = ParsedObjects()
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="umbral public key"):
            parsed.public_key(b"\x02" + b"\xff" * 32)
        with pytest.raises(InvalidRequest, match="capsule must be 105 bytes"):
            parsed.capsule(b"\x00")
        with pytest.raises(IntegrityError, match="not a record envelope"):
            parsed.envelope(b"\xff" * 10)


def capsule_bytes() -> bytes:
    public_key = umbral.SecretKey.random().public_key()
    capsule, _ = umbral.encrypt(public_key, b"dek")
    return bytes(capsule)


def test_each_cache_keeps_a_bounded_number_dropping_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parsed_objects, "CACHE_ENTRIES", 2)
    parsed = ParsedObjects()
    capsules = [capsule_bytes() for _ in range(3)]
    kept = [parsed.capsule(c) for c in capsules]
    assert parsed.capsule(capsules[2]) is kept[2]
    assert parsed.capsule(capsules[1]) is kept[1]
    again = parsed.capsule(capsules[0])  # dropped when the third came in
    assert again is not kept[0] and bytes(again) == bytes(kept[0])
