"""Sealing a record and opening it again; validation of FHIR input."""

from __future__ import annotations

import hashlib
import json

import pytest
import umbral_pre as umbral

from clients.sdk.records import open_envelope, parse_envelope, seal, validate_fhir
from core.errors import IntegrityError, InvalidRequest
from core.record_types import RecordType
from core.registry_types import record_id_of
from core.umbral_codec import capsule_hash
from deploy.sample_records import diagnosis, lab_result

PATIENT = "0x" + "ab" * 20


def test_seal_then_open_with_the_patients_key() -> None:
    sk = umbral.SecretKey.random()
    sealed = seal(PATIENT, RecordType.LAB_RESULT, lab_result(), sk.public_key())
    # The id the registry will give the record: derived from patient and capsule.
    assert sealed.record_id == record_id_of(PATIENT, capsule_hash(sealed.capsule))
    assert sealed.content_hash == hashlib.sha256(sealed.envelope).digest()
    assert sealed.resource_type == "Observation"
    envelope = parse_envelope(sealed.envelope)
    assert envelope.capsule == sealed.capsule
    assert lab_result() not in sealed.envelope
    capsule = umbral.Capsule.from_bytes(envelope.capsule)
    dek = umbral.decrypt_original(sk, capsule, envelope.encrypted_dek)
    assert open_envelope(envelope, bytes(dek)) == lab_result()


def test_envelope_is_bound_to_its_record_id_and_type() -> None:
    sk = umbral.SecretKey.random()
    sealed = seal(PATIENT, RecordType.LAB_RESULT, lab_result(), sk.public_key())
    envelope = parse_envelope(sealed.envelope)
    assert envelope.record_id == sealed.record_id
    dek = bytes(
        umbral.decrypt_original(
            sk, umbral.Capsule.from_bytes(envelope.capsule), envelope.encrypted_dek
        )
    )
    envelope.record_id = b"\x06" * 32
    with pytest.raises(IntegrityError):
        open_envelope(envelope, dek)
    envelope.record_id = sealed.record_id
    envelope.record_type = "diagnosis"
    with pytest.raises(IntegrityError):
        open_envelope(envelope, dek)


def test_fhir_resource_must_match_the_record_type() -> None:
    assert validate_fhir(diagnosis(), RecordType.DIAGNOSIS) == "Condition"
    with pytest.raises(InvalidRequest, match="lab_result record must be a FHIR"):
        validate_fhir(diagnosis(), RecordType.LAB_RESULT)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (b"not json", "not FHIR JSON"),
        (b"[]", "not FHIR JSON"),
        (json.dumps({"resourceType": "Observation"}).encode(), "invalid FHIR Observation"),
        (
            json.dumps(
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "valueQuantity": {"value": "many"},
                }
            ).encode(),
            "invalid FHIR Observation",
        ),
    ],
)
def test_invalid_fhir_is_refused(document: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        validate_fhir(document, RecordType.LAB_RESULT)


def test_garbage_envelope_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError):
        parse_envelope(b"\xff\xff\xff")


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        # json.loads of this, in a process that imported web3, dies (C stack overflow)
        (b'{"resourceType":"Observation","note":' + b"[" * 200_000 + b"}", "nests deeper"),
        (b'{"resourceType":["Observation"]}', "no resourceType"),
        (b'{"resourceType":"Observation","value":NaN}', "not FHIR JSON"),
    ],
    ids=["nested", "resource-type-list", "nan"],
)
def test_a_hostile_document_is_refused_before_it_is_parsed(document: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        validate_fhir(document, RecordType.LAB_RESULT)


def test_the_depth_bound_refuses_hostile_nesting_and_admits_real_resources() -> None:
    nested = b'{"resourceType":"Observation","extension":' + b"[" * 65 + b"]" * 65 + b"}"
    with pytest.raises(InvalidRequest, match="nests deeper than 64 levels"):
        validate_fhir(nested, RecordType.LAB_RESULT)
    # Extensions within extensions, 20 deep (41 levels of JSON), are a real resource.
    extension: dict[str, object] = {"url": "http://example.org/leaf", "valueString": "x"}
    for level in range(20):
        extension = {"url": f"http://example.org/{level}", "extension": [extension]}
    document = json.loads(lab_result())
    document["extension"] = [extension]
    assert validate_fhir(json.dumps(document).encode(), RecordType.LAB_RESULT) == "Observation"
