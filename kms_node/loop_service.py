"""The node's RPCs on an asyncio event loop (ADR 17).

A read is served in the loop's one thread from start to answer: parse, authenticate,
rate limit, judge by the local grant index, unwrap (HSM) and re-encrypt. Its audit
entries join those of the other reads served in the same pass of the loop (and, while
reads keep coming, of those that follow within ``MAX_HOLD_S``: ``LoopCommitter``), and
one commit (one transaction, one fsync, one HSM signature: kms_node/audit_log.py) makes
the whole group durable before any of them is answered.

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
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from core.audit import MAX_RECEIPT_BATCH, AuditEntry, Receipt
from core.errors import KmsError
from core.requests import ReencryptionQuery
from kms_node.service import AuditSink, JudgedRead, NeedsChain, NodeService, audit_entries
from proto import rpc
from proto.interceptors import Handler, HandlerWrapper
from proto.kms.v1 import common_pb2, node_pb2

T = TypeVar("T")
#: entries waiting for the loop pass's commit, and where their receipts go
_Waiting = tuple[Sequence[AuditEntry], "asyncio.Future[list[Receipt]]"]


#: longest the first read of a commit waits for other reads to join it (ADR 17)
MAX_HOLD_S = 0.001


class Arrivals:
    """Reads that have reached the server (an RPC accepted, ``arrived``) but not yet the
    service's code (``started``): a commit is worth holding for them. One that never
    starts (its client sent no message) stops counting after ``expiry_s``."""

    def __init__(
        self, expiry_s: float = MAX_HOLD_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._expiry_s = expiry_s
        self._clock = clock
        self._times: deque[float] = deque()

    def arrived(self) -> None:
        self._times.append(self._clock())

    def started(self) -> None:
        if self._times:
            self._times.popleft()

    def expected(self) -> bool:
        """Whether a read has arrived, not started, and not expired."""
        cutoff = self._clock() - self._expiry_s
        while self._times and self._times[0] < cutoff:
            self._times.popleft()
        return bool(self._times)


class LoopCommitter:
    """Group commit on the event loop: the entries handed in are appended by one call of
    the sink (split only where a receipt batch would overflow), one transaction, one fsync,
    one HSM signature. If the commit fails, every read of the group gets the error (audit
    fails closed).

    When entries are committed, like PostgreSQL's ``commit_delay`` with
    ``commit_siblings``: at the end of the pass of the loop in which they were handed
    in, unless other reads are known to be coming. Then the commit waits for them, at
    most ``max_hold_s`` after its first entry. Reads are known to be coming when one has
    arrived at the server but not yet reached the service (``arrivals``), or, once the
    last group had company, while groups keep having it ("busy"): the loop serves reads
    one after the other, so at concurrency above one the next read is always on its way,
    although gRPC hands it to the loop only after the answer before it is sent. A group
    that waited and had no company ends "busy": a lone caller (concurrency 1) never
    waits."""

    def __init__(
        self,
        sink: AuditSink,
        arrivals: Arrivals | None = None,
        max_hold_s: float = MAX_HOLD_S,
    ) -> None:
        self._sink = sink
        self._arrivals = arrivals if arrivals is not None else Arrivals()
        self._max_hold_s = max_hold_s
        self._waiting: list[_Waiting] = []
        self._first_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._check_scheduled = False
        self._busy = False

    async def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Receipt]] = loop.create_future()
        if not self._waiting:
            self._first_at = loop.time()
            self._timer = loop.call_later(self._max_hold_s, self._commit_when_due)
        self._waiting.append((entries, done))
        self.poke()
        return await done

    def poke(self) -> None:
        """Check, once the running step of the loop is over, whether the waiting entries
        are due: called when a read joins, and when a read that arrived starts."""
        if self._waiting and not self._check_scheduled:
            self._check_scheduled = True
            asyncio.get_running_loop().call_soon(self._commit_when_due)

    def _commit_when_due(self) -> None:
        self._check_scheduled = False
        if not self._waiting:
            return
        held_s = asyncio.get_running_loop().time() - self._first_at
        if held_s < self._max_hold_s and (self._busy or self._arrivals.expected()):
            return  # the timer bounds the wait
        self._busy = len(self._waiting) > 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        offset = 0
        for job, done in group:
            if not done.cancelled():
                done.set_result(receipts[offset : offset + len(job)])
            offset += len(job)


class ReadArrivals(HandlerWrapper):
    """Counts the read RPCs (``methods``, full paths) as the server accepts them, before
    their message is received, and marks each started when its handler is entered, so
    that a commit can wait for reads already on their way (``LoopCommitter``)."""

    def __init__(
        self, methods: Iterable[str], arrivals: Arrivals, committer: LoopCommitter
    ) -> None:
        super().__init__()
        self._methods = frozenset(methods)
        self._arrivals = arrivals
        self._committer = committer

    def wrap(self, method: str, handler: Handler) -> Handler:
        return self._started_first(handler) if method in self._methods else handler

    def arrived(self, method: str) -> None:
        if method in self._methods:
            self._arrivals.arrived()

    def _started_first(self, handler: Handler) -> Handler:
        """``handler``, marking its read started (and poking the committer) on entry."""
        behaviour: Any = handler.unary_unary

        async def started(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._arrivals.started()
            self._committer.poke()
            return await behaviour(raw, context)

        return grpc.unary_unary_rpc_method_handler(
            started,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class LoopNodeService:
    """The KmsNode service's RPCs as coroutines, for a ``grpc.aio`` server."""

    def __init__(self, service: NodeService, committer: LoopCommitter, pool: ThreadPoolExecutor):
        self._service = service
        self._committer = committer
        self._pool = pool
        #: reads whose calls were cancelled: judging in the pool, then committing
        self._unanswered: set[asyncio.Future[Any]] = set()

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

    async def finish_unanswered(self) -> None:
        """Wait until every read whose call was cancelled while the pool judged it is
        judged and committed (at shutdown, before the loop closes)."""
        while self._unanswered:
            await asyncio.gather(*self._unanswered, return_exceptions=True)

    async def in_pool(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in the pool, for what may block."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    def in_pool_methods(self, methods: Sequence[rpc.Method]) -> list[rpc.Method]:
        """Synchronous RPC methods (the auditor's) as coroutines that run them in the
        pool. The context belongs to the loop: the handlers given here take none."""

        def wrapped(method: rpc.Method) -> rpc.Method:
            async def handler(msg: Any, _ctx: Any) -> Any:
                return await self.in_pool(method.handler, msg, None)

            return rpc.Method(method.name, method.request_type, handler, method.streaming)

        return [wrapped(m) for m in methods]

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
        """Judged in the loop, or in the pool if the judgement needs the chain. A read
        whose call is cancelled while the pool judges it is still committed once judged
        (its nonce is spent, its decision made), as one cancelled later is: no decision
        goes unlogged, although no answer leaves."""
        try:
            return self._service.judge(queries, chain_ok=False)
        except NeedsChain:
            pass
        loop = asyncio.get_running_loop()
        judging = loop.run_in_executor(self._pool, self._service.judge, queries)
        try:
            return await asyncio.shield(judging)
        except asyncio.CancelledError:
            self._unanswered.add(judging)
            judging.add_done_callback(self._commit_unanswered)
            raise

    def _commit_unanswered(self, judging: asyncio.Future[JudgedRead]) -> None:
        self._unanswered.discard(judging)
        if judging.cancelled() or judging.exception() is not None:
            return  # nothing was decided
        commit = asyncio.ensure_future(self._commit([judging.result()]))
        self._unanswered.add(commit)
        commit.add_done_callback(self._unanswered.discard)

    async def _commit(self, reads: Sequence[JudgedRead]) -> list[Sequence[Receipt]]:
        receipts = await self._committer.append_many(audit_entries(reads))
        return self._service.settle(reads, receipts)
