"""Validation of incoming requests into typed, checked values.

Every entry point (node, coordinator) builds these from the wire message before
doing anything else, so each field is checked once, here, with a message a
person can act on.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import umbral_pre as umbral

from medkms.core.addresses import checksum
from medkms.core.errors import InvalidRequest
from medkms.core.request_auth import SIGNATURE_SIZE, BatchClaims, RequestClaims
from medkms.core.umbral_codec import capsule_hash, load_capsule, load_kfrag, load_public_key

ADDRESS_SIZE = 20
RECORD_ID_SIZE = 32
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# HL7 v3 ActReason purpose-of-use codes accepted for re-encryption requests.
PURPOSES_OF_USE: dict[str, str] = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "CAREMGT": "care management",
    "PATRQT": "patient requested",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
}


def parse_address(data: bytes, field: str) -> str:
    """A 20-byte Ethereum address, returned as an EIP-55 checksum string."""
    if len(data) != ADDRESS_SIZE:
        raise InvalidRequest(
            f"{field} must be a {ADDRESS_SIZE}-byte address, got {len(data)} bytes"
        )
    if data == bytes(ADDRESS_SIZE):
        raise InvalidRequest(f"{field} must not be the zero address")
    return checksum(bytes(data))


def address_bytes(address: str) -> bytes:
    """The 20 raw bytes of a 0x-prefixed address, as the wire carries them."""
    return bytes.fromhex(address.removeprefix("0x"))


def parse_record_id(data: bytes) -> bytes:
    if len(data) != RECORD_ID_SIZE:
        raise InvalidRequest(f"record_id must be {RECORD_ID_SIZE} bytes, got {len(data)}")
    if data == bytes(RECORD_ID_SIZE):
        raise InvalidRequest("record_id must not be all zeros")
    return data


def parse_request_id(value: str) -> str:
    """The caller's request id, or a fresh one when the caller sent none."""
    if not value:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(value):
        raise InvalidRequest("request_id must be 1-64 characters of A-Z a-z 0-9 . _ : -")
    return value


def parse_purpose(value: str) -> str:
    if value not in PURPOSES_OF_USE:
        known = ", ".join(PURPOSES_OF_USE)
        shown = value if len(value) <= 16 else value[:16] + "..."
        raise InvalidRequest(f"purpose_of_use {shown!r} is not one of: {known}")
    return value


NONCE_SIZE = 32


@dataclass(frozen=True)
class Signed:
    """The freshness fields and signature of a request (checked for form only)."""

    deadline: int
    nonce: bytes
    signature: bytes

    @classmethod
    def parse(cls, deadline: int, nonce: bytes, signature: bytes) -> Signed:
        if len(nonce) != NONCE_SIZE:
            raise InvalidRequest(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        if len(signature) != SIGNATURE_SIZE:
            raise InvalidRequest(
                f"signature must be a {SIGNATURE_SIZE}-byte EIP-712 signature, got {len(signature)}"
            )
        if deadline == 0:
            raise InvalidRequest("deadline is required (Unix seconds)")
        return cls(int(deadline), bytes(nonce), bytes(signature))


class ReencryptionRequestFields(Protocol):
    request_id: str
    patient: bytes
    record_id: bytes
    capsule: bytes
    requester: bytes
    requester_umbral_key: bytes
    purpose_of_use: str
    deadline: int
    nonce: bytes
    signature: bytes


@dataclass(frozen=True)
class ReencryptionQuery:
    """A validated re-encryption request (not yet authorised)."""

    request_id: str
    patient: str
    record_id: bytes
    capsule_bytes: bytes
    capsule: umbral.Capsule
    requester: str
    requester_umbral_key: bytes
    receiving_key: umbral.PublicKey
    purpose_of_use: str
    signed: Signed

    @cached_property
    def capsule_hash(self) -> bytes:
        """The capsule's hash as anchored in the registry (computed once)."""
        return capsule_hash(self.capsule_bytes)

    def claims(self) -> RequestClaims:
        """What the requester's signature must cover."""
        return RequestClaims(
            patient=self.patient,
            record_id=self.record_id,
            capsule_hash=self.capsule_hash,
            requester_umbral_key=self.requester_umbral_key,
            nonce=self.signed.nonce,
            deadline=self.signed.deadline,
            purpose_of_use=self.purpose_of_use,
        )

    @classmethod
    def parse(cls, msg: ReencryptionRequestFields) -> ReencryptionQuery:
        return cls(
            request_id=parse_request_id(msg.request_id),
            patient=parse_address(msg.patient, "patient"),
            record_id=parse_record_id(msg.record_id),
            capsule_bytes=bytes(msg.capsule),
            capsule=load_capsule(msg.capsule),
            requester=parse_address(msg.requester, "requester"),
            requester_umbral_key=bytes(msg.requester_umbral_key),
            receiving_key=load_public_key(msg.requester_umbral_key, "requester_umbral_key"),
            purpose_of_use=parse_purpose(msg.purpose_of_use),
            signed=Signed.parse(msg.deadline, msg.nonce, msg.signature),
        )


class EnrollmentFields(Protocol):
    patient: bytes
    grantee: bytes
    kfrag: bytes


@dataclass(frozen=True)
class Enrollment:
    """A validated kfrag enrollment; the kfrag itself is not verified yet."""

    patient: str
    grantee: str
    kfrag_bytes: bytes
    kfrag: umbral.KeyFrag

    @classmethod
    def parse(cls, msg: EnrollmentFields) -> Enrollment:
        patient = parse_address(msg.patient, "patient")
        grantee = parse_address(msg.grantee, "grantee")
        if patient == grantee:
            raise InvalidRequest("grantee must differ from patient")
        return cls(
            patient=patient,
            grantee=grantee,
            kfrag_bytes=bytes(msg.kfrag),
            kfrag=load_kfrag(msg.kfrag),
        )


MAX_BATCH = 64


class CapsuleRefFields(Protocol):
    record_id: bytes
    capsule: bytes


class BatchFields(Protocol):
    request_id: str
    patient: bytes
    requester: bytes
    requester_umbral_key: bytes
    purpose_of_use: str
    deadline: int
    nonce: bytes
    signature: bytes

    @property
    def capsules(self) -> Sequence[CapsuleRefFields]: ...


@dataclass(frozen=True)
class BatchQuery:
    """A validated batch: one query per capsule, sharing the batch's parties."""

    request_id: str
    items: tuple[ReencryptionQuery, ...]

    def claims(self) -> BatchClaims:
        """What the requester's signature must cover: every record and capsule, in order."""
        first = self.items[0]
        return BatchClaims(
            patient=first.patient,
            record_ids=tuple(q.record_id for q in self.items),
            capsule_hashes=tuple(q.capsule_hash for q in self.items),
            requester_umbral_key=first.requester_umbral_key,
            nonce=first.signed.nonce,
            deadline=first.signed.deadline,
            purpose_of_use=first.purpose_of_use,
        )

    @classmethod
    def parse(cls, msg: BatchFields) -> BatchQuery:
        if not 1 <= len(msg.capsules) <= MAX_BATCH:
            raise InvalidRequest(
                f"a batch holds 1 to {MAX_BATCH} capsules, got {len(msg.capsules)}"
            )
        request_id = parse_request_id(msg.request_id)
        patient = parse_address(msg.patient, "patient")
        requester = parse_address(msg.requester, "requester")
        receiving_key = load_public_key(msg.requester_umbral_key, "requester_umbral_key")
        purpose = parse_purpose(msg.purpose_of_use)
        signed = Signed.parse(msg.deadline, msg.nonce, msg.signature)
        items = []
        seen: set[bytes] = set()
        for i, ref in enumerate(msg.capsules):
            record_id = parse_record_id(ref.record_id)
            if record_id in seen:
                raise InvalidRequest(f"capsules[{i}]: record 0x{record_id.hex()} is listed twice")
            seen.add(record_id)
            items.append(
                ReencryptionQuery(
                    request_id=request_id,
                    patient=patient,
                    record_id=record_id,
                    capsule_bytes=bytes(ref.capsule),
                    capsule=load_capsule(ref.capsule, f"capsules[{i}].capsule"),
                    requester=requester,
                    requester_umbral_key=bytes(msg.requester_umbral_key),
                    receiving_key=receiving_key,
                    purpose_of_use=purpose,
                    signed=signed,
                )
            )
        return cls(request_id, tuple(items))
