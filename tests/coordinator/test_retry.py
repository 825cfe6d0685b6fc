"""The coordinator relays fragments unverified and verifies only what an app reports
(ADR 14): a lying node is found, named, counted and taken out of rotation; a false
report is refused and charged; a suspected node's fragments are verified before they
are relayed. Nodes are the fakes of test_fan_out with real Umbral key fragments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest.mock import patch

import pytest
import umbral_pre as umbral

from clients.sdk.identity import Identity
from clients.sdk.signed_requests import RequestSigner
from coordinator import metrics
from coordinator.node_pool import SUSPICION_S
from coordinator.relayed_reads import RelayedReads
from core.errors import (
    InsufficientFragments,
    InvalidRequest,
    PreconditionFailed,
    ResourceExhausted,
)
from core.rate_limit import REFUSAL_COST
from core.record_types import RecordType
from core.requests import ReencryptionQuery
from core.umbral_codec import cfrag_precursor, load_cfrag
from proto.kms.v1 import coordinator_pb2
from tests.coordinator.test_enrollment_relay import relay, relay_request
from tests.coordinator.test_fan_out import (
    DOMAIN,
    Context,
    World,
    make_world,
    patient_kfrags,
    prefer,
)


@pytest.fixture
def world() -> World:
    return make_world()


def retry(
    world: World, read_id: bytes, *nodes: str
) -> coordinator_pb2.CoordinatorReencryptResponse:
    request = coordinator_pb2.RetryReadRequest(
        read_id=read_id, reported=[coordinator_pb2.ReportedFragment(node_id=n) for n in nodes]
    )
    return asyncio.run(world.service.retry_reencrypt(request, Context()))  # type: ignore[arg-type]


def false_report_of(node_id: str) -> str:
    """The refusal of a report that names ``node_id``'s fragment, which verifies."""
    return f"a false report \\(the fragment from {node_id} verifies\\)"


def lies(node_id: str) -> float:
    return float(metrics.LYING_FRAGMENTS.labels(node=node_id)._value.get())


def stale(node_id: str) -> float:
    return float(metrics.STALE_FRAGMENTS.labels(node=node_id)._value.get())


def test_fragments_are_relayed_unverified_and_kept_under_a_read_id(world: World) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    response = world.run()
    assert "node-2" in {f.node_id for f in response.fragments}  # the app will find it
    assert len(response.read_id) == 16


def test_a_reported_lie_is_checked_replaced_and_its_node_taken_out(world: World) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    before = lies("node-2")
    response = world.run()
    asked = {n for n, node in world.nodes.items() if node.calls}
    retried = retry(world, response.read_id, "node-2")
    assert lies("node-2") == before + 1
    assert "node-2" not in world.pool.in_rotation(time.monotonic())
    fragments = {f.node_id: f.cfrag for f in retried.fragments}
    assert len(fragments) == 3 and "node-2" not in fragments
    # The honest fragments kept, and one from a node the read had not asked (a node
    # asked twice would refuse the signed request as a replay).
    (replacement,) = set(fragments) - asked
    assert sum(n.calls for n in world.nodes.values()) == 4
    _all_verify(world, retried)
    # A read is retried once.
    with pytest.raises(PreconditionFailed, match="already retried"):
        retry(world, response.read_id, "node-2")


def _lie(world: World, how: str) -> Callable[[bytes], bytes]:
    """What a lying node sends instead of its fragment of the world's capsule."""
    capsule = umbral.Capsule.from_bytes(world.request.capsule)
    if how == "a flipped bit":
        return lambda cfrag: cfrag[:60] + bytes([cfrag[60] ^ 1]) + cfrag[61:]
    if how == "garbage":
        return lambda _cfrag: b"not a capsule fragment"
    if how == "a fragment of another capsule":
        other, _ = umbral.encrypt(world.alice.record_public_key(RecordType.LAB_RESULT), b"o" * 32)
        kfrag = world.nodes["node-2"].kfrag
        return lambda _cfrag: bytes(umbral.reencrypt(other, kfrag))
    if how == "a fragment of the patient's kfrag for another record type":
        kfrag = patient_kfrags(world.alice, RecordType.DIAGNOSIS, world.bob)[0]
        return lambda _cfrag: bytes(umbral.reencrypt(capsule, kfrag))
    if how == "a fragment of the patient's kfrag for another grantee":
        carol = Identity.generate("carol")
        kfrag = patient_kfrags(world.alice, RecordType.LAB_RESULT, carol)[0]
        return lambda _cfrag: bytes(umbral.reencrypt(capsule, kfrag))
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "a flipped bit",
        "garbage",
        "a fragment of another capsule",
        "a fragment of the patient's kfrag for another record type",
        "a fragment of the patient's kfrag for another grantee",
    ],
)
def test_every_kind_of_bad_fragment_is_caught_and_replaced(world: World, how: str) -> None:
    world.nodes["node-2"].lie = _lie(world, how)
    prefer(world, "node-2")
    before = lies("node-2")
    response = world.run()
    assert "node-2" in {f.node_id for f in response.fragments}
    retried = retry(world, response.read_id, "node-2")
    assert lies("node-2") == before + 1
    assert "node-2" not in world.pool.in_rotation(time.monotonic())
    assert len(retried.fragments) == 3 and "node-2" not in {f.node_id for f in retried.fragments}
    _all_verify(world, retried)


def _all_verify(world: World, response: coordinator_pb2.CoordinatorReencryptResponse) -> None:
    """As the app checks them: every fragment verifies, each from another kfrag."""
    capsule = umbral.Capsule.from_bytes(world.request.capsule)
    keys = world.alice
    verified = [
        umbral.CapsuleFrag.from_bytes(f.cfrag).verify(
            capsule,
            umbral.PublicKey.from_compressed_bytes(keys.verifying_key()),
            keys.record_public_key(RecordType.LAB_RESULT),
            umbral.PublicKey.from_compressed_bytes(world.bob.umbral_public_key()),
        )
        for f in response.fragments
    ]
    assert len({bytes(v) for v in verified}) == 3


def test_a_suspected_node_is_asked_only_when_needed_and_never_relayed_unverified(
    world: World,
) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    retry(world, world.run().read_id, "node-2")
    world.nodes["node-2"].calls = 0
    for _ in range(3):
        assert "node-2" not in {f.node_id for f in world.run().fragments}
    assert world.nodes["node-2"].calls == 0
    # With two healthy nodes down it is asked, its fragment verified and dropped.
    world.nodes["node-1"].fails = world.nodes["node-3"].fails = True
    with pytest.raises(
        InsufficientFragments,
        match="node-2 \\(DATA_LOSS: returned a capsule fragment that does not verify",
    ):
        world.run()
    assert world.nodes["node-2"].calls == 1


@contextmanager
def frozen_budget(world: World) -> Iterator[Callable[[], float]]:
    """The requester's budget at the coordinator, its clock stopped (no refill) while
    the block runs: what the tokens are now."""
    requesters = world.service._admission._requesters
    requester = ReencryptionQuery.parse(world.request, DOMAIN).requester
    now = time.monotonic()
    with patch.object(requesters, "_clock", lambda: now):
        yield lambda: requesters._tokens(requester, now)


def test_a_node_caught_lying_while_every_fragment_is_verified_is_named_and_taken_out() -> None:
    """ADR 3 as kept by ``verify_every_fragment``: a node whose fragment does not verify
    is replaced at once and leaves rotation, named as any lying node is (ADR 14)."""
    world = make_world(verify_every_fragment=True)
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    before = lies("node-2")
    response = world.run()
    assert "node-2" not in {f.node_id for f in response.fragments}
    assert lies("node-2") == before + 1
    assert "node-2" not in world.pool.in_rotation(time.monotonic())
    world.nodes["node-2"].calls = 0
    world.run()
    assert world.nodes["node-2"].calls == 0  # not asked while the others are enough


def test_a_suspected_node_caught_lying_again_is_suspected_twice_as_long(world: World) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    retry(world, world.run().read_id, "node-2")
    before = lies("node-2")
    world.nodes["node-1"].fails = world.nodes["node-3"].fails = True
    with pytest.raises(InsufficientFragments):
        world.run()  # node-2 asked, as the others are not enough; its lie verified
    assert lies("node-2") == before + 1
    assert world.pool.health["node-2"].lies == 2
    assert world.pool.suspect("node-2", time.monotonic() + 1.5 * SUSPICION_S)


def test_a_replacement_that_does_not_verify_is_not_relayed_and_its_node_is_named(
    world: World,
) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    response = world.run()
    unasked = [n for n, node in world.nodes.items() if not node.calls]
    world.nodes[unasked[0]].corrupt = True
    world.pool.succeeded(unasked[0], 0.00001, time.monotonic())  # asked first
    before = lies(unasked[0])
    retried = retry(world, response.read_id, "node-2")
    assert {f.node_id for f in retried.fragments}.isdisjoint({"node-2", unasked[0]})
    _all_verify(world, retried)
    assert lies(unasked[0]) == before + 1
    assert unasked[0] not in world.pool.in_rotation(time.monotonic())


def test_a_false_report_is_refused_counted_and_charged(world: World) -> None:
    response = world.run()
    honest = response.fragments[0].node_id
    false_before = metrics.FALSE_REPORTS._value.get()
    lies_before = lies(honest)
    with frozen_budget(world) as tokens:
        budget = tokens()
        with pytest.raises(InvalidRequest, match=false_report_of(honest)):
            retry(world, response.read_id, honest)
        # As ten single requests (REFUSAL_COST), as a refused capsule costs.
        assert tokens() == budget - REFUSAL_COST
    assert metrics.FALSE_REPORTS._value.get() == false_before + 1
    assert lies(honest) == lies_before
    assert honest in world.pool.in_rotation(time.monotonic())
    assert sum(n.calls for n in world.nodes.values()) == 3  # no replacement asked


def test_a_report_with_a_lie_and_a_false_one_acts_on_the_lie_and_is_refused(
    world: World,
) -> None:
    """ADR 14 step 4: true lies in a false report are still acted on; the report is
    refused without replacements and charged for its false part."""
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    response = world.run()
    honest = next(f.node_id for f in response.fragments if f.node_id != "node-2")
    false_before = metrics.FALSE_REPORTS._value.get()
    liar_before, honest_before = lies("node-2"), lies(honest)
    with frozen_budget(world) as tokens:
        budget = tokens()
        with pytest.raises(InvalidRequest, match=false_report_of(honest)):
            retry(world, response.read_id, "node-2", honest)
        assert tokens() == budget - REFUSAL_COST
    assert (lies("node-2"), lies(honest)) == (liar_before + 1, honest_before)
    assert metrics.FALSE_REPORTS._value.get() == false_before + 1
    in_rotation = world.pool.in_rotation(time.monotonic())
    assert "node-2" not in in_rotation and honest in in_rotation
    assert sum(n.calls for n in world.nodes.values()) == 3
    with pytest.raises(PreconditionFailed, match="already retried"):
        retry(world, response.read_id, "node-2")


def test_a_flood_of_false_reports_is_paid_for_in_the_reporters_own_reads(world: World) -> None:
    """Each false report costs ten requests, so an app that reports honest nodes gets a
    tenth of the reads it would have had, then is refused before any node is asked."""
    burst = world.service._settings.requester_burst
    reports = 0
    with frozen_budget(world):
        while True:
            try:
                response = world.run()
            except ResourceExhausted:
                break
            with pytest.raises(InvalidRequest, match="a false report"):
                retry(world, response.read_id, response.fragments[0].node_id)
            reports += 1
            assert reports <= burst
    assert 0 < reports <= burst / REFUSAL_COST
    assert sum(n.calls for n in world.nodes.values()) == 3 * reports
    assert all(node_id in world.pool.in_rotation(time.monotonic()) for node_id in world.nodes)


def test_a_report_naming_a_fragment_not_relayed_is_refused_and_the_read_kept(
    world: World,
) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    response = world.run()
    relayed = {f.node_id for f in response.fragments}
    other = next(n for n in world.nodes if n not in relayed)
    with pytest.raises(InvalidRequest, match="was relayed in this read"):
        retry(world, response.read_id, other)
    with pytest.raises(InvalidRequest, match="at least one"):
        retry(world, response.read_id)
    assert len(retry(world, response.read_id, "node-2").fragments) == 3
    with pytest.raises(PreconditionFailed, match="no read is kept"):
        retry(world, b"\x00" * 16, "node-2")
    with pytest.raises(InvalidRequest, match="read_id must be 16 bytes"):
        retry(world, b"\x00" * 17, "node-2")


def test_a_batch_retry_answers_the_reported_capsules_in_one_round(world: World) -> None:
    world.nodes["node-2"].corrupt = True
    prefer(world, "node-2")
    capsule, _ = umbral.encrypt(world.alice.record_public_key(RecordType.LAB_RESULT), b"j" * 32)
    signer = RequestSigner(world.bob.account, world.bob.umbral_public_key(), DOMAIN)
    records = [b"\x01" * 32, b"\x02" * 32, b"\x03" * 32]
    request = signer.batch(
        world.alice.address, [(r, RecordType.LAB_RESULT, bytes(capsule)) for r in records]
    )
    response = asyncio.run(world.service.reencrypt_batch(request, Context()))  # type: ignore[arg-type]
    assert all("node-2" in {f.node_id for f in r.fragments} for r in response.results)
    reported = coordinator_pb2.RetryReadRequest(
        read_id=response.read_id,
        reported=[
            coordinator_pb2.ReportedFragment(record_id=r, node_id="node-2")
            for r in (records[2], records[0])
        ],
    )
    with pytest.raises(InvalidRequest, match="with RetryReencryptBatch"):
        asyncio.run(world.service.retry_reencrypt(reported, Context()))  # type: ignore[arg-type]
    retried = asyncio.run(world.service.retry_reencrypt_batch(reported, Context()))  # type: ignore[arg-type]
    # The reported capsules only, in the read's order, each replaced by one batch call.
    assert [r.record_id for r in retried.results] == [records[0], records[2]]
    for result in retried.results:
        assert result.status == "" and len(result.fragments) == 3
        assert "node-2" not in {f.node_id for f in result.fragments}
    assert sum(n.calls for n in world.nodes.values()) == 4
    assert lies("node-2") >= 2


def test_kept_reads_expire_and_are_bounded(world: World) -> None:
    read = world.service._relayed.peek(world.run().read_id, time.monotonic())
    assert read is not None and len(read.capsules) == 1
    reads = RelayedReads(keep_s=10.0, max_capsules=2)
    first = reads.keep(read, 0.0)
    assert reads.peek(first, 9.9) is read
    assert reads.peek(first, 10.0) is None
    ids = [reads.keep(read, 20.0) for _ in range(3)]
    assert len(reads) == 2 and reads.peek(ids[0], 20.0) is None
    assert reads.take(ids[2], 20.0) is read and reads.take(ids[2], 20.0) is None


def test_a_coordinator_keeps_reads_ten_seconds_and_fifty_thousand_capsules(world: World) -> None:
    """ADR 14's figures are the coordinator's: kept 10 s, at most 50,000 capsules."""
    kept = world.service._relayed
    assert kept.keep_s == 10.0
    read = kept.peek(world.run().read_id, time.monotonic())
    assert read is not None and len(read.capsules) == 1
    now = time.monotonic()
    first = kept.keep(read, now)
    for _ in range(50_000):
        kept.keep(read, now)
    assert len(kept) == 50_000 and kept.peek(first, now) is None


# --- fragments that verify but do not combine (a replayed or stale kfrag set) ---------------


def first_choices(world: World, *nodes: str) -> None:
    """Make ``nodes`` the pool's first choices: the best known latencies."""
    for node_id in world.nodes:
        latency = 0.0001 if node_id in nodes else 0.001
        world.pool.succeeded(node_id, latency, time.monotonic())


def retry_inconsistent(
    world: World, read_id: bytes
) -> coordinator_pb2.CoordinatorReencryptResponse:
    request = coordinator_pb2.RetryReadRequest(read_id=read_id, inconsistent=[b""])
    return asyncio.run(world.service.retry_reencrypt(request, Context()))  # type: ignore[arg-type]


def precursors(response: coordinator_pb2.CoordinatorReencryptResponse) -> dict[str, bytes]:
    return {f.node_id: cfrag_precursor(load_cfrag(f.cfrag)) for f in response.fragments}


def test_a_node_replaying_an_earlier_kfrag_set_is_found_and_the_read_served(
    world: World,
) -> None:
    earlier = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    world.nodes["node-2"].kfrag = earlier[1]
    prefer(world, "node-2")
    lies_before, stale_before = lies("node-2"), stale("node-2")
    response = world.run()
    _all_verify(world, response)  # every fragment verifies: nothing to report as a lie...
    assert len(set(precursors(response).values())) == 2  # ...but they do not combine
    retried = retry_inconsistent(world, response.read_id)
    assert len(retried.fragments) == 3
    assert "node-2" not in precursors(retried)
    assert len(set(precursors(retried).values())) == 1
    _all_verify(world, retried)
    # Named and counted as stale, not as a lie: a node that missed the patient's last
    # enrollment is not suspected, and stays in rotation for everyone else's reads.
    assert (lies("node-2"), stale("node-2")) == (lies_before, stale_before + 1)
    assert "node-2" in world.pool.in_rotation(time.monotonic())
    # Every node the read had not asked was asked, to find the set m nodes agree on.
    assert sum(n.calls for n in world.nodes.values()) == 5


def test_two_nodes_replaying_one_earlier_set_are_outvoted_by_the_rest(world: World) -> None:
    """Two of the three nodes first asked agree with each other on an earlier set: the
    app cannot tell which set is current; the coordinator asks the other two nodes, and
    the set three nodes agree on answers."""
    earlier = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    world.nodes["node-2"].kfrag, world.nodes["node-3"].kfrag = earlier[1], earlier[2]
    first_choices(world, "node-2", "node-3")
    response = world.run()
    assert {"node-2", "node-3"} <= set(precursors(response))
    retried = retry_inconsistent(world, response.read_id)
    agreed = precursors(retried)
    assert len(agreed) == 3 and not {"node-2", "node-3"} & set(agreed)
    assert len(set(agreed.values())) == 1
    _all_verify(world, retried)
    in_rotation = world.pool.in_rotation(time.monotonic())
    assert "node-2" in in_rotation and "node-3" in in_rotation


def test_a_patient_who_gives_nodes_different_sets_gets_no_honest_node_suspected(
    world: World,
) -> None:
    """The patient decides which node gets which kfrag set (a re-grant that reached
    only some nodes does the same): the two nodes left on the other set serve that
    grant no more, but are not named liars, and stay in rotation for every other
    read. The grant's next reads ask them last, so need no retry, though they are the
    fastest nodes."""
    earlier = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    world.nodes["node-4"].kfrag, world.nodes["node-5"].kfrag = earlier[3], earlier[4]
    before = {n: lies(n) for n in world.nodes}
    first_choices(world, "node-1", "node-4", "node-5")
    response = world.run()
    retried = retry_inconsistent(world, response.read_id)
    assert not {"node-4", "node-5"} & set(precursors(retried))
    for _ in range(3):
        first_choices(world, "node-1", "node-4", "node-5")
        read_again(world)
        response = world.run()
        assert set(precursors(response)) == {"node-1", "node-2", "node-3"}
        assert len(set(precursors(response).values())) == 1  # they combine: no retry
    assert {n: lies(n) for n in world.nodes} == before
    assert all(not world.pool.suspect(n, time.monotonic()) for n in world.nodes)
    assert set(world.pool.in_rotation(time.monotonic())) == set(world.nodes)


def read_again(world: World, requester: Identity | None = None) -> None:
    """A fresh signed read of the same record (a node refuses a request it has seen)."""
    who = requester or world.bob
    signer = RequestSigner(who.account, who.umbral_public_key(), DOMAIN)
    world.request = signer.single(
        world.alice.address, b"\x01" * 32, RecordType.LAB_RESULT, world.request.capsule
    )


def test_a_stale_node_is_asked_last_for_that_grant_only_and_first_again_once_enrolled(
    world: World,
) -> None:
    """node-2 missed bob's last enrollment. Once found, bob's reads ask it last; another
    requester's reads (another grant, which node-2 holds) ask it as before; when alice
    enrolls node-2 again through the coordinator, bob's reads ask it first again."""
    earlier = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    current = world.nodes["node-2"].kfrag
    world.nodes["node-2"].kfrag = earlier[1]
    first_choices(world, "node-1", "node-2", "node-3")
    retry_inconsistent(world, world.run().read_id)
    first_choices(world, "node-1", "node-2", "node-3")
    read_again(world)
    assert "node-2" not in precursors(world.run())
    # Another grantee of alice's: node-2 is not stale for that grant.
    carol = Identity.generate("carol")
    world.nodes["node-2"].kfrag = current  # (the fake nodes serve one kfrag each)
    first_choices(world, "node-1", "node-2", "node-3")
    read_again(world, carol)
    assert "node-2" in precursors(world.run())
    # alice enrolls node-2 again for bob, through the coordinator.
    relay(world, relay_request(world))
    first_choices(world, "node-1", "node-2", "node-3")
    read_again(world)
    assert set(precursors(world.run())) == {"node-1", "node-2", "node-3"}


def test_when_no_m_nodes_agree_on_a_set_the_read_fails_and_says_why(world: World) -> None:
    first_set = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    second_set = patient_kfrags(world.alice, RecordType.LAB_RESULT, world.bob)
    world.nodes["node-2"].kfrag, world.nodes["node-3"].kfrag = first_set[1], first_set[2]
    world.nodes["node-4"].kfrag, world.nodes["node-5"].kfrag = second_set[3], second_set[4]
    first_choices(world, "node-1", "node-2", "node-3")
    response = world.run()
    with pytest.raises(InsufficientFragments, match="from 3 kfrag sets .* no 3 of them agree"):
        retry_inconsistent(world, response.read_id)


def test_a_false_claim_of_inconsistency_is_refused_and_charged(world: World) -> None:
    response = world.run()
    false_before = metrics.FALSE_REPORTS._value.get()
    with frozen_budget(world) as tokens:
        budget = tokens()
        with pytest.raises(InvalidRequest, match="a false report .* are of one kfrag set"):
            retry_inconsistent(world, response.read_id)
        assert tokens() == budget - REFUSAL_COST
    assert metrics.FALSE_REPORTS._value.get() == false_before + 1
    assert sum(n.calls for n in world.nodes.values()) == 3  # nobody else asked
    assert len(world.pool.in_rotation(time.monotonic())) == 5


def test_an_inconsistent_record_must_be_one_the_read_relayed(world: World) -> None:
    response = world.run()
    request = coordinator_pb2.RetryReadRequest(
        read_id=response.read_id, inconsistent=[b"\x05" * 32]
    )
    with pytest.raises(InvalidRequest, match="was not relayed in this read"):
        asyncio.run(world.service.retry_reencrypt(request, Context()))  # type: ignore[arg-type]
    empty = coordinator_pb2.RetryReadRequest(read_id=response.read_id)
    with pytest.raises(InvalidRequest, match="report at least one fragment or inconsistent"):
        asyncio.run(world.service.retry_reencrypt(empty, Context()))  # type: ignore[arg-type]
