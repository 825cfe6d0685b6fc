"""Step 7 of an audit (the steps in order: core/audit_verify.py): each entry against the
chain at its block. Its block hash must be the chain's, and its decision is judged again by
the node's own policy function (:func:`core.policy.judge`) on what the entry recorded and
the grant state at that block (ADR 5). Pure, no I/O beyond the
:class:`~core.audit_sources.ChainView` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from core.audit import GRANTED, AuditEntry
from core.audit_findings import Check, Findings
from core.audit_log_checks import ServedLog
from core.audit_sources import ChainView, failed_in_transit
from core.errors import KmsError
from core.policy import POLICY_DENIALS, Reason, judge
from core.record_types import RecordType
from core.registry_types import AccessState

#: denials a version 1 entry cannot be judged on: it did not record what they compare
_UNRECORDED_DENIALS: Final = frozenset({Reason.RECORD_TYPE_MISMATCH, Reason.RECEIVING_KEY_MISMATCH})


@dataclass(frozen=True)
class _RecordedRequest:
    """The request an audit entry recorded, as the policy reads it (core/policy.Request)."""

    record_id: bytes
    patient: str
    capsule_hash: bytes
    record_type: RecordType
    requester_umbral_key: bytes
    purpose_of_use: str


def rejudge(
    entry: AuditEntry, state: AccessState, *, wall_clock: int | None = None
) -> tuple[Reason, str]:
    """What the registry state at the entry's block says of the entry's request: the reason
    code :func:`core.policy.judge` gives it (``Reason.GRANTED`` if allowed) and why.

    The node's own rules, by the same function. A version 1 entry did not record the
    request's record type and receiving key: the record's type and the grant's key stand in
    for them, so those two rules are not judged again. Expiry is judged at the block's time
    and at ``wall_clock`` (default: the entry's time, the node's wall clock when it wrote
    the entry), as the node does.
    """
    record, grant = state.record, state.grant
    if entry.record_type is not None and entry.requester_umbral_key is not None:
        record_type, key = entry.record_type, entry.requester_umbral_key
    else:
        # (When there is no record or no grant, judge refuses before it reads these.)
        record_type = record.record_type if record is not None else RecordType(0)
        key = grant.grantee_umbral_key if grant is not None else b""
    request = _RecordedRequest(
        entry.record_id,
        entry.patient,
        entry.capsule_hash,
        record_type,
        key,
        entry.purpose_of_use,
    )
    decision = judge(request, state, entry.time if wall_clock is None else wall_clock)
    return decision.code, f"at block {state.block_number}: {decision.reason}"


def check_against_chain(
    served: ServedLog, chain: ChainView, findings: Findings, *, rejudge_decisions: bool
) -> None:
    """Step 7 for every served entry that parsed: its block, then (unless
    ``rejudge_decisions`` is False) its decision. Stops at the first read of the chain that
    fails in transit.

    Entries are judged in block order, not log order: the grant state at a block is
    rebuilt forward from the one before (``--state-from-events``), and a node whose
    entries jump back and forth between early and late blocks would otherwise make it
    replay the chain's events for every entry."""
    entries = [(entry, index) for index, entry in served.parsed.items() if entry is not None]
    entries.sort(key=lambda item: (item[0].block_number, item[1]))
    for entry, index in entries:
        if findings.could_not_read:
            return
        _check_block(index, entry, chain, findings)
        if rejudge_decisions and not findings.could_not_read:
            _check_decision(index, entry, chain, findings)


def _check_block(index: int, entry: AuditEntry, chain: ChainView, findings: Findings) -> None:
    try:
        block = chain.block(entry.block_number)
    except KmsError as e:
        message = f"cannot read block {entry.block_number}: {e.message}"
        if failed_in_transit(e):
            findings.cannot_read(f"entry {index}: {message}")
        else:
            findings.fail(Check.BLOCK, message, index)
        return
    if block.hash != entry.block_hash:
        findings.fail(
            Check.BLOCK,
            f"names block {entry.block_number} with hash 0x{entry.block_hash.hex()}; the "
            f"chain's is 0x{block.hash.hex()}",
            index,
        )


def _check_decision(index: int, entry: AuditEntry, chain: ChainView, findings: Findings) -> None:
    granted = entry.decision == GRANTED
    if granted and entry.reason_code != Reason.GRANTED:
        findings.fail(Check.POLICY, f"granted with reason {entry.reason_code!r}", index)
        return
    if not granted and entry.reason_code not in POLICY_DENIALS:
        return  # the grant state cannot confirm it (no_kfrag: the node's kfrag store)
    if not granted and entry.version == 1 and entry.reason_code in _UNRECORDED_DENIALS:
        return
    try:
        state = chain.access_state(
            entry.record_id, entry.requester, entry.capsule_hash, block=entry.block_number
        )
    except KmsError as e:
        if failed_in_transit(e):
            findings.cannot_read(
                f"entry {index}: cannot read the grant state at block {entry.block_number}: "
                f"{e.message}"
            )
        elif granted:
            findings.fail(
                Check.POLICY,
                f"cannot read the grant state at block {entry.block_number}: {e.message}",
                index,
            )
        else:
            findings.warn(f"denial not re-checked: {e.message}", index)
        return
    code, why = rejudge(entry, state)
    if granted and code == Reason.GRANT_EXPIRED and entry.time == _expiry(state):
        # The node judges a moment before it writes the entry's time: a grant expiring
        # in between is a tie the entry cannot settle. The other rules still apply.
        code, why = rejudge(entry, state, wall_clock=entry.time - 1)
        if code == Reason.GRANTED:
            findings.warn("granted in the second the grant expired (a tie)", index)
            return
    if granted and code != Reason.GRANTED:
        findings.fail(Check.POLICY, f"granted, but {why}", index)
    elif not granted and code != entry.reason_code:
        findings.warn(
            f"denied as {entry.reason_code}, but the chain state gives {code}: {why}", index
        )


def _expiry(state: AccessState) -> int | None:
    return state.grant.expires_at if state.grant is not None else None
