"""Reading the registry's events over many blocks in ranges the chain endpoint accepts: the
one place for it, used by a node's follower (``kms_node/chain_follower.py``) and the
auditor's replay (``clients/audit/replayed_state.py``).

Each ``eth_getLogs`` asks for as many blocks as the endpoint has accepted so far, starting
at ``FIRST_RANGE_BLOCKS``. An endpoint that refuses a range as too large (geth's "exceed
maximum block range", providers' result and size limits) or an answer over the client's
size bound is :class:`~core.errors.ChainAnswerTooLarge`: the range is halved, for good,
and the same blocks asked again. One block's events refused is the end: nothing smaller
can be asked for, and the error goes to the caller. Pure: no I/O but the source's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, Protocol

from core.errors import ChainAnswerTooLarge
from core.registry_types import RegistryEvent

#: blocks asked for in the first eth_getLogs of a span: few enough that an endpoint which
#: computes an answer before refusing it does bounded work, many enough that a registry
#: with sparse events is read in few calls (a million blocks in 100)
FIRST_RANGE_BLOCKS: Final = 10_000


class EventLog(Protocol):
    """The registry's followed events in [from_block, to_block], in chain order
    (``RegistryClient.events``)."""

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]: ...


class EventRanges:
    """Reads spans of blocks' events from one source, remembering the largest range the
    source accepted. Not thread-safe: one per reader (the follower's sync lock, the
    auditor's read lock)."""

    def __init__(
        self,
        source: EventLog,
        *,
        first_range_blocks: int | None = None,
        on_halved: Callable[[int, ChainAnswerTooLarge], None] | None = None,
    ) -> None:
        """``first_range_blocks``: ``FIRST_RANGE_BLOCKS`` unless given; ``on_halved(blocks,
        error)`` is told of each halving (to log it)."""
        if first_range_blocks is None:
            first_range_blocks = FIRST_RANGE_BLOCKS
        if first_range_blocks < 1:
            raise ValueError("first_range_blocks must be at least 1")
        self._source = source
        self._on_halved = on_halved
        #: blocks per eth_getLogs call: the first range, halved at each refusal
        self.range_blocks = first_range_blocks

    def read(self, start: int, end: int) -> Iterator[tuple[int, list[RegistryEvent]]]:
        """``(last block, events)`` of each range read in turn, in chain order, until
        ``end``: a caller applies each before the next is read. Raises what the source
        raises, and ``ChainAnswerTooLarge`` if one block's events are refused."""
        while start <= end:
            last = min(end, start + self.range_blocks - 1)
            try:
                events = self._source.events(start, last)
            except ChainAnswerTooLarge as e:
                if last == start:
                    raise  # one block's events are more than the endpoint will give
                self.range_blocks = (last - start + 1) // 2
                if self._on_halved is not None:
                    self._on_halved(self.range_blocks, e)
                continue
            yield last, events
            start = last + 1
