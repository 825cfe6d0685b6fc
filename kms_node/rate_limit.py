"""Per-requester rate limits at a node: a token bucket per authenticated address.

Applied after the signature is verified (so nobody can spend another's budget)
and before anything costly (the chain read that confirms a refusal, the HSM).
Memory is bounded: idle buckets are dropped once full again, and beyond
``max_requesters`` tracked addresses the node refuses new ones rather than grow.

The buckets live in process memory. A node running ``processes`` server processes on one
port gives each its share of the configured limit (:meth:`RateLimiter.share_of`): the
kernel spreads connections between the processes and the coordinator spreads requests
over several connections per node, so the shares add up to the limit; a requester whose
traffic all lands on one process gets that process's share, less than the limit, never
more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from medkms.core.errors import ResourceExhausted


class RateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_requesters: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max = max_requesters
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # requester -> (tokens, at)

    @classmethod
    def share_of(
        cls,
        rate_per_s: float,
        burst: int,
        processes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> RateLimiter:
        """One server process's share of a node's limit of ``rate_per_s`` and ``burst``
        when ``processes`` processes serve it: ``rate_per_s / processes`` and
        ``burst // processes``, at least 1."""
        if processes < 1:
            raise ValueError("processes must be at least 1")
        return cls(rate_per_s / processes, max(1, burst // processes), clock=clock)

    def spend(self, requester: str, cost: int = 1) -> None:
        """Take ``cost`` tokens (a batch costs one per capsule) or refuse."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(requester, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens < cost:
                wait = (cost - tokens) / self._rate
                raise ResourceExhausted(
                    f"rate limit for this requester exceeded; retry in {wait:.1f}s"
                )
            if requester not in self._buckets and len(self._buckets) >= self._max:
                self._sweep(now)
                if len(self._buckets) >= self._max:
                    raise ResourceExhausted("node is tracking too many requesters; retry later")
            self._buckets[requester] = (tokens - cost, now)

    def charge(self, requester: str, cost: int) -> None:
        """Take ``cost`` more tokens after the fact (a refusal costs more than an answer),
        down to at most one burst in debt: the requester waits until it has refilled."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(requester, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if requester in self._buckets or len(self._buckets) < self._max:
                self._buckets[requester] = (max(-self._burst, tokens - cost), now)

    def _sweep(self, now: float) -> None:
        """Forget requesters whose bucket has refilled: they hold no state worth keeping."""
        for requester, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self._rate >= self._burst:
                del self._buckets[requester]
