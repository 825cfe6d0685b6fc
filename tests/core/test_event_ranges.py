"""Reading a span of blocks' events in ranges the endpoint accepts: halved, for good, at each
refusal, until one block; the events come out whole and in chain order."""

from __future__ import annotations

import pytest

from core.errors import ChainAnswerTooLarge
from core.event_ranges import EventRanges
from core.registry_types import AccessRevoked, RegistryEvent

PATIENT = "0x" + "11" * 20


class Limited:
    """One event per block; ranges of more than ``max_blocks`` blocks refused."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.asked: list[tuple[int, int]] = []

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        self.asked.append((from_block, to_block))
        if to_block - from_block + 1 > self.max_blocks:
            raise ChainAnswerTooLarge("exceed maximum block range")
        return [AccessRevoked(b, b, PATIENT, PATIENT) for b in range(from_block, to_block + 1)]


def test_a_refused_range_is_halved_for_good_and_every_event_read_in_order() -> None:
    source, halved = Limited(max_blocks=30), []
    ranges = EventRanges(
        source, first_range_blocks=100, on_halved=lambda blocks, _e: halved.append(blocks)
    )
    read = list(ranges.read(10, 209))
    assert halved == [50, 25]
    assert source.asked[:3] == [(10, 109), (10, 59), (10, 34)]
    assert all(b - a + 1 <= 25 for a, b in source.asked[3:])
    assert [last for last, _ in read] == [*range(34, 209, 25), 209]
    assert [e.block for _, events in read for e in events] == list(range(10, 210))
    # Learnt for good: the next span starts at 25 blocks.
    source.asked.clear()
    list(ranges.read(210, 260))
    assert source.asked == [(210, 234), (235, 259), (260, 260)]


def test_one_blocks_events_refused_is_the_end() -> None:
    ranges = EventRanges(Limited(max_blocks=0), first_range_blocks=4)
    with pytest.raises(ChainAnswerTooLarge):
        list(ranges.read(1, 8))
    assert ranges.range_blocks == 1


def test_an_empty_span_reads_nothing() -> None:
    source = Limited(max_blocks=10)
    assert list(EventRanges(source).read(5, 4)) == []
    assert source.asked == []


def test_the_first_range_must_be_a_block_or_more() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventRanges(Limited(1), first_range_blocks=0)
