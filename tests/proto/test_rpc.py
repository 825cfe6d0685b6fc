"""The servers' RPC wrapper (proto/rpc.py): a refusal for want of a dependency is
logged, a judgement on the request is not, and every outcome is observed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from structlog.testing import capture_logs

from core.errors import AccessDenied, KmsError, Unavailable
from proto import rpc
from proto.kms.v1 import node_pb2
from proto.stubs import NODE_SERVICE, NodeStub

RAISED: list[KmsError] = []
OBSERVED: list[tuple[str, str]] = []


def _node_info(_msg: node_pb2.GetNodeInfoRequest, _ctx: object) -> node_pb2.NodeInfo:
    raise RAISED[0]


@pytest.fixture
def stub() -> Iterator[NodeStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    methods = [rpc.Method("GetNodeInfo", node_pb2.GetNodeInfoRequest, _node_info)]
    server.add_generic_rpc_handlers(
        [rpc.service_handler(NODE_SERVICE, methods, lambda m, o, _s: OBSERVED.append((m, o)))]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield NodeStub(channel)
    finally:
        channel.close()
        server.stop(None)


def _call(stub: NodeStub, error: KmsError) -> grpc.StatusCode:
    RAISED[:] = [error]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
    code: grpc.StatusCode = caught.value.code()
    return code


def test_a_refusal_for_a_missing_dependency_is_logged(stub: NodeStub) -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        code = _call(stub, Unavailable("audit log unavailable: disk full"))
    assert code == grpc.StatusCode.UNAVAILABLE
    (entry,) = [e for e in logs if e["event"] == "rpc_unavailable"]
    assert entry["method"] == "GetNodeInfo"
    assert entry["reason"] == "audit log unavailable: disk full"
    assert OBSERVED == [("GetNodeInfo", "unavailable")]


def test_a_judgement_on_the_request_is_not_logged_as_trouble(stub: NodeStub) -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        code = _call(stub, AccessDenied("grant has been revoked by the patient"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert not [e for e in logs if e["event"] == "rpc_unavailable"]
    assert OBSERVED == [("GetNodeInfo", "permission_denied")]
