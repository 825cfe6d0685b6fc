"""Which nodes to ask, in what order, and when to hedge.

Pure bookkeeping (time is passed in): per-node latency (EWMA) and health. A
request goes to the ``threshold`` best nodes; another is added when one fails
or when the hedge delay, learnt from recent latencies, passes without enough
answers. Asking fewer nodes matters: a cancelled call still costs its node the
whole re-encryption.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# Statuses that say a node is unwell, as opposed to a judgement about the request.
NODE_FAULTS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "DATA_LOSS"})

MIN_HEDGE_S = 0.002
EWMA_WEIGHT = 0.2
BASE_COOLDOWN_S = 0.5
MAX_COOLDOWN_S = 30.0


@dataclass
class NodeHealth:
    latency_s: float | None = None
    consecutive_faults: int = 0
    cooldown_until: float = 0.0


class NodePool:
    def __init__(self, node_ids: Sequence[str], *, max_hedge_s: float, window: int = 256) -> None:
        self.node_ids = list(node_ids)
        self.health = {n: NodeHealth() for n in node_ids}
        self._recent: deque[float] = deque(maxlen=window)
        self._max_hedge_s = max_hedge_s

    def plan(self, now: float) -> list[str]:
        """All nodes, best first: healthy ones by latency (unknown first, to learn
        it), then those cooling down after faults, soonest-recovered first."""
        order = self.node_ids[:]
        random.shuffle(order)  # spreads load between equally good nodes

        def rank(node_id: str) -> tuple[int, float]:
            h = self.health[node_id]
            if h.cooldown_until > now:
                return (1, h.cooldown_until)
            return (0, -1.0 if h.latency_s is None else h.latency_s)

        return sorted(order, key=rank)

    def hedge_delay(self) -> float:
        """Wait this long for answers before asking one more node: a little over the
        95th percentile of recent successful calls."""
        if len(self._recent) < 8:
            return self._max_hedge_s
        ordered = sorted(self._recent)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return min(self._max_hedge_s, max(MIN_HEDGE_S, 1.5 * p95))

    def succeeded(self, node_id: str, latency_s: float) -> None:
        h = self.health[node_id]
        h.latency_s = (
            latency_s
            if h.latency_s is None
            else ((1 - EWMA_WEIGHT) * h.latency_s + EWMA_WEIGHT * latency_s)
        )
        h.consecutive_faults = 0
        h.cooldown_until = 0.0
        self._recent.append(latency_s)

    def answered(self, node_id: str, latency_s: float, status: str, now: float) -> None:
        """A call ended with an error ``status``; faults put the node in cooldown."""
        if status not in NODE_FAULTS:
            self.succeeded(node_id, latency_s)  # a refusal is a healthy answer
            return
        h = self.health[node_id]
        h.consecutive_faults += 1
        backoff = BASE_COOLDOWN_S * 2 ** (h.consecutive_faults - 1)
        h.cooldown_until = now + min(MAX_COOLDOWN_S, backoff)
