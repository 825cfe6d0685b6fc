"""Reads meeting at a node connection go as one call (ADR 16): only while a call is in
flight, each read with its own answer, deadline and cancellation. The node is a fake
whose calls last until the test lets them return."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from coordinator.call_coalescer import CoalescingClient, call_error
from proto.kms.v1 import common_pb2, node_pb2


@dataclass
class GatedNode:
    """A node connection whose re-encryption calls each wait for ``gate``; a read whose
    nonce starts with 0xff is refused. Records each call as (method, nonces)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[tuple[str, list[bytes]]] = field(default_factory=list)
    cancelled: int = 0
    fail_with: grpc.StatusCode | None = None
    #: results dropped from each ReencryptMany answer (a broken or lying node)
    drop_results: int = 0
    #: results added to each ReencryptMany answer, and whether each read is answered with
    #: the other kind of result (a single read's with a batch's, and the other way round)
    extra_results: int = 0
    wrong_kind: bool = False

    async def _wait(self) -> None:
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail_with is not None:
            raise call_error(self.fail_with, "node is down")

    def GetNodeInfo(
        self, request: node_pb2.GetNodeInfoRequest, *, timeout: float
    ) -> Awaitable[node_pb2.NodeInfo]:
        raise NotImplementedError

    def EnrollKeyFragment(
        self, request: common_pb2.EnrollKeyFragmentRequest, *, timeout: float
    ) -> Awaitable[common_pb2.EnrollKeyFragmentResponse]:
        raise NotImplementedError

    async def Reencrypt(
        self, request: common_pb2.ReencryptionRequest, *, timeout: float
    ) -> node_pb2.ReencryptResponse:
        self.calls.append(("Reencrypt", [request.nonce]))
        await self._wait()
        result = answer(node_pb2.NodeRead(single=request))
        if result.HasField("refusal"):
            raise call_error(grpc.StatusCode.PERMISSION_DENIED, result.refusal.message)
        return result.single

    async def ReencryptBatch(
        self, request: common_pb2.ReencryptionBatchRequest, *, timeout: float
    ) -> node_pb2.ReencryptBatchResponse:
        self.calls.append(("ReencryptBatch", [request.nonce]))
        await self._wait()
        return answer(node_pb2.NodeRead(batch=request)).batch

    async def ReencryptMany(
        self, request: node_pb2.ReencryptManyRequest, *, timeout: float
    ) -> node_pb2.ReencryptManyResponse:
        self.calls.append(("ReencryptMany", [nonce_of(r) for r in request.reads]))
        await self._wait()
        results = [answer(r) for r in request.reads]
        if self.wrong_kind:
            results = [swapped_kind(r) for r in results]
        results += results[: self.extra_results]
        return node_pb2.ReencryptManyResponse(results=results[self.drop_results :])


def nonce_of(read: node_pb2.NodeRead) -> bytes:
    return read.batch.nonce if read.HasField("batch") else read.single.nonce


def answer(read: node_pb2.NodeRead) -> node_pb2.NodeReadResult:
    """Each read's answer names its nonce (in the fragment's node id), so that a test
    sees which read got which answer."""
    nonce = nonce_of(read)
    if nonce.startswith(b"\xff"):
        refusal = node_pb2.ReadRefusal(status="PERMISSION_DENIED", message=f"no {nonce.hex()}")
        return node_pb2.NodeReadResult(refusal=refusal)
    fragment = common_pb2.CapsuleFragment(node_id=nonce.hex())
    if read.HasField("batch"):
        outcomes = [common_pb2.CapsuleOutcome(record_id=c.record_id) for c in read.batch.capsules]
        return node_pb2.NodeReadResult(batch=node_pb2.ReencryptBatchResponse(outcomes=outcomes))
    return node_pb2.NodeReadResult(single=node_pb2.ReencryptResponse(fragment=fragment))


def swapped_kind(result: node_pb2.NodeReadResult) -> node_pb2.NodeReadResult:
    if result.HasField("single"):
        return node_pb2.NodeReadResult(batch=node_pb2.ReencryptBatchResponse())
    return node_pb2.NodeReadResult(single=node_pb2.ReencryptResponse())


def single(n: int) -> common_pb2.ReencryptionRequest:
    return common_pb2.ReencryptionRequest(nonce=bytes([n]) * 32)


def batch(n: int, capsules: int) -> common_pb2.ReencryptionBatchRequest:
    refs = [common_pb2.CapsuleRef(record_id=bytes([i]) * 32) for i in range(capsules)]
    return common_pb2.ReencryptionBatchRequest(nonce=bytes([n]) * 32, capsules=refs)


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


async def settle() -> None:
    """Let every ready task run."""
    for _ in range(5):
        await asyncio.sleep(0)


@in_loop
async def test_a_lone_read_goes_at_once_by_its_own_call() -> None:
    node = GatedNode()
    node.gate.set()
    client = CoalescingClient(node)
    first = await client.Reencrypt(single(1), timeout=1.0)
    second = await client.ReencryptBatch(batch(2, 3), timeout=1.0)
    assert first.fragment.node_id == (b"\x01" * 32).hex()
    assert len(second.outcomes) == 3
    assert [c[0] for c in node.calls] == ["Reencrypt", "ReencryptBatch"]


@in_loop
async def test_reads_wait_only_while_a_call_is_in_flight_then_go_together() -> None:
    node = GatedNode()
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    assert node.calls == [("Reencrypt", [b"\x01" * 32])]
    waiting = [
        asyncio.ensure_future(client.Reencrypt(single(2), timeout=5.0)),
        asyncio.ensure_future(client.ReencryptBatch(batch(3, 2), timeout=5.0)),
        asyncio.ensure_future(client.Reencrypt(single(0xFF), timeout=5.0)),
        asyncio.ensure_future(client.Reencrypt(single(4), timeout=5.0)),
    ]
    await settle()
    assert len(node.calls) == 1  # nothing more goes while the call is in flight
    node.gate.set()
    assert (await lone).fragment.node_id == (b"\x01" * 32).hex()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert node.calls[1] == ("ReencryptMany", [bytes([n]) * 32 for n in (2, 3, 0xFF, 4)])
    assert len(node.calls) == 2
    # Each read gets its own answer; the refused one its own error, the others are
    # untouched by it.
    first, second, refused, fourth = results
    assert isinstance(first, node_pb2.ReencryptResponse)
    assert first.fragment.node_id == (b"\x02" * 32).hex()
    assert isinstance(second, node_pb2.ReencryptBatchResponse) and len(second.outcomes) == 2
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.details() == "no " + "ff" * 32
    assert isinstance(fourth, node_pb2.ReencryptResponse)
    assert fourth.fragment.node_id == (b"\x04" * 32).hex()
    # Then the connection is idle again: the next read goes at once, alone.
    assert (await client.Reencrypt(single(5), timeout=1.0)).fragment.node_id
    assert node.calls[-1][0] == "Reencrypt"


@in_loop
async def test_a_read_whose_deadline_passes_while_waiting_fails_and_is_not_sent() -> None:
    node = GatedNode()
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    hurried = asyncio.ensure_future(client.Reencrypt(single(2), timeout=0.01))
    patient = asyncio.ensure_future(client.Reencrypt(single(3), timeout=5.0))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await hurried
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    node.gate.set()
    await lone
    assert (await patient).fragment.node_id == (b"\x03" * 32).hex()
    # The patient read went alone: the one that gave up is not in any call.
    assert node.calls == [("Reencrypt", [b"\x01" * 32]), ("Reencrypt", [b"\x03" * 32])]


@in_loop
async def test_a_cancelled_waiting_read_leaves_the_queue() -> None:
    node = GatedNode()
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    served_around = asyncio.ensure_future(client.Reencrypt(single(2), timeout=5.0))
    others = [asyncio.ensure_future(client.Reencrypt(single(n), timeout=5.0)) for n in (3, 4)]
    await settle()
    served_around.cancel()
    node.gate.set()
    await asyncio.gather(lone, *others)
    assert node.calls[1] == ("ReencryptMany", [b"\x03" * 32, b"\x04" * 32])
    assert served_around.cancelled()


@in_loop
async def test_a_call_is_cancelled_only_when_every_read_in_it_gave_up() -> None:
    node = GatedNode()
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    together = [asyncio.ensure_future(client.Reencrypt(single(n), timeout=5.0)) for n in (2, 3)]
    await settle()
    lone.cancel()  # alone in its call: the call is cancelled, and the others go
    await settle()
    assert node.cancelled == 1
    assert node.calls[1] == ("ReencryptMany", [b"\x02" * 32, b"\x03" * 32])
    together[0].cancel()  # one of two: the call goes on for the other
    await settle()
    assert node.cancelled == 1
    node.gate.set()
    assert (await together[1]).fragment.node_id == (b"\x03" * 32).hex()


@in_loop
async def test_a_shared_calls_failure_is_each_reads_failure() -> None:
    node = GatedNode()
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    reads: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(client.Reencrypt(single(n), timeout=5.0)) for n in (2, 3)
    ]
    reads.append(asyncio.ensure_future(client.ReencryptBatch(batch(4, 2), timeout=5.0)))
    await settle()
    node.fail_with = grpc.StatusCode.UNAVAILABLE
    node.gate.set()
    for read in [lone, *reads]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [c[0] for c in node.calls] == ["Reencrypt", "ReencryptMany"]


@in_loop
async def test_an_answer_with_results_missing_fails_every_read_of_the_call() -> None:
    node = GatedNode(drop_results=1)
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    reads = [asyncio.ensure_future(client.Reencrypt(single(n), timeout=5.0)) for n in (2, 3)]
    await settle()
    node.gate.set()
    await lone
    for read in reads:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read
        assert raised.value.code() == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize(
    ("lie", "details"),
    [
        ({"extra_results": 1}, "answered a call with too many or few results"),
        ({"wrong_kind": True}, "answered a read with another kind of result"),
    ],
    ids=["too-many", "wrong-kind"],
)
def test_an_answer_that_does_not_fit_the_call_fails_its_reads(
    lie: dict[str, Any], details: str
) -> None:
    """Too many results, or a single read answered with a batch's result (and the other
    way round): DATA_LOSS, never another read's answer taken for one's own."""

    async def run() -> None:
        node = GatedNode(**lie)
        client = CoalescingClient(node)
        lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
        await settle()
        reads: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(client.Reencrypt(single(2), timeout=5.0)),
            asyncio.ensure_future(client.ReencryptBatch(batch(3, 2), timeout=5.0)),
        ]
        await settle()
        node.gate.set()
        await lone
        for read in reads:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read
            assert raised.value.code() == grpc.StatusCode.DATA_LOSS
            assert raised.value.details() == details
        assert [c[0] for c in node.calls] == ["Reencrypt", "ReencryptMany"]

    asyncio.run(run())


@in_loop
async def test_a_call_holds_at_most_sixteen_reads_and_sixty_four_capsules() -> None:
    node = GatedNode()
    client = CoalescingClient(node)
    lone = asyncio.ensure_future(client.Reencrypt(single(1), timeout=5.0))
    await settle()
    reads: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(client.Reencrypt(single(n), timeout=5.0)) for n in range(20)
    ]
    reads += [
        asyncio.ensure_future(client.ReencryptBatch(batch(n, 40), timeout=5.0)) for n in (30, 31)
    ]
    await settle()
    node.gate.set()
    await asyncio.gather(lone, *reads)
    sizes = [len(nonces) for _, nonces in node.calls]
    # 16 singles; 4 singles and a batch of 40 (a second would pass 64 capsules); the
    # last batch alone, by its own call. Oldest first throughout.
    assert sizes == [1, 16, 5, 1]
    assert [c[0] for c in node.calls] == [
        "Reencrypt",
        "ReencryptMany",
        "ReencryptMany",
        "ReencryptBatch",
    ]
    assert node.calls[2][1][-1] == bytes([30]) * 32
