"""Fan-out: ask the best nodes for a read's capsule fragments, replace failed ones
and hedge slow ones, until every capsule has ``threshold`` fragments or cannot get
them (ADR 3). Fragments are verified here only where the collection says so: all of
them (``verify_every_fragment``), or those of suspected nodes (ADR 14).

A read is one or more capsules under one signature; a single request is a batch of
one, its node answers taken as answers to that batch (:func:`as_batch_response`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

import grpc
import structlog

from coordinator import metrics
from coordinator.cfrag_verifier import CfragVerifier
from coordinator.node_connections import NodeClient, RoundRobin
from coordinator.node_pool import NODE_FAULTS, NodePool, Rotation
from coordinator.threshold import FragmentCollector
from core.errors import KmsError
from proto import rpc
from proto.kms.v1 import common_pb2, node_pb2

log = structlog.get_logger("medkms.coordinator")

BAD_CFRAG = "returned a capsule fragment that does not verify"


class ShareCollection:
    """The capsule fragments for each capsule of one read, as the nodes answer: each
    verified if ``verify`` says so for its node, and counted toward its capsule's
    threshold."""

    def __init__(
        self,
        needed: Mapping[bytes, int],
        node_ids: Sequence[str],
        verifiers: Mapping[bytes, CfragVerifier],
        verify: Callable[[str], bool],
        lied: Callable[[str, bytes], None],
    ) -> None:
        """``needed`` and ``verifiers``: how many fragments, and how to check them, for
        each capsule asked for, by record id; ``node_ids``: the nodes that may be asked;
        ``lied``: told of each fragment found not to verify (node id, record id)."""
        self.collectors = {r: FragmentCollector(needed[r], node_ids) for r in verifiers}
        self._verifiers = verifiers
        self._verify = verify
        self._lied = lied
        #: (record id, node id) -> the audit receipt that came with the fragment
        self._receipts: dict[tuple[bytes, str], common_pb2.AuditReceipt] = {}
        #: every node sent the request, answered or not
        self.asked: set[str] = set()

    def _open(self) -> list[FragmentCollector]:
        return [c for c in self.collectors.values() if not (c.complete or c.hopeless)]

    @property
    def finished(self) -> bool:
        return not self._open()

    def more_needed(self, in_flight: int) -> int:
        return max((c.threshold - len(c.valid) - in_flight for c in self._open()), default=0)

    def take(self, node_id: str, response: node_pb2.ReencryptBatchResponse) -> None:
        answered = set()
        verify = self._verify(node_id)
        for outcome in response.outcomes:
            record_id = bytes(outcome.record_id)
            collector = self.collectors.get(record_id)
            if collector is None or record_id in answered:
                continue  # not asked for, or repeated: ignore rather than trust
            answered.add(record_id)
            cfrag = bytes(outcome.fragment.cfrag)
            if outcome.status:
                collector.reject(node_id, outcome.status, outcome.reason)
            elif not verify or self._verifiers[record_id].check(cfrag):
                collector.accept(node_id, cfrag)
                self._receipts[(record_id, node_id)] = outcome.fragment.receipt
            else:
                collector.reject(node_id, "DATA_LOSS", BAD_CFRAG)
                self._lied(node_id, record_id)
        for record_id, collector in self.collectors.items():
            if record_id not in answered:
                collector.reject(node_id, "DATA_LOSS", "answered without this capsule")

    def fail(self, node_id: str, status: str, message: str) -> None:
        for collector in self.collectors.values():
            collector.reject(node_id, status, message)

    def valid(self, record_id: bytes) -> list[common_pb2.CapsuleFragment]:
        """Every valid fragment of the capsule so far, in arrival order, threshold or not."""
        return [
            common_pb2.CapsuleFragment(node_id=n, cfrag=c, receipt=self._receipts[(record_id, n)])
            for n, c in self.collectors[record_id].valid.items()
        ]

    def outcome(self, record_id: bytes) -> list[common_pb2.CapsuleFragment] | KmsError:
        """The capsule's first ``threshold`` valid fragments, or why there are not as many."""
        collector = self.collectors[record_id]
        if not collector.complete:
            return collector.error()
        return [
            common_pb2.CapsuleFragment(node_id=n, cfrag=c, receipt=self._receipts[(record_id, n)])
            for n, c in collector.fragments()
        ]


def as_batch_response(
    record_id: bytes, response: node_pb2.ReencryptResponse
) -> node_pb2.ReencryptBatchResponse:
    """A node's answer to a single request, as its answer to the batch of one it is."""
    return node_pb2.ReencryptBatchResponse(
        outcomes=[common_pb2.CapsuleOutcome(record_id=record_id, fragment=response.fragment)]
    )


async def fan_out(
    pool: NodePool,
    nodes: Mapping[str, RoundRobin],
    call: Callable[[NodeClient], Awaitable[node_pb2.ReencryptBatchResponse]],
    collection: ShareCollection,
    exclude: Collection[str] = (),
    last: Collection[str] = (),
) -> None:
    """Ask nodes but ``exclude``, best first (``last`` after every other:
    :meth:`NodePool.plan`), until the collection is finished or no node is left.

    Starts with as many nodes as the threshold needs; asks one more whenever a
    node fails, and when the hedge delay passes without an answer.
    """
    loop = asyncio.get_running_loop()
    queue = iter(pool.plan(time.monotonic(), exclude, last))
    tasks: dict[asyncio.Future[node_pb2.ReencryptBatchResponse], tuple[str, float]] = {}

    def launch(count: int) -> None:
        for _ in range(count):
            node_id = next(queue, None)
            if node_id is None:
                return
            client = nodes[node_id].next()
            collection.asked.add(node_id)
            tasks[asyncio.ensure_future(call(client))] = (node_id, loop.time())

    launch(collection.more_needed(0))
    hedge_delay = pool.hedge_delay()
    try:
        while tasks and not collection.finished:
            done, _ = await asyncio.wait(
                tasks, timeout=hedge_delay, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                metrics.HEDGES.inc()
                launch(1)  # hedge: a slow node should not hold the request up
                continue
            for task in done:
                node_id, started = tasks.pop(task)
                latency = loop.time() - started
                try:
                    response = task.result()
                except grpc.RpcError as e:
                    error = rpc.error_from_rpc(e)
                    if error.grpc_status in NODE_FAULTS:
                        status = error.grpc_status.lower()
                        metrics.NODE_FAULTS_TOTAL.labels(node=node_id, status=status).inc()
                    else:
                        metrics.node_call_seconds(node_id).observe(latency)
                    change = pool.answered(node_id, latency, error.grpc_status, time.monotonic())
                    rotation_changed(node_id, change)
                    collection.fail(node_id, error.grpc_status, error.message)
                    continue
                metrics.node_call_seconds(node_id).observe(latency)
                rotation_changed(node_id, pool.succeeded(node_id, latency, time.monotonic()))
                collection.take(node_id, response)
            launch(collection.more_needed(len(tasks)))
    finally:
        # Cancelling saves us waiting, not the node's work: that is why only as
        # many nodes as needed are asked. A node still silent after the hedge delay
        # was served around: it counts against the node (a hung node never answers).
        now = loop.time()
        for task, (node_id, started) in tasks.items():
            task.cancel()
            if now - started >= hedge_delay:
                metrics.NODE_ABANDONED.labels(node=node_id).inc()
            change = pool.abandoned(node_id, now - started, hedge_delay, time.monotonic())
            rotation_changed(node_id, change)


def rotation_changed(node_id: str, change: Rotation | None) -> None:
    if change is Rotation.OUT:
        metrics.NODE_IN_ROTATION.labels(node=node_id).set(0)
        log.warning("node_out_of_rotation", node_id=node_id)
    elif change is Rotation.BACK:
        metrics.NODE_IN_ROTATION.labels(node=node_id).set(1)
        log.info("node_back_in_rotation", node_id=node_id)
