"""The servers' RPC wrapper (proto/rpc.py): a refusal for want of a dependency is
logged, a judgement on the request is not, and every outcome is observed. An
unexpected exception reaches the caller as ``INTERNAL`` with a fixed sentence, on the
threaded and the asyncio server alike; its detail goes to the server's log only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import umbral_pre as umbral
from structlog.testing import capture_logs

from core.audit import MAX_RECEIPT_BATCH
from core.errors import AccessDenied, KmsError, Unavailable
from core.node_identity import MAX_NODE_ID_BYTES
from core.policy import GRANTED_REASON
from core.requests import MAX_BATCH
from core.umbral_codec import CFRAG_SIZE, is_umbral_panic
from proto import rpc
from proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2
from proto.stubs import NODE_SERVICE, AioNodeStub, NodeStub
from tests.forged_cfrags import forged_to_panic

RAISED: list[BaseException] = []
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


def _failed_call(stub: NodeStub, error: BaseException) -> Any:
    """The ``grpc.Call`` error of a GetNodeInfo whose handler raised ``error``."""
    RAISED[:] = [error]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
    return caught.value


def _call(stub: NodeStub, error: KmsError) -> grpc.StatusCode:
    code: grpc.StatusCode = _failed_call(stub, error).code()
    return code


async def _aio_node_info(_msg: node_pb2.GetNodeInfoRequest, _ctx: object) -> node_pb2.NodeInfo:
    raise RAISED[0]


def _aio_failed_call(error: BaseException) -> grpc.aio.AioRpcError:
    """The error of a GetNodeInfo on a real ``grpc.aio`` server whose handler raised
    ``error``."""
    RAISED[:] = [error]

    async def scenario() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        methods = [rpc.Method("GetNodeInfo", node_pb2.GetNodeInfoRequest, _aio_node_info)]
        server.add_generic_rpc_handlers(
            [
                rpc.aio_service_handler(
                    NODE_SERVICE, methods, lambda m, o, _s: OBSERVED.append((m, o))
                )
            ]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await AioNodeStub(channel).GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
                return caught.value
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def _everything_sent(error: Any) -> str:
    """All a caller is told of a failed call: its details, both sets of metadata and
    gRPC's own description of the error."""
    return repr(
        (
            error.details(),
            tuple(error.initial_metadata() or ()),
            tuple(error.trailing_metadata() or ()),
            error.debug_error_string(),
            str(error),
        )
    )


def _assert_internal_and_logged(error: Any, logs: list[Any]) -> None:
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == rpc.INTERNAL_MESSAGE
    sent = _everything_sent(error)
    assert "s3cret" not in sent
    assert "RuntimeError" not in sent
    assert "Traceback" not in sent
    (entry,) = [e for e in logs if e["event"] == "rpc_failed"]
    assert entry["service"] == NODE_SERVICE.full_name
    assert entry["method"] == "GetNodeInfo"
    assert entry["log_level"] == "error"
    # log.exception: the traceback (and so the detail) is the server log's to keep
    assert entry["exc_info"] is True
    assert OBSERVED == [("GetNodeInfo", "internal")]


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


def test_an_unexpected_exception_is_internal_with_no_detail(stub: NodeStub) -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        error = _failed_call(stub, RuntimeError("s3cret-detail"))
    _assert_internal_and_logged(error, logs)


def test_an_unexpected_exception_is_internal_with_no_detail_on_the_aio_server() -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        error = _aio_failed_call(RuntimeError("s3cret-detail"))
    _assert_internal_and_logged(error, logs)


def umbral_panic() -> BaseException:
    """A real panic of umbral-pre (``pyo3_runtime.PanicException``, a BaseException):
    fragments crafted to combine to the point at infinity (tests/forged_cfrags.py)."""
    sk = umbral.SecretKey.random()
    receiving = umbral.SecretKey.random()
    capsule, ciphertext = umbral.encrypt(sk.public_key(), b"k" * 32)
    kfrag = umbral.generate_kfrags(sk, receiving.public_key(), umbral.Signer(sk), 2, 2, True, True)[
        0
    ]
    template = umbral.reencrypt(capsule, kfrag)
    forged = forged_to_panic(capsule, sk.public_key(), template, receiving.public_key(), 2)
    cfrags = [umbral.CapsuleFrag.from_bytes(c).skip_verification() for c in forged]
    try:
        umbral.decrypt_reencrypted(receiving, sk.public_key(), capsule, cfrags, ciphertext)
    except BaseException as e:
        assert is_umbral_panic(e)
        return e
    raise AssertionError("umbral did not panic")


def test_a_panic_in_umbral_is_internal_with_no_detail(stub: NodeStub) -> None:
    """A panic is no Exception: without care it would pass the handler's net."""
    OBSERVED.clear()
    with capture_logs() as logs:
        error = _failed_call(stub, umbral_panic())
    _assert_internal_and_logged(error, logs)
    assert "left" not in _everything_sent(error)  # the panic's assertion text
    # The server still serves.
    assert _call(stub, AccessDenied("no")) == grpc.StatusCode.PERMISSION_DENIED


def test_a_panic_in_umbral_is_internal_with_no_detail_on_the_aio_server() -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        error = _aio_failed_call(umbral_panic())
    _assert_internal_and_logged(error, logs)
    assert "left" not in _everything_sent(error)


def _assert_own_status_and_message(error: Any, logs: list[Any]) -> None:
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "grant has been revoked by the patient"
    assert not [e for e in logs if e["event"] == "rpc_failed"]
    assert OBSERVED == [("GetNodeInfo", "permission_denied")]


def test_a_kms_error_keeps_its_status_and_safe_message(stub: NodeStub) -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        error = _failed_call(stub, AccessDenied("grant has been revoked by the patient"))
    _assert_own_status_and_message(error, logs)


def test_a_kms_error_keeps_its_status_and_safe_message_on_the_aio_server() -> None:
    OBSERVED.clear()
    with capture_logs() as logs:
        error = _aio_failed_call(AccessDenied("grant has been revoked by the patient"))
    _assert_own_status_and_message(error, logs)


def _largest_fragment() -> common_pb2.CapsuleFragment:
    """A relayed fragment as large as one can honestly be: 32-byte node ids, a 72-byte
    DER signature, a receipt in the largest batch (a path of 10 hashes), 64-bit indexes,
    and its entry's facts."""
    node_id = "n" * MAX_NODE_ID_BYTES
    return common_pb2.CapsuleFragment(
        node_id=node_id,
        cfrag=bytes(CFRAG_SIZE),
        receipt=common_pb2.AuditReceipt(
            node_id=node_id,
            leaf_index=2**64 - 1,
            tree_size=2**64 - 1,
            entry_hash=bytes(32),
            signature=bytes(72),
            batch_start=2**64 - 1,
            batch_size=MAX_RECEIPT_BATCH,
            batch_path=[bytes(32)] * MAX_RECEIPT_BATCH.bit_length(),
            entry=common_pb2.EntryFacts(
                time=2**64 - 1,
                block_number=2**64 - 1,
                block_hash=bytes(32),
                reason_code="r" * 64,  # core.audit's longest
                reason="r" * 64,  # a granted entry's sentence (asserted below)
            ),
        ),
    )


@pytest.mark.parametrize("threshold", [1, 3, 7, rpc.MAX_THRESHOLD])
def test_a_coordinators_largest_honest_answer_fits_the_bound_for_its_threshold(
    threshold: int,
) -> None:
    fragment = _largest_fragment()
    assert len(GRANTED_REASON) <= len(fragment.receipt.entry.reason)
    assert fragment.ByteSize() + 3 <= rpc.MAX_FRAGMENT_MESSAGE_BYTES  # with its field's framing
    answer = coordinator_pb2.CoordinatorBatchResponse(
        results=[
            coordinator_pb2.CapsuleFragments(record_id=bytes(32), fragments=[fragment] * threshold)
            for _ in range(MAX_BATCH)
        ],
        threshold=threshold,
        read_id=bytes(16),
    )
    assert answer.ByteSize() <= rpc.coordinator_answer_bytes(threshold) <= rpc.APP_ANSWER_BYTES
