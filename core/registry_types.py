"""What the registry contract says, as plain values.

The chain adapter (``contracts.registry``) returns these; the policy
(``core.policy``) judges them. Addresses are EIP-55 checksum strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_hash.auto import keccak

from core.addresses import is_valid
from core.errors import InvalidRequest
from core.record_types import RecordType


def record_id_of(patient: str, capsule_hash: bytes) -> bytes:
    """A record's id, as the registry derives it (``Registry.recordIdOf``):
    ``keccak256(abi.encode(patient, capsuleHash))``. Ids are derived, never chosen, so nobody
    can take a patient's id first, and a capsule (anchored once, for ever) has one record."""
    if not is_valid(patient):
        raise InvalidRequest(f"patient is not an Ethereum address: {patient[:64]!r}")
    if not isinstance(capsule_hash, bytes) or len(capsule_hash) != 32:
        raise InvalidRequest("capsule_hash must be 32 bytes")
    return keccak(bytes(12) + bytes.fromhex(patient[2:]) + capsule_hash)


@dataclass(frozen=True)
class PatientInfo:
    address: str
    #: one Umbral public key per record type, indexed by ``RecordType`` value: a record
    #: of a type is encapsulated under that type's key, so a kfrag for one type cannot
    #: open another
    umbral_public_keys: tuple[bytes, ...]
    verifying_key: bytes

    def umbral_key(self, record_type: RecordType) -> bytes:
        return self.umbral_public_keys[record_type]


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
    #: opened by an emergency responder on the patient's standing opt-in
    emergency: bool = False


@dataclass(frozen=True)
class EmergencyOptIn:
    """A patient's standing consent that ``responder`` may open emergency grants."""

    patient: str
    responder: str
    responder_umbral_key: bytes
    allowed_types_mask: int
    active: bool
    #: emergency windows opened since the patient last opted in (the registry allows
    #: MAX_EMERGENCY_WINDOWS)
    windows_opened: int = 0


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    endpoint: str
    #: DER SubjectPublicKeyInfo of the node's HSM response-signing key (P-256)
    signing_public_key: bytes
    #: compressed P-256 point of the node's HSM delivery key: kfrags are sealed to it
    delivery_public_key: bytes
    #: the node's Ethereum account (its key is in the HSM); it anchors checkpoints
    account: str
    active: bool


@dataclass(frozen=True)
class CheckpointAnchor:
    """A node's signed audit checkpoint as anchored on-chain (CheckpointAnchored event)."""

    node_id: str
    tree_size: int
    root_hash: bytes
    timestamp: int
    signature: bytes
    block: int


@dataclass(frozen=True)
class AccessState:
    """Record and grant as of one block, read in a single call."""

    record: RecordInfo | None
    grant: GrantInfo | None
    block_number: int
    block_timestamp: int
    #: hash of that block, when the reader knows it (the grant index does)
    block_hash: bytes | None = None
    #: the request's capsule is carried by a deactivated record (whichever record the
    #: request names): a retired capsule is never re-encrypted again
    capsule_retired: bool = False


@dataclass(frozen=True)
class BlockRef:
    number: int
    hash: bytes
    timestamp: int


# Registry events a node's grant index follows (contracts/src/Registry.sol). Each
# carries the block it was mined in, whose timestamp stands in for the contract's
# createdAt/grantedAt fields. Which contract event becomes which of these is the table
# in contracts/registry_events.py; the other fields are read from the event's arguments
# of the same names (in camelCase) unless that table renames them.


@dataclass(frozen=True)
class PatientRegistered:
    block: int
    timestamp: int
    patient: str
    umbral_public_keys: tuple[bytes, ...]
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


@dataclass(frozen=True)
class EmergencyAccessOpened:
    """A responder opened an emergency grant (the patient can watch for this)."""

    block: int
    timestamp: int
    patient: str
    responder: str
    responder_umbral_key: bytes
    expires_at: int
    allowed_types_mask: int


@dataclass(frozen=True)
class EmergencyOptInChanged:
    block: int
    timestamp: int
    patient: str
    responder: str
    responder_umbral_key: bytes
    allowed_types_mask: int
    active: bool


@dataclass(frozen=True)
class EmergencyRoleChanged:
    """``responder`` was given (``held``) or lost EMERGENCY_ROLE. Emergency windows are in
    force only while their responder holds it."""

    block: int
    timestamp: int
    responder: str
    held: bool


RegistryEvent = (
    PatientRegistered
    | RecordAnchored
    | RecordDeactivated
    | AccessGranted
    | AccessRevoked
    | EmergencyAccessOpened
    | EmergencyOptInChanged
    | EmergencyRoleChanged
)
