"""Who may send the nodes work now (issue 10: no single party can starve the nodes).

Before the coordinator fans a request out, it checks the signature (as every node does
again) and two budgets, and it charges refusals after the nodes have answered:

- each requester's token bucket, in single requests (``request_cost``: a batch of ``n``
  capsules costs ``1 + (n - 1) / 4``, as a node spends on them). A capsule the nodes
  refuse costs ``REFUSAL_COST`` in all, as at a node.
- each peer address's budget of refusals, spent by requesters the coordinator has not
  served lately. Throw-away keys each start with a full requester bucket, but they all
  come from somewhere: one address gets a few refusals per second for new requesters,
  and requesters it has served lately (``served_memory_s``) are not held up by it. A new
  requester sharing an address with a flood waits until the flood stops.

Pure logic over :class:`~medkms.core.rate_limit.RateLimiter`; memory is bounded by the
limiters' and by ``MAX_SERVED`` remembered requesters.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from medkms.core.rate_limit import REFUSAL_COST, RateLimiter

#: requesters remembered as served (the oldest are forgotten first)
MAX_SERVED = 100_000


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``,
    ``unix:/path``): connections from one host share it, whatever their port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer[:128]


class Admission:
    def __init__(
        self,
        *,
        requester_rate_per_s: float,
        requester_burst: int,
        peer_refusals_per_s: float,
        peer_refusal_burst: int,
        served_memory_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._requesters = RateLimiter(requester_rate_per_s, requester_burst, clock=clock)
        self._peers = RateLimiter(
            peer_refusals_per_s,
            peer_refusal_burst,
            what="requesters not yet served from this address (too many refusals)",
            clock=clock,
        )
        self._served_memory_s = served_memory_s
        self._clock = clock
        self._lock = threading.Lock()
        self._served: OrderedDict[str, float] = OrderedDict()  # requester -> last served

    def _recently_served(self, requester: str) -> bool:
        with self._lock:
            at = self._served.get(requester)
        return at is not None and self._clock() - at < self._served_memory_s

    def admit(self, requester: str, peer: str, cost: float) -> None:
        """Refuse (ResourceExhausted) or take the request's cost from the requester."""
        if not self._recently_served(requester):
            self._peers.check(peer)
        self._requesters.spend(requester, cost)

    def served(self, requester: str) -> None:
        with self._lock:
            self._served[requester] = self._clock()
            self._served.move_to_end(requester)
            while len(self._served) > MAX_SERVED:
                self._served.popitem(last=False)

    def refused(self, requester: str, peer: str, count: int = 1) -> None:
        """The nodes refused ``count`` capsules of the requester's request."""
        self._requesters.charge(requester, count * (REFUSAL_COST - 1))
        if not self._recently_served(requester):
            self._peers.charge(peer, count)
