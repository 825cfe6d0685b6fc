"""An app's channel holds back calls past the coordinator's per-connection limit
(proto/rpc.py ``InFlightBound``), against a real ``grpc.aio`` server that enforces such
a limit. Without the bound, grpcio's client sends some calls past the limit anyway and
the server refuses each at once with UNAVAILABLE (0 to 7 of 12 calls over a limit of 4,
in 15 tries; 6 to 32 of 100 at the real coordinator: tests/integration/test_attacks.py),
which is why the bound exists."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from proto import rpc

#: the server's calls per connection, and the channel's bound: half of it, as an app's
#: channel against the coordinator (rpc.APP_CALLS_PER_CONNECTION), because the server
#: counts a call for a moment after its answer reached the client (a bound equal to the
#: server's limit had a call refused now and then)
SERVER_LIMIT = 8
LIMIT = SERVER_LIMIT // 2
HOLD_S = 0.3
METHOD = "/t.Slow/Hold"


@pytest.fixture(name="address")
def address_fixture() -> Iterator[str]:
    """A ``grpc.aio`` server, as the coordinator's, that answers each call after HOLD_S,
    at most SERVER_LIMIT calls per connection; its loop runs in a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def hold(request: bytes, _ctx: object) -> bytes:
        await asyncio.sleep(HOLD_S)
        return request

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", SERVER_LIMIT)])
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(hold)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("t.Slow", {"Hold": handler})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _outcomes(channel: grpc.Channel, calls: int, timeout: float = 5.0) -> Counter[str]:
    """``calls`` calls started at once (after one that sets the connection up)."""
    hold: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
    assert hold(b"up", timeout=5) == b"up"
    pending = [hold.future(bytes([i]), timeout=timeout) for i in range(calls)]
    outcomes: Counter[str] = Counter()
    for i, call in enumerate(pending):
        try:
            assert call.result() == bytes([i])
            outcomes["ok"] += 1
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)
            outcomes[e.code().name] += 1
    return outcomes


def test_with_the_bound_every_call_waits_its_turn_and_is_served(address: str) -> None:
    with rpc.bounded(grpc.insecure_channel(address), LIMIT) as channel:
        started = time.monotonic()
        outcomes = _outcomes(channel, 3 * LIMIT)
        took = time.monotonic() - started
    assert outcomes == Counter(ok=3 * LIMIT)
    assert took >= 3 * HOLD_S  # in three turns


def test_a_call_whose_timeout_passes_while_it_waits_fails_with_deadline_exceeded(
    address: str,
) -> None:
    with rpc.bounded(grpc.insecure_channel(address), LIMIT) as channel:
        hold: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        busy = [hold.future(b"busy", timeout=5) for _ in range(LIMIT)]
        with pytest.raises(grpc.RpcError) as caught:
            hold(b"late", timeout=HOLD_S / 3)
        assert isinstance(caught.value, grpc.Call)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [call.result() for call in busy] == [b"busy"] * LIMIT
        # The slots came back: the next call goes at once.
        assert hold(b"again", timeout=5) == b"again"


def test_calls_from_many_threads_share_the_bound(address: str) -> None:
    with rpc.bounded(grpc.insecure_channel(address), LIMIT) as channel:
        hold: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        answers: list[bytes] = []

        def call(i: int) -> None:
            answers.append(hold(bytes([i]), timeout=5))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3 * LIMIT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(answers) == [bytes([i]) for i in range(3 * LIMIT)]
