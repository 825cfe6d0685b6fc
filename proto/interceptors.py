"""A ``grpc.aio`` server interceptor that serves each method through a wrapper of its
handler, made once per method and kept."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

#: a method handler (generic only in the type stubs: a string at run time)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class HandlerWrapper(grpc.aio.ServerInterceptor):
    """Serves each method through :meth:`wrap` of its handler (made on the method's first
    call and kept), and calls :meth:`arrived` for every call as the server accepts it,
    before its request message is received. A path the server does not serve is left to
    it (``UNIMPLEMENTED``). Subclasses override the two hooks."""

    def __init__(self) -> None:
        #: method path -> its handler wrapped
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[details.method] = self.wrap(details.method, handler)
        self.arrived(details.method)
        return wrapped

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler ``method`` (its full path) is served with."""
        return handler

    def arrived(self, method: str) -> None:
        """A call of ``method`` has been accepted."""


class WrapperChain(HandlerWrapper):
    """Several wrappers as one interceptor: grpc.aio awaits each interceptor on every
    call, so one that applies them all costs a call less. The first wraps outermost (its
    handler runs first), as it would as the first of the server's interceptors."""

    def __init__(self, *wrappers: HandlerWrapper) -> None:
        super().__init__()
        self._wrappers = wrappers

    def wrap(self, method: str, handler: Handler) -> Handler:
        for wrapper in reversed(self._wrappers):
            handler = wrapper.wrap(method, handler)
        return handler

    def arrived(self, method: str) -> None:
        for wrapper in self._wrappers:
            wrapper.arrived(method)
