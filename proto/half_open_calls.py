"""A deadline for a call's first request message, on a ``grpc.aio`` server.

A client may open a call (its headers) and never send the request message: a "half-open"
call. gRPC keeps it, with its stream and buffers, for as long as the connection lives,
and no handler of ours runs to see it, so no admission rule or budget can charge it.
Measured at the coordinator: 3,200 such calls (100 connections of 32) held 70 MiB, and
none ended. A connection holds at most 64 calls (``rpc.MAX_CALLS_PER_CONNECTION``), but
connections are many.

:class:`FirstMessageDeadline` is a server interceptor that serves every method it knows
(the service's own, health, reflection) through a handler that reads the request
stream itself: a call whose first message has not come ``timeout_s`` after the call
arrived is ended ``DEADLINE_EXCEEDED``. What follows the first message is the method's
as before (a unary method gets that message; a streaming one, it and the rest).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from proto.interceptors import Handler, HandlerWrapper

Context = grpc.aio.ServicerContext[Any, Any]

#: seconds a call may wait for its request message, and a connection for its TLS
#: handshake (``HANDSHAKE_OPTION``), at the coordinator and the nodes: clients send both
#: at once; a party that opens calls or connections and then sends nothing holds a
#: server's memory only this long
FIRST_MESSAGE_TIMEOUT_S = 10.0
HANDSHAKE_OPTION = ("grpc.server_handshake_timeout_ms", 10_000)


class FirstMessageDeadline(HandlerWrapper):
    """End a call whose first request message has not come within ``timeout_s``;
    ``on_expired(method)`` is called for each (the method's full path, one the server
    serves: a path it does not serve is answered ``UNIMPLEMENTED`` at once, as before)."""

    def __init__(self, timeout_s: float, on_expired: Callable[[str], None]) -> None:
        super().__init__()
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self._timeout_s = timeout_s
        self._on_expired = on_expired

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` served from the request stream: unary requests become streams of
        one message, read here under the deadline. Handlers are coroutine functions (or,
        for responses streamed, async generator functions), as on any ``grpc.aio`` server."""
        first = _FirstMessage(method, self._timeout_s, self._on_expired)
        inner: Any
        if handler.unary_unary is not None or handler.stream_unary is not None:
            if handler.unary_unary is not None:
                inner, streamed = handler.unary_unary, False
            else:
                inner, streamed = handler.stream_unary, True

            async def one_response(_requests: object, context: Context) -> Any:
                return await inner(await first.requests(context, streamed), context)

            return grpc.stream_unary_rpc_method_handler(
                one_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner, streamed = handler.unary_stream, False
        else:
            inner, streamed = handler.stream_stream, True

        async def responses(_requests: object, context: Context) -> None:
            result = inner(await first.requests(context, streamed), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    await context.write(response)
            else:
                await result  # it writes its responses itself

        return grpc.stream_stream_rpc_method_handler(
            responses,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _FirstMessage:
    """Reads a call's first request message within the deadline."""

    def __init__(self, method: str, timeout_s: float, on_expired: Callable[[str], None]) -> None:
        self._method = method
        self._timeout_s = timeout_s
        self._on_expired = on_expired

    async def requests(self, context: Context, streamed: bool) -> Any:
        """The request for the method's handler: its one message, or (``streamed``) an
        iterator of the first message and the rest."""
        first = await self.read(context)
        if not streamed:
            return first

        async def all_of_them() -> AsyncIterator[Any]:
            yield first
            while (message := await context.read()) is not grpc.aio.EOF:
                yield message

        return all_of_them()

    async def read(self, context: Context) -> Any:
        """The first request message; the call ended ``DEADLINE_EXCEEDED`` if it has not
        come within the deadline, and ``INVALID_ARGUMENT`` if the client ended its side
        without one. A timer cancels the read (a ``wait_for`` task per call would cost
        more than the timer)."""
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(self._timeout_s, expire)
        try:
            message = await context.read()
        except asyncio.CancelledError:
            if not expired:
                raise  # the call itself was cancelled
            task.uncancel()
            self._on_expired(self._method)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request message came within {self._timeout_s:g} s of the call",
            )
        finally:
            timer.cancel()
        if message is grpc.aio.EOF:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message"
            )
        return message
