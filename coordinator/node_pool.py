"""Which nodes to ask, in what order, and when to hedge.

Pure bookkeeping (time is passed in): per-node latency (EWMA) and health. A
request goes to the ``threshold`` best nodes; another is added when one fails
or when the hedge delay, learnt from recent latencies, passes without enough
answers. Asking fewer nodes matters: a cancelled call still costs its node the
whole re-encryption.

A node is taken out of rotation by a fault (an error status that says it is
unwell, a timeout) and equally by a call that was hedged around and abandoned
unanswered: a hung node (SIGSTOPped, wedged) never answers at all, so without
that it would be asked first on every request for as long as it hangs. Out of
rotation it is asked only when the healthy nodes are not enough, for a cooldown
that doubles with each consecutive strike. When the cooldown ends it is half-open:
exactly one request probes it (others keep passing it over) and its answer puts
it back in rotation, with the latency just measured, or out again for longer.

A node found to have sent a fragment that does not verify (an app reported it and the
coordinator checked, or the coordinator checked it before relaying: ADR 14) is
suspected for ``SUSPICION_S``, doubled with each lie it is caught in: out of rotation
as above, and every fragment it sends meanwhile is verified before it is relayed.
After that it is probed back like a faulted node.

A latency learnt more than ``LATENCY_STALE_S`` ago is refreshed: one request asks that
node first among the healthy ones. Without it, the nodes outside the fastest
``threshold`` would never be asked while all is well: a node that answered one probe
slowly would stay passed over, and a node that hung while passed over would show as in
rotation for as long as it hangs.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

# Statuses that say a node is unwell, as opposed to a judgement about the request.
NODE_FAULTS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS"})

MIN_HEDGE_S = 0.002
EWMA_WEIGHT = 0.2
BASE_COOLDOWN_S = 0.5
MAX_COOLDOWN_S = 30.0
#: how long a node caught lying is suspected; doubled for each further lie
SUSPICION_S = 60.0
MAX_SUSPICION_S = 3600.0
#: how old a node's latency may be before a request asks it again to refresh it
LATENCY_STALE_S = 5.0


class Rotation(Enum):
    """A change in whether the pool sends a node its share of requests."""

    OUT = "out"  # faulted, hung or caught lying: passed over until its cooldown ends
    BACK = "back"  # answered its probe: in rotation again


@dataclass
class NodeHealth:
    latency_s: float | None = None
    #: when its latency was last measured
    measured_at: float = 0.0
    #: when its latency was last measured, or a request last planned to refresh it
    checked_at: float = 0.0
    consecutive_faults: int = 0
    cooldown_until: float = 0.0
    #: a request is probing this node after its cooldown; others pass it over
    probing: bool = False
    #: fragments it was caught sending that do not verify, ever
    lies: int = 0
    suspect_until: float = 0.0
    #: taken out for a lie and not yet back (its probe answers after the suspicion)
    demoted: bool = False

    def out_of_rotation(self, now: float) -> bool:
        return self.cooldown_until > now or self.probing or self.suspect_until > now


class NodePool:
    def __init__(self, node_ids: Sequence[str], *, max_hedge_s: float, window: int = 256) -> None:
        self.node_ids = list(node_ids)
        self.health = {n: NodeHealth() for n in node_ids}
        self._recent: deque[float] = deque(maxlen=window)
        #: the same latencies, kept sorted (a read's hedge delay needs their 95th
        #: percentile; sorting them on every read cost more than keeping them sorted)
        self._ordered: list[float] = []
        self._max_hedge_s = max_hedge_s

    def plan(
        self, now: float, exclude: Collection[str] = (), last: Collection[str] = ()
    ) -> list[str]:
        """All nodes but ``exclude``, best first: one whose cooldown has just ended (its
        probe; it is marked so that concurrent requests pass it over until it answers),
        then healthy ones by latency (unknown first, to learn it), then those out of
        rotation, soonest-recovered first, then ``last`` (nodes that cannot serve this
        read's grant well: stale_nodes.py), which are neither probed nor refreshed by it."""
        order = [n for n in self.node_ids if n not in exclude]
        random.shuffle(order)  # spreads load between equally good nodes
        usual = [n for n in order if n not in last]
        probe = next((n for n in usual if self._due_for_probe(n, now)), None)
        if probe is not None:
            self.health[probe].probing = True
        refresh = next((n for n in usual if self._due_for_refresh(n, now)), None)
        if refresh is not None:
            self.health[refresh].checked_at = now  # the next request leaves it be

        def rank(node_id: str) -> tuple[int, float]:
            h = self.health[node_id]
            if node_id in last:
                return (3, 0.0)
            if node_id == probe:
                return (0, 0.0)
            if h.out_of_rotation(now):
                return (2, max(h.cooldown_until, h.suspect_until))
            if h.latency_s is None or node_id == refresh:
                return (1, -1.0)  # to learn its latency
            return (1, h.latency_s)

        return sorted(order, key=rank)

    def _due_for_probe(self, node_id: str, now: float) -> bool:
        h = self.health[node_id]
        return (
            (h.consecutive_faults > 0 or h.demoted)
            and not h.probing
            and max(h.cooldown_until, h.suspect_until) <= now
        )

    def _due_for_refresh(self, node_id: str, now: float) -> bool:
        h = self.health[node_id]
        return (
            h.latency_s is not None
            and not h.out_of_rotation(now)
            and now - h.checked_at > LATENCY_STALE_S
        )

    def suspect(self, node_id: str, now: float) -> bool:
        """Whether the node's fragments are to be verified before they are relayed."""
        return self.health[node_id].suspect_until > now

    def in_rotation(self, now: float) -> list[str]:
        """The nodes a request is sent to when all is well (for metrics and logs)."""
        return [n for n in self.node_ids if not self.health[n].out_of_rotation(now)]

    def hedge_delay(self) -> float:
        """Wait this long for answers before asking one more node: a little over the
        95th percentile of recent successful calls."""
        if len(self._recent) < 8:
            return self._max_hedge_s
        ordered = self._ordered
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return min(self._max_hedge_s, max(MIN_HEDGE_S, 1.5 * p95))

    def succeeded(self, node_id: str, latency_s: float, now: float) -> Rotation | None:
        h = self.health[node_id]
        if h.suspect_until > now:  # answered while suspected: it stays out
            h.probing = False
            return None
        back = h.consecutive_faults > 0 or h.demoted
        h.demoted = False
        h.latency_s = (
            # Back from a strike, or not asked for a while: judged on what it does now.
            latency_s
            if h.latency_s is None or back or now - h.measured_at > LATENCY_STALE_S
            else ((1 - EWMA_WEIGHT) * h.latency_s + EWMA_WEIGHT * latency_s)
        )
        h.measured_at = h.checked_at = now
        h.consecutive_faults = 0
        h.cooldown_until = 0.0
        h.probing = False
        if len(self._recent) == self._recent.maxlen:
            del self._ordered[bisect.bisect_left(self._ordered, self._recent[0])]
        self._recent.append(latency_s)
        bisect.insort(self._ordered, latency_s)
        return Rotation.BACK if back else None

    def answered(self, node_id: str, latency_s: float, status: str, now: float) -> Rotation | None:
        """A call ended with an error ``status``; faults take the node out of rotation."""
        if status not in NODE_FAULTS:
            return self.succeeded(node_id, latency_s, now)  # a refusal is a healthy answer
        return self._strike(node_id, now)

    def abandoned(
        self, node_id: str, waited_s: float, hedge_delay_s: float, now: float
    ) -> Rotation | None:
        """A call was still unanswered when its request finished. Having waited longer
        than the hedge delay, the request was served around the node: that is a strike,
        as a fault is. A call abandoned sooner (a hedge the request did not need after
        all) says nothing about the node."""
        if waited_s < hedge_delay_s:
            self.health[node_id].probing = False  # unanswered probe: the next request asks
            return None
        return self._strike(node_id, now)

    def _strike(self, node_id: str, now: float) -> Rotation | None:
        h = self.health[node_id]
        was_in = not h.out_of_rotation(now)
        h.consecutive_faults += 1
        h.probing = False
        backoff = BASE_COOLDOWN_S * 2 ** (h.consecutive_faults - 1)
        h.cooldown_until = now + min(MAX_COOLDOWN_S, backoff)
        return Rotation.OUT if was_in else None

    def lied(self, node_id: str, now: float) -> Rotation | None:
        """The node sent a fragment that does not verify: suspected for ``SUSPICION_S``,
        doubled for each lie before (never forgotten)."""
        h = self.health[node_id]
        was_in = not h.out_of_rotation(now)
        h.lies += 1
        h.demoted = True
        h.probing = False
        h.suspect_until = now + min(MAX_SUSPICION_S, SUSPICION_S * 2 ** (h.lies - 1))
        return Rotation.OUT if was_in else None
