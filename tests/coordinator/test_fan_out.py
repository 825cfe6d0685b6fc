"""The coordinator asks only as many nodes as it needs, replaces failed ones,
hedges slow ones, and drops fragments that do not verify. Nodes are fakes with
real Umbral key fragments; timing is controlled by the fakes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import patch

import grpc
import pytest
import umbral_pre as umbral

from clients.sdk.identity import Identity
from clients.sdk.signed_requests import RequestSigner
from coordinator.call_coalescer import CoalescingClient
from coordinator.node_pool import NodePool
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings, NodeAddress
from core import capsule_cache
from core.errors import (
    AccessDenied,
    ChainUnavailable,
    InsufficientFragments,
    InvalidRequest,
    ResourceExhausted,
    Unauthenticated,
)
from core.rate_limit import REFUSAL_COST
from core.record_types import RecordType
from core.registry_types import PatientInfo
from core.request_auth import Domain
from core.requests import ReencryptionQuery
from core.umbral_codec import load_capsule
from proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2

NODES = [f"node-{i}" for i in range(1, 6)]
DOMAIN = Domain(31337, "0x" + "00" * 19 + "01")


@dataclass
class FakeNode:
    kfrag: umbral.VerifiedKeyFrag
    delay_s: float = 0.0
    fails: bool = False
    refuses: bool = False
    corrupt: bool = False
    #: what the node sends instead of the cfrag it computed (a lie that may parse)
    lie: Callable[[bytes], bytes] | None = None
    calls: int = 0
    request_ids: list[str] = field(default_factory=list)
    #: records this node refuses in a batch
    denied: set[bytes] = field(default_factory=set)
    #: while set, every call waits for it to open
    gate: asyncio.Event | None = None
    #: calls in flight now, the most ever, and ReencryptMany calls
    in_flight: int = 0
    most_in_flight: int = 0
    many_calls: int = 0
    enrollments: int = 0
    #: the size of each single or batch request received
    sizes: list[int] = field(default_factory=list)

    async def _enter(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.in_flight -= 1

    async def Reencrypt(self, msg: common_pb2.ReencryptionRequest, timeout: float) -> Any:
        self.calls += 1
        self.request_ids.append(msg.request_id)
        self.sizes.append(msg.ByteSize())
        await self._enter()
        await asyncio.sleep(self.delay_s)
        if self.fails:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        if self.refuses:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "patient has not granted access to this requester",
            )
        cfrag = bytes(umbral.reencrypt(umbral.Capsule.from_bytes(msg.capsule), self.kfrag))
        if self.corrupt:
            cfrag = cfrag[:-40] + bytes(40)
        if self.lie is not None:
            cfrag = self.lie(cfrag)
        return node_pb2.ReencryptResponse(
            fragment=common_pb2.CapsuleFragment(node_id="x", cfrag=cfrag)
        )

    async def EnrollKeyFragment(
        self, msg: common_pb2.EnrollKeyFragmentRequest, timeout: float
    ) -> common_pb2.EnrollKeyFragmentResponse:
        """Stored, as far as the coordinator can tell (it cannot open the kfrags)."""
        self.enrollments += 1
        return common_pb2.EnrollKeyFragmentResponse(node_id=msg.node_id)

    async def ReencryptBatch(
        self, msg: common_pb2.ReencryptionBatchRequest, timeout: float
    ) -> node_pb2.ReencryptBatchResponse:
        """As a node answers a batch: an outcome per capsule, refusing those in ``denied``."""
        self.calls += 1
        self.request_ids.append(msg.request_id)
        self.sizes.append(msg.ByteSize())
        await asyncio.sleep(self.delay_s)
        outcomes = []
        for ref in msg.capsules:
            if ref.record_id in self.denied:
                outcome = common_pb2.CapsuleOutcome(
                    record_id=ref.record_id, status="PERMISSION_DENIED", reason="record is retired"
                )
            else:
                capsule = umbral.Capsule.from_bytes(ref.capsule)
                cfrag = bytes(umbral.reencrypt(capsule, self.kfrag))
                if self.corrupt:
                    cfrag = cfrag[:-40] + bytes(40)
                outcome = common_pb2.CapsuleOutcome(
                    record_id=ref.record_id,
                    fragment=common_pb2.CapsuleFragment(node_id="x", cfrag=cfrag),
                )
            outcomes.append(outcome)
        return node_pb2.ReencryptBatchResponse(outcomes=outcomes)

    async def ReencryptMany(
        self, msg: node_pb2.ReencryptManyRequest, timeout: float
    ) -> node_pb2.ReencryptManyResponse:
        """Each read answered as its lone call would be, in one call."""
        self.many_calls += 1
        await self._enter()
        gate, self.gate = self.gate, None  # the reads below are part of this call
        try:
            results = []
            for read in msg.reads:
                try:
                    if read.HasField("batch"):
                        batch = await self.ReencryptBatch(read.batch, timeout)
                        results.append(node_pb2.NodeReadResult(batch=batch))
                    else:
                        single = await self.Reencrypt(read.single, timeout)
                        results.append(node_pb2.NodeReadResult(single=single))
                except grpc.aio.AioRpcError as e:
                    refusal = node_pb2.ReadRefusal(status=e.code().name, message=e.details())
                    results.append(node_pb2.NodeReadResult(refusal=refusal))
        finally:
            self.gate = gate
        return node_pb2.ReencryptManyResponse(results=results)


class Context:
    def __init__(self, peer: str = "ipv4:127.0.0.1:5555") -> None:
        self._peer = peer

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return self._peer


@dataclass
class World:
    service: CoordinatorService
    nodes: dict[str, FakeNode]
    pool: NodePool
    request: common_pb2.ReencryptionRequest
    alice: Identity = field(repr=False)
    bob: Identity = field(repr=False)

    def run(self) -> coordinator_pb2.CoordinatorReencryptResponse:
        return asyncio.run(self.service.reencrypt(self.request, Context()))  # type: ignore[arg-type]


class Registry:
    def __init__(self, info: PatientInfo) -> None:
        self.info = info

    def get_patient(self, address: str) -> PatientInfo | None:
        return self.info

    def signing_domain(self) -> Domain:
        return DOMAIN


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
def verifying_world() -> World:
    """A coordinator configured to verify every fragment before relaying it."""
    return make_world(verify_every_fragment=True)


def patient_kfrags(
    patient: Identity, record_type: RecordType, receiving: Identity
) -> list[umbral.VerifiedKeyFrag]:
    """A fresh 3-of-5 set of ``patient``'s kfrags for ``record_type``, to ``receiving``."""
    return umbral.generate_kfrags(
        delegating_sk=patient.record_secret_key(record_type),
        receiving_pk=umbral.PublicKey.from_compressed_bytes(receiving.umbral_public_key()),
        signer=patient.kfrag_signer(),
        threshold=3,
        shares=5,
        sign_delegating_key=True,
        sign_receiving_key=True,
    )


def make_world(
    *,
    verify_every_fragment: bool = False,
    coalesce_node_calls: bool = True,
    request_window_s: int = CoordinatorSettings.request_window_s,
    requester_rate_per_s: float = CoordinatorSettings.requester_rate_per_s,
) -> World:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    kfrags = patient_kfrags(alice, RecordType.LAB_RESULT, bob)
    settings = CoordinatorSettings(
        listen="127.0.0.1:1",
        threshold=3,
        nodes=tuple(NodeAddress(n, "127.0.0.1:1") for n in NODES),
        chain_rpc_url="http://127.0.0.1:1",
        registry_address="0x" + "00" * 19 + "01",
        node_timeout_s=2.0,
        verify_every_fragment=verify_every_fragment,
        coalesce_node_calls=coalesce_node_calls,
        request_window_s=request_window_s,
        requester_rate_per_s=requester_rate_per_s,
    )
    info = PatientInfo(alice.address, alice.record_public_keys(), alice.verifying_key())
    nodes = {n: FakeNode(k) for n, k in zip(NODES, kfrags, strict=True)}
    pool = NodePool(NODES, max_hedge_s=settings.node_timeout_s / 4)
    service = CoordinatorService(
        settings,
        Registry(info),
        lambda node: nodes[node.node_id],  # type: ignore[arg-type, return-value]
        pool=pool,
    )
    capsule, _ = umbral.encrypt(alice.record_public_key(RecordType.LAB_RESULT), b"k" * 32)
    # Signed as the SDK signs: the coordinator checks the signature too.
    signer = RequestSigner(bob.account, bob.umbral_public_key(), DOMAIN)
    request = signer.single(
        alice.address, b"\x01" * 32, RecordType.LAB_RESULT, bytes(capsule), "TREAT"
    )
    return World(service, nodes, pool, request, alice, bob)


def test_nodes_are_sent_the_id_derived_from_the_signed_request(world: World) -> None:
    world.run()
    derived = ReencryptionQuery.parse(world.request, DOMAIN).request_id
    assert {i for n in world.nodes.values() for i in n.request_ids} == {derived}
    # An app (or a relay before the coordinator) naming another id is refused.
    world.request.request_id = "someone-elses-id"
    with pytest.raises(InvalidRequest, match=f"request_id must be empty or .* {derived}"):
        world.run()


def test_only_threshold_nodes_are_asked_when_all_are_healthy(world: World) -> None:
    response = world.run()
    assert len(response.fragments) == 3
    assert sum(n.calls for n in world.nodes.values()) == 3


def prefer(world: World, first: str) -> None:
    """Make ``first`` the pool's first choice: the best known latency."""
    for node_id in world.nodes:
        world.pool.succeeded(node_id, 0.0001 if node_id == first else 0.001, time.monotonic())


def test_a_failed_node_is_replaced_at_once(world: World) -> None:
    first_down = "node-1"
    world.nodes[first_down].fails = True
    prefer(world, first_down)
    response = world.run()
    assert len(response.fragments) == 3
    assert first_down not in {f.node_id for f in response.fragments}
    assert world.nodes[first_down].calls == 1
    assert sum(n.calls for n in world.nodes.values()) == 4


def test_a_slow_node_is_hedged(world: World) -> None:
    for _ in range(2):  # enough answers for the pool to learn a short hedge delay
        prefer(world, "node-1")
    world.nodes["node-1"].delay_s = 1.0  # chosen first, then stalls
    response = world.run()
    assert "node-1" not in {f.node_id for f in response.fragments}
    assert len(response.fragments) == 3
    assert world.nodes["node-1"].calls == 1


def test_a_hung_node_is_asked_once_not_on_every_request(world: World) -> None:
    for _ in range(2):  # the pool has learnt that node-1 is the fastest
        prefer(world, "node-1")
    world.nodes["node-1"].delay_s = 30.0  # hung: never answers within a request
    for _ in range(5):
        response = world.run()
        assert len(response.fragments) == 3
    # Served around once, it is out of rotation: the other four carry the load.
    assert world.nodes["node-1"].calls == 1
    assert "node-1" not in world.pool.in_rotation(time.monotonic())


def test_corrupted_fragments_are_dropped_and_replaced_when_every_one_is_verified(
    verifying_world: World,
) -> None:
    world = verifying_world
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    response = world.run()
    assert response.read_id == b""  # verified: nothing kept to report on
    assert "node-2" not in {f.node_id for f in response.fragments}
    assert len(response.fragments) == 3


def test_too_few_healthy_nodes_is_a_clear_error(world: World) -> None:
    for node_id in ["node-1", "node-3", "node-5"]:
        world.nodes[node_id].fails = True
    with pytest.raises(InsufficientFragments) as caught:
        world.run()
    for node_id in ["node-1", "node-3", "node-5"]:
        assert f"{node_id} (UNAVAILABLE: down)" in caught.value.message


# --- admission (issue 10: no single party can starve the nodes) ------------------------------


def test_a_forged_signature_is_refused_before_any_node_is_asked(world: World) -> None:
    world.request.signature = world.request.signature[:-1] + bytes([27])
    world.request.nonce = b"\x06" * 32  # tampered: the signature no longer covers it
    world.request.request_id = ""
    with pytest.raises(Unauthenticated, match="signature is not by the requester"):
        world.run()
    assert sum(n.calls for n in world.nodes.values()) == 0


def test_a_served_capsule_is_parsed_once_and_a_refused_ones_every_time(world: World) -> None:
    """As at a node (ADR 13): only capsules the nodes served are kept parsed, so a
    stranger's capsules cannot push them out."""
    with patch.object(capsule_cache, "load_capsule", wraps=load_capsule) as parse:
        for node in world.nodes.values():
            node.refuses = True
        for _ in range(2):
            with pytest.raises(AccessDenied):
                world.run()
        assert parse.call_count == 2
        for node in world.nodes.values():
            node.refuses = False
        for _ in range(3):
            assert len(world.run().fragments) == 3
    assert parse.call_count == 3


def test_a_malformed_capsule_is_refused_before_any_node_is_asked(world: World) -> None:
    world.run()  # the well-formed capsule is served, and kept parsed
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    zeros = bytes(len(world.request.capsule))
    world.request = signer.single(
        world.alice.address, b"\x01" * 32, RecordType.LAB_RESULT, zeros, "TREAT"
    )
    with pytest.raises(InvalidRequest, match="capsule is not a valid Umbral capsule"):
        world.run()
    assert sum(n.calls for n in world.nodes.values()) == 3


def test_with_the_chain_down_calls_share_one_read_of_the_signing_domain() -> None:
    """The coordinator reads the registry's domain on first use: a flood of (forged)
    requests while the chain is down costs one chain read a second, not one each."""
    world = make_world()
    reads = 0

    def down() -> Domain:
        nonlocal reads
        reads += 1
        raise ChainUnavailable("chain at http://127.0.0.1:1: connection refused")

    world.service._registry.signing_domain = down  # type: ignore[method-assign]

    async def flood() -> list[BaseException | coordinator_pb2.CoordinatorReencryptResponse]:
        calls = [world.service.reencrypt(world.request, Context()) for _ in range(20)]  # type: ignore[arg-type]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(flood())
    assert all(isinstance(o, ChainUnavailable) for o in outcomes)
    assert reads == 1
    # Once DOMAIN_RETRY_S have passed, the next call reads it again, and is served.
    world.service._registry.signing_domain = lambda: DOMAIN  # type: ignore[method-assign]
    real = time.monotonic
    with patch.object(time, "monotonic", lambda: real() + 2):
        assert len(world.run().fragments) == 3


def test_a_batch_is_authenticated_before_any_capsule_is_parsed(world: World) -> None:
    """Parsing is the costly check of a capsule (about 0.25 ms): a batch of 64 whose
    signature fails is refused for that and costs no parse, and a signed one stops at
    its first malformed capsule, before any node is asked."""
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    zeros = bytes(len(world.request.capsule))
    garbage = [(bytes([i + 1]) * 32, RecordType.LAB_RESULT, zeros) for i in range(64)]
    with patch.object(capsule_cache, "load_capsule", wraps=load_capsule) as parse:
        forged = signer.batch(world.alice.address, garbage)
        forged.nonce = b"\x06" * 32  # the signature no longer covers it
        forged.request_id = ""
        with pytest.raises(Unauthenticated, match="signature is not by the requester"):
            asyncio.run(world.service.reencrypt_batch(forged, Context()))  # type: ignore[arg-type]
        assert parse.call_count == 0
        signed = signer.batch(world.alice.address, garbage)
        with pytest.raises(InvalidRequest, match=r"capsules\[0\]\.capsule is not a valid"):
            asyncio.run(world.service.reencrypt_batch(signed, Context()))  # type: ignore[arg-type]
        assert parse.call_count == 1
    assert sum(n.calls for n in world.nodes.values()) == 0


def _with_unknown_field(message: bytes, size: int) -> bytes:
    """``message`` with a length-delimited field number 1000 of ``size`` bytes appended, as
    a sender of a version with more fields (or an attacker padding it) would."""
    length = bytearray()
    n = size
    while True:
        length.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    return message + bytes([0xC2, 0x3E]) + bytes(length) + b"A" * size  # (1000 << 3) | 2


def test_fields_the_coordinator_does_not_know_are_not_forwarded(world: World) -> None:
    """A read padded with unknown fields up to the message limit would otherwise make a
    node call it shares with other reads too large to send, failing theirs."""
    plain = world.request.ByteSize()
    padded = common_pb2.ReencryptionRequest.FromString(
        _with_unknown_field(world.request.SerializeToString(), 200_000)
    )
    assert padded.ByteSize() > plain + 200_000
    world.request = padded
    assert len(world.run().fragments) == 3
    sizes = [size for node in world.nodes.values() for size in node.sizes]
    assert len(sizes) == 3 and max(sizes) < plain + 100  # the request id, set on the way


def test_a_requester_the_nodes_keep_refusing_is_stopped_at_the_coordinator(world: World) -> None:
    for node in world.nodes.values():
        node.refuses = True
    refused = 0
    with pytest.raises(ResourceExhausted, match="rate limit|not yet served"):
        for _ in range(100):
            with pytest.raises(AccessDenied):
                world.run()
            refused += 1
    asked = sum(n.calls for n in world.nodes.values())
    # A requester not served pays the refusal price up front: its burst at ten a refusal,
    # or its address's burst of refusals, whichever runs out first (plus what refills
    # while the test runs).
    settings = CoordinatorSettings
    expected = min(settings.requester_burst // REFUSAL_COST, settings.peer_refusal_burst)
    assert expected <= refused <= expected + 2
    assert asked == refused * 3  # threshold nodes per request; none once it was stopped


# --- batches: each capsule collected to its own threshold ------------------------------------


def test_a_batch_answers_each_capsule_and_a_refused_one_does_not_fail_the_others(
    world: World,
) -> None:
    capsule, _ = umbral.encrypt(world.alice.record_public_key(RecordType.LAB_RESULT), b"j" * 32)
    served, refused = b"\x01" * 32, b"\x02" * 32
    for node in world.nodes.values():
        node.denied.add(refused)
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    request = signer.batch(
        world.alice.address,
        [
            (served, RecordType.LAB_RESULT, bytes(capsule)),
            (refused, RecordType.LAB_RESULT, bytes(capsule)),
        ],
    )
    response = asyncio.run(world.service.reencrypt_batch(request, Context()))  # type: ignore[arg-type]
    first, second = response.results
    assert (first.record_id, first.status, len(first.fragments)) == (served, "", 3)
    assert (second.record_id, second.status) == (refused, "PERMISSION_DENIED")
    assert second.reason.startswith("refused by ") and "record is retired" in second.reason
    assert sum(n.calls for n in world.nodes.values()) == 3  # each node answered both at once


def test_a_batch_with_a_fragment_that_does_not_verify_asks_another_node(
    verifying_world: World,
) -> None:
    world = verifying_world
    prefer(world, "node-2")
    capsule, _ = umbral.encrypt(world.alice.record_public_key(RecordType.LAB_RESULT), b"j" * 32)
    # node-2 re-encrypts with a kfrag meant for another grantee: its fragments do not verify.
    carol = Identity.generate("carol")
    world.nodes["node-2"].kfrag = patient_kfrags(world.alice, RecordType.LAB_RESULT, carol)[0]
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    request = signer.batch(
        world.alice.address, [(b"\x01" * 32, RecordType.LAB_RESULT, bytes(capsule))]
    )
    response = asyncio.run(world.service.reencrypt_batch(request, Context()))  # type: ignore[arg-type]
    (result,) = response.results
    assert result.status == "" and len(result.fragments) == 3
    assert "node-2" not in {f.node_id for f in result.fragments}
    assert sum(n.calls for n in world.nodes.values()) == 4


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalescing", "coalesce_node_calls=false"])
def test_reads_meeting_at_a_node_wait_for_its_call_only_when_coalescing(coalesce: bool) -> None:
    """ADR 16: with coalescing, a node connection has one call in flight at a time and the
    reads meeting there go together when it returns; ``coalesce_node_calls = false``
    sends each read by its own call at once. Either way every read is served."""
    world = make_world(coalesce_node_calls=coalesce)
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    capsule = world.request.capsule
    requests = [
        signer.single(world.alice.address, b"\x01" * 32, RecordType.LAB_RESULT, capsule)
        for _ in range(8)  # a requester not yet served pays 10 of its 100 up front
    ]
    submitted = 0
    submit = CoalescingClient._submit

    async def counted(client: CoalescingClient, request: Any, timeout: float) -> Any:
        nonlocal submitted
        submitted += 1
        return await submit(client, request, timeout)

    async def run() -> list[coordinator_pb2.CoordinatorReencryptResponse]:
        gate = asyncio.Event()
        for node in world.nodes.values():
            node.gate = gate
        reads = [
            asyncio.ensure_future(world.service.reencrypt(r, Context()))  # type: ignore[arg-type]
            for r in requests
        ]
        # Until each read has been handed to its three nodes' connections (with
        # coalescing most of them wait there; without, each is a call at its node).
        handed = 3 * len(reads)
        for _ in range(1000):
            if (submitted if coalesce else sum(n.calls for n in world.nodes.values())) >= handed:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the reads did not all reach their nodes' connections")
        gate.set()
        return await asyncio.gather(*reads)

    with patch.object(CoalescingClient, "_submit", counted):
        responses = asyncio.run(run())
    assert all(len(r.fragments) == 3 for r in responses)
    most = max(n.most_in_flight for n in world.nodes.values())
    many = sum(n.many_calls for n in world.nodes.values())
    if coalesce:
        assert most == 1 and many >= 1
    else:
        assert most > 1 and many == 0
