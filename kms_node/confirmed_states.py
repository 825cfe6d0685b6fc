"""Chain reads that confirmed a refusal, kept while the chain has no newer block.

A node confirms a refusal of its grant index against the chain (a grant written a moment
ago must be honoured). The registry state at the latest block cannot change until a new
block is mined, so a confirmation read at block B answers every identical question while
the node's index is at most at B: a requester repeating a refused request costs one chain
read per block, not one per request. Bounded: the whole memory is dropped when it is full.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from core.registry_types import AccessState

#: most confirmations remembered (a few hundred bytes each)
MAX_ENTRIES = 4096


class ChainStateReader(Protocol):
    def access_state(self, record_id: bytes, grantee: str, capsule_hash: bytes) -> AccessState: ...


class ConfirmedStates:
    def __init__(self, chain: ChainStateReader, max_entries: int = MAX_ENTRIES) -> None:
        self._chain = chain
        self._max = max_entries
        self._lock = threading.Lock()
        self._states: dict[tuple[bytes, str, bytes], AccessState] = {}

    def access_state(
        self,
        record_id: bytes,
        grantee: str,
        capsule_hash: bytes,
        index_block: int,
        *,
        may_read: Callable[[], bool] = lambda: True,
    ) -> AccessState | None:
        """The registry state at the latest block; read again once the node's index has
        seen a block newer than the one remembered. None when a read is needed and
        ``may_read`` (a budget) says no."""
        key = (record_id, grantee, capsule_hash)
        with self._lock:
            known = self._states.get(key)
        if known is not None and known.block_number >= index_block:
            return known
        if not may_read():
            return None
        state = self._chain.access_state(record_id, grantee, capsule_hash)
        with self._lock:
            if len(self._states) >= self._max:
                self._states.clear()
            self._states[key] = state
        return state
