"""The registry state requests are judged by, rebuilt from the registry's events: the one
interpreter of those events. A node keeps one in step with the chain
(``kms_node/chain_follower.py``), so its hot path makes no chain call; the auditor replays
the same events to judge each logged decision against the state as of its block on a chain
that keeps no historical state (``clients/audit/replayed_state.py``).

Pure: events in, lookups out. The index records the block it reflects; its user decides
whether that is fresh enough to judge by.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import assert_never

from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    AccessState,
    BlockRef,
    EmergencyAccessOpened,
    EmergencyOptInChanged,
    EmergencyRoleChanged,
    GrantInfo,
    PatientInfo,
    PatientRegistered,
    RecordAnchored,
    RecordDeactivated,
    RecordInfo,
    RegistryEvent,
)


class GrantIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._patients: dict[str, PatientInfo] = {}
        self._records: dict[bytes, RecordInfo] = {}
        self._grants: dict[tuple[str, str], GrantInfo] = {}
        #: capsule hashes of deactivated records: never re-encrypted again, whatever record
        #: a request names (the registry anchors each capsule once; this holds even if not)
        self._retired_capsules: set[bytes] = set()
        #: accounts that lost EMERGENCY_ROLE: their emergency windows are not in force
        self._without_emergency_role: set[str] = set()
        #: the last block whose events have all been applied; None before the first sync
        self.block: BlockRef | None = None

    def copy(self) -> GrantIndex:
        """An independent index holding the same state (the values are immutable, so the
        containers are copied, not the values)."""
        twin = GrantIndex()
        with self._lock:
            twin._patients = dict(self._patients)
            twin._records = dict(self._records)
            twin._grants = dict(self._grants)
            twin._retired_capsules = set(self._retired_capsules)
            twin._without_emergency_role = set(self._without_emergency_role)
            twin.block = self.block
        return twin

    def apply(self, events: list[RegistryEvent], through: BlockRef) -> None:
        """Apply events (in chain order) and mark the index as reflecting ``through``."""
        with self._lock:
            for event in events:
                self._apply(event)
            self.block = through

    def _apply(self, event: RegistryEvent) -> None:
        """The one place an event changes the index. Every ``RegistryEvent`` type has its
        case: mypy refuses this match (``assert_never``) when a new one has none."""
        match event:
            case PatientRegistered():
                self._patients[event.patient] = PatientInfo(
                    event.patient, event.umbral_public_keys, event.verifying_key
                )
            case RecordAnchored():
                self._records[event.record_id] = RecordInfo(
                    record_id=event.record_id,
                    patient=event.patient,
                    content_hash=event.content_hash,
                    storage_uri="",  # not in the event, and not needed to judge a request
                    record_type=event.record_type,
                    capsule_hash=event.capsule_hash,
                    creator=event.creator,
                    active=True,
                    created_at=event.timestamp,
                )
            case RecordDeactivated():
                record = self._records.get(event.record_id)
                if record is not None:
                    self._records[event.record_id] = dataclasses.replace(record, active=False)
                    self._retired_capsules.add(record.capsule_hash)
            case AccessGranted():
                self._grants[(event.patient, event.grantee)] = GrantInfo(
                    patient=event.patient,
                    grantee=event.grantee,
                    grantee_umbral_key=event.grantee_umbral_key,
                    expires_at=event.expires_at,
                    allowed_types_mask=event.allowed_types_mask,
                    active=True,
                    granted_at=event.timestamp,
                )
            case EmergencyAccessOpened():
                self._grants[(event.patient, event.responder)] = GrantInfo(
                    patient=event.patient,
                    grantee=event.responder,
                    grantee_umbral_key=event.responder_umbral_key,
                    expires_at=event.expires_at,
                    allowed_types_mask=event.allowed_types_mask,
                    active=True,
                    granted_at=event.timestamp,
                    emergency=True,
                )
            case EmergencyOptInChanged():
                pass  # read from the chain at enrollment and shredding, not on the hot path
            case EmergencyRoleChanged():
                if event.held:
                    self._without_emergency_role.discard(event.responder)
                else:
                    self._without_emergency_role.add(event.responder)
            case AccessRevoked():
                key = (event.patient, event.grantee)
                grant = self._grants.get(key)
                if grant is not None:
                    self._grants[key] = dataclasses.replace(grant, active=False)
            case _:
                assert_never(event)

    def access_state(self, record_id: bytes, grantee: str, capsule_hash: bytes) -> AccessState:
        with self._lock:
            if self.block is None:
                raise RuntimeError("the index has not been synced yet")
            record = self._records.get(record_id)
            grant = self._grants.get((record.patient, grantee)) if record is not None else None
            if grant is not None and grant.emergency and grantee in self._without_emergency_role:
                # As the registry's views report it (Registry._inForce).
                grant = dataclasses.replace(grant, active=False)
            return AccessState(
                record,
                grant,
                self.block.number,
                self.block.timestamp,
                self.block.hash,
                capsule_retired=capsule_hash in self._retired_capsules,
            )

    def patient(self, address: str) -> PatientInfo | None:
        with self._lock:
            return self._patients.get(address)

    def sizes(self) -> tuple[int, int, int]:
        """(patients, records, grants) held."""
        with self._lock:
            return len(self._patients), len(self._records), len(self._grants)
