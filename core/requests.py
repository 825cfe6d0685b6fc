"""Validation of incoming requests into typed, checked values.

Every entry point (node, coordinator) builds these from the wire message before
doing anything else, so each field is checked once, here, with a message a
person can act on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import umbral_pre as umbral

from core.addresses import checksum
from core.errors import InvalidRequest
from core.node_identity import MAX_NODE_ID_BYTES
from core.record_types import RecordType
from core.request_auth import (
    SIGNATURE_SIZE,
    BatchClaims,
    Domain,
    EnrollmentClaims,
    RequestClaims,
    id_of_digest,
    signing_digest,
)
from core.umbral_codec import capsule_hash, check_capsule_size, load_capsule, load_public_key

ADDRESS_SIZE = 20
RECORD_ID_SIZE = 32

#: parses (and checks) a capsule's bytes; the second argument names the field for errors
CapsuleLoader = Callable[[bytes, str], umbral.Capsule]

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


def parse_request_id(echo: str, digest: bytes) -> str:
    """The request's id: derived from the signing digest of what the requester signed
    (:func:`~core.request_auth.request_id_of`), never taken from the wire.

    The wire's ``request_id`` is an optional echo of it, which must be empty or equal.
    It is kept, rather than removed, so that a relay that rewrites it is caught
    (INVALID_ARGUMENT at the coordinator and at every node, a refusal its operator sees)
    instead of being silently ignored, and so that the SDK's messages name the id the
    audit logs will carry. Checked last, so a malformed field is named first.
    """
    derived = id_of_digest(digest)
    if echo and echo != derived:
        # The caller's value is not repeated: it may be anything, of any length.
        raise InvalidRequest(
            "request_id must be empty or the id derived from the signed request, " + derived
        )
    return derived


def parse_record_type(value: int, field: str = "record_type") -> RecordType:
    try:
        return RecordType(value)
    except ValueError:
        raise InvalidRequest(
            f"{field} must be 0..{len(RecordType) - 1} (a record type), got {value}"
        ) from None


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


class LazyCapsule:
    """A capsule's bytes (their size checked), parsed on first use and kept: parsing is
    the one costly check of a request (two curve multiplications, about 0.25 ms), which
    the coordinator and the nodes make only once the read's signature (and at the
    coordinator its budget) let it in (:func:`parse_capsules`). Copies of a query share
    it, so it is parsed at most once."""

    __slots__ = ("_capsule", "_field", "_load", "data")

    def __init__(
        self, data: bytes, field: str = "capsule", load: CapsuleLoader = load_capsule
    ) -> None:
        check_capsule_size(data, field)
        self.data = data
        self._field = field
        self._load = load
        self._capsule: umbral.Capsule | None = None

    def parsed(self) -> umbral.Capsule:
        """The capsule; :class:`InvalidRequest` naming the field if it is malformed."""
        if self._capsule is None:
            self._capsule = self._load(self.data, self._field)
        return self._capsule

    def __repr__(self) -> str:
        return f"LazyCapsule({self._field!r}, parsed={self._capsule is not None})"


def parse_capsules(queries: Iterable[ReencryptionQuery]) -> None:
    """Parse each query's capsule, in order (kept parsed): :class:`InvalidRequest` naming
    the first malformed one. Parsing a request leaves its capsules unparsed; a server
    calls this once the read's signature is found good, so that a forged read costs it
    the signature check, not a parse per capsule."""
    for query in queries:
        query.lazy_capsule.parsed()


class SignedRequestFields(Protocol):
    """The wire fields a single request and a batch share: who asks, about whose
    records, with which key, why, until when, and the signature over it all."""

    request_id: str
    patient: bytes
    requester: bytes
    requester_umbral_key: bytes
    purpose_of_use: str
    deadline: int
    nonce: bytes
    signature: bytes


class ReencryptionRequestFields(SignedRequestFields, Protocol):
    record_id: bytes
    capsule: bytes
    record_type: int


@dataclass(frozen=True)
class ReencryptionQuery:
    """A validated re-encryption request (not yet authorised)."""

    request_id: str
    patient: str
    record_id: bytes
    record_type: RecordType
    lazy_capsule: LazyCapsule
    requester: str
    requester_umbral_key: bytes
    receiving_key: umbral.PublicKey
    purpose_of_use: str
    signed: Signed
    #: the EIP-712 digest the requester signed (a batch's, for its items), computed once
    #: from the checked fields above: the request id is derived from it and the signature
    #: is checked against it, so neither hashes the claims again
    digest: bytes

    @property
    def capsule_bytes(self) -> bytes:
        return self.lazy_capsule.data

    @property
    def capsule(self) -> umbral.Capsule:
        """The capsule, parsed on first use (:class:`InvalidRequest` if malformed)."""
        return self.lazy_capsule.parsed()

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
    def parse(
        cls,
        msg: ReencryptionRequestFields,
        domain: Domain,
        load: CapsuleLoader = load_capsule,
    ) -> ReencryptionQuery:
        """Check every field but the capsule's content (its size is checked);
        ``domain`` is the registry's EIP-712 domain, which the request id is derived in;
        ``load`` parses the capsule (a node's cache of those it served, or
        ``load_capsule``) at its first use, or at :func:`parse_capsules`."""
        patient = parse_address(msg.patient, "patient")
        record_id = parse_record_id(msg.record_id)
        record_type = parse_record_type(msg.record_type)
        capsule = LazyCapsule(bytes(msg.capsule), "capsule", load)
        query = cls(
            request_id="",
            digest=b"",
            patient=patient,
            record_id=record_id,
            record_type=record_type,
            lazy_capsule=capsule,
            requester=parse_address(msg.requester, "requester"),
            requester_umbral_key=bytes(msg.requester_umbral_key),
            receiving_key=load_public_key(msg.requester_umbral_key, "requester_umbral_key"),
            purpose_of_use=parse_purpose(msg.purpose_of_use),
            signed=Signed.parse(msg.deadline, msg.nonce, msg.signature),
        )
        digest = signing_digest(domain, query.claims())
        request_id = parse_request_id(msg.request_id, digest)
        return dataclasses.replace(query, request_id=request_id, digest=digest)


MAX_SEALED_KFRAG_BYTES = 512
EPHEMERAL_KEY_SIZE = 33


class SealedKfragFields(Protocol):
    record_type: int
    ephemeral_public_key: bytes
    sealed: bytes


class EnrollmentFields(Protocol):
    node_id: str
    patient: bytes
    grantee: bytes
    receiving_key: bytes
    deadline: int
    nonce: bytes
    signature: bytes

    @property
    def kfrags(self) -> Sequence[SealedKfragFields]: ...


@dataclass(frozen=True)
class SealedKfrag:
    """A kfrag sealed to a node's delivery key (opened only inside that node's HSM)."""

    record_type: RecordType
    ephemeral_public_key: bytes
    sealed: bytes

    @property
    def sha256(self) -> bytes:
        """What the patient's enrollment signature binds for this kfrag."""
        return hashlib.sha256(self.ephemeral_public_key + self.sealed).digest()


@dataclass(frozen=True)
class Enrollment:
    """A validated enrollment: form checked; signature and kfrags not verified yet."""

    node_id: str
    patient: str
    grantee: str
    receiving_key_bytes: bytes
    receiving_key: umbral.PublicKey
    kfrags: tuple[SealedKfrag, ...]
    #: deadline, nonce and the patient's signature
    signed: Signed

    def claims(self) -> EnrollmentClaims:
        return EnrollmentClaims(
            node_id=self.node_id,
            patient=self.patient,
            grantee=self.grantee,
            receiving_key=self.receiving_key_bytes,
            record_types=tuple(int(k.record_type) for k in self.kfrags),
            sealed_hashes=tuple(k.sha256 for k in self.kfrags),
            nonce=self.signed.nonce,
            deadline=self.signed.deadline,
        )

    @classmethod
    def parse(cls, msg: EnrollmentFields) -> Enrollment:
        if not 1 <= len(msg.node_id.encode()) <= MAX_NODE_ID_BYTES:
            raise InvalidRequest(f"node_id must be 1-{MAX_NODE_ID_BYTES} bytes")
        patient = parse_address(msg.patient, "patient")
        grantee = parse_address(msg.grantee, "grantee")
        if patient == grantee:
            raise InvalidRequest("grantee must differ from patient")
        if not 1 <= len(msg.kfrags) <= len(RecordType):
            raise InvalidRequest(
                f"an enrollment holds 1 to {len(RecordType)} sealed kfrags, got {len(msg.kfrags)}"
            )
        kfrags = []
        seen: set[RecordType] = set()
        for i, k in enumerate(msg.kfrags):
            record_type = parse_record_type(k.record_type, f"kfrags[{i}].record_type")
            if record_type in seen:
                raise InvalidRequest(
                    f"kfrags[{i}]: record type {record_type.label} is listed twice"
                )
            seen.add(record_type)
            if len(k.ephemeral_public_key) != EPHEMERAL_KEY_SIZE:
                raise InvalidRequest(
                    f"kfrags[{i}].ephemeral_public_key must be a {EPHEMERAL_KEY_SIZE}-byte "
                    "compressed P-256 point"
                )
            if not 28 < len(k.sealed) <= MAX_SEALED_KFRAG_BYTES:
                raise InvalidRequest(
                    f"kfrags[{i}].sealed must be 29..{MAX_SEALED_KFRAG_BYTES} bytes "
                    "(nonce, ciphertext, tag)"
                )
            kfrags.append(SealedKfrag(record_type, bytes(k.ephemeral_public_key), bytes(k.sealed)))
        return cls(
            node_id=msg.node_id,
            patient=patient,
            grantee=grantee,
            receiving_key_bytes=bytes(msg.receiving_key),
            receiving_key=load_public_key(msg.receiving_key, "receiving_key"),
            kfrags=tuple(kfrags),
            signed=Signed.parse(msg.deadline, msg.nonce, msg.signature),
        )


MAX_BATCH = 64
#: a node's ReencryptMany call: at most this many independently signed reads, and
#: at most MAX_BATCH capsules in all (so that one call costs a node no more than
#: one full batch)
MAX_MANY_READS = 16


class CapsuleRefFields(Protocol):
    record_id: bytes
    capsule: bytes
    record_type: int


class BatchFields(SignedRequestFields, Protocol):
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
    def parse(
        cls,
        msg: BatchFields,
        domain: Domain,
        load: CapsuleLoader = load_capsule,
    ) -> BatchQuery:
        """As :meth:`ReencryptionQuery.parse`; the batch has one id, its signature's."""
        if not 1 <= len(msg.capsules) <= MAX_BATCH:
            raise InvalidRequest(
                f"a batch holds 1 to {MAX_BATCH} capsules, got {len(msg.capsules)}"
            )
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
            record_type = parse_record_type(ref.record_type, f"capsules[{i}].record_type")
            capsule = LazyCapsule(bytes(ref.capsule), f"capsules[{i}].capsule", load)
            items.append(
                ReencryptionQuery(
                    request_id="",
                    digest=b"",
                    patient=patient,
                    record_id=record_id,
                    record_type=record_type,
                    lazy_capsule=capsule,
                    requester=requester,
                    requester_umbral_key=bytes(msg.requester_umbral_key),
                    receiving_key=receiving_key,
                    purpose_of_use=purpose,
                    signed=signed,
                )
            )
        digest = signing_digest(domain, cls("", tuple(items)).claims())
        request_id = parse_request_id(msg.request_id, digest)
        return cls(
            request_id,
            tuple(dataclasses.replace(q, request_id=request_id, digest=digest) for q in items),
        )
