"""What the registry contract says, as plain values.

The chain adapter (``medkms.contracts.registry``) returns these; the policy
(``medkms.core.policy``) judges them. Addresses are EIP-55 checksum strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from medkms.core.record_types import RecordType


@dataclass(frozen=True)
class PatientInfo:
    address: str
    umbral_public_key: bytes
    verifying_key: bytes


@dataclass(frozen=True)
class RecordInfo:
    record_id: bytes
    patient: str
    content_hash: bytes
    storage_uri: str
    record_type: RecordType
    capsule_hash: bytes
    creator: str
    active: bool
    created_at: int


@dataclass(frozen=True)
class GrantInfo:
    patient: str
    grantee: str
    grantee_umbral_key: bytes
    expires_at: int
    allowed_types_mask: int
    active: bool
    granted_at: int


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    endpoint: str
    signing_public_key: bytes
    active: bool


@dataclass(frozen=True)
class AccessState:
    """Record and grant as of one block, read in a single call."""

    record: RecordInfo | None
    grant: GrantInfo | None
    block_number: int
    block_timestamp: int
