"""What the auditor reads: a node's log (:class:`LogSource`) and the registry
(:class:`ChainView`). The auditor's adapter (clients/audit/auditor.py) implements both over
gRPC and JSON-RPC, raising only :class:`~core.errors.KmsError`, which the checks turn into
findings; a node's ``AuditLog`` is a log source in process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from core.audit import MAX_ENTRIES_PER_CALL, MAX_ENTRY_BYTES, Checkpoint
from core.errors import ChainUnavailable, KmsError
from core.registry_types import AccessState, BlockRef, CheckpointAnchor

#: gRPC statuses (by name, as :class:`~core.errors.KmsError` carries them) of a call that
#: failed on the way, not by the answer: a deadline, a dropped or refused connection, a
#: limit or a cancellation
_IN_TRANSIT_STATUSES: Final = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED"}
)


def failed_in_transit(error: BaseException) -> bool:
    """Whether ``error`` is a transport failure (of a node's gRPC service or of the chain's
    JSON-RPC endpoint): no evidence of tampering, only that the read did not complete."""
    if isinstance(error, ChainUnavailable | ConnectionError | TimeoutError):
        return True
    return isinstance(error, KmsError) and error.grpc_status in _IN_TRANSIT_STATUSES


@dataclass(frozen=True)
class ReadPolicy:
    """How a log source reads a node's log: in pages of about ``page_bytes``, each with a
    deadline of ``deadline_s`` plus its bytes at ``bytes_per_s`` (one deadline for a whole
    10,000-entry page failed intact nodes), and up to ``retries`` more attempts at a page
    that failed in transit, each resuming after the last entry received."""

    page_bytes: int = 1 << 20
    #: the deadline of any call; a page's adds its bytes at ``bytes_per_s``
    deadline_s: float = 10.0
    bytes_per_s: float = 256 * 1024
    retries: int = 4
    #: wait before the first retry, doubled for each next one
    backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if self.page_bytes < 1 or self.deadline_s <= 0 or self.bytes_per_s <= 0:
            raise ValueError("page_bytes, deadline_s and bytes_per_s must be positive")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must not be negative")

    def page_entries(self, entry_bytes: float | None) -> int:
        """How many entries make a page, given the mean size of those read so far (None:
        none yet, so assume the largest an entry may be)."""
        size = entry_bytes if entry_bytes else MAX_ENTRY_BYTES
        return max(1, min(MAX_ENTRIES_PER_CALL, int(self.page_bytes // size)))

    def page_deadline_s(self, entries: int, entry_bytes: float | None) -> float:
        """The deadline of a page of ``entries``, at the mean size read so far."""
        size = entry_bytes if entry_bytes else MAX_ENTRY_BYTES
        return self.deadline_s + entries * size / self.bytes_per_s

    def backoff(self, attempt: int) -> float:
        """The wait before retry ``attempt`` (1, 2, ...)."""
        return float(self.backoff_s * 2 ** (attempt - 1))


#: the auditor's policy unless told otherwise
DEFAULT_READ_POLICY: Final = ReadPolicy()


class LogSource(Protocol):
    """One node's audit service (the node's ``AuditLog`` is one, in process). Implementations
    raise only :class:`~core.errors.KmsError`."""

    def checkpoint(self) -> Checkpoint: ...

    def entries(self, start: int, end: int, /) -> Iterable[tuple[int, bytes]]:
        """``(leaf_index, canonical entry bytes)`` rows for ``[start, end)`` as served."""
        ...

    def inclusion_proof(self, leaf_index: int, tree_size: int, /) -> Sequence[bytes]: ...

    def consistency_proof(self, old_size: int, new_size: int, /) -> Sequence[bytes]: ...


class ChainView(Protocol):
    """What the auditor reads from the registry (``RegistryClient`` is one)."""

    def checkpoint_anchors(self, node_id: str, /) -> Sequence[CheckpointAnchor]: ...

    def block(self, number: int, /) -> BlockRef: ...

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int
    ) -> AccessState: ...
