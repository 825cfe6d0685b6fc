"""The auditor's adapter: reads each node's log over gRPC and the registry through its read
interface (:class:`~core.registry_interface.RegistryReader`: the web3 client, or a test's
twin), and runs :func:`core.audit_verify.verify_node` on them.

The trust roots are the chain endpoint and the registry's address: the nodes to audit, their
endpoints and their signing keys are read from the registry, never from the nodes. gRPC
failures become :class:`~core.errors.KmsError` here (``rpc.error_from_rpc``), so the
core sees only those.

How a node is reached is the caller's :data:`ChannelFactory`; :func:`channel_factory` makes
the usual one from a :class:`~proto.transport.Transport` (mutual TLS with the
operator's certificate, the node's id pinned as the TLS name).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc

from clients.audit.replayed_state import ReplayedState
from core.audit import Checkpoint, Receipt
from core.audit_findings import Check, NodeReport, Problem, Verdict, VerifiedPrefix
from core.audit_sources import DEFAULT_READ_POLICY, LogSource, ReadPolicy, failed_in_transit
from core.audit_verify import verify_node
from core.errors import InvalidRequest, KmsError
from core.event_ranges import EventLog
from core.registry_interface import RegistryReader
from core.registry_types import AccessState, BlockRef, CheckpointAnchor, NodeInfo
from proto import rpc
from proto.kms.v1 import audit_pb2
from proto.stubs import AuditStub
from proto.transport import Transport

_Reply = TypeVar("_Reply")

#: told, as a node's entries are read: (node id, entries read, entries to read)
ReadProgress = Callable[[str, int, int], None]

ChannelFactory = Callable[[NodeInfo], grpc.Channel]


def channel_factory(transport: Transport) -> ChannelFactory:
    """Channels to nodes at their registered endpoints, each checked to be the node it
    claims (its id is a name in its TLS certificate)."""

    def open_channel(node: NodeInfo) -> grpc.Channel:
        return transport.channel(node.endpoint, server_name=node.node_id)

    return open_channel


class GrpcLogSource:
    """One node's ``kms.v1.Audit`` service as a :class:`~core.audit_sources.LogSource`,
    read as ``policy`` says: entries in pages of about ``policy.page_bytes`` (sized by the
    mean entry read so far), each call with its own deadline, and a call that fails in
    transit retried (a page resumes after the last entry received: none is yielded twice
    or skipped; ``policy.retries`` counts attempts in a row that received nothing).

    A node serves every entry of a page below its checkpoint's size: a page that ends
    short without an error ends the reading (the checks name the rest as missing, once),
    so a checkpoint claiming 2^63 entries does not make the auditor ask page after empty
    page."""

    def __init__(
        self,
        channel: grpc.Channel,
        node_id: str,
        *,
        policy: ReadPolicy = DEFAULT_READ_POLICY,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._stub = AuditStub(channel)
        self._node_id = node_id
        self._policy = policy
        self._sleep = sleep
        #: calls retried after a failure in transit
        self.retries = 0

    def _retry(self, error: KmsError, attempt: int) -> bool:
        """Whether to try again after ``attempt`` failed with ``error`` (then wait)."""
        if not failed_in_transit(error) or attempt > self._policy.retries:
            return False
        self.retries += 1
        self._sleep(self._policy.backoff(attempt))
        return True

    def _unary(self, method: Callable[..., _Reply], request: object) -> _Reply:
        attempt = 1
        while True:
            try:
                reply: _Reply = method(request, timeout=self._policy.deadline_s)
                return reply
            except grpc.RpcError as e:
                error = rpc.error_from_rpc(e, self._node_id)
            if not self._retry(error, attempt):
                raise error
            attempt += 1

    def checkpoint(self) -> Checkpoint:
        cp = self._unary(self._stub.GetCheckpoint, audit_pb2.GetCheckpointRequest())
        return Checkpoint(cp.node_id, cp.tree_size, cp.root, cp.timestamp, cp.signature)

    def entries(self, start: int, end: int, /) -> Iterator[tuple[int, bytes]]:
        policy = self._policy
        read_bytes = read_entries = 0
        page = start
        while page < end:
            mean = read_bytes / read_entries if read_entries else None
            page_end = min(end, page + policy.page_entries(mean))
            resume, attempt = page, 1
            while True:
                started_at = resume
                request = audit_pb2.GetEntriesRequest(start=resume, end=page_end)
                deadline = policy.page_deadline_s(page_end - resume, mean)
                rows = self._stub.GetEntries(request, timeout=deadline)
                try:
                    for row in rows:
                        # Resume after the last entry received (what the node serves is
                        # passed on as served: the checks name what is out of order).
                        resume = max(resume, min(row.leaf_index + 1, page_end))
                        read_bytes += len(row.entry)
                        read_entries += 1
                        yield row.leaf_index, row.entry
                    break
                except grpc.RpcError as e:
                    error = rpc.error_from_rpc(e, self._node_id)
                finally:
                    rows.cancel()  # the reader stopped early: the node streams no more
                # An attempt that received entries made progress: the link works, if
                # badly, and the next one is the first of a fresh count (the page is
                # finite, so this ends).
                attempt = 1 if resume > started_at else attempt
                if resume >= page_end or not self._retry(error, attempt):
                    raise error
                attempt += 1
            if resume < page_end:
                return  # the page ended short: the node serves nothing more
            page = page_end

    def inclusion_proof(self, leaf_index: int, tree_size: int, /) -> list[bytes]:
        request = audit_pb2.InclusionProofRequest(leaf_index=leaf_index, tree_size=tree_size)
        return list(self._unary(self._stub.GetInclusionProof, request).hashes)

    def consistency_proof(self, old_size: int, new_size: int, /) -> list[bytes]:
        request = audit_pb2.ConsistencyProofRequest(old_size=old_size, new_size=new_size)
        return list(self._unary(self._stub.GetConsistencyProof, request).hashes)


class _Counted:
    """A log source that tells ``progress`` of each entry read."""

    def __init__(self, source: LogSource, node_id: str, progress: ReadProgress) -> None:
        self._source, self._node_id, self._progress = source, node_id, progress
        self.checkpoint = source.checkpoint
        self.inclusion_proof = source.inclusion_proof
        self.consistency_proof = source.consistency_proof

    def entries(self, start: int, end: int, /) -> Iterator[tuple[int, bytes]]:
        total = max(0, end - start)
        self._progress(self._node_id, 0, total)
        for read, row in enumerate(self._source.entries(start, end), 1):
            self._progress(self._node_id, read, total)
            yield row


class CachedChain:
    """The registry as a :class:`~core.audit_sources.ChainView`, with the blocks and
    grant states read during one audit kept: one request is decided by several nodes,
    mostly at the same block. Failures are not kept. Thread-safe.

    Grant states are the registry's ``accessState`` at each block (historical calls: an
    archive node), or, given ``replayed``, rebuilt from the registry's events (any node)."""

    def __init__(self, registry: RegistryReader, replayed: ReplayedState | None = None) -> None:
        self._registry = registry
        self._replayed = replayed
        self._lock = threading.Lock()
        self._blocks: dict[int, BlockRef] = {}
        self._states: dict[tuple[bytes, str, bytes, int], AccessState] = {}
        self.reads = 0

    def checkpoint_anchors(self, node_id: str, /) -> list[CheckpointAnchor]:
        return self._registry.checkpoint_anchors(node_id)

    def block(self, number: int, /) -> BlockRef:
        with self._lock:
            cached = self._blocks.get(number)
        if cached is None:
            cached = self._registry.block(number)
            with self._lock:
                self._blocks[number] = cached
                self.reads += 1
        return cached

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int
    ) -> AccessState:
        key = (record_id, grantee, capsule_hash, block)
        with self._lock:
            cached = self._states.get(key)
        if cached is None:
            if self._replayed is not None:
                at = self.block(block)
                cached = self._replayed.access_state(record_id, grantee, capsule_hash, at=at)
                read = 0  # replayed here, not read from the chain
            else:
                cached = self._registry.access_state(record_id, grantee, capsule_hash, block=block)
                read = 1
            with self._lock:
                self._states[key] = cached
                self.reads += read
        return cached


@dataclass(frozen=True)
class ClusterReport:
    """Every audited node's report, in registry order."""

    registry_address: str
    #: the latest block when the audit started
    block: int
    nodes: tuple[NodeReport, ...]
    #: wall time of the whole audit, and of each node's
    seconds: float
    node_seconds: dict[str, float]
    #: distinct blocks and grant states read from the chain
    chain_reads: int

    @property
    def ok(self) -> bool:
        return all(n.ok for n in self.nodes)

    @property
    def verdict(self) -> Verdict:
        """Failed if any node failed; else could not read if any node could not be read."""
        verdicts = {n.verdict for n in self.nodes}
        for verdict in (Verdict.FAILED, Verdict.COULD_NOT_READ):
            if verdict in verdicts:
                return verdict
        return Verdict.PASSED

    @property
    def entries(self) -> int:
        return sum(len(n.entries) for n in self.nodes)


def audit_cluster(
    registry: RegistryReader,
    channel_for: ChannelFactory,
    *,
    node_ids: Sequence[str] = (),
    receipts: Sequence[Receipt] = (),
    rejudge_decisions: bool = True,
    since: Mapping[str, VerifiedPrefix] | None = None,
    events: EventLog | None = None,
    start_block: int = 0,
    policy: ReadPolicy = DEFAULT_READ_POLICY,
    progress: ReadProgress | None = None,
) -> ClusterReport:
    """Audit every node registered on-chain (or those in ``node_ids``), in parallel;
    a node with a prefix in ``since`` (an earlier audit's ``NodeReport.verified``) from
    the end of that prefix on.

    Decisions are judged against the registry's state at each entry's block, read with
    historical calls (an archive node); given ``events`` (the registry client itself),
    against the state rebuilt from the registry's events since ``start_block`` (its
    deployment block), which any node can serve. ``policy`` says how each node's log is
    read (pages, deadlines, retries); ``progress``, if given, is told of every entry read
    (from the nodes' threads)."""
    started = time.perf_counter()
    block = registry.block("latest").number
    nodes = registry.list_nodes()
    if node_ids:
        known = {n.node_id for n in nodes}
        unknown = sorted(set(node_ids) - known)
        if unknown:
            raise InvalidRequest(f"not registered on-chain: {', '.join(unknown)}")
        nodes = [n for n in nodes if n.node_id in node_ids]
    replayed = (
        ReplayedState(events, start_block=start_block, through_block=block)
        if events is not None and rejudge_decisions
        else None
    )
    chain = CachedChain(registry, replayed)
    seconds: dict[str, float] = {}

    def audit(node: NodeInfo) -> NodeReport:
        began = time.perf_counter()
        channel = channel_for(node)
        source: LogSource = GrpcLogSource(channel, node.node_id, policy=policy)
        if progress is not None:
            source = _Counted(source, node.node_id, progress)
        try:
            return verify_node(
                node,
                source,
                chain,
                receipts=receipts,
                rejudge_decisions=rejudge_decisions,
                since=(since or {}).get(node.node_id),
            )
        except Exception as e:  # noqa: BLE001 - one node must not cost the others their reports
            # verify_node turns what a node or the chain serves into findings; this is for
            # what it did not foresee: that node fails (or, failing in transit, could not be
            # read), the others are still reported.
            stopped = f"the audit of this node stopped: unexpected {type(e).__name__}"
            if failed_in_transit(e):
                return NodeReport(node.node_id, None, (), 0, (), (), could_not_read=(stopped,))
            problem = Problem(Check.REACHABLE, stopped)
            return NodeReport(node.node_id, None, (), 0, (problem,), ())
        finally:
            channel.close()
            seconds[node.node_id] = time.perf_counter() - began

    with ThreadPoolExecutor(max_workers=max(1, min(len(nodes), 8))) as pool:
        reports = tuple(pool.map(audit, nodes))
    return ClusterReport(
        registry_address=registry.address,
        block=block,
        nodes=reports,
        seconds=time.perf_counter() - started,
        node_seconds=seconds,
        chain_reads=chain.reads,
    )
