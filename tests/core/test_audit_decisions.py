"""Decisions judged again at their block (core/audit_decisions.py): the node's own rules,
on what the entry recorded."""

from __future__ import annotations

import dataclasses
from typing import TypedDict, Unpack

import pytest

from core.audit_decisions import rejudge
from core.record_types import RecordType, to_mask
from core.registry_types import AccessState
from tests.core.test_audit_verify import DOCTOR, T0, FakeChain, make_entry, recorded


class GrantChanges(TypedDict, total=False):
    """The grant fields these tests change."""

    active: bool
    expires_at: int
    allowed_types_mask: int
    emergency: bool


def _state(chain: FakeChain, **grant_changes: Unpack[GrantChanges]) -> AccessState:
    grant = dataclasses.replace(chain.grant, **grant_changes)
    return AccessState(chain.record, grant, 130, T0 + 30)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({}, "granted"),
        ({"active": False}, "grant_revoked"),
        ({"expires_at": T0 + 30}, "grant_expired"),  # at the block's time
        ({"allowed_types_mask": to_mask([RecordType.DIAGNOSIS])}, "type_not_allowed"),
        ({"emergency": True}, "emergency_purpose_required"),
    ],
)
def test_rejudge_applies_the_policy_rules(changes: GrantChanges, code: str) -> None:
    assert rejudge(make_entry(30), _state(FakeChain(), **changes))[0] == code


def test_rejudge_covers_the_record_rules() -> None:
    chain, entry = FakeChain(), make_entry(30)
    for record, code in [
        (dataclasses.replace(chain.record, active=False), "record_inactive"),
        (dataclasses.replace(chain.record, patient=DOCTOR), "patient_mismatch"),
        (dataclasses.replace(chain.record, capsule_hash=b"x" * 32), "capsule_mismatch"),
        (None, "record_unknown"),
    ]:
        assert rejudge(entry, dataclasses.replace(_state(chain), record=record))[0] == code
    # A granted entry whose capsule belongs to a deactivated record (issue 10) is flagged.
    retired = dataclasses.replace(_state(chain), capsule_retired=True)
    assert rejudge(entry, retired)[0] == "capsule_retired"
    emergency = dataclasses.replace(entry, purpose_of_use="ETREAT")
    assert rejudge(emergency, _state(chain, emergency=True))[0] == "granted"
    # The entry's time (the node's wall clock) counts too, not just the block's.
    late = dataclasses.replace(entry, time=T0 + 100)
    assert rejudge(late, _state(chain, expires_at=T0 + 90))[0] == "grant_expired"


def test_a_version_2_entry_is_judged_on_the_type_and_key_it_recorded() -> None:
    chain = FakeChain()
    key = chain.grant.grantee_umbral_key
    state = _state(chain)
    assert rejudge(recorded(make_entry(30), RecordType.LAB_RESULT, key), state)[0] == "granted"
    wrong_key = recorded(make_entry(30), RecordType.LAB_RESULT, b"\x03" + b"z" * 32)
    assert rejudge(wrong_key, state)[0] == "receiving_key_mismatch"
    wrong_type = recorded(make_entry(30), RecordType.IMAGING, key)
    assert rejudge(wrong_type, state)[0] == "record_type_mismatch"
    # A version 1 entry did not record them: those two rules are not judged.
    assert rejudge(make_entry(30), state)[0] == "granted"
