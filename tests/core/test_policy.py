"""The node's access decision, one rule at a time."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import pytest
import umbral_pre as umbral

from core.errors import AccessDenied, NotFound
from core.policy import FINAL_DENIALS, POLICY_DENIALS, Reason, judge
from core.record_types import RecordType, to_mask
from core.registry_types import AccessState, GrantInfo, RecordInfo
from core.requests import LazyCapsule, ReencryptionQuery, Signed
from core.umbral_codec import capsule_hash

PATIENT = "0x" + "11" * 20
GRANTEE = "0x" + "22" * 20
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def keys() -> tuple[umbral.SecretKey, umbral.SecretKey]:
    return umbral.SecretKey.random(), umbral.SecretKey.random()


@pytest.fixture
def capsule(keys: tuple[umbral.SecretKey, umbral.SecretKey]) -> umbral.Capsule:
    capsule, _ = umbral.encrypt(keys[0].public_key(), b"k" * 32)
    return capsule


def _query(capsule: umbral.Capsule, receiving: umbral.PublicKey) -> ReencryptionQuery:
    record_id = bytes(range(32))
    return ReencryptionQuery(
        request_id="r1",
        digest=bytes(32),
        patient=PATIENT,
        record_id=record_id,
        record_type=RecordType.LAB_RESULT,
        lazy_capsule=LazyCapsule(bytes(capsule)),
        requester=GRANTEE,
        requester_umbral_key=bytes(receiving.to_compressed_bytes()),
        receiving_key=receiving,
        purpose_of_use="TREAT",
        signed=Signed(deadline=NOW + 60, nonce=b"\x01" * 32, signature=b"\x00" * 65),
    )


def _state(query: ReencryptionQuery) -> AccessState:
    record = RecordInfo(
        record_id=query.record_id,
        patient=PATIENT,
        content_hash=secrets.token_bytes(32),
        storage_uri="blob:x",
        record_type=RecordType.LAB_RESULT,
        capsule_hash=capsule_hash(query.capsule_bytes),
        creator=PATIENT,
        active=True,
        created_at=NOW - 100,
    )
    grant = GrantInfo(
        patient=PATIENT,
        grantee=GRANTEE,
        grantee_umbral_key=query.requester_umbral_key,
        expires_at=NOW + 3600,
        allowed_types_mask=to_mask([RecordType.LAB_RESULT]),
        active=True,
        granted_at=NOW - 50,
    )
    return AccessState(record=record, grant=grant, block_number=42, block_timestamp=NOW)


@pytest.fixture
def query(
    capsule: umbral.Capsule, keys: tuple[umbral.SecretKey, umbral.SecretKey]
) -> ReencryptionQuery:
    return _query(capsule, keys[1].public_key())


def test_active_grant_is_allowed_and_names_its_block(query: ReencryptionQuery) -> None:
    decision = judge(query, _state(query), NOW)
    assert decision.allowed
    assert decision.code == "granted"
    assert decision.block_number == 42


def _with(
    state: AccessState,
    *,
    record: dict[str, Any] | None = None,
    grant: dict[str, Any] | None = None,
) -> AccessState:
    return dataclasses.replace(
        state,
        record=dataclasses.replace(state.record, **(record or {})) if state.record else None,
        grant=dataclasses.replace(state.grant, **(grant or {})) if state.grant else None,
    )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"record": {"active": False}}, "record_inactive"),
        ({"record": {"patient": "0x" + "33" * 20}}, "patient_mismatch"),
        ({"record": {"capsule_hash": b"\x01" * 32}}, "capsule_mismatch"),
        ({"record": {"record_type": RecordType.DIAGNOSIS}}, "record_type_mismatch"),
        ({"grant": {"allowed_types_mask": to_mask([RecordType.DIAGNOSIS])}}, "type_not_allowed"),
        ({"grant": {"emergency": True}}, "emergency_purpose_required"),
        ({"grant": {"active": False}}, "grant_revoked"),
        ({"grant": {"expires_at": NOW}}, "grant_expired"),
        ({"grant": {"grantee_umbral_key": b"\x02" + b"\x07" * 32}}, "receiving_key_mismatch"),
    ],
)
def test_each_rule_denies(query: ReencryptionQuery, change: dict[str, Any], code: str) -> None:
    decision = judge(query, _with(_state(query), **change), NOW)
    assert not decision.allowed
    assert decision.code == code
    assert isinstance(decision.error(), AccessDenied)
    assert decision.reason


def test_a_retired_capsule_is_denied_under_any_record(query: ReencryptionQuery) -> None:
    # The named record is active and carries the capsule, but the capsule's record was
    # deactivated (issue 10): refused, and no chain event can lift it.
    state = dataclasses.replace(_state(query), capsule_retired=True)
    decision = judge(query, state, NOW)
    assert (decision.allowed, decision.code) == (False, "capsule_retired")
    assert "deactivated" in decision.reason
    assert "capsule_retired" in FINAL_DENIALS and "no_grant" not in FINAL_DENIALS


def test_the_reason_codes_are_the_ones_written_before() -> None:
    # Audit entries, metric labels and alert rules carry these strings: one renamed, and
    # the logs already written would no longer read the same.
    assert {str(r) for r in Reason} == {
        "granted",
        "record_unknown",
        "patient_mismatch",
        "record_inactive",
        "capsule_retired",
        "capsule_mismatch",
        "record_type_mismatch",
        "no_grant",
        "emergency_access_closed",
        "grant_revoked",
        "grant_expired",
        "type_not_allowed",
        "receiving_key_mismatch",
        "emergency_purpose_required",
        "no_kfrag",
    }
    assert FINAL_DENIALS < POLICY_DENIALS == set(Reason) - {Reason.GRANTED, Reason.NO_KFRAG}


def test_missing_grant_is_denied(query: ReencryptionQuery) -> None:
    state = dataclasses.replace(_state(query), grant=None)
    decision = judge(query, state, NOW)
    assert (decision.allowed, decision.code) == (False, "no_grant")


def test_unknown_record_is_not_found(query: ReencryptionQuery) -> None:
    state = dataclasses.replace(_state(query), record=None)
    decision = judge(query, state, NOW)
    assert decision.code == "record_unknown"
    assert isinstance(decision.error(), NotFound)


def test_expiry_uses_the_later_of_chain_time_and_wall_clock(query: ReencryptionQuery) -> None:
    state = _state(query)
    assert state.grant is not None
    expires = state.grant.expires_at
    # chain is ahead of the wall clock (anvil time travel, or a skewed node clock)
    ahead = dataclasses.replace(state, block_timestamp=expires + 1)
    assert judge(query, ahead, NOW).code == "grant_expired"
    # wall clock is ahead of a stalled chain
    assert judge(query, state, expires + 1).code == "grant_expired"
    assert judge(query, state, expires - 1).allowed


def test_emergency_grant_serves_emergency_treatment(query: ReencryptionQuery) -> None:
    state = _with(_state(query), grant={"emergency": True})
    decision = judge(dataclasses.replace(query, purpose_of_use="ETREAT"), state, NOW)
    assert decision.allowed


def test_emergency_grant_is_refused_outside_its_window(query: ReencryptionQuery) -> None:
    state = _with(_state(query), grant={"emergency": True, "expires_at": NOW - 1})
    decision = judge(dataclasses.replace(query, purpose_of_use="ETREAT"), state, NOW)
    assert decision.code == "grant_expired"


def test_a_closed_emergency_window_says_why(query: ReencryptionQuery) -> None:
    state = _with(_state(query), grant={"emergency": True, "active": False})
    decision = judge(dataclasses.replace(query, purpose_of_use="ETREAT"), state, NOW)
    assert decision.code == "emergency_access_closed"
    assert "no longer holds the emergency role" in decision.reason
