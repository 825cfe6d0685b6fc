"""The coordinator checks a read's signed deadline itself, before anything else: a read
whose deadline has passed (UNAUTHENTICATED) or lies further ahead than its
``request_window_s`` (INVALID_ARGUMENT) is refused before any node is asked, before the
patient is looked up on the chain, and charged to no budget; one at the window's very
edge is served. Single reads and batches alike.

The coordinator's clock is pinned relative to the request's signed deadline, so each
case sits exactly where it claims to, however slowly the test runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from unittest.mock import MagicMock, patch

import grpc
import pytest
import umbral_pre as umbral

import coordinator.service as service_module
from clients.sdk.signed_requests import RequestSigner
from coordinator.settings import CoordinatorSettings
from core.errors import InvalidRequest, KmsError, Unauthenticated
from core.record_types import RecordType
from proto import rpc
from proto.kms.v1 import common_pb2
from tests.coordinator.test_fan_out import DOMAIN, Context, Registry, World, make_world

#: the coordinator's default window (the worlds here use it unless a test says otherwise)
WINDOW = CoordinatorSettings.request_window_s
KINDS = ["single", "batch"]

Request = common_pb2.ReencryptionRequest | common_pb2.ReencryptionBatchRequest


def signed(world: World, kind: str) -> Request:
    """A read the SDK signed (deadline a minute from now), of one capsule either way."""
    if kind == "single":
        return world.request
    capsule, _ = umbral.encrypt(world.alice.record_public_key(RecordType.LAB_RESULT), b"j" * 32)
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    return signer.batch(
        world.alice.address, [(b"\x01" * 32, RecordType.LAB_RESULT, bytes(capsule))]
    )


@contextmanager
def chain_reads() -> Iterator[MagicMock]:
    """Counts the coordinator's patient lookups on the (fake) chain."""
    with patch.object(
        Registry, "get_patient", autospec=True, side_effect=Registry.get_patient
    ) as reads:
        yield reads


def read_at(world: World, request: Request, now: float) -> int:
    """Send ``request`` to the coordinator whose wall clock reads ``now``; the number of
    capsules it answered with fragments."""
    clock = SimpleNamespace(time=lambda: now, monotonic=time.monotonic)
    context = Context()
    with patch.object(service_module, "time", clock):
        if isinstance(request, common_pb2.ReencryptionBatchRequest):
            batch = world.service.reencrypt_batch(request, context)  # type: ignore[arg-type]
            return sum(1 for r in asyncio.run(batch).results if len(r.fragments) == 3)
        single = world.service.reencrypt(request, context)  # type: ignore[arg-type]
        return 1 if len(asyncio.run(single).fragments) == 3 else 0


def node_calls(world: World) -> int:
    return sum(n.calls + n.many_calls for n in world.nodes.values())


def refused_at(world: World, request: Request, now: float) -> KmsError:
    """What the coordinator refuses ``request`` with at ``now``, having asked no node and
    read nothing from the chain."""
    with chain_reads() as reads, pytest.raises(KmsError) as caught:
        read_at(world, request, now)
    assert node_calls(world) == 0
    assert reads.call_count == 0
    return caught.value


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("late_s", [0.0, 0.5, 1.0, 3600.0], ids=lambda s: f"{s:g}s-late")
def test_a_read_whose_deadline_has_passed_is_refused_before_any_node_is_asked(
    kind: str, late_s: float
) -> None:
    world = make_world()
    request = signed(world, kind)
    error = refused_at(world, request, now=request.deadline + late_s)
    assert isinstance(error, Unauthenticated)
    assert rpc.status_of(error) == grpc.StatusCode.UNAUTHENTICATED
    assert error.message == "request deadline has passed"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beyond_s", [0.001, 1.0, 86_400.0], ids=lambda s: f"{s:g}s-beyond")
def test_a_read_whose_deadline_lies_beyond_the_window_is_refused_before_any_node_is_asked(
    kind: str, beyond_s: float
) -> None:
    world = make_world()
    request = signed(world, kind)
    error = refused_at(world, request, now=request.deadline - WINDOW - beyond_s)
    assert isinstance(error, InvalidRequest)
    assert rpc.status_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == f"deadline too far in the future; at most {WINDOW} s"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ahead_s", [WINDOW, WINDOW - 1, 0.001], ids=lambda s: f"{s:g}s-ahead")
def test_a_read_whose_deadline_lies_within_the_window_is_served(kind: str, ahead_s: float) -> None:
    """Up to the window's very edge (deadline exactly ``now + request_window_s``)."""
    world = make_world()
    request = signed(world, kind)
    with chain_reads() as reads:
        assert read_at(world, request, now=request.deadline - ahead_s) == 1
    assert node_calls(world) == 3
    assert reads.call_count == 1  # the patient's keys, to verify what the nodes sent


def test_the_window_is_the_coordinators_setting() -> None:
    world = make_world(request_window_s=60)
    request = world.request
    error = refused_at(world, request, now=request.deadline - 61)
    assert error.message == "deadline too far in the future; at most 60 s"
    assert read_at(world, request, now=request.deadline - 60) == 1


def test_refused_deadlines_are_charged_to_no_budget() -> None:
    """A deadline is checked before the signature, so a refused one is not known to be
    the requester's: charging it would let anyone spend another's budget. Many more such
    refusals than the requester's and its address's bursts allow leave both untouched."""
    world = make_world()
    request = world.request
    bursts = CoordinatorSettings.requester_burst + CoordinatorSettings.peer_refusal_burst
    for _ in range(bursts):
        refused_at(world, request, now=request.deadline)
        refused_at(world, request, now=request.deadline - WINDOW - 1)
    assert read_at(world, request, now=request.deadline - 1) == 1
