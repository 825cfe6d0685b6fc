"""The registry state requests are judged by, rebuilt from the registry's events: the one
interpreter of those events. A node keeps one in step with the chain
(``kms_node/chain_follower.py``), so its hot path makes no chain call; the auditor replays
the same events to judge each logged decision against the state as of its block on a chain
that keeps no historical state (``clients/audit/replayed_state.py``).

Pure: events in, lookups out. The index records the block it reflects; its user decides
whether that is fresh enough to judge by.

Packed (issue 14): a node holds every patient, record and grant of the registry, so each is
a few bytes objects, not a dataclass per entry. Addresses are kept as their 20 raw bytes and
given back in EIP-55 form (``core.addresses.checksum``, cached).

- ``_patients``: patient -> one flag byte (registered) followed by the patient's grants, each
  ``grantee(20) || expires_at(8) || mask(4) || granted_at(8) || flags(1) || key_len(1) ||
  grantee_umbral_key``. A patient has few grants, so a scan of them is cheap and saves a
  dict entry and a key object per grant.
- ``_records``: record id -> ``patient(20) || creator(20) || content_hash(32) ||
  capsule_hash(32) || record_type(1) || active(1) || created_at(8)``.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from typing import Final, assert_never

from core.addresses import checksum
from core.record_types import RecordType
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    AccessState,
    BlockRef,
    EmergencyAccessOpened,
    EmergencyOptInChanged,
    EmergencyRoleChanged,
    GrantInfo,
    PatientRegistered,
    RecordAnchored,
    RecordDeactivated,
    RecordInfo,
    RegistryEvent,
)

_REGISTERED: Final = b"\x01"
_UNREGISTERED: Final = b"\x00"
#: expires_at, allowed types mask, granted_at, flags, length of the grantee's Umbral key
_GRANT_FIXED: Final = struct.Struct(">QIQBB")
_GRANT_HEAD: Final = 20 + _GRANT_FIXED.size
_ACTIVE: Final = 1
_EMERGENCY: Final = 2
#: patient, creator, content hash, capsule hash, record type, active, created_at
_RECORD: Final = struct.Struct(">20s20s32s32sB?Q")
_CAPSULE_AT: Final = 72


def raw_address(address: str) -> bytes:
    """The 20 bytes of a 0x-prefixed hex address (any case)."""
    raw = bytes.fromhex(address[2:])
    if len(raw) != 20:
        raise ValueError("an address is 20 bytes")
    return raw


def _grant_entry(grantee: bytes, info: GrantInfo) -> bytes:
    flags = (_ACTIVE if info.active else 0) | (_EMERGENCY if info.emergency else 0)
    key = info.grantee_umbral_key
    if len(key) > 255:
        raise ValueError("an Umbral public key is 33 bytes")
    head = _GRANT_FIXED.pack(
        info.expires_at, info.allowed_types_mask, info.granted_at, flags, len(key)
    )
    return grantee + head + key


def _find_grant(blob: bytes, grantee: bytes) -> tuple[int, int]:
    """(start, end) of ``grantee``'s entry in a patient's blob, or (-1, -1)."""
    at = 1
    while at < len(blob):
        end = at + _GRANT_HEAD + blob[at + _GRANT_HEAD - 1]
        if blob[at : at + 20] == grantee:
            return at, end
        at = end
    return -1, -1


def _grant_info(patient: str, grantee: str, entry: bytes) -> GrantInfo:
    expires_at, mask, granted_at, flags, _ = _GRANT_FIXED.unpack_from(entry, 20)
    return GrantInfo(
        patient=patient,
        grantee=grantee,
        grantee_umbral_key=entry[_GRANT_HEAD:],
        expires_at=expires_at,
        allowed_types_mask=mask,
        active=bool(flags & _ACTIVE),
        granted_at=granted_at,
        emergency=bool(flags & _EMERGENCY),
    )


class GrantIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._patients: dict[bytes, bytes] = {}
        self._records: dict[bytes, bytes] = {}
        self._patient_count = 0
        self._grant_count = 0
        #: capsule hashes of deactivated records: never re-encrypted again, whatever record
        #: a request names (the registry anchors each capsule once; this holds even if not)
        self._retired_capsules: set[bytes] = set()
        #: accounts that lost EMERGENCY_ROLE: their emergency windows are not in force
        self._without_emergency_role: set[bytes] = set()
        #: the last block whose events have all been applied; None before the first sync
        self.block: BlockRef | None = None

    def copy(self) -> GrantIndex:
        """An independent index holding the same state (the values are immutable bytes, so
        the containers are copied, not the values)."""
        twin = GrantIndex()
        with self._lock:
            twin._patients = dict(self._patients)
            twin._records = dict(self._records)
            twin._patient_count = self._patient_count
            twin._grant_count = self._grant_count
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
                patient = raw_address(event.patient)
                blob = self._patients.get(patient, _UNREGISTERED)
                if blob[:1] != _REGISTERED:
                    self._patient_count += 1
                    self._patients[patient] = _REGISTERED + blob[1:]
            case RecordAnchored():
                self._records[event.record_id] = _RECORD.pack(
                    raw_address(event.patient),
                    raw_address(event.creator),
                    event.content_hash,
                    event.capsule_hash,
                    int(event.record_type),
                    True,
                    event.timestamp,
                )
            case RecordDeactivated():
                packed = self._records.get(event.record_id)
                if packed is not None:
                    active_at = _RECORD.size - 9
                    self._records[event.record_id] = (
                        packed[:active_at] + b"\x00" + packed[active_at + 1 :]
                    )
                    self._retired_capsules.add(packed[_CAPSULE_AT : _CAPSULE_AT + 32])
            case AccessGranted() | EmergencyAccessOpened():
                self._put_grant(event)
            case EmergencyOptInChanged():
                pass  # read from the chain at enrollment and shredding, not on the hot path
            case EmergencyRoleChanged():
                responder = raw_address(event.responder)
                if event.held:
                    self._without_emergency_role.discard(responder)
                else:
                    self._without_emergency_role.add(responder)
            case AccessRevoked():
                patient, grantee = raw_address(event.patient), raw_address(event.grantee)
                held = self._patients.get(patient, _UNREGISTERED)
                start, _ = _find_grant(held, grantee)
                if start >= 0:
                    flags_at = start + _GRANT_HEAD - 2
                    flags = held[flags_at] & ~_ACTIVE
                    self._patients[patient] = (
                        held[:flags_at] + bytes((flags,)) + held[flags_at + 1 :]
                    )
            case _:
                assert_never(event)

    def _put_grant(self, event: AccessGranted | EmergencyAccessOpened) -> None:
        """Set the patient's grant to the grantee (a new grant replaces the old one)."""
        if isinstance(event, AccessGranted):
            grantee_address, key, emergency = event.grantee, event.grantee_umbral_key, False
        else:
            grantee_address, key, emergency = event.responder, event.responder_umbral_key, True
        info = GrantInfo(
            event.patient,
            grantee_address,
            key,
            event.expires_at,
            event.allowed_types_mask,
            active=True,
            granted_at=event.timestamp,
            emergency=emergency,
        )
        patient, grantee = raw_address(event.patient), raw_address(grantee_address)
        blob = self._patients.get(patient, _UNREGISTERED)
        start, end = _find_grant(blob, grantee)
        if start >= 0:
            blob = blob[:start] + blob[end:]
        else:
            self._grant_count += 1
        self._patients[patient] = blob + _grant_entry(grantee, info)

    def access_state(self, record_id: bytes, grantee: str, capsule_hash: bytes) -> AccessState:
        with self._lock:
            if self.block is None:
                raise RuntimeError("the index has not been synced yet")
            record, grant = self._record_and_grant(record_id, grantee)
            return AccessState(
                record,
                grant,
                self.block.number,
                self.block.timestamp,
                self.block.hash,
                capsule_retired=capsule_hash in self._retired_capsules,
            )

    def _record_and_grant(
        self, record_id: bytes, grantee: str
    ) -> tuple[RecordInfo | None, GrantInfo | None]:
        packed = self._records.get(record_id)
        if packed is None:
            return None, None
        patient_raw, creator, content_hash, capsule_hash, record_type, active, created_at = (
            _RECORD.unpack(packed)
        )
        patient = checksum(patient_raw)
        record = RecordInfo(
            record_id=record_id,
            patient=patient,
            content_hash=content_hash,
            storage_uri="",  # not in the event, and not needed to judge a request
            record_type=RecordType(record_type),
            capsule_hash=capsule_hash,
            creator=checksum(creator),
            active=active,
            created_at=created_at,
        )
        try:
            grantee_raw = raw_address(grantee)
        except ValueError:
            return record, None
        blob = self._patients.get(patient_raw, _UNREGISTERED)
        start, end = _find_grant(blob, grantee_raw)
        if start < 0:
            return record, None
        grant = _grant_info(patient, checksum(grantee_raw), blob[start:end])
        if grant.emergency and grantee_raw in self._without_emergency_role:
            # As the registry's views report it (Registry._inForce).
            grant = dataclasses.replace(grant, active=False)
        return record, grant

    def is_registered(self, address: str) -> bool:
        """Has the patient registered (as of the block the index reflects)?"""
        try:
            raw = raw_address(address)
        except ValueError:
            return False
        with self._lock:
            blob = self._patients.get(raw)
            return blob is not None and blob[:1] == _REGISTERED

    def sizes(self) -> tuple[int, int, int]:
        """(patients, records, grants) held."""
        with self._lock:
            return self._patient_count, len(self._records), self._grant_count

    # -- snapshots (kms_node/index_snapshot.py signs, writes and checks them) -----------

    def to_bytes(self) -> bytes:
        """The whole index, and the block it reflects, as one byte string (read back by
        :meth:`from_bytes`)."""
        with self._lock:
            if self.block is None:
                raise RuntimeError("the index has not been synced yet")
            block = self.block
            patients = list(self._patients.items())
            records = list(self._records.items())
            retired = list(self._retired_capsules)
            without_role = list(self._without_emergency_role)
            counts = (self._patient_count, self._grant_count)
        parts = [
            _SNAPSHOT_MAGIC,
            _SNAPSHOT_HEAD.pack(
                block.number,
                block.timestamp,
                len(block.hash),
                len(patients),
                len(records),
                len(retired),
                len(without_role),
                *counts,
            ),
            block.hash,
        ]
        for patient, blob in patients:
            parts += (patient, _BLOB_LEN.pack(len(blob)), blob)
        for record_id, packed in records:
            parts += (record_id, packed)
        parts += retired
        parts += without_role
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> GrantIndex:
        """The index :meth:`to_bytes` wrote; ``ValueError`` if ``data`` is not one."""
        view = memoryview(data)
        if bytes(view[: len(_SNAPSHOT_MAGIC)]) != _SNAPSHOT_MAGIC:
            raise ValueError("not a grant index snapshot (or another version)")
        at = len(_SNAPSHOT_MAGIC)
        try:
            number, timestamp, hash_len, n_patients, n_records, n_retired, n_without, *counts = (
                _SNAPSHOT_HEAD.unpack_from(view, at)
            )
        except struct.error:
            raise ValueError("grant index snapshot cut short") from None
        at += _SNAPSHOT_HEAD.size
        need = hash_len + n_retired * 32 + n_without * 20
        need += n_patients * (20 + _BLOB_LEN.size + 1) + n_records * (32 + _RECORD.size)
        if len(view) - at < need:
            raise ValueError("grant index snapshot cut short")
        index = cls()
        index.block = BlockRef(number, bytes(view[at : at + hash_len]), timestamp)
        at += hash_len
        patients: dict[bytes, bytes] = {}
        for _ in range(n_patients):
            patient = bytes(view[at : at + 20])
            (size,) = _BLOB_LEN.unpack_from(view, at + 20)
            at += 20 + _BLOB_LEN.size
            blob = bytes(view[at : at + size])
            at += size
            if len(blob) != size or not _well_formed(blob):
                raise ValueError("grant index snapshot holds a malformed patient entry")
            patients[patient] = blob
        records: dict[bytes, bytes] = {}
        width = 32 + _RECORD.size
        for _ in range(n_records):
            entry = bytes(view[at : at + width])
            at += width
            if len(entry) != width:
                raise ValueError("grant index snapshot cut short")
            records[entry[:32]] = entry[32:]
        retired = {bytes(view[i : i + 32]) for i in range(at, at + 32 * n_retired, 32)}
        at += 32 * n_retired
        without = {bytes(view[i : i + 20]) for i in range(at, at + 20 * n_without, 20)}
        at += 20 * n_without
        if at != len(view):
            raise ValueError("grant index snapshot does not end where its counts say")
        index._patients, index._records = patients, records
        index._retired_capsules, index._without_emergency_role = retired, without
        index._patient_count, index._grant_count = counts
        return index


#: "medkms grant index, version 1"
_SNAPSHOT_MAGIC: Final = b"medkms-grant-index/1\n"
#: block number, timestamp, hash length; patient, record, retired and role entries;
#: registered patients, grants
_SNAPSHOT_HEAD: Final = struct.Struct(">QQBIIIIII")
_BLOB_LEN: Final = struct.Struct(">I")


def _well_formed(blob: bytes) -> bool:
    """A patient entry: a flag byte, then whole grant entries."""
    if blob[:1] not in (_REGISTERED, _UNREGISTERED):
        return False
    at = 1
    while at < len(blob):
        if at + _GRANT_HEAD > len(blob):
            return False
        at += _GRANT_HEAD + blob[at + _GRANT_HEAD - 1]
    return at == len(blob)
