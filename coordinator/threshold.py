"""Threshold bookkeeping for one request: which nodes answered what.

Pure: the service feeds in each node's outcome; this says when the threshold
is met, when it can no longer be met, and what to tell the caller then.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import InsufficientFragments, KmsError, error_for_status

# Statuses that are a node's considered answer about the request itself, as
# opposed to the node being unreachable or broken.
DECISION_STATUSES = (
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "FAILED_PRECONDITION",
)


@dataclass(frozen=True)
class NodeFailure:
    node_id: str
    status: str
    message: str


class FragmentCollector:
    def __init__(self, threshold: int, node_ids: Sequence[str]) -> None:
        if not 1 <= threshold <= len(node_ids):
            raise ValueError("threshold must be between 1 and the number of nodes")
        self.threshold = threshold
        self._pending = set(node_ids)
        self._order = list(node_ids)
        self.valid: dict[str, bytes] = {}
        self.failures: list[NodeFailure] = []

    def accept(self, node_id: str, cfrag: bytes) -> None:
        self._pending.discard(node_id)
        self.valid[node_id] = cfrag

    def reject(self, node_id: str, status: str, message: str) -> None:
        self._pending.discard(node_id)
        self.failures.append(NodeFailure(node_id, status, message))

    @property
    def complete(self) -> bool:
        return len(self.valid) >= self.threshold

    @property
    def hopeless(self) -> bool:
        return len(self.valid) + len(self._pending) < self.threshold

    def fragments(self) -> list[tuple[str, bytes]]:
        """The first ``threshold`` valid fragments, in arrival order."""
        return list(self.valid.items())[: self.threshold]

    def error(self) -> KmsError:
        """Why the threshold was not reached, naming the nodes that failed."""
        have = f"{len(self.valid)} of {self.threshold} required capsule fragments"
        decisions = [f for f in self.failures if f.status in DECISION_STATUSES]
        if decisions:
            status, _ = Counter(f.status for f in decisions).most_common(1)[0]
            same = [f for f in decisions if f.status == status]
            names = ", ".join(f.node_id for f in same)
            return error_for_status(status, f"refused by {names}: {same[0].message} ({have})")
        failed = "; ".join(f"{f.node_id} ({f.status}: {f.message})" for f in self.failures)
        silent = [n for n in self._order if n in self._pending]
        if silent:
            why = "not awaited: threshold out of reach" if self.hopeless else "no answer in time"
            failed += ("; " if failed else "") + ", ".join(silent) + f" ({why})"
        return InsufficientFragments(f"only {have}; failed: {failed}")
