"""HandlerWrapper and WrapperChain (proto/interceptors.py), on a real grpc.aio server."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from proto.interceptors import Handler, HandlerWrapper, WrapperChain


class _Tag(HandlerWrapper):
    """Appends its name to each answer of the methods it wraps, and records arrivals."""

    def __init__(self, name: str, seen: list[str]) -> None:
        super().__init__()
        self._name, self._seen = name, seen
        self.wrapped = 0

    def wrap(self, method: str, handler: Handler) -> Handler:
        self.wrapped += 1
        inner: Any = handler.unary_unary
        name = self._name

        async def tagged(request: bytes, context: Any) -> bytes:
            return bytes(await inner(request, context)) + name.encode()

        return grpc.unary_unary_rpc_method_handler(tagged)

    def arrived(self, method: str) -> None:
        self._seen.append(f"{self._name}:{method}")


def test_a_chain_wraps_first_outermost_once_per_method_and_tells_each_of_every_call() -> None:
    seen: list[str] = []
    outer, inner = _Tag("O", seen), _Tag("I", seen)

    async def echo(request: bytes, _context: Any) -> bytes:
        return request

    async def run() -> list[bytes]:
        server = grpc.aio.server(interceptors=[WrapperChain(outer, inner)])
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "t.S", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
                )
            ]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call: Any = channel.unary_unary("/t.S/Echo")
                answers = [await call(b"x", timeout=5) for _ in range(3)]
                try:
                    await channel.unary_unary("/t.S/None")(b"", timeout=5)  # type: ignore[arg-type]
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNIMPLEMENTED
                return answers
        finally:
            await server.stop(None)

    # the inner wrapper's handler answers first, so its tag comes first
    assert asyncio.run(run()) == [b"xIO"] * 3
    assert (outer.wrapped, inner.wrapped) == (1, 1)
    assert seen == ["O:/t.S/Echo", "I:/t.S/Echo"] * 3
