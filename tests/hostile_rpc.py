"""A JSON-RPC endpoint on loopback that lies on demand, for the chain adapter's tests and a
real node's: it forwards to an upstream chain (anvil), or answers "method not found", unless
a method has been given a hostile reply (nested, huge, wrong-typed, slow or trickling)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: a reply: writes the whole HTTP answer to ``handler`` for the decoded JSON-RPC ``request``
Reply = Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]

EVERY_METHOD = "*"


class HostileRpc:
    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        #: method (or EVERY_METHOD) -> hostile reply
        self.replies: dict[str, Reply] = {}
        #: bytes the hostile replies wrote before the client went away
        self.sent = 0
        self.methods: list[str] = []
        #: the block ranges eth_getLogs was asked for (block_range_limit)
        self.log_ranges: list[int] = []
        rpc = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = json.loads(body)
                method = str(request["method"])
                rpc.methods.append(method)
                reply = rpc.replies.get(method) or rpc.replies.get(EVERY_METHOD)
                try:
                    if reply is not None:
                        reply(self, request)
                    elif rpc.upstream is not None:
                        forward(self, rpc.upstream, body)
                    else:
                        error = {"code": -32601, "message": f"no {method} here"}
                        send_json(self, {"jsonrpc": "2.0", "id": request["id"], "error": error})
                except OSError:
                    pass  # the client hung up, as it should on a hostile answer

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False  # trickling replies are left behind
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def misbehave(self, reply: Reply, *methods: str) -> None:
        """Answer ``methods`` (default: every method) with ``reply`` from now on."""
        for method in methods or (EVERY_METHOD,):
            self.replies[method] = reply

    def behave(self) -> None:
        self.replies.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- replies ---------------------------------------------------------------------------------


def send(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def forward(handler: BaseHTTPRequestHandler, upstream: str, body: bytes) -> None:
    """Answer with what the upstream chain answers to ``body``."""
    request = urllib.request.Request(
        upstream, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        send(handler, response.read())


def send_json(handler: BaseHTTPRequestHandler, answer: object) -> None:
    send(handler, json.dumps(answer).encode())


def result(value: object) -> Reply:
    """A well-formed JSON-RPC answer whose result is ``value`` (of whatever type)."""
    return lambda handler, request: send_json(
        handler, {"jsonrpc": "2.0", "id": request["id"], "result": value}
    )


def raw(body: bytes, status: int = 200) -> Reply:
    return lambda handler, _request: send(handler, body, status)


def nested(depth: int = 200_000) -> Reply:
    """An answer whose result nests ``depth`` arrays deep: json.loads of it, with web3's
    recursion limit, overflows the C stack."""

    def reply(handler: BaseHTTPRequestHandler, request: dict[str, Any]) -> None:
        head = b'{"jsonrpc":"2.0","id":%d,"result":' % request["id"]
        send(handler, head + b"[" * depth + b"]" * depth + b"}")

    return reply


def huge(rpc: HostileRpc, total: int = 1 << 30, *, declared: bool = True) -> Reply:
    """A gigabyte-long answer, written as fast as the client reads it; ``declared`` says its
    length up front, otherwise it ends when the connection closes."""

    def reply(handler: BaseHTTPRequestHandler, request: dict[str, Any]) -> None:
        head = b'{"jsonrpc":"2.0","id":%d,"result":"0x' % request["id"]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if declared:
            handler.send_header("Content-Length", str(total))
        handler.end_headers()
        handler.wfile.write(head)
        chunk = b"00" * 32768
        rpc.sent = len(head)
        while rpc.sent < total:
            handler.wfile.write(chunk)
            rpc.sent += len(chunk)

    return reply


def slow(seconds: float, then: Reply | None = None) -> Reply:
    """Say nothing for ``seconds``, then (if still connected) answer with ``then``."""

    def reply(handler: BaseHTTPRequestHandler, request: dict[str, Any]) -> None:
        time.sleep(seconds)
        if then is not None:
            then(handler, request)

    return reply


def trickle(interval_s: float, *, in_headers: bool = False) -> Reply:
    """A byte every ``interval_s``, for ever: each read returns in time, the answer never
    completes. ``in_headers``: the bytes are header bytes, before any body."""

    def reply(handler: BaseHTTPRequestHandler, _request: dict[str, Any]) -> None:
        out = handler.wfile
        if in_headers:
            out.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        out.flush()
        while True:
            time.sleep(interval_s)
            out.write(b"a" if in_headers else b" ")
            out.flush()

    return reply


def block_range_limit(rpc: HostileRpc, max_blocks: int) -> Reply:
    """eth_getLogs as geth serves it with a range limit: refused, in geth's words, over more
    than ``max_blocks`` blocks; otherwise forwarded upstream."""

    def reply(handler: BaseHTTPRequestHandler, request: dict[str, Any]) -> None:
        query = request["params"][0]
        blocks = int(query["toBlock"], 16) - int(query["fromBlock"], 16) + 1
        rpc.log_ranges.append(blocks)
        if blocks > max_blocks:
            error = {"code": -32000, "message": f"exceed maximum block range: {max_blocks}"}
            send_json(handler, {"jsonrpc": "2.0", "id": request["id"], "error": error})
        else:
            assert rpc.upstream is not None
            forward(handler, rpc.upstream, json.dumps(request).encode())

    return reply


def assert_halved_down_to(rpc: HostileRpc, first_blocks: int, max_blocks: int) -> None:
    """What a reader behind :func:`block_range_limit` asked for: ``first_blocks``, then
    half of it, and so on until at most ``max_blocks``; every later call no more."""
    halvings = [first_blocks]
    while halvings[-1] > max_blocks:
        halvings.append(halvings[-1] // 2)
    assert len(halvings) > 2
    assert rpc.log_ranges[: len(halvings)] == halvings
    assert all(blocks <= max_blocks for blocks in rpc.log_ranges[len(halvings) :])


def tampered(rpc: HostileRpc, edit: Callable[[Any], Any]) -> Reply:
    """The upstream chain's answer, its result passed through ``edit`` (a lying endpoint
    that alters what an honest one says)."""

    def reply(handler: BaseHTTPRequestHandler, request: dict[str, Any]) -> None:
        assert rpc.upstream is not None
        upstream = urllib.request.Request(
            rpc.upstream,
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(upstream, timeout=10) as response:
            answer = json.loads(response.read())
        answer["result"] = edit(answer["result"])
        send_json(handler, answer)

    return reply
