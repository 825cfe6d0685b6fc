"""Rate limits: a token bucket per key (an authenticated requester, a peer's address).

A node keys its buckets by requester, after the signature is verified (so nobody can
spend another's budget) and before anything costly (the chain read that confirms a
refusal, the HSM). The coordinator keys one set by requester and another by the
address of the peer that sends requests for requesters it has not yet served
(``coordinator/admission.py``). Costs are in units of one single request; a refusal
is charged after the fact (:meth:`RateLimiter.charge`), so a party whose requests are
refused is slowed down more than one whose requests are served.

Memory is bounded: idle buckets are dropped once full again, and beyond ``max_keys``
tracked keys new ones are refused rather than grow.

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

from core.errors import ResourceExhausted

#: what a refused capsule costs in all, in single requests served: a refusal costs a
#: node an audit entry and may cost a chain read, and a party whose requests are refused
#: is slowed to a tenth of the rate an honest one gets
REFUSAL_COST = 10
#: node CPU of an extra capsule in a batch, as a share of a single request's (measured:
#: 2.1 ms per single request, 0.5 ms per extra capsule in a batch of 32)
BATCH_CAPSULE_SHARE = 0.25


#: what an enrollment costs, in single requests: chain reads, and per kfrag an ECDH in
#: the HSM and an Umbral verification
ENROLLMENT_COST = 10


def request_cost(capsules: int) -> float:
    """A request's cost in single requests: 1, plus a quarter per extra capsule."""
    return 1 + (capsules - 1) * BATCH_CAPSULE_SHARE


class RateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        what: str = "this requester",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max = max_keys
        #: who a bucket belongs to, in refusals ("rate limit for {what} exceeded")
        self._what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @classmethod
    def share_of(
        cls,
        rate_per_s: float,
        burst: int,
        processes: int,
        *,
        what: str = "this requester",
        clock: Callable[[], float] = time.monotonic,
    ) -> RateLimiter:
        """One server process's share of a node's limit of ``rate_per_s`` and ``burst``
        when ``processes`` processes serve it: ``rate_per_s / processes`` and
        ``burst // processes``, at least 1."""
        if processes < 1:
            raise ValueError("processes must be at least 1")
        return cls(rate_per_s / processes, max(1, burst // processes), what=what, clock=clock)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def _refuse(self, tokens: float, cost: float) -> ResourceExhausted:
        wait = (cost - tokens) / self._rate
        return ResourceExhausted(f"rate limit for {self._what} exceeded; retry in {wait:.1f}s")

    def spend(self, key: str, cost: float = 1) -> None:
        """Take ``cost`` tokens (a batch costs more than one) or refuse. A cost above the
        burst is taken from a full bucket, leaving it in debt (at most one burst)."""
        now = self._clock()
        needed = min(cost, self._burst)
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens < needed:
                raise self._refuse(tokens, needed)
            if key not in self._buckets and len(self._buckets) >= self._max:
                self._sweep(now)
                if len(self._buckets) >= self._max:
                    raise ResourceExhausted("too many parties are being tracked; retry later")
            self._buckets[key] = (max(-self._burst, tokens - cost), now)

    def try_spend(self, key: str, cost: float = 1) -> bool:
        """Take ``cost`` tokens if there are enough; whether it did."""
        try:
            self.spend(key, cost)
        except ResourceExhausted:
            return False
        return True

    def charge(self, key: str, cost: float) -> None:
        """Take ``cost`` more tokens after the fact (a refusal costs more than an answer),
        down to at most one burst in debt: the party waits until it has refilled."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
            if key in self._buckets or len(self._buckets) < self._max:
                self._buckets[key] = (max(-self._burst, tokens - cost), now)

    def _sweep(self, now: float) -> None:
        """Forget keys whose bucket has refilled: they hold no state worth keeping."""
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self._rate >= self._burst:
                del self._buckets[key]
