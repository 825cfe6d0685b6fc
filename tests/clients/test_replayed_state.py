"""The auditor's state rebuilt from events: at any block, in any order, from any thread, it
is the state an index that applied exactly the events up to that block holds. (On a real
chain without historical state: tests/integration/test_audit_without_archive.py.)"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clients.audit import replayed_state
from clients.audit.replayed_state import ReplayedState
from contracts.registry import RegistryClient
from core.errors import ChainAnswerTooLarge, InvalidRequest
from core.record_types import RecordType
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    BlockRef,
    RecordAnchored,
    RegistryEvent,
)
from deploy.anvil import AnvilProcess
from tests.contracts.conftest import (
    registry_with_spread_patients,
)
from tests.hostile_rpc import HostileRpc, assert_halved_down_to, block_range_limit

PATIENT = "0x" + "11" * 20
GRANTEE = "0x" + "22" * 20
RECORD = b"\x05" * 32
CAPSULE = b"h" * 32
START = 10
HEAD = 200


class Events:
    """A grant given at every even block and revoked at every odd one, after the record."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.by_block: dict[int, list[RegistryEvent]] = {
            START: [
                RecordAnchored(
                    START,
                    START,
                    RECORD,
                    PATIENT,
                    RecordType.LAB_RESULT,
                    PATIENT,
                    b"c" * 32,
                    CAPSULE,
                )
            ]
        }
        for block in range(START + 1, HEAD + 40):
            self.by_block[block] = [
                AccessGranted(block, block, PATIENT, GRANTEE, b"\x02" * 33, 10**9, 0b10)
                if block % 2 == 0
                else AccessRevoked(block, block, PATIENT, GRANTEE)
            ]

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        self.calls.append((from_block, to_block))
        return [e for b in range(from_block, to_block + 1) for e in self.by_block.get(b, [])]


def at(block: int) -> BlockRef:
    return BlockRef(block, block.to_bytes(32, "big"), 1000 + block)


def active_at(state: ReplayedState, block: int) -> bool | None:
    grant = state.access_state(RECORD, GRANTEE, CAPSULE, at=at(block)).grant
    return None if grant is None else grant.active


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("core.event_ranges.FIRST_RANGE_BLOCKS", 50)
    monkeypatch.setattr(replayed_state, "SNAPSHOT_EVERY", 16)


def test_each_block_sees_exactly_the_events_up_to_it_in_any_order() -> None:
    events = Events()
    state = ReplayedState(events, start_block=START, through_block=HEAD)
    assert events.calls == [(10, 59), (60, 109), (110, 159), (160, 200)]
    blocks = list(range(START, HEAD + 1))
    random.Random(7).shuffle(blocks)
    for block in blocks:
        # (No grant yet at the first two blocks: a revocation of none changes nothing.)
        expected = None if block <= START + 1 else block % 2 == 0
        assert active_at(state, block) is expected, block
        s = state.access_state(RECORD, GRANTEE, CAPSULE, at=at(block))
        assert (s.block_number, s.block_timestamp, s.block_hash) == (
            block,
            1000 + block,
            at(block).hash,
        )


def test_threads_keep_their_own_cursors() -> None:
    state = ReplayedState(Events(), start_block=START, through_block=HEAD)
    blocks = list(range(START + 1, HEAD + 1)) * 4
    random.Random(3).shuffle(blocks)
    with ThreadPoolExecutor(max_workers=4) as pool:
        seen = list(pool.map(lambda b: (b, active_at(state, b)), blocks))
    assert all(active is (None if block == START + 1 else block % 2 == 0) for block, active in seen)


def test_an_entry_after_the_audit_began_reads_the_new_events() -> None:
    events = Events()
    state = ReplayedState(events, start_block=START, through_block=HEAD)
    assert active_at(state, HEAD + 7) is False
    assert active_at(state, HEAD + 8) is True
    assert events.calls[-2:] == [(HEAD + 1, HEAD + 7), (HEAD + 8, HEAD + 8)]


def test_a_block_before_the_registry_is_refused() -> None:
    state = ReplayedState(Events(), start_block=START, through_block=HEAD)
    with pytest.raises(InvalidRequest, match="before the registry's first block 10"):
        state.access_state(RECORD, GRANTEE, CAPSULE, at=at(START - 1))


def test_a_range_the_source_refuses_is_halved_and_every_event_read() -> None:
    class Limited(Events):
        def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
            if to_block - from_block + 1 > 12:
                self.calls.append((from_block, to_block))
                raise ChainAnswerTooLarge("exceed maximum block range: 12")
            return super().events(from_block, to_block)

    events = Limited()
    state = ReplayedState(events, start_block=START, through_block=HEAD)
    # 50 blocks refused, then 25; 12 accepted, and asked for from then on.
    assert events.calls[:4] == [(10, 59), (10, 34), (10, 21), (22, 33)]
    assert all(b - a + 1 <= 12 for a, b in events.calls[2:])
    assert state.events_read == HEAD - START + 1
    assert active_at(state, HEAD) is True and active_at(state, HEAD - 1) is False


@pytest.mark.anvil
def test_an_endpoint_that_refuses_large_ranges_is_read_in_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a node's follower (tests/kms_node/test_chain_follower_limits.py): geth's range
    limit, on a real anvil behind tests/hostile_rpc.py."""
    with AnvilProcess(log_path=tmp_path / "anvil.log") as anvil:
        registry, patients = registry_with_spread_patients(anvil.rpc_url)
        head = registry.latest_block()[0]
        rpc = HostileRpc(upstream=anvil.rpc_url)
        try:
            rpc.misbehave(block_range_limit(rpc, 5), "eth_getLogs")
            monkeypatch.setattr("core.event_ranges.FIRST_RANGE_BLOCKS", 40)
            limited = RegistryClient(rpc.url, registry.address)
            state = ReplayedState(limited, start_block=0, through_block=head)
            assert state.events_read == len(registry.events(0, head)) >= len(patients)
            assert_halved_down_to(rpc, head + 1, 5)
        finally:
            rpc.close()
