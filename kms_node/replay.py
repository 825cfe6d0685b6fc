"""Refuses a signed request seen before: the replay guard.

A signed request (:mod:`medkms.core.request_auth`) carries a requester-chosen
32-byte nonce and a deadline at most ``max_window_s`` ahead of the node's clock.
The guard remembers each (requester, nonce) until that request's deadline, and
no longer: once the deadline has passed, a replay of the same signed request
fails the deadline check instead (the deadline is inside the signature, so it
cannot be moved). Memory is therefore bounded by the requests accepted within
one window, and ``max_entries`` caps it outright under attack.

The guard's clock only moves forward: it keeps the latest ``now`` it was given,
so a wall clock stepping back cannot revive a request whose entry was already
forgotten.

Memory is per node process (roughly 300 bytes per live entry). If one node
runs several worker processes, each has its own guard and a replay routed to
another process of the same node would pass it; sharing the guard between
processes (e.g. in SQLite) is a deployment decision left for later.
"""

from __future__ import annotations

import heapq
import threading

from medkms.core.errors import InvalidRequest, ResourceExhausted, Unauthenticated
from medkms.core.request_auth import check_deadline


class ReplayGuard:
    """Remembers (requester, nonce) until the request's deadline; thread-safe."""

    def __init__(self, max_window_s: int, max_entries: int) -> None:
        if max_window_s <= 0:
            raise ValueError("max_window_s must be positive")
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_window_s = max_window_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # (requester, nonce) -> deadline, and a min-heap of the same entries by deadline.
        self._seen: dict[tuple[str, bytes], int] = {}
        self._expiry: list[tuple[int, str, bytes]] = []
        self._latest_now: float = float("-inf")

    def __len__(self) -> int:
        """Live entries, as of the last call (expired ones are dropped lazily)."""
        with self._lock:
            return len(self._seen)

    def check_and_remember(self, requester: str, nonce: bytes, deadline: int, now: float) -> None:
        """Accept this (requester, nonce) once, or raise.

        Raises :class:`Unauthenticated` if the deadline has passed or the nonce
        was already used by this requester, :class:`InvalidRequest` if the
        deadline is further ahead than ``max_window_s``, and
        :class:`ResourceExhausted` if ``max_entries`` requests are already live.

        Call it after the signature has been verified and the signer found to hold
        a grant, so that nobody without a grant can fill the guard; the nonce is
        used up from then on, even if serving the request fails later.
        """
        if not isinstance(nonce, bytes):
            raise InvalidRequest("nonce must be bytes")
        key = (requester, nonce)
        with self._lock:
            now = max(now, self._latest_now)
            self._latest_now = now
            check_deadline(deadline, now, self.max_window_s)
            self._evict_expired(now)
            if key in self._seen:
                raise Unauthenticated("nonce already used")
            if len(self._seen) >= self.max_entries:
                raise ResourceExhausted(
                    "too many requests in flight at this node; retry after a short wait"
                )
            self._seen[key] = deadline
            heapq.heappush(self._expiry, (deadline, requester, nonce))

    def _evict_expired(self, now: float) -> None:
        # Amortised O(log n) per entry: each entry is pushed once and popped once.
        # An entry whose deadline has passed can be forgotten: check_deadline
        # refuses any request with deadline <= now, and now never goes back.
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, requester, nonce = heapq.heappop(expiry)
            del self._seen[(requester, nonce)]
