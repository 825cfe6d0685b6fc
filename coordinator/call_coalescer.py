"""Reads that meet at one node connection go as one call (ADR 16).

A read's call goes out at once when no call is in flight on the connection. While one
is, reads wait, and go together as one ``ReencryptMany`` when it returns: no timer, so
a lone read is never delayed, and under load the node's fixed cost per call (gRPC,
thread hand-offs, one audit commit with its fsync and HSM signature) is shared.

Each waiting read keeps its own deadline and cancellation: a read cancelled (served
around, or its client gone) leaves the queue, or, if it was in flight alone, cancels
its call; one whose deadline passes while it waits fails with DEADLINE_EXCEEDED. A
failure of a shared call is each of its reads' failure, as it would have been had each
gone alone. The node judges every read of a call on its own (kms_node/service.py
``reencrypt_many``), so the answer to one read is never another's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc

from coordinator import metrics
from coordinator.node_connections import NodeClient
from core.requests import MAX_BATCH, MAX_MANY_READS
from proto.kms.v1 import common_pb2, node_pb2

Request = common_pb2.ReencryptionRequest | common_pb2.ReencryptionBatchRequest
Response = node_pb2.ReencryptResponse | node_pb2.ReencryptBatchResponse


@dataclass(eq=False)
class _Read:
    """One read waiting for, or in, a call."""

    request: Request
    #: loop time after which the read gives up
    deadline: float
    answer: asyncio.Future[Response]
    #: the call the read went out in, with the other reads in it
    call: asyncio.Task[None] | None = None
    group: list[_Read] = field(default_factory=list)

    @property
    def capsules(self) -> int:
        if isinstance(self.request, common_pb2.ReencryptionBatchRequest):
            return len(self.request.capsules)
        return 1

    def as_node_read(self) -> node_pb2.NodeRead:
        if isinstance(self.request, common_pb2.ReencryptionBatchRequest):
            return node_pb2.NodeRead(batch=self.request)
        return node_pb2.NodeRead(single=self.request)


def call_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A failed call, as gRPC would have raised it."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class CoalescingClient:
    """A :class:`NodeClient` over one connection's client that coalesces its
    ``Reencrypt`` and ``ReencryptBatch`` calls; other calls pass straight through."""

    def __init__(self, inner: NodeClient) -> None:
        self._inner = inner
        self._waiting: deque[_Read] = deque()
        self._busy = False

    def GetNodeInfo(
        self, request: node_pb2.GetNodeInfoRequest, *, timeout: float
    ) -> Awaitable[node_pb2.NodeInfo]:
        return self._inner.GetNodeInfo(request, timeout=timeout)

    def EnrollKeyFragment(
        self, request: common_pb2.EnrollKeyFragmentRequest, *, timeout: float
    ) -> Awaitable[common_pb2.EnrollKeyFragmentResponse]:
        return self._inner.EnrollKeyFragment(request, timeout=timeout)

    def ReencryptMany(
        self, request: node_pb2.ReencryptManyRequest, *, timeout: float
    ) -> Awaitable[node_pb2.ReencryptManyResponse]:
        return self._inner.ReencryptMany(request, timeout=timeout)

    async def Reencrypt(
        self, request: common_pb2.ReencryptionRequest, *, timeout: float
    ) -> node_pb2.ReencryptResponse:
        response = await self._submit(request, timeout)
        assert isinstance(response, node_pb2.ReencryptResponse)  # _answer checks the kind
        return response

    async def ReencryptBatch(
        self, request: common_pb2.ReencryptionBatchRequest, *, timeout: float
    ) -> node_pb2.ReencryptBatchResponse:
        response = await self._submit(request, timeout)
        assert isinstance(response, node_pb2.ReencryptBatchResponse)  # _answer checks the kind
        return response

    async def _submit(self, request: Request, timeout: float) -> Response:
        if not self._busy:
            # Nothing in flight: the read goes at once, by its own call, awaited here as
            # without coalescing (its cancellation cancels the call, its timeout is the
            # call's); those that arrive meanwhile go together when it returns.
            self._busy = True
            metrics.NODE_CALL_READS.observe(1)
            try:
                return await self._alone(request, timeout)
            finally:
                self._send_next()
        loop = asyncio.get_running_loop()
        read = _Read(request, loop.time() + timeout, loop.create_future())
        self._waiting.append(read)
        try:
            # wait_for cancels the answer when the read times out or is cancelled.
            return await asyncio.wait_for(read.answer, timeout)
        except TimeoutError:
            raise call_error(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the node did not answer in time"
            ) from None
        finally:
            if read.answer.cancelled():
                self._leave(read)

    async def _alone(self, request: Request, timeout: float) -> Response:
        if isinstance(request, common_pb2.ReencryptionBatchRequest):
            return await self._inner.ReencryptBatch(request, timeout=timeout)
        return await self._inner.Reencrypt(request, timeout=timeout)

    def _leave(self, read: _Read) -> None:
        """A read gave up: out of the queue; its call cancelled if no read is left in it."""
        if read.call is None:
            if read in self._waiting:  # unless _send_next dropped it already
                self._waiting.remove(read)
        elif all(r.answer.cancelled() for r in read.group):
            read.call.cancel()

    def _send(self, reads: list[_Read]) -> None:
        call = asyncio.get_running_loop().create_task(self._call(reads))
        for read in reads:
            read.call, read.group = call, reads
        metrics.NODE_CALL_READS.observe(len(reads))

    async def _call(self, reads: list[_Read]) -> None:
        try:
            # As long as the most patient read waits; each read times out on its own.
            timeout = max(r.deadline for r in reads) - asyncio.get_running_loop().time()
            timeout = max(timeout, 0.001)
            if len(reads) == 1:
                (read,) = reads
                _settle(read, await self._alone(read.request, timeout))
            else:
                request = node_pb2.ReencryptManyRequest(reads=[r.as_node_read() for r in reads])
                many = await self._inner.ReencryptMany(request, timeout=timeout)
                if len(many.results) != len(reads):
                    error = call_error(
                        grpc.StatusCode.DATA_LOSS, "answered a call with too many or few results"
                    )
                    for read in reads:
                        _settle(read, error)
                for read, result in zip(reads, many.results, strict=False):
                    _settle(read, _answer(read, result))
        except asyncio.CancelledError:
            pass  # every read of the call gave up (_leave)
        except Exception as e:  # noqa: BLE001 - a failed call is each of its reads' failure
            for read in reads:
                _settle(read, e)
        finally:
            self._send_next()

    def _send_next(self) -> None:
        """The waiting reads, oldest first, as many as one call holds, go out now."""
        reads: list[_Read] = []
        capsules = 0
        while self._waiting and len(reads) < MAX_MANY_READS:
            read = self._waiting[0]
            if read.answer.done():
                # Gave up, its cancellation not yet run to _leave.
                self._waiting.popleft()
                continue
            if reads and capsules + read.capsules > MAX_BATCH:
                break
            reads.append(self._waiting.popleft())
            capsules += read.capsules
        if reads:
            self._send(reads)
        else:
            self._busy = False


def _answer(read: _Read, result: node_pb2.NodeReadResult) -> Response | Exception:
    """What the node answered one read of a shared call: its response, or its refusal
    as the error a lone call would have raised."""
    kind = result.WhichOneof("result")
    if kind == "refusal":
        code = grpc.StatusCode.__members__.get(result.refusal.status, grpc.StatusCode.UNKNOWN)
        if code is grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN
        return call_error(code, result.refusal.message)
    if kind == "single" and isinstance(read.request, common_pb2.ReencryptionRequest):
        return result.single
    if kind == "batch" and isinstance(read.request, common_pb2.ReencryptionBatchRequest):
        return result.batch
    return call_error(grpc.StatusCode.DATA_LOSS, "answered a read with another kind of result")


def _settle(read: _Read, outcome: Response | Exception) -> None:
    """Hand a read its outcome, unless it has given up (or has one already)."""
    if read.answer.done():
        return
    if isinstance(outcome, Exception):
        read.answer.set_exception(outcome)
    else:
        read.answer.set_result(outcome)
