"""The grant index follows registry events and refuses to judge when stale."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import structlog

from core.errors import ChainUnavailable, Unavailable
from core.record_types import RecordType
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    BlockRef,
    EmergencyAccessOpened,
    EmergencyRoleChanged,
    RecordAnchored,
    RecordDeactivated,
    RegistryEvent,
)
from kms_node.chain_follower import ChainFollower

PATIENT = "0x" + "11" * 20
GRANTEE = "0x" + "22" * 20
RECORD = b"\x05" * 32
CAPSULE = b"h" * 32


class FakeChain:
    """Blocks with events, a head that can move, fork or go away."""

    def __init__(self) -> None:
        self.blocks: list[tuple[BlockRef, list[RegistryEvent]]] = [
            (BlockRef(0, b"\x00" * 32, 1000), [])
        ]
        self.down = False
        self.calls = 0

    def mine(self, *events: RegistryEvent, fork: bytes = b"") -> BlockRef:
        number = len(self.blocks)
        block = BlockRef(number, bytes([number % 256]) * 31 + (fork or b"\x00"), 1000 + number)
        self.blocks.append((block, list(events)))
        return block

    def block(self, identifier: int | str = "latest") -> BlockRef:
        self.calls += 1
        if self.down:
            raise ChainUnavailable("chain down")
        return self.blocks[-1 if identifier == "latest" else int(identifier)][0]

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        if self.down:
            raise ChainUnavailable("chain down")
        return [e for b, es in self.blocks[from_block : to_block + 1] for e in es]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def anchored(block: int, record_id: bytes = RECORD) -> RecordAnchored:
    return RecordAnchored(
        block, 1000 + block, record_id, PATIENT, RecordType.LAB_RESULT, PATIENT, b"c" * 32, CAPSULE
    )


def granted(block: int, expires_at: int = 10_000) -> AccessGranted:
    return AccessGranted(block, 1000 + block, PATIENT, GRANTEE, b"\x02" * 33, expires_at, 0b10)


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def follower(chain: FakeChain, clock: Clock) -> ChainFollower:
    return ChainFollower(chain, max_age_s=2.0, max_lag_blocks=2, clock=clock)


def test_events_build_the_state_a_node_judges_by(chain: FakeChain, clock: Clock) -> None:
    chain.mine(anchored(1))
    chain.mine(granted(2))
    f = follower(chain, clock)
    f.sync_once()
    state = f.access_state(RECORD, GRANTEE, CAPSULE)
    assert state.block_number == 2
    assert state.record is not None and state.record.active
    assert state.grant is not None and state.grant.active and state.grant.granted_at == 1002

    chain.mine(
        AccessRevoked(3, 1003, PATIENT, GRANTEE), RecordDeactivated(3, 1003, RECORD, PATIENT)
    )
    f.sync_once()
    state = f.access_state(RECORD, GRANTEE, CAPSULE)
    assert state.block_number == 3
    assert state.grant is not None and not state.grant.active
    assert state.record is not None and not state.record.active


def test_an_emergency_window_lasts_while_its_responder_holds_the_role(
    chain: FakeChain, clock: Clock
) -> None:
    other = "0x" + "33" * 20
    chain.mine(anchored(1), EmergencyRoleChanged(1, 1001, GRANTEE, True))
    chain.mine(EmergencyAccessOpened(2, 1002, PATIENT, GRANTEE, b"\x02" * 33, 5000, 0b10))
    f = follower(chain, clock)
    f.sync_once()
    state = f.access_state(RECORD, GRANTEE, CAPSULE)
    assert state.grant is not None and state.grant.active and state.grant.emergency

    # Another account losing the role changes nothing; the responder losing it ends the
    # window, as the registry's views say; given back, the role revives it.
    chain.mine(EmergencyRoleChanged(3, 1003, other, False))
    f.sync_once()
    unchanged = f.access_state(RECORD, GRANTEE, CAPSULE).grant
    assert unchanged is not None and unchanged.active
    chain.mine(EmergencyRoleChanged(4, 1004, GRANTEE, False))
    f.sync_once()
    ended = f.access_state(RECORD, GRANTEE, CAPSULE).grant
    assert ended is not None and not ended.active and ended.emergency
    chain.mine(EmergencyRoleChanged(5, 1005, GRANTEE, True))
    f.sync_once()
    revived = f.access_state(RECORD, GRANTEE, CAPSULE).grant
    assert revived is not None and revived.active


def test_losing_the_emergency_role_leaves_ordinary_grants_alone(
    chain: FakeChain, clock: Clock
) -> None:
    chain.mine(anchored(1), granted(1), EmergencyRoleChanged(1, 1001, GRANTEE, False))
    f = follower(chain, clock)
    f.sync_once()
    grant = f.access_state(RECORD, GRANTEE, CAPSULE).grant
    assert grant is not None and grant.active and not grant.emergency


def test_stale_index_is_refused_not_used(chain: FakeChain, clock: Clock) -> None:
    chain.mine(anchored(1), granted(1))
    f = follower(chain, clock)
    with pytest.raises(Unavailable, match="not synced"):
        f.access_state(RECORD, GRANTEE, CAPSULE)
    f.sync_once()
    clock.now = 1.9
    assert f.access_state(RECORD, GRANTEE, CAPSULE).grant is not None
    chain.down = True
    clock.now = 2.5
    with pytest.raises(ChainUnavailable):
        f.sync_once()
    with pytest.raises(Unavailable, match=r"last chain sync was 2.5s ago \(bound 2s\)"):
        f.access_state(RECORD, GRANTEE, CAPSULE)
    chain.down = False
    f.sync_once()
    assert f.access_state(RECORD, GRANTEE, CAPSULE).grant is not None


def test_a_reorg_rebuilds_the_index(chain: FakeChain, clock: Clock) -> None:
    chain.mine(anchored(1))
    chain.mine(granted(2))
    f = follower(chain, clock)
    f.sync_once()
    # Block 2 is replaced by a block without the grant.
    chain.blocks.pop()
    chain.mine(fork=b"\x01")
    f.sync_once()
    state = f.access_state(RECORD, GRANTEE, CAPSULE)
    assert state.grant is None
    assert state.record is not None


def test_with_confirmations_grants_and_revocations_count_only_k_deep(
    chain: FakeChain, clock: Clock
) -> None:
    chain.mine(anchored(1))
    chain.mine(granted(2))
    f = ChainFollower(chain, max_age_s=2.0, max_lag_blocks=2, confirmations=3, clock=clock)
    f.sync_once()
    # Head 2: the index reflects block 0, before the record and the grant.
    assert f.index_block() == 0
    assert f.access_state(RECORD, GRANTEE, CAPSULE).record is None
    chain.mine()
    chain.mine()
    f.sync_once()
    assert f.index_block() == 1
    assert f.access_state(RECORD, GRANTEE, CAPSULE).grant is None
    chain.mine()
    f.sync_once()
    state = f.access_state(RECORD, GRANTEE, CAPSULE)
    assert state.block_number == 2 and state.grant is not None and state.grant.active
    # A revocation in block 6 is not in force until block 9 is mined.
    chain.mine(AccessRevoked(6, 1006, PATIENT, GRANTEE))
    chain.mine()
    chain.mine()
    f.sync_once()
    grant = f.access_state(RECORD, GRANTEE, CAPSULE).grant
    assert f.index_block() == 5 and grant is not None and grant.active
    chain.mine()
    f.sync_once()
    grant = f.access_state(RECORD, GRANTEE, CAPSULE).grant
    assert f.index_block() == 6 and grant is not None and not grant.active


def test_with_confirmations_the_freshness_bound_counts_from_the_confirmed_head(
    chain: FakeChain, clock: Clock
) -> None:
    f = ChainFollower(chain, max_age_s=2.0, max_lag_blocks=2, confirmations=3, clock=clock)
    for _ in range(10):
        chain.mine()
    f.sync_once()
    # Three blocks below the head by design: not lag.
    assert f.index_block() == 7 and f.staleness() is None
    clock.now = 2.5
    assert "last chain sync was 2.5s ago" in (f.staleness() or "")


def test_with_confirmations_a_reorg_deeper_than_k_rebuilds_the_index(
    chain: FakeChain, clock: Clock
) -> None:
    chain.mine(anchored(1))
    chain.mine(granted(2))
    for _ in range(3):
        chain.mine()
    f = ChainFollower(chain, max_age_s=2.0, max_lag_blocks=2, confirmations=3, clock=clock)
    f.sync_once()
    assert f.access_state(RECORD, GRANTEE, CAPSULE).grant is not None
    # Blocks 2 to 5 are replaced by blocks without the grant: the confirmed block 2 is gone.
    del chain.blocks[2:]
    for _ in range(4):
        chain.mine(fork=b"\x01")
    f.sync_once()
    assert f.index_block() == 2
    assert f.access_state(RECORD, GRANTEE, CAPSULE).grant is None


def test_catch_up_reads_events_in_chunks(
    chain: FakeChain, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.event_ranges.FIRST_RANGE_BLOCKS", 3)
    chain.mine(anchored(1))
    for _ in range(8):
        chain.mine()
    chain.mine(granted(10))
    f = follower(chain, clock)
    f.sync_once()
    assert f.index_block() == 10
    assert f.access_state(RECORD, GRANTEE, CAPSULE).grant is not None


def test_blocks_mined_between_polls_are_not_lag(chain: FakeChain, clock: Clock) -> None:
    f = follower(chain, clock)
    f.sync_once()
    for block in range(1, 6):
        chain.mine(anchored(block) if block == 1 else granted(block))
    assert f.staleness() is None  # not yet polled: fresh within the age bound
    f.sync_once()
    assert f.staleness() is None and f.index_block() == 5


def test_a_long_catch_up_counts_as_lag(
    chain: FakeChain, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.event_ranges.FIRST_RANGE_BLOCKS", 2)
    f = follower(chain, clock)
    f.sync_once()
    for _ in range(6):
        chain.mine()
    seen = []
    original = chain.events

    def spy(from_block: int, to_block: int) -> list[RegistryEvent]:
        seen.append(f.staleness())
        return original(from_block, to_block)

    monkeypatch.setattr(chain, "events", spy)
    f.sync_once()
    assert seen[0] is not None and "blocks behind" in seen[0]
    assert f.staleness() is None


def test_a_deactivated_records_capsule_is_retired_under_any_record_id(
    chain: FakeChain, clock: Clock
) -> None:
    # Issue 10: a registry that let a capsule be anchored twice (an old deployment) must
    # not let a second record id serve the capsule of a deactivated record.
    other = b"\x06" * 32
    chain.mine(anchored(1), anchored(1, other), granted(1))
    chain.mine(RecordDeactivated(2, 1002, RECORD, PATIENT))
    f = follower(chain, clock)
    f.sync_once()
    state = f.access_state(other, GRANTEE, CAPSULE)
    assert state.record is not None and state.record.active  # the other record itself
    assert state.capsule_retired is True
    assert f.access_state(other, GRANTEE, b"k" * 32).capsule_retired is False


def test_events_whose_shredding_failed_are_handed_over_again(
    chain: FakeChain, clock: Clock
) -> None:
    """A revocation whose shredding failed (its chain read, or the store) is judged by at
    once, and handed over again at the next sync: the kfrags are not kept for good, and
    no snapshot (consistent_index) holds a revocation whose kfrags were not shredded."""
    chain.mine(anchored(1), granted(1))
    f = follower(chain, clock)
    f.sync_once()
    handed: list[RegistryEvent] = []
    failures = [Unavailable("chain read failed")]

    def shred(events: list[RegistryEvent]) -> None:
        if failures:
            raise failures.pop()
        handed.extend(events)

    f.on_events = shred
    revoked = AccessRevoked(2, 1002, PATIENT, GRANTEE)
    chain.mine(revoked)
    with pytest.raises(Unavailable):
        f.sync_once()
    state = f.access_state(RECORD, GRANTEE, CAPSULE)
    assert state.grant is not None and not state.grant.active
    assert f.consistent_index() is None
    f.sync_once()
    assert handed == [revoked]
    saved = f.consistent_index()
    assert saved is not None and saved.block is not None and saved.block.number == 2


@pytest.mark.parametrize(
    "failure",
    [ChainUnavailable("chain at http://127.0.0.1:1 sent a bad JSON-RPC answer"), TypeError("x")],
    ids=["chain-unavailable", "a-bug"],
)
def test_the_background_sync_survives_failures_and_says_why(
    chain: FakeChain, failure: Exception
) -> None:
    """Whatever a sync raises, the thread goes on following: the index goes stale (the node
    refuses with UNAVAILABLE, giving the reason) and recovers once the chain answers."""
    clock = Clock()
    f = ChainFollower(chain, poll_interval_s=0.01, max_age_s=2.0, clock=clock)
    original = chain.block
    failing = threading.Event()

    def block(identifier: int | str = "latest") -> BlockRef:
        if failing.is_set():
            raise failure
        return original(identifier)

    chain.block = block  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        f.start()
        try:
            failing.set()
            _wait_for(lambda: any(e["event"] == "chain_sync_failed" for e in logs))
            clock.now = 3.0
            with pytest.raises(Unavailable) as refused:
                f.access_state(RECORD, GRANTEE, CAPSULE)
            why = failure.message if isinstance(failure, ChainUnavailable) else "unexpected"
            assert f"last chain sync was 3.0s ago (bound 2s): {why}" in refused.value.message
            failing.clear()
            chain.mine(anchored(1))
            _wait_for(lambda: f.index_block() == 1)
            assert f.staleness() is None
        finally:
            f.stop()
    failed = [e for e in logs if e["event"] == "chain_sync_failed"]
    assert failed and all(why in e["error"] for e in failed)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_sync_that_applied_many_events_gives_free_memory_back(
    chain: FakeChain, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: list[int] = []

    def release() -> bool:
        released.append(1)
        return True

    monkeypatch.setattr("kms_node.chain_follower.RELEASE_MEMORY_AFTER_EVENTS", 3)
    monkeypatch.setattr("kms_node.heap.release_free_memory", release)
    chain.mine(anchored(1), granted(1))
    chain.mine(granted(2))
    f = follower(chain, clock)
    f.sync_once()  # a catch-up of 3 events
    assert released == [1]
    chain.mine(granted(3))
    f.sync_once()  # a routine poll
    assert released == [1]
