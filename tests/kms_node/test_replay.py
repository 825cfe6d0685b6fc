"""The replay guard refuses a nonce seen before, forgets it after its deadline, and is
bounded; what the audit log shows was granted before a start is refused again."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import IntegrityError, InvalidRequest, ResourceExhausted, Unauthenticated
from kms_node.audit_log import AuditLog
from kms_node.keystore import MemoryKeyStore
from kms_node.replay import (
    OLDER_ENTRIES_READ,
    NonceReused,
    ReplayGuard,
    ServedBeforeStart,
    SharedReplayGuard,
)
from tests.kms_node.test_audit_log import NODE, make_entry

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
NOW = 1_700_000_000


def test_replay_is_refused() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=100)
    nonce = os.urandom(32)
    guard.check_and_remember(ALICE, nonce, NOW + 60, NOW)
    with pytest.raises(Unauthenticated, match="nonce already used"):
        guard.check_and_remember(ALICE, nonce, NOW + 60, NOW + 1)
    # Still refused with any other deadline while the first is live.
    with pytest.raises(Unauthenticated, match="nonce already used"):
        guard.check_and_remember(ALICE, nonce, NOW + 200, NOW + 59)


def test_same_nonce_from_distinct_requesters_is_fine() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=100)
    nonce = os.urandom(32)
    guard.check_and_remember(ALICE, nonce, NOW + 60, NOW)
    guard.check_and_remember(BOB, nonce, NOW + 60, NOW)
    guard.check_and_remember(ALICE, os.urandom(32), NOW + 60, NOW)
    assert len(guard) == 3


def test_entry_is_evicted_once_its_deadline_passes() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=100)
    nonce = os.urandom(32)
    guard.check_and_remember(ALICE, nonce, NOW + 10, NOW)
    guard.check_and_remember(BOB, os.urandom(32), NOW + 100, NOW)
    assert len(guard) == 2
    # At the deadline the replay fails the deadline check, and the entry is forgotten.
    with pytest.raises(Unauthenticated, match="request deadline has passed"):
        guard.check_and_remember(ALICE, nonce, NOW + 10, NOW + 10)
    guard.check_and_remember(BOB, os.urandom(32), NOW + 100, NOW + 10)
    assert len(guard) == 2  # ALICE's forgotten, BOB's two live
    # A fresh request may reuse the nonce once the old one is gone (new deadline, new signature).
    guard.check_and_remember(ALICE, nonce, NOW + 20, NOW + 11)


def test_deadline_is_checked() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=100)
    with pytest.raises(Unauthenticated, match="request deadline has passed"):
        guard.check_and_remember(ALICE, os.urandom(32), NOW - 1, NOW)
    with pytest.raises(InvalidRequest, match="at most 300 s"):
        guard.check_and_remember(ALICE, os.urandom(32), NOW + 301, NOW)
    assert len(guard) == 0


def test_clock_stepping_back_does_not_revive_a_forgotten_request() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=100)
    nonce = os.urandom(32)
    guard.check_and_remember(ALICE, nonce, NOW + 10, NOW)
    guard.check_and_remember(BOB, os.urandom(32), NOW + 100, NOW + 50)  # evicts ALICE's
    with pytest.raises(Unauthenticated):
        guard.check_and_remember(ALICE, nonce, NOW + 10, NOW)  # wall clock went back


def test_bound_is_enforced_and_frees_up_after_deadlines() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=3)
    for i in range(3):
        guard.check_and_remember(ALICE, os.urandom(32), NOW + 10 + i, NOW)
    with pytest.raises(ResourceExhausted, match="too many requests"):
        guard.check_and_remember(BOB, os.urandom(32), NOW + 10, NOW)
    # A replay is still reported as a replay, not as a full guard.
    nonce = os.urandom(32)
    guard2 = ReplayGuard(max_window_s=300, max_entries=1)
    guard2.check_and_remember(ALICE, nonce, NOW + 10, NOW)
    with pytest.raises(Unauthenticated, match="nonce already used"):
        guard2.check_and_remember(ALICE, nonce, NOW + 10, NOW)
    # Once the first deadline has passed there is room again.
    guard.check_and_remember(BOB, os.urandom(32), NOW + 100, NOW + 10)
    assert len(guard) == 3


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(max_window_s=0, max_entries=1)
    with pytest.raises(ValueError):
        ReplayGuard(max_window_s=1, max_entries=0)


def test_concurrent_use_accepts_each_nonce_exactly_once() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=100_000)
    nonces = [os.urandom(32) for _ in range(500)]
    accepted: list[bytes] = []
    replays = 0
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        nonlocal replays
        start.wait()
        for nonce in nonces:  # every thread tries every nonce
            try:
                guard.check_and_remember(ALICE, nonce, NOW + 60, NOW)
            except Unauthenticated:
                with lock:
                    replays += 1
            else:
                with lock:
                    accepted.append(nonce)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(accepted) == sorted(nonces)
    assert replays == 7 * len(nonces)
    assert len(guard) == len(nonces)


def test_concurrent_use_with_eviction_and_bound() -> None:
    guard = ReplayGuard(max_window_s=300, max_entries=50)
    errors: list[BaseException] = []

    def worker(requester: str) -> None:
        try:
            for step in range(2000):
                now = NOW + step // 10
                try:
                    guard.check_and_remember(requester, os.urandom(32), now + 2, now)
                except ResourceExhausted:
                    pass
                except Unauthenticated as e:
                    # Another thread ran ahead: the guard's clock never goes back.
                    assert e.message == "request deadline has passed"
        except BaseException as e:  # collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"0x{i:040x}",)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(guard) <= 50


# --- shared between the processes of one node ----------------------------------------------


def _shared(tmp_path: Path, max_entries: int = 100) -> SharedReplayGuard:
    return SharedReplayGuard(tmp_path / "replay.sqlite", max_window_s=300, max_entries=max_entries)


def test_a_replay_to_another_process_is_refused(tmp_path: Path) -> None:
    # Two guards on one file stand for two worker processes of one node.
    first, second = _shared(tmp_path), _shared(tmp_path)
    nonce = os.urandom(32)
    first.check_and_remember(ALICE, nonce, NOW + 60, NOW)
    with pytest.raises(Unauthenticated, match="nonce already used"):
        second.check_and_remember(ALICE, nonce, NOW + 60, NOW + 1)
    with pytest.raises(Unauthenticated, match="nonce already used"):
        first.check_and_remember(ALICE, nonce, NOW + 60, NOW + 1)
    second.check_and_remember(BOB, nonce, NOW + 60, NOW + 1)  # another requester's nonce


def test_shared_guard_checks_deadlines_and_forgets_expired_nonces(tmp_path: Path) -> None:
    guard = _shared(tmp_path)
    nonce = os.urandom(32)
    with pytest.raises(Unauthenticated, match="deadline has passed"):
        guard.check_and_remember(ALICE, nonce, NOW - 1, NOW)
    with pytest.raises(InvalidRequest, match="too far in the future"):
        guard.check_and_remember(ALICE, nonce, NOW + 301, NOW)
    guard.check_and_remember(ALICE, nonce, NOW + 10, NOW)
    # Past its deadline the entry may be reused by a new request with a later deadline.
    guard.check_and_remember(ALICE, nonce, NOW + 200, NOW + 11)
    with pytest.raises(Unauthenticated, match="nonce already used"):
        guard.check_and_remember(ALICE, nonce, NOW + 200, NOW + 12)


def test_shared_guard_is_bounded(tmp_path: Path) -> None:
    guard = _shared(tmp_path, max_entries=1)
    guard.check_and_remember(ALICE, os.urandom(32), NOW + 60, NOW)
    with pytest.raises(ResourceExhausted, match="too many requests"):
        guard.check_and_remember(ALICE, os.urandom(32), NOW + 60, NOW)
    # Another process counts the shared table when it starts.
    fresh = _shared(tmp_path, max_entries=1)
    with pytest.raises(ResourceExhausted, match="too many requests"):
        fresh.check_and_remember(ALICE, os.urandom(32), NOW + 60, NOW)
    assert str(tmp_path) in repr(fresh)


@pytest.mark.parametrize("kind", ["in-process", "shared"])
def test_check_unused_looks_without_remembering(tmp_path: Path, kind: str) -> None:
    """The cheap look a node takes before costly work (an enrollment's chain reads): it
    refuses a live nonce, remembers nothing, and forgets with the deadline."""
    guard: ReplayGuard | SharedReplayGuard = (
        ReplayGuard(max_window_s=300, max_entries=100)
        if kind == "in-process"
        else _shared(tmp_path)
    )
    nonce = os.urandom(32)
    guard.check_unused(ALICE, nonce, NOW)
    guard.check_unused(ALICE, nonce, NOW)  # looking twice spends nothing
    guard.check_and_remember(ALICE, nonce, NOW + 10, NOW)
    with pytest.raises(NonceReused, match="nonce already used"):
        guard.check_unused(ALICE, nonce, NOW + 9)
    guard.check_unused(BOB, nonce, NOW + 9)  # another signer's nonce
    guard.check_unused(ALICE, nonce, NOW + 10)  # its deadline has passed
    if kind == "shared":
        # Another process of the node sees the nonce too.
        with pytest.raises(NonceReused):
            _shared(tmp_path).check_unused(ALICE, nonce, NOW + 9)


# --- the reads the audit log shows were granted before a start --------------------------

WINDOW = 300


def _granted(log: AuditLog, request_id: str, at: int, *, granted: bool = True) -> None:
    n = 0 if granted else 3  # make_entry grants n % 4 != 3
    log.append(dataclasses.replace(make_entry(n), request_id=request_id, time=at))


def _clock_stepped_back(log: AuditLog, entries: int) -> None:
    """``entries`` granted reads logged after the wall clock stepped back over an hour."""
    log.append_many(
        [
            dataclasses.replace(make_entry(0), request_id=f"stepped-{i}", time=NOW - 4000)
            for i in range(entries)
        ]
    )


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.sqlite", MemoryKeyStore(), NODE)
    yield log
    log.close()


def test_a_read_granted_within_the_window_before_a_start_is_a_replay(audit: AuditLog) -> None:
    _granted(audit, "old", NOW - WINDOW - 1)
    _granted(audit, "recent", NOW - 10)
    _granted(audit, "refused", NOW - 5, granted=False)
    served = ServedBeforeStart.from_audit_log(audit.newest_first(), WINDOW, NOW)
    assert len(served) == 1
    with pytest.raises(NonceReused, match="nonce already used"):
        served.check("recent", NOW)
    served.check("old", NOW)  # its deadline had passed by the start
    served.check("refused", NOW)  # a refused read spent no nonce: judged again
    served.check("another", NOW)


def test_a_served_read_is_forgotten_when_its_window_ends(audit: AuditLog) -> None:
    _granted(audit, "recent", NOW - 10)
    served = ServedBeforeStart.from_audit_log(audit.newest_first(), WINDOW, NOW)
    with pytest.raises(NonceReused):
        served.check("recent", NOW - 10 + WINDOW - 1)
    served.check("recent", NOW - 10 + WINDOW)
    assert len(served) == 0
    # The clock only moves forward: stepping it back revives nothing.
    served.check("recent", NOW)


def test_entries_after_a_clock_step_back_are_still_found(audit: AuditLog) -> None:
    """Entry times are the node's wall clock; one that stepped back leaves old-looking
    entries after recent ones. The scan goes on past up to OLDER_ENTRIES_READ of them."""
    _granted(audit, "before the step", NOW - 20)
    _clock_stepped_back(audit, OLDER_ENTRIES_READ - 1)
    served = ServedBeforeStart.from_audit_log(audit.newest_first(), WINDOW, NOW)
    with pytest.raises(NonceReused):
        served.check("before the step", NOW)


def test_the_scan_stops_after_enough_older_entries(audit: AuditLog) -> None:
    _granted(audit, "behind the step", NOW - 20)
    _clock_stepped_back(audit, OLDER_ENTRIES_READ)
    read: list[int] = []

    def newest_first() -> Iterator[tuple[int, bytes]]:
        for index, data in audit.newest_first():
            read.append(index)
            yield index, data

    served = ServedBeforeStart.from_audit_log(newest_first(), WINDOW, NOW)
    assert len(served) == 0 and len(read) == OLDER_ENTRIES_READ


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"request_id": "r", "time": "1", "decision": "granted"}', b"{}"],
)
def test_a_damaged_entry_stops_the_start(data: bytes) -> None:
    with pytest.raises(IntegrityError, match="audit log is damaged: entry 7 is not an audit entry"):
        ServedBeforeStart.from_audit_log([(7, data)], WINDOW, NOW)
