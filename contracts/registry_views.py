"""The registry's view answers as core values (``core/registry_types.py``).

Each function takes what web3 decoded from one view of ``contracts/src/Registry.sol``
(structs as named tuples, so fields are read by their Solidity names) and returns the core
value, or None where the contract answers a zeroed struct for "there is none". web3 has
already decoded the answer by the ABI; a value a core type still refuses (a record type
this code does not know) raises ``ValueError``, so the client decodes records inside
``ChainTransport.translate``, which makes that ``ChainUnavailable``.
"""

from __future__ import annotations

from typing import Any

from web3 import Web3

from contracts.registry_arguments import COMPRESSED_POINT_BYTES, ZERO_32
from core.errors import ChainUnavailable
from core.record_types import RecordType
from core.registry_types import (
    AccessState,
    EmergencyOptIn,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    RecordInfo,
)

_ZERO_ADDRESS = "0x" + "00" * 20


def patient_keys(keys: bytes) -> tuple[bytes, ...]:
    """A patient's Umbral keys, one per ``RecordType``, as the registry stores them: one
    compressed point after another, in ``RecordType`` order."""
    n = COMPRESSED_POINT_BYTES
    if len(keys) != n * len(RecordType):
        raise ChainUnavailable("registry returned a patient key list of the wrong length")
    return tuple(keys[i * n : (i + 1) * n] for i in range(len(RecordType)))


def patient_info(patient: str, p: Any) -> PatientInfo | None:
    """``getPatient``."""
    if len(p.umbralKeys) == 0:
        return None
    return PatientInfo(patient, patient_keys(bytes(p.umbralKeys)), bytes(p.verifyingKey))


def record_info(record_id: bytes, r: Any) -> RecordInfo | None:
    """``getRecord``, and the record in ``accessState``."""
    if r.patient == _ZERO_ADDRESS:
        return None
    return RecordInfo(
        record_id=record_id,
        patient=Web3.to_checksum_address(r.patient),
        content_hash=bytes(r.contentHash),
        storage_uri=str(r.storageUri),
        record_type=RecordType(r.recordType),
        capsule_hash=bytes(r.capsuleHash),
        creator=Web3.to_checksum_address(r.creator),
        active=bool(r.active),
        created_at=int(r.createdAt),
    )


def record_of_capsule(answer: Any) -> bytes | None:
    """``recordOfCapsule``: the record's id, or None if no record ever carried the capsule."""
    record_id = bytes(answer)
    return None if record_id == ZERO_32 else record_id


def grant_info(patient: str, grantee: str, g: Any) -> GrantInfo | None:
    """``getGrant``, and the grant in ``accessState``."""
    if len(g.granteeUmbralKey) == 0:
        return None
    return GrantInfo(
        patient=patient,
        grantee=grantee,
        grantee_umbral_key=bytes(g.granteeUmbralKey),
        expires_at=int(g.expiresAt),
        allowed_types_mask=int(g.allowedTypes),
        active=bool(g.active),
        granted_at=int(g.grantedAt),
        emergency=bool(g.emergency),
    )


def access_state(record_id: bytes, grantee: str, answer: Any) -> AccessState:
    """``accessState``: record, grant (record's patient -> grantee), whether the capsule's
    record is deactivated, and the block judged at."""
    record, grant, retired, number, timestamp = answer
    info = record_info(record_id, record)
    return AccessState(
        record=info,
        grant=grant_info(info.patient, grantee, grant) if info is not None else None,
        block_number=int(number),
        block_timestamp=int(timestamp),
        capsule_retired=bool(retired),
    )


def emergency_opt_in(patient: str, responder: str, o: Any) -> EmergencyOptIn | None:
    """``getEmergencyOptIn``."""
    if len(o.responderUmbralKey) == 0:
        return None
    return EmergencyOptIn(
        patient,
        responder,
        bytes(o.responderUmbralKey),
        int(o.allowedTypes),
        bool(o.active),
        int(o.windowsOpened),
    )


def checkpoint(c: Any) -> tuple[int, bytes, int] | None:
    """``latestCheckpoint``: (tree size, root hash, timestamp), or None before the first."""
    if int(c.treeSize) == 0:
        return None
    return int(c.treeSize), bytes(c.rootHash), int(c.timestamp)


def node_info(n: Any) -> NodeInfo | None:
    """``getNode``; None for an empty slot."""
    if not n.nodeId:
        return None
    return NodeInfo(
        node_id=n.nodeId,
        endpoint=n.endpoint,
        signing_public_key=bytes(n.signingKey),
        delivery_public_key=bytes(n.deliveryKey),
        account=str(Web3.to_checksum_address(n.account)),
        active=bool(n.active),
    )
