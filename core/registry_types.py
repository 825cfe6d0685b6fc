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


@dataclass(frozen=True)
class BlockRef:
    number: int
    hash: bytes
    timestamp: int


# Registry events a node's grant index follows (contracts/src/Registry.sol). Each
# carries the block it was mined in, whose timestamp stands in for the contract's
# createdAt/grantedAt fields.


@dataclass(frozen=True)
class PatientRegistered:
    block: int
    timestamp: int
    patient: str
    umbral_public_key: bytes
    verifying_key: bytes


@dataclass(frozen=True)
class RecordAnchored:
    block: int
    timestamp: int
    record_id: bytes
    patient: str
    record_type: RecordType
    creator: str
    content_hash: bytes
    capsule_hash: bytes


@dataclass(frozen=True)
class RecordDeactivated:
    block: int
    timestamp: int
    record_id: bytes
    patient: str


@dataclass(frozen=True)
class AccessGranted:
    block: int
    timestamp: int
    patient: str
    grantee: str
    grantee_umbral_key: bytes
    expires_at: int
    allowed_types_mask: int


@dataclass(frozen=True)
class AccessRevoked:
    block: int
    timestamp: int
    patient: str
    grantee: str


RegistryEvent = (
    PatientRegistered | RecordAnchored | RecordDeactivated | AccessGranted | AccessRevoked
)
