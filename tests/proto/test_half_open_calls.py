"""A call whose request message never comes is ended (proto/half_open_calls.py), on a
real ``grpc.aio`` server with a service of ours, health and reflection behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from proto import rpc
from proto.half_open_calls import FirstMessageDeadline
from proto.kms.v1 import node_pb2
from proto.stubs import NODE_SERVICE

TIMEOUT_S = 0.3
NODE_INFO = f"/{NODE_SERVICE.full_name}/GetNodeInfo"
CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


async def _node_info(_msg: node_pb2.GetNodeInfoRequest, _ctx: object) -> node_pb2.NodeInfo:
    return node_pb2.NodeInfo(node_id="node-h")


def _serve(
    scenario: Callable[[Any, list[str]], Awaitable[None]],
) -> list[str]:
    """Run ``scenario`` against the server; the methods whose calls expired."""
    expired: list[str] = []

    async def run() -> None:
        server = grpc.aio.server(interceptors=[FirstMessageDeadline(TIMEOUT_S, expired.append)])
        methods = [rpc.Method("GetNodeInfo", node_pb2.GetNodeInfoRequest, _node_info)]
        server.add_generic_rpc_handlers([rpc.aio_service_handler(NODE_SERVICE, methods)])
        await rpc.aio_add_health_and_reflection(server, [NODE_SERVICE.full_name])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(channel, expired)
        finally:
            await server.stop(None)

    asyncio.run(run())
    return expired


async def _never() -> AsyncIterator[bytes]:
    """A request stream that sends nothing, and does not end."""
    await asyncio.Event().wait()
    yield b""  # never reached


async def _nothing() -> AsyncIterator[bytes]:
    """A request stream that ends with no message."""
    return
    yield b""  # an async generator


def _raw(channel: grpc.aio.Channel, path: str) -> Any:
    return channel.stream_stream(path, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("path", [NODE_INFO, CHECK, WATCH, REFLECTION])
def test_a_call_whose_message_never_comes_is_ended(path: str) -> None:
    """Our unary method, health's unary and server-streaming ones and reflection's
    bidirectional one: each ends DEADLINE_EXCEEDED at the deadline, and is counted."""

    async def scenario(channel: Any, _expired: list[str]) -> None:
        started = time.monotonic()
        call = _raw(channel, path)(_never())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert caught.value.details() == "no request message came within 0.3 s of the call"
        assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 2

    assert _serve(scenario) == [path]


def test_a_call_ended_without_a_message_is_invalid() -> None:
    async def scenario(channel: Any, _expired: list[str]) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in _raw(channel, NODE_INFO)(_nothing()):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "the call ended without a request message"

    assert _serve(scenario) == []


def test_calls_that_send_their_message_are_served_as_before() -> None:
    """Unary (ours and health's), server-streaming (health's Watch: its first answer)
    and bidirectional (reflection, two requests on one stream); a path the server does
    not serve is still UNIMPLEMENTED, at once."""

    async def scenario(channel: Any, _expired: list[str]) -> None:
        info = await channel.unary_unary(
            NODE_INFO, response_deserializer=node_pb2.NodeInfo.FromString
        )(node_pb2.GetNodeInfoRequest().SerializeToString(), timeout=5)
        assert info.node_id == "node-h"
        check = await channel.unary_unary(
            CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        watch = channel.unary_stream(
            WATCH,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service=""), timeout=5)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = channel.stream_stream(
            REFLECTION,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([ask, ask]), timeout=5)
        listed = [a.list_services_response.service async for a in answers]
        assert len(listed) == 2
        assert NODE_SERVICE.full_name in {s.name for s in listed[0]}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/no.such.Service/Call")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED

    assert _serve(scenario) == []


def test_the_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        FirstMessageDeadline(0, lambda _m: None)
