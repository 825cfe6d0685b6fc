"""Sealing and opening a medical record.

A record is FHIR JSON, validated, encrypted with AES-256-GCM under a fresh
data-encryption key (DEK); the DEK is encapsulated with Umbral under the
patient's key. Both travel in one ``RecordEnvelope`` whose SHA-256 is the
content hash anchored on-chain. The AES-GCM associated data binds the
ciphertext to its record id and type, so an envelope cannot be passed off as
another record.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import umbral_pre as umbral
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fhir.resources.R4B import get_fhir_model_class
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from core import bounded_json
from core.errors import IntegrityError, InvalidRequest
from core.record_types import FHIR_RESOURCES, RecordType
from core.registry_types import record_id_of
from core.umbral_codec import capsule_hash, load_capsule
from proto.kms.v1 import record_pb2

MEDIA_TYPE = "application/fhir+json"
FORMAT_VERSION = 1
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
#: FHIR resources nest a few levels per element (a component's code's coding's extension);
#: contained resources and nested extensions fit well within this
MAX_DOCUMENT_DEPTH = 64
DEK_SIZE = 32
NONCE_SIZE = 12


@dataclass(frozen=True)
class SealedRecord:
    #: the id the registry gives the record (``record_id_of(patient, capsule hash)``)
    record_id: bytes
    envelope: bytes
    capsule: bytes
    content_hash: bytes
    resource_type: str


def validate_fhir(document: bytes, record_type: RecordType) -> str:
    """Check the document is a valid FHIR R4 resource of a kind that carries
    ``record_type``; return its resource type."""
    # Bounded first: pydantic's parser below sees only a document within both bounds.
    try:
        fields = bounded_json.loads_object(
            document, max_bytes=MAX_DOCUMENT_BYTES, max_depth=MAX_DOCUMENT_DEPTH, what="document"
        )
    except InvalidRequest as e:
        raise InvalidRequest(f"record is not FHIR JSON: {e.message}") from None
    resource_type = fields.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidRequest("record is not FHIR JSON (no resourceType)")
    allowed = FHIR_RESOURCES[record_type]
    if resource_type not in allowed:
        raise InvalidRequest(
            f"a {record_type.label} record must be a FHIR {' or '.join(sorted(allowed))}, "
            f"not {str(resource_type)[:40]!r}"
        )
    try:
        get_fhir_model_class(resource_type).model_validate_json(document)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"invalid FHIR {resource_type}: {where}: {first['msg']}") from None
    return str(resource_type)


def _aad(record_id: bytes, record_type: RecordType) -> bytes:
    return b"medkms/record/v1\x00" + record_id + record_type.label.encode()


def seal(
    patient: str, record_type: RecordType, document: bytes, patient_key: umbral.PublicKey
) -> SealedRecord:
    """Encrypt a record of ``patient``'s under her key for its type. The record's id is
    derived from the new capsule, as the registry derives it when the record is anchored."""
    resource_type = validate_fhir(document, record_type)
    dek = AESGCM.generate_key(bit_length=256)
    capsule, encrypted_dek = umbral.encrypt(patient_key, dek)
    record_id = record_id_of(patient, capsule_hash(bytes(capsule)))
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(dek).encrypt(nonce, document, _aad(record_id, record_type))
    del dek
    envelope = record_pb2.RecordEnvelope(
        format_version=FORMAT_VERSION,
        record_id=record_id,
        record_type=record_type.label,
        capsule=bytes(capsule),
        encrypted_dek=encrypted_dek,
        nonce=nonce,
        ciphertext=ciphertext,
        media_type=MEDIA_TYPE,
    ).SerializeToString()
    return SealedRecord(
        record_id=record_id,
        envelope=envelope,
        capsule=bytes(capsule),
        content_hash=hashlib.sha256(envelope).digest(),
        resource_type=resource_type,
    )


def parse_envelope(data: bytes) -> record_pb2.RecordEnvelope:
    try:
        envelope = record_pb2.RecordEnvelope.FromString(data)
    except DecodeError:
        raise IntegrityError("stored record is not a record envelope") from None
    if envelope.format_version != FORMAT_VERSION:
        raise IntegrityError(f"unsupported envelope format {envelope.format_version}")
    if len(envelope.nonce) != NONCE_SIZE:
        raise IntegrityError("envelope nonce has the wrong size")
    load_capsule(envelope.capsule)
    return envelope


def open_envelope(envelope: record_pb2.RecordEnvelope, dek: bytes) -> bytes:
    if len(dek) != DEK_SIZE:
        raise IntegrityError("decapsulated key has the wrong size")
    record_type = RecordType.parse(envelope.record_type)
    try:
        return AESGCM(dek).decrypt(
            envelope.nonce, envelope.ciphertext, _aad(envelope.record_id, record_type)
        )
    except InvalidTag:
        raise IntegrityError("record ciphertext failed authentication") from None
