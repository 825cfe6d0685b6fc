"""A read that ended CANCELLED (the coordinator stopped with the call open) is signed
again and sent again within its timeout; any other failure is the caller's at once,
naming the coordinator and the id of the request sent (clients/sdk/provider.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from clients.sdk.provider import MAX_RESENDS, send_read
from core.errors import AccessDenied, KmsError
from proto.kms.v1 import common_pb2


class Failed(grpc.RpcError, grpc.Call):
    """A failed call as grpc raises it: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class Coordinator:
    def __init__(self, *failures: Failed) -> None:
        self.failures = list(failures)
        self.sent: list[str] = []
        self.timeouts: list[float] = []

    def send(self, request: common_pb2.ReencryptionRequest, timeout_s: float) -> str:
        self.sent.append(request.request_id)
        self.timeouts.append(timeout_s)
        if self.failures:
            raise self.failures.pop(0)
        return "answer"


def signer() -> Any:
    count = iter(range(1000))
    return lambda: common_pb2.ReencryptionRequest(request_id=f"request-{next(count)}")


def test_a_read_cancelled_by_a_stopping_coordinator_is_signed_and_sent_again() -> None:
    coordinator = Coordinator(Failed(grpc.StatusCode.CANCELLED, "CANCELLED"))
    request, answer = send_read(signer(), coordinator.send, 5.0)
    assert answer == "answer"
    # Signed afresh: a node that saw the first one would take a resend for a replay.
    assert coordinator.sent == ["request-0", "request-1"]
    assert request.request_id == "request-1"
    assert coordinator.timeouts[1] <= coordinator.timeouts[0] <= 5.0


def test_a_refusal_is_not_sent_again_and_names_the_coordinator_and_request() -> None:
    coordinator = Coordinator(Failed(grpc.StatusCode.PERMISSION_DENIED, "grant revoked"))
    with pytest.raises(AccessDenied) as caught:
        send_read(signer(), coordinator.send, 5.0)
    assert coordinator.sent == ["request-0"]
    assert caught.value.message == "coordinator: grant revoked"
    assert caught.value.request_id == "request-0"


def test_unavailable_is_not_sent_again() -> None:
    coordinator = Coordinator(Failed(grpc.StatusCode.UNAVAILABLE, "only 2 of 3"))
    with pytest.raises(KmsError, match="^coordinator: only 2 of 3"):
        send_read(signer(), coordinator.send, 5.0)
    assert coordinator.sent == ["request-0"]


def test_resending_stops_when_the_timeout_is_spent() -> None:
    coordinator = Coordinator(*[Failed(grpc.StatusCode.CANCELLED, "CANCELLED")] * 1000)
    with pytest.raises(KmsError, match="CANCELLED"):
        send_read(signer(), coordinator.send, 0.3)
    # Paused 0.05, 0.1 s between sends: not a tight loop against a failing coordinator.
    assert 2 <= len(coordinator.sent) <= 4


def test_a_coordinator_cancelling_every_read_gets_at_most_1_plus_3_signed_reads() -> None:
    """Each resend is a freshly signed read, valid for minutes: a coordinator answering
    CANCELLED on purpose must not collect one every pause for the whole timeout. After
    MAX_RESENDS resends the app is told why it stopped."""
    coordinator = Coordinator(*[Failed(grpc.StatusCode.CANCELLED, "CANCELLED")] * 1000)
    signed: list[str] = []
    sign = signer()

    def counted() -> common_pb2.ReencryptionRequest:
        request: common_pb2.ReencryptionRequest = sign()
        signed.append(request.request_id)
        return request

    with pytest.raises(KmsError) as caught:
        send_read(counted, coordinator.send, 10.0)
    assert MAX_RESENDS == 3
    assert len(signed) == len(coordinator.sent) == 1 + MAX_RESENDS
    assert caught.value.grpc_status == "CANCELLED"
    assert caught.value.message.startswith("coordinator: CANCELLED")
    assert "signed and sent 4 times, each cancelled by the coordinator" in caught.value.message
    assert caught.value.request_id == signed[-1]
