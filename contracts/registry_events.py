"""The registry's events (``contracts/src/Registry.sol``) as core values
(``core/registry_types.py``): the events a node's grant index follows, and the checkpoint
anchors an auditor reads.
"""

from __future__ import annotations

from typing import Any

from eth_utils.abi import collapse_if_tuple
from web3 import Web3

from contracts.registry_arguments import EMERGENCY_ROLE
from contracts.registry_views import patient_keys
from core.record_types import RecordType
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    CheckpointAnchor,
    EmergencyAccessOpened,
    EmergencyOptInChanged,
    EmergencyRoleChanged,
    PatientRegistered,
    RecordAnchored,
    RecordDeactivated,
    RegistryEvent,
)

FOLLOWED_EVENTS = frozenset(
    {
        "PatientRegistered",
        "RecordAnchored",
        "RecordDeactivated",
        "AccessGranted",
        "AccessRevoked",
        "EmergencyAccessOpened",
        "EmergencyOptInChanged",
        "RoleGranted",  # of EMERGENCY_ROLE only: an emergency window lasts while it is held
        "RoleRevoked",
    }
)


def event_topic(entry: dict[str, Any]) -> bytes:
    types = ",".join(collapse_if_tuple(i) for i in entry.get("inputs", []))
    return bytes(Web3.keccak(text=f"{entry['name']}({types})"))


def followed_event(name: str, args: Any, block: int, timestamp: int) -> RegistryEvent | None:
    """The followed event ``name`` as its registry type; None for the role events of
    roles other than EMERGENCY_ROLE."""

    def addr(value: str) -> str:
        return str(Web3.to_checksum_address(value))

    if name == "PatientRegistered":
        return PatientRegistered(
            block,
            timestamp,
            addr(args.patient),
            patient_keys(bytes(args.umbralKeys)),
            bytes(args.verifyingKey),
        )
    if name == "RecordAnchored":
        return RecordAnchored(
            block,
            timestamp,
            bytes(args.recordId),
            addr(args.patient),
            RecordType(args.recordType),
            addr(args.creator),
            bytes(args.contentHash),
            bytes(args.capsuleHash),
        )
    if name == "RecordDeactivated":
        return RecordDeactivated(block, timestamp, bytes(args.recordId), addr(args.patient))
    if name == "AccessGranted":
        return AccessGranted(
            block,
            timestamp,
            addr(args.patient),
            addr(args.grantee),
            bytes(args.granteeUmbralKey),
            int(args.expiresAt),
            int(args.allowedTypes),
        )
    if name == "AccessRevoked":
        return AccessRevoked(block, timestamp, addr(args.patient), addr(args.grantee))
    if name == "EmergencyAccessOpened":
        return EmergencyAccessOpened(
            block,
            timestamp,
            addr(args.patient),
            addr(args.responder),
            bytes(args.responderUmbralKey),
            int(args.expiresAt),
            int(args.allowedTypes),
        )
    if name == "EmergencyOptInChanged":
        return EmergencyOptInChanged(
            block,
            timestamp,
            addr(args.patient),
            addr(args.responder),
            bytes(args.responderUmbralKey),
            int(args.allowedTypes),
            bool(args.active),
        )
    if name in ("RoleGranted", "RoleRevoked"):
        if bytes(args.role) != EMERGENCY_ROLE:
            return None
        return EmergencyRoleChanged(block, timestamp, addr(args.account), name == "RoleGranted")
    raise ValueError(f"not a followed event: {name}")


def checkpoint_anchor(args: Any, block: int) -> CheckpointAnchor:
    """A ``CheckpointAnchored`` event mined in ``block``."""
    return CheckpointAnchor(
        node_id=str(args.nodeId),
        tree_size=int(args.treeSize),
        root_hash=bytes(args.rootHash),
        timestamp=int(args.timestamp),
        signature=bytes(args.signature),
        block=block,
    )
