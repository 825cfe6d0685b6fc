"""What the auditor reads: a node's log (:class:`LogSource`) and the registry
(:class:`ChainView`). The auditor's adapter (clients/audit/auditor.py) implements both over
gRPC and JSON-RPC, raising only :class:`~core.errors.KmsError`, which the checks turn into
findings; a node's ``AuditLog`` is a log source in process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from core.audit import Checkpoint
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
