"""The node's RPCs on an asyncio event loop (ADR 17).

A read is served in the loop's one thread from start to answer: parse, authenticate,
rate limit, judge by the local grant index, unwrap (HSM) and re-encrypt. Its audit
entries join those of every read served in the same pass of the loop, and one commit
(one transaction, one fsync, one HSM signature: kms_node/audit_log.py) makes the whole
group durable before any of them is answered.

The loop never waits on the network. A read whose judgement needs the chain (a refusal
to confirm, a record the index does not know yet, a block's hash) is judged again in a
bounded pool of threads, as are enrollments (chain reads) and the auditor's RPCs (pages
of the log): a slow or hostile chain endpoint then holds a pool thread, never the
loop. The loop does wait on local devices: the disk and the HSM, for the audit commit
as before.

Why one thread: umbral-pre, SQLite, the HSM binding and the signature checks each
release the GIL several times per request; with several server threads runnable,
each release handed the GIL to another thread, and those hand-offs cost more CPU
than the handler itself (issue 14's notes: perf, strace).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from core.audit import MAX_RECEIPT_BATCH, AuditEntry, Receipt
from core.errors import KmsError
from core.requests import ReencryptionQuery
from kms_node.service import AuditSink, JudgedRead, NeedsChain, NodeService, audit_entries
from proto import rpc
from proto.kms.v1 import common_pb2, node_pb2

T = TypeVar("T")
#: entries waiting for the loop pass's commit, and where their receipts go
_Waiting = tuple[Sequence[AuditEntry], "asyncio.Future[list[Receipt]]"]


class LoopCommitter:
    """Group commit on the event loop: the entries handed in during one pass of the loop
    are appended by one call of the sink, scheduled with ``call_soon`` to run once the
    pass is over. If that commit fails, every read of the group gets the error (audit
    fails closed)."""

    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink
        self._waiting: list[_Waiting] = []
        #: commits made and entries they held (for tests and the harness)
        self.commits = 0
        self.entries = 0

    async def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Receipt]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._commit_waiting)
        self._waiting.append((entries, done))
        return await done

    def _commit_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        group: list[_Waiting] = []
        size = 0
        for job in waiting:
            if group and size + len(job[0]) > MAX_RECEIPT_BATCH:
                self._commit(group)
                group, size = [], 0
            group.append(job)
            size += len(job[0])
        if group:
            self._commit(group)

    def _commit(self, group: list[_Waiting]) -> None:
        entries = [e for job, _ in group for e in job]
        try:
            receipts = self._sink.append_many(entries)
        except BaseException as e:  # noqa: BLE001 - handed to every read of the group
            for _, done in group:
                if not done.cancelled():
                    done.set_exception(e)
            return
        self.commits += 1
        self.entries += len(entries)
        offset = 0
        for job, done in group:
            if not done.cancelled():
                done.set_result(receipts[offset : offset + len(job)])
            offset += len(job)


class LoopNodeService:
    """The KmsNode service's RPCs as coroutines, for a ``grpc.aio`` server."""

    def __init__(self, service: NodeService, committer: LoopCommitter, pool: ThreadPoolExecutor):
        self._service = service
        self._committer = committer
        self._pool = pool

    def rpc_methods(self, on_enrolled: Callable[[], None]) -> list[rpc.Method]:
        """The ``kms.v1.KmsNode`` service's methods; ``on_enrolled`` runs (in the pool)
        after each enrollment accepted."""

        async def node_info(_msg: node_pb2.GetNodeInfoRequest, _ctx: object) -> node_pb2.NodeInfo:
            return self._service.node_info()

        def enroll_and_report(
            msg: common_pb2.EnrollKeyFragmentRequest,
        ) -> common_pb2.EnrollKeyFragmentResponse:
            response = self._service.enroll(msg)
            on_enrolled()
            return response

        async def enroll(
            msg: common_pb2.EnrollKeyFragmentRequest, _ctx: object
        ) -> common_pb2.EnrollKeyFragmentResponse:
            return await self.in_pool(enroll_and_report, msg)

        return [
            rpc.Method("GetNodeInfo", node_pb2.GetNodeInfoRequest, node_info),
            rpc.Method("EnrollKeyFragment", common_pb2.EnrollKeyFragmentRequest, enroll),
            rpc.Method("Reencrypt", common_pb2.ReencryptionRequest, self.reencrypt),
            rpc.Method("ReencryptBatch", common_pb2.ReencryptionBatchRequest, self.reencrypt_batch),
            rpc.Method("ReencryptMany", node_pb2.ReencryptManyRequest, self.reencrypt_many),
        ]

    async def in_pool(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in the pool, for what may block."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    async def reencrypt(
        self, msg: common_pb2.ReencryptionRequest, _ctx: object
    ) -> node_pb2.ReencryptResponse:
        judged = await self._judge(self._service.admit_single(msg))
        (receipts,) = await self._commit([judged])
        return self._service.single_response(judged, receipts)

    async def reencrypt_batch(
        self, msg: common_pb2.ReencryptionBatchRequest, _ctx: object
    ) -> node_pb2.ReencryptBatchResponse:
        judged = await self._judge(self._service.admit_batch(msg))
        (receipts,) = await self._commit([judged])
        return self._service.batch_response(judged, receipts)

    async def reencrypt_many(
        self, msg: node_pb2.ReencryptManyRequest, _ctx: object
    ) -> node_pb2.ReencryptManyResponse:
        judged: list[JudgedRead | KmsError] = []
        for read in self._service.admit_many(msg):
            if isinstance(read, KmsError):
                judged.append(read)
                continue
            try:
                judged.append(await self._judge(read))
            except KmsError as e:
                judged.append(e)
        served = [j for j in judged if isinstance(j, JudgedRead)]
        receipts = await self._commit(served) if served else []
        return self._service.many_response(msg, judged, receipts)

    async def _judge(self, queries: Sequence[ReencryptionQuery]) -> JudgedRead:
        """Judged in the loop, or in the pool if the judgement needs the chain."""
        try:
            return self._service.judge(queries, chain_ok=False)
        except NeedsChain:
            return await self.in_pool(self._service.judge, queries)

    async def _commit(self, reads: Sequence[JudgedRead]) -> list[Sequence[Receipt]]:
        receipts = await self._committer.append_many(audit_entries(reads))
        return self._service.settle(reads, receipts)


def in_pool_methods(methods: Sequence[rpc.Method], pool: ThreadPoolExecutor) -> list[rpc.Method]:
    """Synchronous RPC methods (the auditor's) as coroutines that run them in ``pool``."""

    def wrapped(method: rpc.Method) -> rpc.Method:
        async def handler(msg: Any, _ctx: Any) -> Any:
            loop = asyncio.get_running_loop()
            # The context belongs to the loop: the handlers given here take none.
            return await loop.run_in_executor(pool, method.handler, msg, None)

        return rpc.Method(method.name, method.request_type, handler, method.streaming)

    return [wrapped(m) for m in methods]
