"""The node's RPCs on the event loop (kms_node/loop_service.py, ADR 17): reads of one
loop pass share one audit commit, a failed commit fails them all, and whatever needs
the chain waits in the pool, never in the loop. On the in-memory twins of
test_service.py; the real server runs in tests/integration."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.audit import MAX_RECEIPT_BATCH, AuditEntry, Receipt, verify_receipt
from core.errors import NotFound, Unavailable
from core.registry_types import AccessState
from kms_node.audit_log import AuditLog
from kms_node.loop_service import Arrivals, LoopCommitter, LoopNodeService, ReadArrivals
from kms_node.service import IndexedState, NodeService
from proto import rpc
from proto.kms.v1 import node_pb2
from proto.stubs import NODE_SERVICE, AioNodeStub
from tests.kms_node.test_service import (
    ChainReads,
    MemoryRegistry,
    StaleIndex,
    World,
    make_world,
    node_on,
)

POOL_PREFIX = "test-blocking"


@pytest.fixture(name="world")
def world_fixture(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def pool() -> Any:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix=POOL_PREFIX) as executor:
        yield executor


def node_with(
    world: World, tmp_path: Path, *, chain: ChainReads, index: IndexedState
) -> tuple[NodeService, RecordedAudit]:
    """A node on ``chain`` and ``index``, and its audit log, recorded."""
    audit = AuditLog(tmp_path / "audit-loop.sqlite", world.keystore, "node-t")
    return node_on(world, tmp_path, chain, index, audit=audit), RecordedAudit(audit)


class RecordedAudit:
    """The audit log as a commit's sink, with the size of each commit it made."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.sizes: list[int] = []

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        receipts = self.log.append_many(entries)
        self.sizes.append(len(entries))
        return receipts


def nonce(i: int) -> bytes:
    return bytes([i]) * 32


def test_the_reads_of_one_loop_pass_share_one_commit(
    world: World, pool: ThreadPoolExecutor
) -> None:
    world.enroll(world.kfrag())
    recorded = RecordedAudit(world.audit)
    service = LoopNodeService(world.node, LoopCommitter(recorded), pool)

    async def five_reads() -> list[Any]:
        return await asyncio.gather(
            *(service.reencrypt(world.request(nonce=nonce(i)), None) for i in range(1, 6))
        )

    responses = asyncio.run(five_reads())
    assert recorded.sizes == [5]
    receipts = [r.fragment.receipt for r in responses]
    assert sorted(r.leaf_index for r in receipts) == list(range(5))
    assert {r.batch_size for r in receipts} == {5}
    signing_key = world.node.node_info().signing_public_key
    for response in responses:
        receipt = Receipt.from_fields(response.fragment.receipt)
        assert verify_receipt(receipt, signing_key)
        assert world.audit.entry(receipt.leaf_index).decision == "granted"


class FailingSink:
    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        raise Unavailable("audit log unavailable: disk full")


def test_a_failed_commit_fails_every_read_of_its_group(
    world: World, pool: ThreadPoolExecutor
) -> None:
    world.enroll(world.kfrag())
    service = LoopNodeService(world.node, LoopCommitter(FailingSink()), pool)

    async def three_reads() -> list[Any]:
        calls = (service.reencrypt(world.request(nonce=nonce(i)), None) for i in range(1, 4))
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(three_reads())
    assert [type(o) for o in outcomes] == [Unavailable] * 3
    assert world.audit.checkpoint().tree_size == 0


class SizeSink:
    """Records each commit's size; every receipt is the same (only sizes and timing
    matter here)."""

    def __init__(self, receipt: Receipt) -> None:
        self.receipt = receipt
        self.sizes: list[int] = []

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        if len(entries) > MAX_RECEIPT_BATCH:
            raise AssertionError("more entries than one receipt batch holds")
        self.sizes.append(len(entries))
        return [self.receipt] * len(entries)


@pytest.mark.parametrize(
    ("jobs", "commits"),
    [([600, 600, 600], [600, 600, 600]), ([400, 400, 400], [800, 400]), ([1024], [1024])],
)
def test_a_loop_pass_beyond_one_receipt_batch_commits_in_several(
    world: World, jobs: list[int], commits: list[int]
) -> None:
    world.enroll(world.kfrag())
    judged = world.node.judge(world.node.admit_single(world.request()))
    (entry,) = judged.entries
    (receipt,) = world.audit.append_many([entry])
    sink = SizeSink(receipt)
    committer = LoopCommitter(sink)

    async def submit() -> list[list[Receipt]]:
        return await asyncio.gather(*(committer.append_many([entry] * n) for n in jobs))

    answers = asyncio.run(submit())
    assert sink.sizes == commits
    assert [len(a) for a in answers] == jobs


@pytest.fixture
def one_entry(world: World) -> tuple[AuditEntry, Receipt]:
    world.enroll(world.kfrag())
    (entry,) = world.node.judge(world.node.admit_single(world.request())).entries
    (receipt,) = world.audit.append_many([entry])
    return entry, receipt


def test_a_lone_read_is_committed_without_waiting(one_entry: tuple[AuditEntry, Receipt]) -> None:
    entry, receipt = one_entry
    sink = SizeSink(receipt)
    committer = LoopCommitter(sink, Arrivals(), max_hold_s=30)

    async def lone() -> float:
        start = time.monotonic()
        await asyncio.wait_for(committer.append_many([entry]), 5)
        return time.monotonic() - start

    assert asyncio.run(lone()) < 5
    assert sink.sizes == [1]


def test_a_commit_waits_for_a_read_that_has_arrived(one_entry: tuple[AuditEntry, Receipt]) -> None:
    entry, receipt = one_entry
    sink = SizeSink(receipt)
    arrivals = Arrivals(expiry_s=30)
    committer = LoopCommitter(sink, arrivals, max_hold_s=30)

    async def second_read_later() -> list[Receipt]:
        await asyncio.sleep(0.05)  # its message is still on the wire
        arrivals.started()
        committer.poke()
        return await committer.append_many([entry, entry])

    async def scenario() -> None:
        arrivals.arrived()
        first = asyncio.ensure_future(committer.append_many([entry]))
        second = asyncio.ensure_future(second_read_later())
        await asyncio.wait_for(asyncio.gather(first, second), 5)

    asyncio.run(scenario())
    assert sink.sizes == [3]


def test_a_read_that_never_comes_holds_a_commit_at_most_max_hold(
    one_entry: tuple[AuditEntry, Receipt],
) -> None:
    entry, receipt = one_entry
    sink = SizeSink(receipt)
    arrivals = Arrivals(expiry_s=30)
    committer = LoopCommitter(sink, arrivals, max_hold_s=0.05)

    async def scenario() -> float:
        arrivals.arrived()  # and its client never sends the message
        start = time.monotonic()
        await asyncio.wait_for(committer.append_many([entry]), 5)
        return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.05
    assert sink.sizes == [1]


def test_an_arrival_stops_counting_after_its_expiry() -> None:
    now = [100.0]
    arrivals = Arrivals(expiry_s=0.5, clock=lambda: now[0])
    arrivals.arrived()
    assert arrivals.expected()
    now[0] += 0.6
    assert not arrivals.expected()


def test_groups_with_company_keep_the_next_commit_waiting_until_one_is_alone(
    one_entry: tuple[AuditEntry, Receipt],
) -> None:
    entry, receipt = one_entry
    sink = SizeSink(receipt)
    committer = LoopCommitter(sink, Arrivals(), max_hold_s=0.3)

    async def timed_lone_commit() -> float:
        start = time.monotonic()
        await asyncio.wait_for(committer.append_many([entry]), 5)
        return time.monotonic() - start

    async def scenario() -> list[float]:
        # Two reads in one pass: a group with company, so the loop counts as busy.
        await asyncio.gather(committer.append_many([entry]), committer.append_many([entry]))
        busy_alone = await timed_lone_commit()  # waits for company that does not come...
        idle = await timed_lone_commit()  # ...so the next lone read is committed at once
        return [busy_alone, idle]

    busy_alone, idle = asyncio.run(scenario())
    assert sink.sizes == [2, 1, 1]
    assert busy_alone >= 0.3
    assert idle < 0.3


class ChainReadThreads(ChainReads):
    """Chain reads counted, with the thread each ran in."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.threads: list[str] = []

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        self.threads.append(threading.current_thread().name)
        return super().access_state(record_id, grantee, capsule_hash)


def test_a_read_that_needs_the_chain_is_judged_in_the_pool_and_spends_its_nonce_once(
    world: World, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    world.enroll(world.kfrag())
    # The index has not seen the grant yet: the refusal is confirmed against the chain.
    chain = ChainReadThreads(world.registry)
    node, audit = node_with(world, tmp_path, chain=chain, index=StaleIndex(world.registry))
    service = LoopNodeService(node, LoopCommitter(audit), pool)
    response = asyncio.run(service.reencrypt(world.request(), None))
    assert response.fragment.cfrag
    assert len(chain.threads) == 1
    assert chain.threads[0].startswith(POOL_PREFIX)
    assert audit.sizes == [1]


class HangingChain(ChainReads):
    """A chain endpoint that does not answer until ``answer`` is set."""

    def __init__(self, registry: MemoryRegistry) -> None:
        super().__init__(registry)
        self.answer = threading.Event()
        self.reached = threading.Event()

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        self.reached.set()
        if not self.answer.wait(10):
            raise AssertionError("never released")
        return super().access_state(record_id, grantee, capsule_hash)


def test_a_hanging_chain_endpoint_holds_a_pool_thread_never_the_loop(
    world: World, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    world.enroll(world.kfrag())
    chain = HangingChain(world.registry)
    node, audit = node_with(world, tmp_path, chain=chain, index=world.registry)
    service = LoopNodeService(node, LoopCommitter(audit), pool)
    # A record the index does not know yet: looked up on the chain, which hangs.
    unknown = dataclasses.replace(world, record_id=b"\x0a" * 32).request(nonce=nonce(1))

    async def scenario() -> None:
        stuck = asyncio.ensure_future(service.reencrypt(unknown, None))
        while not chain.reached.is_set():
            await asyncio.sleep(0.01)
        # Meanwhile, a read the index allows is served at once.
        served = await asyncio.wait_for(service.reencrypt(world.request(nonce=nonce(2)), None), 5)
        assert served.fragment.cfrag
        assert not stuck.done()
        chain.answer.set()
        with pytest.raises(NotFound):
            await asyncio.wait_for(stuck, 5)

    asyncio.run(scenario())
    assert audit.log.checkpoint().tree_size == 2


def test_a_read_cancelled_while_the_pool_judges_it_is_still_logged(
    world: World, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    """The caller gives up while the chain is read: the read is judged all the same (its
    nonce spent) and its decision committed to the audit log; no answer leaves."""
    world.enroll(world.kfrag())
    chain = HangingChain(world.registry)
    node, audit = node_with(world, tmp_path, chain=chain, index=StaleIndex(world.registry))
    service = LoopNodeService(node, LoopCommitter(audit), pool)

    async def scenario() -> None:
        call = asyncio.ensure_future(service.reencrypt(world.request(nonce=nonce(1)), None))
        while not chain.reached.is_set():
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert audit.log.checkpoint().tree_size == 0  # still judging
        chain.answer.set()
        # As at shutdown: wait for what the pool finishes for callers who left.
        await service.finish_unanswered()

    asyncio.run(scenario())
    assert audit.log.checkpoint().tree_size == 1
    assert audit.log.entry(0).decision == "granted"


class CountedArrivals(Arrivals):
    def __init__(self) -> None:
        super().__init__()
        self.arrivals = self.starts = 0

    def arrived(self) -> None:
        self.arrivals += 1
        super().arrived()

    def started(self) -> None:
        self.starts += 1
        super().started()


def test_the_server_counts_read_rpcs_as_they_arrive_and_as_they_start(
    world: World, pool: ThreadPoolExecutor
) -> None:
    """ReadArrivals on a real grpc.aio server: each read RPC (even one whose message does
    not parse) counts as arrived, then started when its handler is entered; other RPCs
    do not count."""
    world.enroll(world.kfrag())
    arrivals = CountedArrivals()
    recorded = RecordedAudit(world.audit)
    committer = LoopCommitter(recorded, arrivals)
    service = LoopNodeService(world.node, committer, pool)
    read_path = f"/{NODE_SERVICE.full_name}/Reencrypt"

    async def scenario() -> list[tuple[int, int]]:
        server = grpc.aio.server(interceptors=[ReadArrivals([read_path], arrivals, committer)])
        methods = service.rpc_methods(on_enrolled=lambda: None)
        server.add_generic_rpc_handlers([rpc.aio_service_handler(NODE_SERVICE, methods)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        seen = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = AioNodeStub(channel)
                answer = await stub.Reencrypt(world.request(nonce=nonce(1)), timeout=5)
                assert answer.fragment.cfrag
                seen.append((arrivals.arrivals, arrivals.starts))
                await stub.GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
                seen.append((arrivals.arrivals, arrivals.starts))
                garbage: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    read_path
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await garbage(b"\xff\xff not a request", timeout=5)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                seen.append((arrivals.arrivals, arrivals.starts))
        finally:
            await server.stop(None)
        return seen

    assert asyncio.run(scenario()) == [(1, 1), (1, 1), (2, 2)]
    assert not arrivals.expected()
    assert recorded.sizes == [1]
