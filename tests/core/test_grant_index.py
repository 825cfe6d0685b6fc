"""The packed grant index keeps what the events say, entry by entry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.grant_index import GrantIndex
from core.policy import EMERGENCY_PURPOSE, Reason, judge
from core.record_types import RecordType, to_mask
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    BlockRef,
    EmergencyAccessOpened,
    EmergencyRoleChanged,
    PatientRegistered,
    RecordAnchored,
    RecordDeactivated,
    RegistryEvent,
)

# EIP-55 forms, as the chain adapter gives them
ALICE = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
BOB = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
CAROL = "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB"
RECORD = b"\x05" * 32
CAPSULE = b"c" * 32
BLOCK = BlockRef(9, b"\x09" * 32, 1009)


def anchored(record_id: bytes = RECORD, capsule: bytes = CAPSULE) -> RecordAnchored:
    return RecordAnchored(1, 1001, record_id, ALICE, RecordType.IMAGING, BOB, b"h" * 32, capsule)


def granted(grantee: str, key: bytes, expires_at: int = 5000) -> AccessGranted:
    return AccessGranted(2, 1002, ALICE, grantee, key, expires_at, 0b1010)


def test_records_and_grants_come_back_as_the_events_said() -> None:
    index = GrantIndex()
    index.apply(
        [
            PatientRegistered(1, 1001, ALICE, (b"\x02" * 33,), b"\x03" * 33),
            anchored(),
            granted(BOB, b"\x02" * 33),
            granted(CAROL, b"\x03" * 33, expires_at=7000),
        ],
        BLOCK,
    )
    state = index.access_state(RECORD, BOB, CAPSULE)
    assert state.block_number == 9 and state.block_hash == b"\x09" * 32
    record, grant = state.record, state.grant
    assert record is not None and grant is not None
    assert (record.patient, record.creator, record.content_hash) == (ALICE, BOB, b"h" * 32)
    assert (record.record_type, record.capsule_hash, record.created_at) == (
        RecordType.IMAGING,
        CAPSULE,
        1001,
    )
    assert record.active
    assert (grant.patient, grant.grantee, grant.grantee_umbral_key) == (ALICE, BOB, b"\x02" * 33)
    assert (grant.expires_at, grant.allowed_types_mask, grant.granted_at) == (5000, 0b1010, 1002)
    assert grant.active and not grant.emergency
    # The grantee may be named in any case; the index answers in EIP-55 form.
    carol = index.access_state(RECORD, CAROL.lower(), CAPSULE).grant
    assert carol is not None and carol.grantee == CAROL and carol.expires_at == 7000
    assert index.sizes() == (1, 1, 2)


def test_a_new_grant_replaces_the_old_and_a_revocation_touches_only_its_grantee() -> None:
    index = GrantIndex()
    index.apply([anchored(), granted(BOB, b"\x02" * 33), granted(CAROL, b"\x03" * 33)], BLOCK)
    index.apply([granted(BOB, b"\x04" * 33, expires_at=9000)], BLOCK)
    index.apply([AccessRevoked(3, 1003, ALICE, CAROL)], BLOCK)
    bob = index.access_state(RECORD, BOB, CAPSULE).grant
    carol = index.access_state(RECORD, CAROL, CAPSULE).grant
    assert bob is not None and bob.active and bob.grantee_umbral_key == b"\x04" * 33
    assert bob.expires_at == 9000
    assert carol is not None and not carol.active and carol.grantee_umbral_key == b"\x03" * 33
    assert index.sizes() == (0, 1, 2)
    # A revocation of a grant never made, or by an unknown patient, changes nothing.
    index.apply([AccessRevoked(4, 1004, BOB, CAROL), AccessRevoked(4, 1004, ALICE, ALICE)], BLOCK)
    assert index.sizes() == (0, 1, 2)


def test_deactivation_retires_the_capsule_under_any_record_id() -> None:
    index = GrantIndex()
    index.apply([anchored(), RecordDeactivated(2, 1002, RECORD, ALICE)], BLOCK)
    state = index.access_state(b"\x06" * 32, BOB, CAPSULE)
    assert state.record is None and state.capsule_retired
    record = index.access_state(RECORD, BOB, CAPSULE).record
    assert record is not None and not record.active and record.capsule_hash == CAPSULE


def test_an_emergency_window_is_out_of_force_while_its_responder_lacks_the_role() -> None:
    index = GrantIndex()
    opened = EmergencyAccessOpened(2, 1002, ALICE, BOB, b"\x02" * 33, 5000, 0b10)
    index.apply([anchored(), opened, EmergencyRoleChanged(3, 1003, BOB, False)], BLOCK)
    grant = index.access_state(RECORD, BOB, CAPSULE).grant
    assert grant is not None and grant.emergency and not grant.active


@dataclass(frozen=True)
class Read:
    """The responder's ETREAT read of RECORD, as core.policy.judge sees it."""

    record_id: bytes = RECORD
    patient: str = ALICE
    capsule_hash: bytes = CAPSULE
    record_type: RecordType = RecordType.IMAGING
    requester_umbral_key: bytes = b"\x02" * 33
    purpose_of_use: str = EMERGENCY_PURPOSE


def _decided_at(index: GrantIndex, events: list[RegistryEvent], when: int) -> Reason:
    """What a node decides for BOB's read once ``events`` are applied in a block at ``when``."""
    index.apply(events, BlockRef(when, when.to_bytes(32, "big"), when))
    return judge(Read(), index.access_state(RECORD, BOB, CAPSULE), when).code


def _window_until(end: int) -> GrantIndex:
    index = GrantIndex()
    opened = EmergencyAccessOpened(
        2, 1002, ALICE, BOB, b"\x02" * 33, end, to_mask([RecordType.IMAGING])
    )
    assert _decided_at(index, [anchored(), opened], 1002) == Reason.GRANTED
    return index


def test_a_responder_given_the_role_back_before_the_windows_end_is_served_until_it() -> None:
    index = _window_until(5000)
    lost = EmergencyRoleChanged(3, 1003, BOB, False)
    assert _decided_at(index, [lost], 1003) == Reason.EMERGENCY_ACCESS_CLOSED
    back = EmergencyRoleChanged(4, 4000, BOB, True)
    assert _decided_at(index, [back], 4000) == Reason.GRANTED
    assert _decided_at(index, [], 5000) == Reason.GRANT_EXPIRED


def test_a_role_given_back_after_the_windows_end_reopens_nothing() -> None:
    index = _window_until(5000)
    assert _decided_at(index, [EmergencyRoleChanged(3, 1003, BOB, False)], 1003) == (
        Reason.EMERGENCY_ACCESS_CLOSED
    )
    back = EmergencyRoleChanged(4, 6000, BOB, True)
    assert _decided_at(index, [back], 6000) != Reason.GRANTED


def test_registration_is_known_by_address_in_any_case() -> None:
    index = GrantIndex()
    index.apply([granted(BOB, b"\x02" * 33)], BLOCK)
    assert not index.is_registered(ALICE)  # a grant alone does not register its patient
    index.apply([PatientRegistered(3, 1003, ALICE, (b"\x02" * 33,), b"\x03" * 33)], BLOCK)
    assert index.is_registered(ALICE) and index.is_registered(ALICE.lower())
    assert not index.is_registered(BOB)
    assert not index.is_registered("0x1234") and not index.is_registered("not an address")
    assert index.sizes() == (1, 0, 1)


def test_a_copy_is_independent() -> None:
    index = GrantIndex()
    index.apply([anchored(), granted(BOB, b"\x02" * 33)], BLOCK)
    twin = index.copy()
    index.apply([AccessRevoked(3, 1003, ALICE, BOB)], BLOCK)
    grant = twin.access_state(RECORD, BOB, CAPSULE).grant
    assert grant is not None and grant.active


def _every_kind_of_entry() -> GrantIndex:
    """An index holding each kind of entry: a registered patient and one known only by a
    grant, active, revoked and emergency grants, an active and a deactivated record, and a
    responder without the emergency role."""
    index = GrantIndex()
    other = b"\x06" * 32
    index.apply(
        [
            PatientRegistered(1, 1001, ALICE, (b"\x02" * 33,), b"\x03" * 33),
            anchored(),
            anchored(other, b"d" * 32),
            granted(BOB, b"\x02" * 33),
            granted(CAROL, b"\x03" * 33, expires_at=7000),
            AccessRevoked(2, 1002, ALICE, CAROL),
            AccessGranted(2, 1002, BOB, CAROL, b"\x04" * 33, 8000, 0b1),
            EmergencyAccessOpened(3, 1003, ALICE, ALICE, b"\x05" * 33, 6000, 0b10),
            EmergencyRoleChanged(3, 1003, ALICE, False),
            RecordDeactivated(4, 1004, other, ALICE),
        ],
        BLOCK,
    )
    return index


def test_an_index_read_back_from_its_bytes_answers_every_question_the_same() -> None:
    index = _every_kind_of_entry()
    back = GrantIndex.from_bytes(index.to_bytes())
    assert back.block == index.block and back.sizes() == index.sizes() == (1, 2, 4)
    for record_id in (RECORD, b"\x06" * 32, b"\x07" * 32):
        for grantee in (ALICE, BOB, CAROL):
            for capsule in (CAPSULE, b"d" * 32):
                asked = (record_id, grantee, capsule)
                assert back.access_state(*asked) == index.access_state(*asked)
    for address in (ALICE, BOB, CAROL):
        assert back.is_registered(address) == index.is_registered(address)
    assert back.to_bytes() == index.to_bytes()


def test_bytes_cut_short_or_run_on_are_refused_with_value_error() -> None:
    """Every prefix of a snapshot's index bytes, and the bytes with more after them, are a
    ValueError (the snapshot is then refused), never another exception."""
    data = _every_kind_of_entry().to_bytes()
    for end in range(len(data)):
        with pytest.raises(ValueError):
            GrantIndex.from_bytes(data[:end])
    with pytest.raises(ValueError, match="does not end where its counts say"):
        GrantIndex.from_bytes(data + b"\x00")
