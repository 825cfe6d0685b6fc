"""Who may send the nodes work now (issue 10: no single party can starve the nodes).

Before the coordinator fans a request out, it checks the signature (as every node does
again) and two budgets, and it charges refusals after the nodes have answered:

- each requester's token bucket, in single requests (``request_cost``: a batch of ``n``
  capsules costs ``1 + (n - 1) / 4``, as a node spends on them). A capsule the nodes
  refuse costs ``REFUSAL_COST`` in all, as at a node; a requester not served lately pays
  that price up front and gets the difference back when it is served.
- each peer address's budget of refusals, spent by requesters the coordinator has not
  served lately. Throw-away keys each start with a full requester bucket, but they all
  come from somewhere: one address gets a few refusals per second for new requesters,
  and requesters it has served lately (``served_memory_s``) are not held up by it. A new
  requester sharing an address with a flood waits until the flood stops.

Pure logic over :class:`~core.rate_limit.RateLimiter`; memory is bounded by the
limiters' and by ``MAX_SERVED`` remembered requesters.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from core.errors import ResourceExhausted
from core.rate_limit import REFUSAL_COST, RateLimiter

#: requesters remembered as served (the oldest are forgotten first)
MAX_SERVED = 100_000


#: an IPv6 host is charged by its /64: one subscriber or host is commonly given a whole
#: /64, so keyed by full address, it would have 2**64 refusal budgets to draw on
IPV6_PREFIX = 64


def peer_address(peer: str) -> str:
    """Who a gRPC peer string (``ipv4:1.2.3.4:5678``, ``ipv6:[2001:db8::1]:5678``,
    ``unix:/path``) is charged as: its IPv4 address, its IPv6 /64 (an IPv4-mapped one as
    IPv4), or the string itself; connections from one host share it, whatever their
    port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%")[0]  # without a zone
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return peer[:128]
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
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

    def admit(self, requester: str, peer: str, cost: float) -> Ticket:
        """Refuse (ResourceExhausted) or take the request's price. A requester not served
        lately pays as if refused (``REFUSAL_COST`` times ``cost``, and one refusal of its
        address's budget), refunded when it is served: many calls sent at once get no
        more through than the same calls one after another."""
        proven = self._recently_served(requester)
        price = cost if proven else cost * REFUSAL_COST
        if not proven:
            self._peers.spend(peer)
        try:
            self._requesters.spend(requester, price)
        except ResourceExhausted:
            if not proven:
                self._peers.charge(peer, -1)
            raise
        return Ticket(requester, peer, proven, cost, price)

    def settle(self, ticket: Ticket, *, served: int, refused: int) -> None:
        """What the nodes did with the ticket's request: ``served`` and ``refused``
        capsules (refused for the requester's own reasons). The price is made right."""
        owed = ticket.cost + refused * (REFUSAL_COST - 1)
        self._requesters.charge(ticket.requester, owed - ticket.paid)  # < 0: a refund
        if not ticket.proven:
            self._peers.charge(ticket.peer, refused - 1)  # one was taken at admission
        if served:
            with self._lock:
                self._served[ticket.requester] = self._clock()
                self._served.move_to_end(ticket.requester)
                while len(self._served) > MAX_SERVED:
                    self._served.popitem(last=False)

    def charge_refusals(self, ticket: Ticket, refusals: int) -> None:
        """Charge the ticket's requester for ``refusals`` more refused requests, after it
        was settled (a false report of a bad fragment: ADR 14)."""
        self._requesters.charge(ticket.requester, refusals * REFUSAL_COST)


@dataclass(frozen=True)
class Ticket:
    """An admitted request: who sent it, from where, and what was taken for it."""

    requester: str
    peer: str
    #: served lately, so not held to the address's refusal budget
    proven: bool
    #: the request's cost, in single requests
    cost: float
    #: what was taken from the requester's budget at admission
    paid: float
