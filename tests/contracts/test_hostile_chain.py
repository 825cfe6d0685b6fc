"""A lying or broken chain endpoint: every answer is bounded in size, nesting and total time,
and anything of the wrong shape is ChainUnavailable with a reason; nothing else escapes the
adapter, and the process lives on. The endpoint is a fake on loopback (tests/hostile_rpc.py),
so no chain is needed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from contracts.registry import RegistryClient
from core.errors import ChainUnavailable
from tests import hostile_rpc
from tests.hostile_rpc import HostileRpc, Reply, huge, nested, raw, result, slow, trickle

REGISTRY = "0x" + "12" * 20
GRANTEE = "0x" + "34" * 20
BLOCK = {
    "number": "0x5",
    "hash": "0x" + "ab" * 32,
    "parentHash": "0x" + "00" * 32,
    "timestamp": "0x10",
}
TIMEOUT_S = 1.0


@pytest.fixture
def rpc() -> Iterator[HostileRpc]:
    endpoint = HostileRpc()
    yield endpoint
    endpoint.close()


@pytest.fixture
def client(rpc: HostileRpc) -> RegistryClient:
    # The path stands in for a hosted endpoint's API key: it must never be shown.
    return RegistryClient(rpc.url + "/v1/secret-api-key", REGISTRY, timeout_s=TIMEOUT_S)


def refused(call: Callable[[], object], *reasons: str) -> str:
    """The ChainUnavailable message ``call`` ends in; it names one of ``reasons``."""
    with pytest.raises(ChainUnavailable) as excinfo:
        call()
    message = excinfo.value.message
    assert "secret-api-key" not in message
    assert any(reason in message for reason in reasons), message
    return message


def test_deep_nesting_is_refused_before_decoding(rpc: HostileRpc, client: RegistryClient) -> None:
    """json.loads of this answer, with web3's recursion limit, kills the process."""
    rpc.misbehave(nested(200_000))
    message = refused(client.latest_block, "JSON-RPC answer nests deeper than 32 levels")
    assert message.startswith(f"get_block: chain at {rpc.url}: ")
    rpc.misbehave(nested(200_000), "eth_getLogs")
    rpc.misbehave(result(BLOCK), "eth_getBlockByNumber")
    refused(lambda: client.events(0, 5), "nests deeper than 32 levels")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_huge_answer_is_cut_while_it_is_read(
    rpc: HostileRpc, client: RegistryClient, declared: bool
) -> None:
    rpc.misbehave(huge(rpc, 1 << 30, declared=declared))
    started = time.perf_counter()
    refused(client.latest_block, "answer larger than 8388608 bytes")
    assert time.perf_counter() - started < TIMEOUT_S
    # Nowhere near the gigabyte was read (the socket buffers hold a few MiB at most).
    assert rpc.sent < 64 << 20


def test_the_size_bound_is_configurable(rpc: HostileRpc) -> None:
    small = RegistryClient(rpc.url, REGISTRY, max_response_bytes=100)
    rpc.misbehave(result(BLOCK))
    refused(small.latest_block, "answer larger than 100 bytes")


@pytest.mark.parametrize(
    "reply",
    [
        slow(30 * TIMEOUT_S),
        trickle(0.2),
        trickle(0.2, in_headers=True),
    ],
    ids=["silent", "trickling-body", "trickling-headers"],
)
def test_a_slow_endpoint_is_given_up_on_at_the_deadline(
    rpc: HostileRpc, client: RegistryClient, reply: Reply
) -> None:
    """A byte every 0.2 s keeps every read within a per-read timeout; the call as a whole
    still ends at ``timeout_s``."""
    rpc.misbehave(reply)
    started = time.perf_counter()
    refused(client.latest_block, f"no complete answer within {TIMEOUT_S:g}s")
    assert time.perf_counter() - started < 2 * TIMEOUT_S
    rpc.behave()
    rpc.misbehave(result(BLOCK))
    assert client.latest_block() == (5, 16)  # the cut connection is not reused


def test_deadlines_start_no_thread_per_call(
    rpc: HostileRpc, client: RegistryClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One watchdog thread keeps every call's deadline: a timer thread per call cost about
    0.17 ms of CPU on every chain poll."""
    rpc.misbehave(result(BLOCK))
    client.latest_block()
    caller, started = threading.current_thread(), []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        if threading.current_thread() is caller:
            started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    for _ in range(50):
        assert client.latest_block() == (5, 16)
    assert started == []


def test_a_shorter_deadline_fires_before_a_longer_one_already_waiting(
    rpc: HostileRpc, client: RegistryClient
) -> None:
    patient = RegistryClient(rpc.url, REGISTRY, timeout_s=3 * TIMEOUT_S)
    rpc.misbehave(slow(30 * TIMEOUT_S))
    ended: list[float] = []

    def wait_patiently() -> None:
        began = time.perf_counter()
        with pytest.raises(ChainUnavailable):
            patient.latest_block()
        ended.append(time.perf_counter() - began)

    waiting = threading.Thread(target=wait_patiently)
    waiting.start()
    time.sleep(0.2)  # its 3 s deadline is the earliest unfinished one the watchdog keeps
    began = time.perf_counter()
    refused(client.latest_block, f"no complete answer within {TIMEOUT_S:g}s")
    assert time.perf_counter() - began < 2 * TIMEOUT_S
    waiting.join(10)
    assert len(ended) == 1 and 3 * TIMEOUT_S <= ended[0] < 5 * TIMEOUT_S


def test_a_forked_child_keeps_its_own_deadlines(rpc: HostileRpc, client: RegistryClient) -> None:
    """The parent's watchdog thread does not exist in a forked child: the child's calls
    are still cut at their deadline."""
    rpc.misbehave(result(BLOCK))
    client.latest_block()  # the parent's watchdog is running
    rpc.misbehave(trickle(0.2))  # every read within its timeout: only the deadline cuts
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the call was cut in time
        began = time.perf_counter()
        try:
            client.latest_block()
        except ChainUnavailable:
            os._exit(0 if time.perf_counter() - began < 2 * TIMEOUT_S else 3)
        except BaseException:  # noqa: BLE001 - anything else fails the test
            os._exit(4)
        os._exit(2)
    waited_until = time.monotonic() + 10 * TIMEOUT_S
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > waited_until:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's call was never cut at its deadline")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(ended[1]) == 0


BAD_BLOCKS: dict[str, Any] = {
    "string": "0x1",
    "list": [BLOCK],
    "number": 5,
    "missing-hash": {k: v for k, v in BLOCK.items() if k != "hash"},
    "missing-timestamp": {k: v for k, v in BLOCK.items() if k != "timestamp"},
    "missing-number": {k: v for k, v in BLOCK.items() if k != "number"},
    "short-hash": {**BLOCK, "hash": "0xab"},
    "hash-as-number": {**BLOCK, "hash": 5},
    "null-hash": {**BLOCK, "hash": None},
    "negative-number": {**BLOCK, "number": "-0x5"},
    "object-number": {**BLOCK, "number": {}},
    "list-timestamp": {**BLOCK, "timestamp": ["0x10"]},
}


@pytest.mark.parametrize("block", BAD_BLOCKS.values(), ids=BAD_BLOCKS.keys())
def test_a_block_of_the_wrong_shape_is_chain_unavailable(
    rpc: HostileRpc, client: RegistryClient, block: Any
) -> None:
    rpc.misbehave(result(block))
    message = refused(client.latest_block, "malformed data", "the chain answered")
    assert message.startswith("get_block: ")


BAD_ANSWERS: dict[str, bytes] = {
    "a-list": b"[1, 2]",
    "a-string": b'"0x1"',
    "no-result": b'{"jsonrpc": "2.0", "id": 1}',
    "error-as-string": b'{"jsonrpc": "2.0", "id": 1, "error": "boom"}',
    "not-utf8": b"\xff\xfe{}",
    "not-json": b"<html>bad gateway</html>",
    "nan": b'{"jsonrpc": "2.0", "id": 1, "result": NaN}',
}


@pytest.mark.parametrize("body", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
def test_an_answer_that_is_not_json_rpc_is_chain_unavailable(
    rpc: HostileRpc, client: RegistryClient, body: bytes
) -> None:
    rpc.misbehave(raw(body))
    refused(client.latest_block, "JSON-RPC answer", "malformed data")


def test_an_http_error_is_chain_unavailable(rpc: HostileRpc, client: RegistryClient) -> None:
    rpc.misbehave(raw(b"{}", status=502))
    refused(client.latest_block, "HTTP status 502")


LOG = {
    "address": REGISTRY,
    "topics": ["0x" + "00" * 32],
    "data": "0x",
    "blockNumber": "0x1",
    "blockHash": "0x" + "00" * 32,
    "transactionHash": "0x" + "00" * 32,
    "logIndex": "0x0",
    "transactionIndex": "0x0",
    "removed": False,
}
BAD_LOGS: dict[str, Any] = {
    "strings": ["x"],
    "an-object": {"a": 1},
    "a-list-per-log": [[LOG]],
    "topics-as-number": [{**LOG, "topics": 5}],
    "topic-not-hex": [{**LOG, "topics": ["zz"]}],
    "block-number-as-list": [{**LOG, "blockNumber": [1]}],
}


@pytest.mark.parametrize("logs", BAD_LOGS.values(), ids=BAD_LOGS.keys())
def test_logs_of_the_wrong_shape_are_chain_unavailable(
    rpc: HostileRpc, client: RegistryClient, logs: Any
) -> None:
    # Logs of an event the node follows, so that each one is decoded.
    followed = "0x" + next(iter(client._followed)).hex()
    logs = json.loads(json.dumps(logs).replace("0x" + "00" * 32, followed, 1))
    rpc.misbehave(result(logs), "eth_getLogs")
    rpc.misbehave(result(BLOCK), "eth_getBlockByNumber", "eth_blockNumber")
    refused(lambda: client.events(0, 5), "malformed data")
    refused(lambda: client.checkpoint_anchors("node-1", 0, 5), "malformed data", "unavailable")


@pytest.mark.parametrize("value", [{}, [], None], ids=["object", "list", "null"])
def test_a_call_result_of_the_wrong_shape_is_chain_unavailable(
    rpc: HostileRpc, client: RegistryClient, value: Any
) -> None:
    rpc.misbehave(result(value))
    refused(
        lambda: client.access_state(b"\x01" * 32, GRANTEE, b"\x02" * 32),
        "malformed data",
        "unavailable",
    )
    refused(client.list_nodes, "malformed data", "unavailable")


def test_an_endpoint_error_message_is_clipped(rpc: HostileRpc, client: RegistryClient) -> None:
    error = {"code": -32000, "message": "x" * 1_000_000}
    rpc.misbehave(
        lambda handler, request: hostile_rpc.send_json(
            handler, {"jsonrpc": "2.0", "id": request["id"], "error": error}
        )
    )
    with pytest.raises(Exception) as excinfo:  # noqa: PT011 - a refusal, whichever kind
        client.latest_block()
    assert len(str(excinfo.value)) < 400
