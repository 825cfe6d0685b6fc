"""Unwrapped key fragments kept for a short while (ADR 13), so that a grant's repeated
reads do not each pay the HSM unwrap and the parse.

An entry lives at most ``ttl_s`` after its unwrap, whether used or not (the server
drops expired entries twice a second, with or without requests), and the cache holds at
most ``max_entries`` of them (the oldest goes first). A revocation's shredding
evicts the grant's entries at once; so does a new enrollment of the grant, and the
node's stop. The key includes the wrapped bytes, so a kfrag replaced or re-wrapped in the
store is never served from an older entry.

The cache only saves work: every request is still authorised against the grant index
first, so an entry that outlived its grant could not be used for it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import umbral_pre as umbral

from core.record_types import RecordType

#: (patient, grantee, record type, wrapped kfrag)
Key = tuple[str, str, RecordType, bytes]

DEFAULT_TTL_S: Final = 60.0
DEFAULT_MAX_ENTRIES: Final = 10_000


class KfragCache:
    """A bounded, time-limited map from a stored kfrag to its unwrapped, parsed form.
    ``ttl_s`` 0 keeps nothing (every request unwraps in the HSM)."""

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0 or max_entries < 1:
            raise ValueError("ttl_s must be >= 0 and max_entries >= 1")
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        #: key -> (expiry, kfrag), oldest unwrap first
        self._entries: OrderedDict[Key, tuple[float, umbral.VerifiedKeyFrag]] = OrderedDict()
        #: bumped by every eviction: an unwrap that started before one is not kept
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # never the kfrags
        return f"KfragCache(entries={len(self._entries)}, ttl_s={self._ttl_s})"

    def generation(self) -> int:
        """Read before fetching a kfrag from the store, and handed back to :meth:`put`."""
        return self._evictions

    def get(self, key: Key) -> umbral.VerifiedKeyFrag | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, key: Key, kfrag: umbral.VerifiedKeyFrag, generation: int) -> None:
        """Keep ``kfrag`` unless an eviction happened since ``generation`` was read (it
        might have been this grant's shredding, racing with the request)."""
        if self._ttl_s == 0:
            return
        with self._lock:
            if generation != self._evictions:
                return
            self._entries[key] = (self._clock() + self._ttl_s, kfrag)
            self._entries.move_to_end(key)
            self._drop_oldest()

    def drop_expired(self) -> int:
        """Drop the entries older than ``ttl_s``; how many. The server calls this every
        half second, so an entry does not outlive its TTL when no request comes."""
        with self._lock:
            before = len(self._entries)
            self._drop_oldest()
            return before - len(self._entries)

    def _drop_oldest(self) -> None:
        """Drop expired entries, and the oldest beyond ``max_entries`` (lock held).
        Entries are in unwrap order, so the expired ones are the first."""
        now = self._clock()
        while self._entries:
            oldest_key, (expiry, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self._max_entries and expiry > now:
                break
            del self._entries[oldest_key]

    def evict(self, patient: str, grantee: str) -> int:
        """Drop every entry of the grant of ``patient`` to ``grantee``; how many."""
        with self._lock:
            self._evictions += 1
            doomed = [k for k in self._entries if k[0] == patient and k[1] == grantee]
            for key in doomed:
                del self._entries[key]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._evictions += 1
            self._entries.clear()
