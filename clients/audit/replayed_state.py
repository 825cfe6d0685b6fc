"""The registry's state as of any block, rebuilt from the registry's events, for an auditor
whose chain keeps state for recent blocks only (most full and hosted nodes: a historical
``eth_call`` at an entry's block fails there, but blocks and logs stay).

The events are interpreted by :class:`~core.grant_index.GrantIndex`, the grant index every
node judges by, so the state an entry is judged against here is the state its node's index
held at that block. (An archive node's ``accessState`` at the block, the auditor's default,
is the contract's own view and so also checks that interpretation: ADR 12.)

How: the events from the registry's first block to the head are read once, in ranges the
endpoint accepts (``core/event_ranges.py``, as a node's follower reads them). Each
thread keeps a cursor, an index replayed up to some block, and moves it forward for the next
entry's block (one node's entries mostly come in block order); for an earlier block it
restarts from the nearest of the copies kept every ``SNAPSHOT_EVERY`` blocks with events.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Final

from core.errors import InvalidRequest
from core.event_ranges import EventLog, EventRanges
from core.grant_index import GrantIndex
from core.registry_types import AccessState, BlockRef, RegistryEvent

#: a copy of the replayed index is kept every this many blocks with events
SNAPSHOT_EVERY: Final = 256


@dataclass(frozen=True)
class _Events:
    """Every event read so far (through ``through``) and each one's block number."""

    events: tuple[RegistryEvent, ...]
    blocks: tuple[int, ...]
    through: int


@dataclass
class _Cursor:
    index: GrantIndex
    #: how many of the events it has applied
    applied: int


class ReplayedState:
    """Access states at any block since ``start_block`` (the registry's deployment block),
    from the events. Thread-safe."""

    def __init__(self, log: EventLog, *, start_block: int, through_block: int) -> None:
        if not 0 <= start_block <= through_block:
            raise InvalidRequest("need 0 <= start_block <= through_block")
        self._ranges = EventRanges(log)
        self._start_block = start_block
        self._lock = threading.Lock()
        self._local = threading.local()
        self._read = _Events((), (), start_block - 1)
        self._extend(through_block)
        # (events applied, index after them), every SNAPSHOT_EVERY blocks with events
        self._snapshots: list[tuple[int, GrantIndex]] = [(0, GrantIndex())]
        index, applied, blocks_seen = GrantIndex(), 0, 0
        read = self._read
        while applied < len(read.events):
            block = read.blocks[applied]
            end = bisect.bisect_right(read.blocks, block)
            index.apply(list(read.events[applied:end]), BlockRef(block, b"", 0))
            applied, blocks_seen = end, blocks_seen + 1
            if blocks_seen % SNAPSHOT_EVERY == 0:
                self._snapshots.append((applied, index.copy()))
        self._snapshot_positions = [applied for applied, _ in self._snapshots]

    @property
    def events_read(self) -> int:
        return len(self._read.events)

    def _extend(self, through_block: int) -> None:
        """Read the events of the blocks after those read, through ``through_block``."""
        with self._lock:
            read = self._read
            if through_block <= read.through:
                return
            events = list(read.events)
            for _, more in self._ranges.read(read.through + 1, through_block):
                events.extend(more)
            self._read = _Events(tuple(events), tuple(e.block for e in events), through_block)

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, at: BlockRef
    ) -> AccessState:
        """The state as of block ``at`` (after its transactions), as a node's index holds it."""
        if at.number < self._start_block:
            raise InvalidRequest(
                f"block {at.number} is before the registry's first block {self._start_block}"
            )
        self._extend(at.number)  # an entry the node wrote after the audit began
        read = self._read
        end = bisect.bisect_right(read.blocks, at.number)
        cursor: _Cursor | None = getattr(self._local, "cursor", None)
        if cursor is None or cursor.applied > end:
            applied, snapshot = self._snapshots[
                bisect.bisect_right(self._snapshot_positions, end) - 1
            ]
            cursor = _Cursor(snapshot.copy(), applied)
            self._local.cursor = cursor
        cursor.index.apply(list(read.events[cursor.applied : end]), at)
        cursor.applied = end
        return cursor.index.access_state(record_id, grantee, capsule_hash)
