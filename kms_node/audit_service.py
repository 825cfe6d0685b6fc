"""The node's Audit service: checkpoints, entries and RFC 9162 proofs for auditors.

Read-only over the node's audit log; the same log every decision is appended to.
"""

from __future__ import annotations

from core.audit import MAX_ENTRIES_PER_CALL
from core.errors import InvalidRequest
from kms_node.audit_log import AuditLog
from proto import rpc
from proto.kms.v1 import audit_pb2


class AuditService:
    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def rpc_methods(self) -> list[rpc.Method]:
        """The ``kms.v1.Audit`` service's methods (synchronous: the node runs them in its
        pool, kms_node/loop_service.py ``LoopNodeService.in_pool_methods``)."""
        return [
            rpc.Method(
                "GetCheckpoint", audit_pb2.GetCheckpointRequest, lambda m, _c: self.checkpoint(m)
            ),
            rpc.Method(
                "GetEntries", audit_pb2.GetEntriesRequest, lambda m, _c: self.entries(m), True
            ),
            rpc.Method(
                "GetInclusionProof",
                audit_pb2.InclusionProofRequest,
                lambda m, _c: self.inclusion_proof(m),
            ),
            rpc.Method(
                "GetConsistencyProof",
                audit_pb2.ConsistencyProofRequest,
                lambda m, _c: self.consistency_proof(m),
            ),
        ]

    def checkpoint(self, _msg: audit_pb2.GetCheckpointRequest) -> audit_pb2.SignedCheckpoint:
        cp = self._log.checkpoint()
        return audit_pb2.SignedCheckpoint(
            node_id=cp.node_id,
            tree_size=cp.tree_size,
            root=cp.root,
            timestamp=cp.timestamp,
            signature=cp.signature,
        )

    def entries(self, msg: audit_pb2.GetEntriesRequest) -> list[audit_pb2.AuditLogEntry]:
        if msg.end < msg.start:
            raise InvalidRequest("end must not be below start")
        if msg.end - msg.start > MAX_ENTRIES_PER_CALL:
            raise InvalidRequest(f"at most {MAX_ENTRIES_PER_CALL} entries per call")
        return [
            audit_pb2.AuditLogEntry(leaf_index=index, entry=data)
            for index, data in self._log.entries(msg.start, msg.end)
        ]

    def inclusion_proof(self, msg: audit_pb2.InclusionProofRequest) -> audit_pb2.InclusionProof:
        hashes = self._log.inclusion_proof(msg.leaf_index, msg.tree_size)
        return audit_pb2.InclusionProof(
            leaf_index=msg.leaf_index, tree_size=msg.tree_size, hashes=hashes
        )

    def consistency_proof(
        self, msg: audit_pb2.ConsistencyProofRequest
    ) -> audit_pb2.ConsistencyProof:
        hashes = self._log.consistency_proof(msg.old_size, msg.new_size)
        return audit_pb2.ConsistencyProof(
            old_size=msg.old_size, new_size=msg.new_size, hashes=hashes
        )
