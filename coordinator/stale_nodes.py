"""Nodes found to hold an earlier kfrag set of a grant, asked last for that grant's reads.

When a read's fragments verify but do not combine, the coordinator finds the kfrag set
``m`` nodes agree on, and names the nodes of any other set stale (ADR 14, amended): they
missed the patient's last enrollment (a re-grant while they were down), or replay an
earlier set. They are not suspected, since they serve every other grant; but for this
grant (this patient's kfrags for this requester) their fragments cannot combine with
the others', so asking them first costs each read a retry. This remembers them per
grant, for :data:`AVOID_S` or until the patient enrolls that node again through this
coordinator, and the fan-out asks them only when the other nodes are not enough.

Pure bookkeeping, time passed in; bounded to :data:`MAX_GRANTS` grants, oldest dropped.
Only the coordinator's own finding marks a node (its check of the fragments it kept
and the count of nodes agreeing), never an app's word.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

#: how long a node found stale for a grant is asked last for that grant's reads
AVOID_S: Final = 600.0
#: grants remembered at most (a few hundred bytes each), the oldest dropped first
MAX_GRANTS: Final = 10_000

Grant = tuple[str, str]  # (patient, requester), EIP-55 addresses


class StaleNodes:
    def __init__(self, avoid_s: float = AVOID_S, max_grants: int = MAX_GRANTS) -> None:
        self._avoid_s = avoid_s
        self._max_grants = max_grants
        #: grant -> node id -> until when it is asked last
        self._grants: OrderedDict[Grant, dict[str, float]] = OrderedDict()

    def mark(self, patient: str, requester: str, node_id: str, now: float) -> None:
        """``node_id``'s fragment for this grant was of another set than ``m`` nodes'."""
        nodes = self._grants.pop((patient, requester), {})
        nodes[node_id] = now + self._avoid_s
        self._grants[(patient, requester)] = nodes  # the newest
        while len(self._grants) > self._max_grants:
            self._grants.popitem(last=False)

    def avoided(self, patient: str, requester: str, now: float) -> frozenset[str]:
        """The nodes to ask last for this grant's reads now."""
        nodes = self._grants.get((patient, requester))
        if not nodes:
            return frozenset()
        for node_id in [n for n, until in nodes.items() if until <= now]:
            del nodes[node_id]
        if not nodes:
            del self._grants[(patient, requester)]
        return frozenset(nodes)

    def forget(self, patient: str, grantee: str, node_id: str) -> None:
        """The patient enrolled ``node_id`` again for ``grantee``: it holds her kfrags."""
        nodes = self._grants.get((patient, grantee))
        if nodes is not None:
            nodes.pop(node_id, None)
            if not nodes:
                del self._grants[(patient, grantee)]

    def __len__(self) -> int:
        return len(self._grants)
