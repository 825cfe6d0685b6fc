"""The coordinator's relay of a patient's enrollments (``RelayEnrollments``): signed by
the patient, checked here as at every node, and charged to her budget once per relay
(``ENROLLMENT_COST``, 10 single requests), before any node is asked."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clients.sdk.signed_requests import sealed_enrollment
from coordinator.settings import CoordinatorSettings
from core.errors import ResourceExhausted, Unauthenticated
from core.rate_limit import ENROLLMENT_COST
from core.record_types import RecordType
from core.registry_types import NodeInfo
from proto.kms.v1 import coordinator_pb2
from tests.coordinator.test_fan_out import (
    DOMAIN,
    NODES,
    Context,
    World,
    make_world,
    patient_kfrags,
)


def relay_request(world: World) -> coordinator_pb2.RelayEnrollmentsRequest:
    """Alice's enrollment of a fresh kfrag set for bob at every node, as the SDK seals it."""
    kfrags = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    enrollments = []
    for node_id, kfrag in zip(NODES, kfrags, strict=True):
        delivery = ec.generate_private_key(ec.SECP256R1()).public_key()
        node = NodeInfo(
            node_id=node_id,
            endpoint="",
            signing_public_key=b"",
            delivery_public_key=delivery.public_bytes(Encoding.X962, PublicFormat.CompressedPoint),
            account="0x" + "00" * 20,
            active=True,
        )
        enrollments.append(
            sealed_enrollment(
                world.alice.account,
                DOMAIN,
                node,
                world.bob.address,
                world.bob.umbral_public_key(),
                {RecordType.LAB_RESULT: bytes(kfrag)},
            )
        )
    return coordinator_pb2.RelayEnrollmentsRequest(enrollments=enrollments)


def relay(
    world: World, request: coordinator_pb2.RelayEnrollmentsRequest
) -> coordinator_pb2.RelayEnrollmentsResponse:
    return asyncio.run(world.service.enroll_key_fragments(request, Context()))  # type: ignore[arg-type]


def enrollments_at_nodes(world: World) -> int:
    return sum(n.enrollments for n in world.nodes.values())


def test_a_relay_reaches_the_node_each_enrollment_is_sealed_to() -> None:
    world = make_world()
    response = relay(world, relay_request(world))
    assert [r.node_id for r in response.results] == list(NODES)
    assert all(r.status == "" and r.response.node_id == r.node_id for r in response.results)
    assert all(n.enrollments == 1 for n in world.nodes.values())


def test_an_enrollment_not_signed_by_its_patient_is_refused_before_any_node_is_asked() -> None:
    world = make_world()
    request = relay_request(world)
    request.enrollments[2].nonce = bytes(32)  # tampered: the signature no longer covers it
    with pytest.raises(Unauthenticated):
        relay(world, request)
    assert enrollments_at_nodes(world) == 0


def test_each_relay_costs_the_patient_ten_requests() -> None:
    """With no refill, a patient's burst (100) pays for 10 relays; the next is refused
    before any node is asked. (She is not yet served at the first, so it pays ten times
    its price up front and is refunded the difference once the nodes store it.)"""
    assert ENROLLMENT_COST == 10
    world = make_world(requester_rate_per_s=1e-6)
    requests = [relay_request(world) for _ in range(11)]
    relays = CoordinatorSettings.requester_burst // ENROLLMENT_COST
    assert relays == 10
    for request in requests[:relays]:
        relay(world, request)
    assert enrollments_at_nodes(world) == relays * len(NODES)
    with pytest.raises(ResourceExhausted, match="rate limit"):
        relay(world, requests[relays])
    assert enrollments_at_nodes(world) == relays * len(NODES)
