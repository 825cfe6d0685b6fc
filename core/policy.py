"""The access decision a node makes for each re-encryption request.

Pure: given the validated request, the registry state read at one block and the
node's wall clock, say whether the request is allowed and why not. Expiry is
judged against both the block's time and the wall clock, so neither a stalled
chain nor a skewed clock extends a grant.

The auditor judges again with the same function, from what the audit entry
recorded of the request (core/audit_verify.py).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from core.errors import AccessDenied, KmsError, NotFound
from core.record_types import RecordType, from_mask
from core.registry_types import AccessState

#: HL7 purpose of use that an emergency grant (opened by a responder) requires
EMERGENCY_PURPOSE = "ETREAT"


class Request(Protocol):
    """What the policy reads of a request: a node's validated
    :class:`~core.requests.ReencryptionQuery`, or what an audit entry recorded of
    one."""

    @property
    def record_id(self) -> bytes: ...
    @property
    def patient(self) -> str: ...
    @property
    def capsule_hash(self) -> bytes: ...
    @property
    def record_type(self) -> RecordType: ...
    @property
    def requester_umbral_key(self) -> bytes: ...
    @property
    def purpose_of_use(self) -> str: ...


#: refusals no later registry event can lift: a record's patient, capsule and type never
#: change, and neither a deactivation nor a retired capsule is ever undone
FINAL_DENIALS = frozenset(
    {
        "patient_mismatch",
        "record_inactive",
        "capsule_retired",
        "capsule_mismatch",
        "record_type_mismatch",
    }
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: short machine-readable reason, e.g. "granted", "grant_revoked"
    code: str
    #: a sentence for the caller and the audit log
    reason: str
    block_number: int
    #: hash of that block, when the state's reader knew it
    block_hash: bytes | None = None

    def error(self) -> KmsError:
        """The error to answer a denied request with."""
        if self.code == "record_unknown":
            return NotFound(self.reason)
        return AccessDenied(self.reason)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def judge(query: Request, state: AccessState, wall_clock: int) -> Decision:
    def deny(code: str, reason: str) -> Decision:
        return Decision(False, code, reason, state.block_number, state.block_hash)

    record, grant = state.record, state.grant
    if record is None:
        return deny("record_unknown", f"record 0x{query.record_id.hex()} is not in the registry")
    if record.patient != query.patient:
        return deny("patient_mismatch", "record belongs to a different patient")
    if not record.active:
        return deny("record_inactive", "record has been deactivated by the patient")
    if state.capsule_retired:
        return deny(
            "capsule_retired",
            "capsule belongs to a record the patient deactivated; it is never served again",
        )
    if not hmac.compare_digest(query.capsule_hash, record.capsule_hash):
        return deny("capsule_mismatch", "capsule is not the one anchored for this record")
    if query.record_type != record.record_type:
        return deny(
            "record_type_mismatch",
            f"record_type {query.record_type.label} is not the record's type "
            f"({record.record_type.label})",
        )
    if grant is None:
        return deny("no_grant", "patient has not granted access to this requester")
    if not grant.active and grant.emergency:
        return deny(
            "emergency_access_closed",
            "emergency access has ended: closed by the patient, or the responder no longer "
            "holds the emergency role",
        )
    if not grant.active:
        return deny("grant_revoked", "grant has been revoked by the patient")
    now = max(state.block_timestamp, wall_clock)
    if now >= grant.expires_at:
        return deny("grant_expired", f"grant expired at {_iso(grant.expires_at)}")
    if record.record_type not in from_mask(grant.allowed_types_mask):
        return deny(
            "type_not_allowed", f"grant does not cover record type {record.record_type.label}"
        )
    if not hmac.compare_digest(grant.grantee_umbral_key, query.requester_umbral_key):
        return deny("receiving_key_mismatch", "requester_umbral_key is not the key in the grant")
    if grant.emergency and query.purpose_of_use != EMERGENCY_PURPOSE:
        return deny(
            "emergency_purpose_required",
            f"an emergency grant serves purpose_of_use {EMERGENCY_PURPOSE} only",
        )
    return Decision(
        True,
        "granted",
        "grant is active and covers this record",
        state.block_number,
        state.block_hash,
    )
