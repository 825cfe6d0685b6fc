"""gRPC glue shared by every service and client.

- Servers register their methods through :func:`service_handler` (threaded
  server) or :func:`aio_service_handler` (asyncio server). Requests arrive as
  raw bytes and are parsed here, so a garbage payload is answered with
  ``INVALID_ARGUMENT`` rather than gRPC's generic deserialisation failure.
- :class:`core.errors.KmsError` becomes the status it names, with its
  safe message; anything else (any ``Exception``, and a panic in umbral-pre, which
  is a ``BaseException``) becomes ``INTERNAL`` with no details (the traceback goes
  to the server's log only). This is the one place where errors
  turn into statuses.
- Clients turn a failed call back into a ``KmsError`` with :func:`error_from_rpc`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from core import errors
from core.requests import MAX_BATCH
from core.umbral_codec import is_umbral_panic

log = structlog.get_logger("medkms.rpc")

INTERNAL_MESSAGE = "internal error; the server's log has the details"


def status_of(error: errors.KmsError) -> grpc.StatusCode:
    return grpc.StatusCode[error.grpc_status]


def error_from_rpc(error: grpc.RpcError, peer: str = "") -> errors.KmsError:
    """The KmsError a failed call stands for, its message prefixed by ``peer``."""
    # Sync calls raise grpc.Call instances; aio calls raise AioRpcError, which is not one.
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        code, details = error.code(), error.details() or ""
    else:
        code, details = grpc.StatusCode.UNKNOWN, ""
    details = details or code.name
    return errors.error_for_status(code.name, f"{peer}: {details}" if peer else details)


def method_path(service: Any, name: str, request: type[Message], response: type[Message]) -> str:
    """``/package.Service/Method``, after checking the types match the descriptor."""
    method = service.methods_by_name[name]
    if method.input_type.full_name != request.DESCRIPTOR.full_name:
        raise TypeError(f"{name} takes {method.input_type.full_name}")
    if method.output_type.full_name != response.DESCRIPTOR.full_name:
        raise TypeError(f"{name} returns {method.output_type.full_name}")
    return f"/{service.full_name}/{name}"


@dataclass(frozen=True)
class Method:
    """One RPC taking one request: its name, request message type and implementation.

    A ``streaming`` method's handler returns the whole (bounded) list of responses,
    so that every error is known before the first one is sent."""

    name: str
    request_type: type[Message]
    handler: Callable[[Any, Any], Any]
    streaming: bool = False


def _parse(method: Method, raw: bytes) -> Message | str:
    try:
        return method.request_type.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return f"request is not a valid {method.request_type.DESCRIPTOR.full_name} message"


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


#: called once per RPC with (method name, outcome, seconds); outcome is "ok" or
#: the lower-case status name, e.g. "permission_denied"
Observer = Callable[[str, str, float], None]
#: every outcome an observer can be given: one per gRPC status, "ok" for OK
OUTCOMES: tuple[str, ...] = tuple(code.name.lower() for code in grpc.StatusCode)


def _ignore(_method: str, _outcome: str, _seconds: float) -> None:
    return None


def _log_unavailable(service: Any, method: Method, error: errors.KmsError) -> None:
    """A refusal for want of a dependency (chain, audit log, HSM, nodes) is the
    operator's business, unlike a judgement on the request: each one is logged."""
    if error.grpc_status == "UNAVAILABLE":
        log.warning(
            "rpc_unavailable", service=service.full_name, method=method.name, reason=error.message
        )


def _generic_handler(
    service: Any, methods: list[Method], wrap: Callable[[Method], grpc.RpcMethodHandler[Any, Any]]
) -> grpc.GenericRpcHandler:
    """One handler per method, each checked against the service's descriptor."""
    for method in methods:
        response = service.methods_by_name[method.name].output_type._concrete_class
        method_path(service, method.name, method.request_type, response)
    return grpc.method_handlers_generic_handler(
        service.full_name, {m.name: wrap(m) for m in methods}
    )


def service_handler(
    service: Any, methods: list[Method], observe: Observer = _ignore
) -> grpc.GenericRpcHandler:
    """Handlers for a threaded ``grpc.server``."""

    def wrap(method: Method) -> grpc.RpcMethodHandler[Any, Any]:
        def behaviour(raw: bytes, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            request = _parse(method, raw)
            if isinstance(request, str):
                observe(method.name, "invalid_argument", time.perf_counter() - start)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request)
            try:
                response = method.handler(request, context)
            except errors.KmsError as e:
                observe(method.name, status_of(e).name.lower(), time.perf_counter() - start)
                _log_unavailable(service, method, e)
                context.abort(status_of(e), e.message)
            except BaseException as e:
                if not _unexpected(e):
                    raise
                observe(method.name, "internal", time.perf_counter() - start)
                log.exception("rpc_failed", service=service.full_name, method=method.name)
                context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            observe(method.name, "ok", time.perf_counter() - start)
            return response

        if method.streaming:

            def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Message]:
                yield from behaviour(raw, context)

            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=_serialize)
        return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=_serialize)

    return _generic_handler(service, methods, wrap)


def _unexpected(error: BaseException) -> bool:
    """Whether a handler's error is answered ``INTERNAL``: any ``Exception``, and a panic
    in umbral-pre (a ``BaseException``, which would otherwise leave the call unanswered
    until its deadline on a threaded server). Cancellation, exit and interrupts pass."""
    return isinstance(error, Exception) or is_umbral_panic(error)


def aio_service_handler(
    service: Any, methods: list[Method], observe: Observer = _ignore
) -> grpc.GenericRpcHandler:
    """Handlers for a ``grpc.aio`` server; each handler is a coroutine function (a
    ``streaming`` one's returns the list of responses, as for :func:`service_handler`)."""

    def wrap(method: Method) -> grpc.RpcMethodHandler[Any, Any]:
        async def behaviour(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            request = _parse(method, raw)
            if isinstance(request, str):
                observe(method.name, "invalid_argument", time.perf_counter() - start)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request)
            handler: Callable[[Any, Any], Awaitable[Message]] = method.handler
            try:
                response = await handler(request, context)
            except errors.KmsError as e:
                observe(method.name, status_of(e).name.lower(), time.perf_counter() - start)
                _log_unavailable(service, method, e)
                await context.abort(status_of(e), e.message)
            except BaseException as e:
                if not _unexpected(e):
                    raise
                observe(method.name, "internal", time.perf_counter() - start)
                log.exception("rpc_failed", service=service.full_name, method=method.name)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            observe(method.name, "ok", time.perf_counter() - start)
            return response

        if method.streaming:

            async def stream(
                raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Message]:
                for message in await behaviour(raw, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=_serialize)
        return grpc.unary_unary_rpc_method_handler(behaviour, response_serializer=_serialize)

    return _generic_handler(service, methods, wrap)


async def aio_set_health(servicer: Any, services: list[str], serving: bool) -> None:
    """Report every service (and the server as a whole, "") SERVING or NOT_SERVING on a
    ``grpc.aio`` server's health servicer."""
    from grpc_health.v1 import health_pb2

    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *services]:
        await servicer.set(name, status)


async def aio_add_health_and_reflection(server: grpc.aio.Server, services: list[str]) -> Any:
    """Standard health checking and server reflection on a ``grpc.aio`` server.

    Returns the health servicer so the caller can flip to NOT_SERVING on shutdown.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *services]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


#: calls one client connection may have in flight at the coordinator: its server refuses
#: more (coordinator/server.py)
MAX_CALLS_PER_CONNECTION = 64
#: calls an app's channel sends at once (:func:`bounded`): half the server's limit. A
#: server still counts a call for a moment after its answer has reached the client, so a
#: client at the full limit that sends a call in place of one just answered meets a
#: refusal (measured at the coordinator: 8 to 10 of 100 calls at once); at half, the
#: calls just answered and those sent in their place fit together.
APP_CALLS_PER_CONNECTION = MAX_CALLS_PER_CONNECTION // 2


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class InFlightBound(grpc.UnaryUnaryClientInterceptor):
    """At most ``limit`` unary calls of a channel in flight; a call past it waits, within
    its own timeout, for one to end.

    An HTTP/2 client should hold back streams past the server's advertised limit;
    grpcio's sometimes sends them, and the server refuses each (``UNAVAILABLE``,
    "Stream removed"): an app with more reads at once than the limit saw some fail for
    nothing.
    A call whose timeout passes while it waits is sent with what is left of it, so it
    fails with gRPC's own ``DEADLINE_EXCEEDED``."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        started = time.monotonic()
        if not self._slots.acquire(timeout=details.timeout):
            return continuation(_with_timeout(details, 0.0), request)
        if details.timeout is not None:
            left = max(details.timeout - (time.monotonic() - started), 0.0)
            details = _with_timeout(details, left)
        try:
            call = continuation(details, request)
        except BaseException:
            self._slots.release()
            raise
        call.add_done_callback(lambda _call: self._slots.release())
        return call


def _with_timeout(details: grpc.ClientCallDetails, timeout: float) -> _CallDetails:
    return _CallDetails(
        details.method,
        timeout,
        details.metadata,
        details.credentials,
        details.wait_for_ready,
        details.compression,
    )


def bounded(channel: grpc.Channel, limit: int = APP_CALLS_PER_CONNECTION) -> grpc.Channel:
    """``channel`` with at most ``limit`` unary calls in flight (:class:`InFlightBound`)."""
    return grpc.intercept_channel(channel, InFlightBound(limit))


#: Default channel/server options: bounded message sizes on every hop.
MAX_MESSAGE_BYTES = 256 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# A coordinator's answers to apps are the one exception: a batch answer carries the
# threshold's fragments for each of up to MAX_BATCH capsules, each with its receipt, so
# it grows with the threshold (7-of-7 and 64 records: about 320 KiB). What a coordinator
# receives stays bounded as above.
#: a capsule fragment with its receipt, as relayed, at most: a 381-byte cfrag, node ids
#: of 32 bytes, a signature of 72, a batch path of 10 hashes and the entry's facts (a
#: 64-character reason code and reason) come to 1,164 bytes
MAX_FRAGMENT_MESSAGE_BYTES = 1280
#: the highest threshold a coordinator may be configured with (it sizes the answers)
MAX_THRESHOLD = 64


def coordinator_answer_bytes(threshold: int) -> int:
    """The largest answer a coordinator at ``threshold`` sends honestly: ``threshold``
    fragments for each of :data:`~core.requests.MAX_BATCH` capsules, and the rest of the
    answer (record ids, refusals' reasons) within :data:`MAX_MESSAGE_BYTES`."""
    return MAX_MESSAGE_BYTES + MAX_BATCH * threshold * MAX_FRAGMENT_MESSAGE_BYTES


#: what an app accepts in one answer from a coordinator: the largest at MAX_THRESHOLD
#: (5.25 MiB), whatever the coordinator's threshold (the app does not know it in advance)
APP_ANSWER_BYTES = coordinator_answer_bytes(MAX_THRESHOLD)
#: the options of an app's channel to a coordinator (replacing the receive bound)
APP_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", APP_ANSWER_BYTES)]


def coordinator_server_options(threshold: int) -> list[tuple[str, int]]:
    """A coordinator server's message bounds: requests as every hop's, answers sized by
    its threshold (gRPC keeps the first value it is given for an option, so the
    defaults are not repeated here)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", coordinator_answer_bytes(threshold)),
    ]


# A server that comes back must be reached again at once: gRPC's default reconnect
# backoff grows to two minutes, during which every call on the channel fails at once
# (an app stayed down 10-15 s after a 30 s coordinator outage). Every client channel
# (Transport.channel) retries its connection at most a second apart.
MAX_RECONNECT_BACKOFF_MS = 1000
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]
