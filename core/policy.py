"""The access decision a node makes for each re-encryption request.

Pure: given the validated request, the registry state read at one block and the
node's wall clock, say whether the request is allowed and why not. Expiry is
judged against both the block's time and the wall clock, so neither a stalled
chain nor a skewed clock extends a grant. Why is a :class:`Reason`, the one list of the
codes audit entries, metrics and alert rules carry.

The auditor judges again with the same function, from what the audit entry
recorded of the request (core/audit_decisions.py).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from core.errors import AccessDenied, KmsError, NotFound
from core.formats import iso_utc
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


class Reason(StrEnum):
    """Why a node decided as it did: the ``reason_code`` of its audit entries and the
    ``reason`` label of ``kms_node_decisions_total``. The values are written to disk and
    signed into the audit log: they never change, or logs already written would no longer
    read the same."""

    #: the only reason of a granted entry
    GRANTED = "granted"
    # The refusals :func:`judge` gives, in the order it checks its rules:
    RECORD_UNKNOWN = "record_unknown"
    PATIENT_MISMATCH = "patient_mismatch"
    RECORD_INACTIVE = "record_inactive"
    CAPSULE_RETIRED = "capsule_retired"
    CAPSULE_MISMATCH = "capsule_mismatch"
    RECORD_TYPE_MISMATCH = "record_type_mismatch"
    NO_GRANT = "no_grant"
    EMERGENCY_ACCESS_CLOSED = "emergency_access_closed"
    GRANT_REVOKED = "grant_revoked"
    GRANT_EXPIRED = "grant_expired"
    TYPE_NOT_ALLOWED = "type_not_allowed"
    RECEIVING_KEY_MISMATCH = "receiving_key_mismatch"
    EMERGENCY_PURPOSE_REQUIRED = "emergency_purpose_required"
    #: the node's refusal, not the policy's: the grant allows the request, but this node
    #: holds no key fragment of it for the record's type and the requester's key
    NO_KFRAG = "no_kfrag"


#: the sentence of every granted decision (sent with each receipt: proto/rpc.py sizes it)
GRANTED_REASON: Final = "grant is active and covers this record"

#: every refusal :func:`judge` gives, which the grant state at a block confirms (an auditor
#: judges again)
POLICY_DENIALS: Final = frozenset(Reason) - {Reason.GRANTED, Reason.NO_KFRAG}

#: refusals no later registry event can lift: a record's patient, capsule and type never
#: change, and neither a deactivation nor a retired capsule is ever undone
FINAL_DENIALS: Final = frozenset(
    {
        Reason.PATIENT_MISMATCH,
        Reason.RECORD_INACTIVE,
        Reason.CAPSULE_RETIRED,
        Reason.CAPSULE_MISMATCH,
        Reason.RECORD_TYPE_MISMATCH,
    }
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: granted, or the rule that refused
    code: Reason
    #: a sentence for the caller and the audit log
    reason: str
    block_number: int
    #: hash of that block, when the state's reader knew it
    block_hash: bytes | None = None

    def error(self) -> KmsError:
        """The error to answer a denied request with."""
        if self.code == Reason.RECORD_UNKNOWN:
            return NotFound(self.reason)
        return AccessDenied(self.reason)


def judge(query: Request, state: AccessState, wall_clock: int) -> Decision:
    def deny(code: Reason, reason: str) -> Decision:
        return Decision(False, code, reason, state.block_number, state.block_hash)

    record, grant = state.record, state.grant
    if record is None:
        return deny(
            Reason.RECORD_UNKNOWN, f"record 0x{query.record_id.hex()} is not in the registry"
        )
    if record.patient != query.patient:
        return deny(Reason.PATIENT_MISMATCH, "record belongs to a different patient")
    if not record.active:
        return deny(Reason.RECORD_INACTIVE, "record has been deactivated by the patient")
    if state.capsule_retired:
        return deny(
            Reason.CAPSULE_RETIRED,
            "capsule belongs to a record the patient deactivated; it is never served again",
        )
    if not hmac.compare_digest(query.capsule_hash, record.capsule_hash):
        return deny(Reason.CAPSULE_MISMATCH, "capsule is not the one anchored for this record")
    if query.record_type != record.record_type:
        return deny(
            Reason.RECORD_TYPE_MISMATCH,
            f"record_type {query.record_type.label} is not the record's type "
            f"({record.record_type.label})",
        )
    if grant is None:
        return deny(Reason.NO_GRANT, "patient has not granted access to this requester")
    if not grant.active and grant.emergency:
        return deny(
            Reason.EMERGENCY_ACCESS_CLOSED,
            "emergency access has ended: closed by the patient, or the responder no longer "
            "holds the emergency role",
        )
    if not grant.active:
        return deny(Reason.GRANT_REVOKED, "grant has been revoked by the patient")
    now = max(state.block_timestamp, wall_clock)
    if now >= grant.expires_at:
        return deny(Reason.GRANT_EXPIRED, f"grant expired at {iso_utc(grant.expires_at)}")
    if record.record_type not in from_mask(grant.allowed_types_mask):
        return deny(
            Reason.TYPE_NOT_ALLOWED, f"grant does not cover record type {record.record_type.label}"
        )
    if not hmac.compare_digest(grant.grantee_umbral_key, query.requester_umbral_key):
        return deny(
            Reason.RECEIVING_KEY_MISMATCH, "requester_umbral_key is not the key in the grant"
        )
    if grant.emergency and query.purpose_of_use != EMERGENCY_PURPOSE:
        return deny(
            Reason.EMERGENCY_PURPOSE_REQUIRED,
            f"an emergency grant serves purpose_of_use {EMERGENCY_PURPOSE} only",
        )
    return Decision(
        True,
        Reason.GRANTED,
        GRANTED_REASON,
        state.block_number,
        state.block_hash,
    )
