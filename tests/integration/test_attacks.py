"""The security suite: one test per attack on a node, on the real cluster (anvil, SoftHSM,
gRPC). Each asserts the exact status the attacker gets, and that the cluster keeps serving
honest requests afterwards. Attacks on signed requests (replay, deadline, forged or tampered
signatures) are in test_signed_requests.py; a stolen node database and the log scan in
test_kfrag_protection.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import umbral_pre as umbral
from eth_account import Account

from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient
from clients.sdk.records import parse_envelope
from clients.sdk.signed_requests import RequestSigner, sealed_enrollment
from coordinator.settings import CoordinatorSettings
from core.audit import Receipt, verify_receipt
from core.errors import AccessDenied, ChainRejected, InvalidRequest
from core.record_types import RecordType
from core.registry_types import EmergencyAccessOpened, NodeInfo
from deploy import metrics_scrape
from deploy.anvil import increase_time
from deploy.sample_records import lab_result
from proto import rpc
from proto.half_open_calls import FIRST_MESSAGE_TIMEOUT_S
from proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2
from proto.stubs import CoordinatorStub, NodeStub
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster

LAB, DIAGNOSIS = RecordType.LAB_RESULT, RecordType.DIAGNOSIS


def assert_still_serving(people: People) -> None:
    """The honest doctor still reads the lab result through the whole cluster."""
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()


def capsule_of(people: People, storage_uri: str) -> bytes:
    return bytes(parse_envelope(people.cluster.blob_store().get(storage_uri)).capsule)


def node_refusal(people: People, request: common_pb2.ReencryptionRequest) -> grpc.Call:
    with people.cluster.transport.channel(people.cluster.nodes[0].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).Reencrypt(request, timeout=5)
    assert isinstance(caught.value, grpc.Call)
    return caught.value


def registered_node(people: People, index: int = 0) -> NodeInfo:
    node_id = people.cluster.nodes[index].node_id
    return next(n for n in people.registry.list_nodes() if n.node_id == node_id)


def kfrag_for(patient: Identity, record_type: RecordType, receiving_key: bytes) -> bytes:
    return bytes(
        umbral.generate_kfrags(
            delegating_sk=patient.record_secret_key(record_type),
            receiving_pk=umbral.PublicKey.from_compressed_bytes(receiving_key),
            signer=patient.kfrag_signer(),
            threshold=1,
            shares=1,
            sign_delegating_key=True,
            sign_receiving_key=True,
        )[0]
    )


def enrollment_refusal(people: People, request: common_pb2.EnrollKeyFragmentRequest) -> grpc.Call:
    with people.cluster.transport.channel(people.cluster.nodes[0].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            NodeStub(channel).EnrollKeyFragment(request, timeout=5)
    assert isinstance(caught.value, grpc.Call)
    return caught.value


# --- capsules bound to their records and types ----------------------------------------------


def test_a_capsule_swapped_in_from_another_record_is_refused(people: People) -> None:
    people.grant_doctor([LAB])
    other = people.patient.store_record(lab_result(), LAB)
    signer = people.doctor_signer()
    request = signer.single(
        people.patient.identity.address,
        people.lab.record_id,
        LAB,
        capsule_of(people, other.storage_uri),
    )
    error = node_refusal(people, request)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "capsule is not the one anchored for this record" in error.details()
    assert_still_serving(people)


def test_a_record_of_another_type_is_refused_whatever_type_is_claimed(people: People) -> None:
    people.grant_doctor([LAB])
    signer = people.doctor_signer()
    capsule = capsule_of(people, people.condition.storage_uri)
    patient = people.patient.identity.address
    claimed_lab = node_refusal(
        people, signer.single(patient, people.condition.record_id, LAB, capsule)
    )
    assert claimed_lab.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "record_type lab_result is not the record's type (diagnosis)" in claimed_lab.details()
    honest = node_refusal(
        people, signer.single(patient, people.condition.record_id, DIAGNOSIS, capsule)
    )
    assert honest.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "grant does not cover record type diagnosis" in honest.details()
    assert_still_serving(people)


def test_another_patients_record_is_refused(people: People) -> None:
    """The doctor holds Alice's grant and asks for Carol's record: named as Carol's (who
    granted nothing) or passed off as Alice's, every node refuses."""
    people.grant_doctor([LAB])
    with PatientClient(
        people.new_identity("carol"),
        registry=people.registry,
        blobs=people.cluster.blob_store(),
        coordinator_address=people.cluster.coordinator_address,
        transport=people.cluster.app_transport,
    ) as carol:
        carol.register()
        theirs = carol.store_record(lab_result(), LAB)
        # Nodes judge a requester they hold no kfrag for by their index alone (no chain
        # read): wait until it has the new record, or they rightly call it unknown.
        carol.await_nodes(people.registry.latest_block()[0])
    signer = people.doctor_signer()
    capsule = capsule_of(people, theirs.storage_uri)
    as_carols = node_refusal(
        people, signer.single(carol.identity.address, theirs.record_id, LAB, capsule)
    )
    assert as_carols.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "patient has not granted access to this requester" in as_carols.details()
    as_alices = node_refusal(
        people, signer.single(people.patient.identity.address, theirs.record_id, LAB, capsule)
    )
    assert as_alices.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "record belongs to a different patient" in as_alices.details()
    assert_still_serving(people)


# --- a deactivated record stays unreadable (issue 10) ---------------------------------------


def test_a_deactivated_records_capsule_cannot_come_back_under_a_new_record(people: People) -> None:
    """The doctor holds a lab grant and tries to re-anchor the capsule of a lab record the
    patient deactivated, as a new record of hers: the registry refuses it, whether or not
    she lets him write records for her, and the record stays unreadable."""
    people.grant_doctor([LAB])
    record = people.registry.get_record(people.lab.record_id)
    assert record is not None
    people.patient.await_nodes(people.patient.deactivate(record.record_id))

    def reanchor() -> None:
        people.registry.anchor_record(
            people.doctor.account,
            patient=people.patient.identity.address,
            content_hash=record.content_hash,
            storage_uri=record.storage_uri,
            record_type=LAB,
            capsule_hash=record.capsule_hash,
        )

    with pytest.raises(ChainRejected) as not_hers:
        reanchor()
    assert not_hers.value.reason == "NotRecordWriter"
    people.patient.allow_writer(people.doctor.address)
    with pytest.raises(ChainRejected) as retired:
        reanchor()
    assert retired.value.reason == "CapsuleAlreadyAnchored"
    with people.provider() as doctor, pytest.raises(AccessDenied, match="deactivated"):
        doctor.read_record(record.record_id)


def test_every_node_refuses_a_retired_capsule_whatever_record_is_named(people: People) -> None:
    """A request naming another, active record of the patient but carrying the capsule of
    her deactivated one is refused by every node as a retired capsule."""
    people.grant_doctor([LAB])
    second = people.patient.store_record(lab_result(), LAB)
    retired_capsule = capsule_of(people, people.lab.storage_uri)
    people.patient.await_nodes(people.patient.deactivate(people.lab.record_id))
    request = people.doctor_signer().single(
        people.patient.identity.address, second.record_id, LAB, retired_capsule
    )
    people.every_node_refuses(request, "capsule belongs to a record the patient deactivated")
    with people.provider() as doctor:
        assert doctor.read_record(second.record_id) == lab_result()


# --- enrollment: sealed, signed by the patient, verified against the grant -------------------


def test_enrollment_by_someone_who_is_not_the_patient_is_refused(
    people: People, coordinator: CoordinatorStub
) -> None:
    people.grant_doctor([LAB])
    mallory = people.new_identity("mallory")
    doctor_key = people.doctor.umbral_public_key()
    nodes = [n for n in people.registry.list_nodes() if n.active]
    forged = []
    for node in nodes:
        request = sealed_enrollment(
            mallory.account,
            people.registry.signing_domain(),
            node,
            people.doctor.address,
            doctor_key,
            {LAB: kfrag_for(mallory, LAB, doctor_key)},
        )
        request.patient = bytes.fromhex(people.patient.identity.address[2:])
        forged.append(request)
    # Sent through the coordinator, as the SDK sends them: it checks the patient's
    # signature itself and relays nothing.
    with pytest.raises(grpc.RpcError) as relayed:
        coordinator.EnrollKeyFragments(
            coordinator_pb2.RelayEnrollmentsRequest(enrollments=forged), timeout=10
        )
    assert isinstance(relayed.value, grpc.Call)
    assert relayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature is not by the patient" in relayed.value.details()
    # And straight to a node, which checks it again.
    error = enrollment_refusal(people, forged[0])
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_still_serving(people)


def test_a_kfrag_for_another_receiving_key_is_refused(people: People) -> None:
    people.grant_doctor([LAB])
    alice = people.patient.identity
    eve_key = Identity.generate("eve").umbral_public_key()
    node = registered_node(people)
    doctor_key = people.doctor.umbral_public_key()
    # Said to be for the grant's key, made for Eve's: it does not verify.
    mislabelled = sealed_enrollment(
        alice.account,
        people.registry.signing_domain(),
        node,
        people.doctor.address,
        doctor_key,
        {LAB: kfrag_for(alice, LAB, eve_key)},
    )
    error = enrollment_refusal(people, mislabelled)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "does not verify against the patient's registered lab_result key" in error.details()
    # Honestly labelled for Eve's key: no grant or opt-in names it.
    for_eve = sealed_enrollment(
        alice.account,
        people.registry.signing_domain(),
        node,
        people.doctor.address,
        eve_key,
        {LAB: kfrag_for(alice, LAB, eve_key)},
    )
    error = enrollment_refusal(people, for_eve)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "names this receiving key" in error.details()
    assert_still_serving(people)


def test_a_replayed_enrollment_is_unauthenticated(
    people: People, coordinator: CoordinatorStub
) -> None:
    """One signed enrollment is accepted once per node: sent again, straight to the node or
    relayed, it is refused before the node reads the chain or opens anything in its HSM."""
    people.grant_doctor([LAB])
    alice = people.patient.identity
    doctor_key = people.doctor.umbral_public_key()
    nodes = [n for n in people.registry.list_nodes() if n.active]
    kfrags = umbral.generate_kfrags(
        delegating_sk=alice.record_secret_key(LAB),
        receiving_pk=umbral.PublicKey.from_compressed_bytes(doctor_key),
        signer=alice.kfrag_signer(),
        threshold=people.cluster.threshold,
        shares=len(nodes),
        sign_delegating_key=True,
        sign_receiving_key=True,
    )

    def enrollments() -> list[common_pb2.EnrollKeyFragmentRequest]:
        domain = people.registry.signing_domain()
        return [
            sealed_enrollment(
                alice.account, domain, node, people.doctor.address, doctor_key, {LAB: bytes(k)}
            )
            for node, k in zip(nodes, kfrags, strict=True)
        ]

    def relay(sent: list[common_pb2.EnrollKeyFragmentRequest]) -> dict[str, tuple[str, str]]:
        response = coordinator.EnrollKeyFragments(
            coordinator_pb2.RelayEnrollmentsRequest(enrollments=sent), timeout=10
        )
        return {r.node_id: (r.status, r.reason) for r in response.results}

    signed = enrollments()
    assert {status for status, _ in relay(signed).values()} == {""}
    here = next(e for e in signed if e.node_id == people.cluster.nodes[0].node_id)
    error = enrollment_refusal(people, here)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == (
        "enrollment already received (nonce already used); the patient must sign a new one"
    )
    assert {r for r, _ in relay(signed).values()} == {"UNAUTHENTICATED"}
    # The patient enrolls again by signing anew; the cluster keeps serving.
    assert {status for status, _ in relay(enrollments()).values()} == {""}
    assert_still_serving(people)


def test_a_kfrag_sealed_to_another_node_does_not_open(people: People) -> None:
    people.grant_doctor([LAB])
    alice = people.patient.identity
    doctor_key = people.doctor.umbral_public_key()
    elsewhere = registered_node(people, 1)
    request = sealed_enrollment(
        alice.account,
        people.registry.signing_domain(),
        elsewhere,
        people.doctor.address,
        doctor_key,
        {LAB: kfrag_for(alice, LAB, doctor_key)},
    )
    error = enrollment_refusal(people, request)  # sent to node 0
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sealed to node" in error.details()
    assert_still_serving(people)


# --- emergency access ---------------------------------------------------------------------


def test_emergency_access_is_served_only_inside_its_window(people: People) -> None:
    people.grant_doctor([LAB])
    responder = people.new_identity("er-team", emergency=True)
    alice = people.patient.identity
    start = people.registry.latest_block()[0]
    people.patient.opt_in_emergency(
        responder.address,
        responder.umbral_public_key(),
        [LAB],
        threshold=people.cluster.threshold,
    )
    with people.provider(responder) as er:
        with pytest.raises(AccessDenied, match="not granted access"):
            er.read_record(people.lab.record_id, "ETREAT")  # opted in, window not open
        block, expires_at = er.open_emergency_access(alice.address, 60)
        people.patient.await_nodes(block)
        with pytest.raises(AccessDenied, match="serves purpose_of_use ETREAT only"):
            er.read_record(people.lab.record_id, "TREAT")
        assert er.read_record(people.lab.record_id, "ETREAT") == lab_result()
        # The patient can watch for it.
        opened = [
            e
            for e in people.registry.events(start, people.registry.latest_block()[0])
            if isinstance(e, EmergencyAccessOpened) and e.patient == alice.address
        ]
        assert [(e.responder, e.expires_at) for e in opened] == [(responder.address, expires_at)]
        increase_time(people.cluster.rpc_url, 120)
        people.patient.await_nodes(people.registry.latest_block()[0])
        with pytest.raises(AccessDenied, match="grant expired at"):
            er.read_record(people.lab.record_id, "ETREAT")
    assert_still_serving(people)


def test_revoking_the_emergency_role_ends_an_open_window_at_every_node(
    people: People,
) -> None:
    people.grant_doctor([LAB])
    responder = people.new_identity("er-leaver", emergency=True)
    alice = people.patient.identity
    people.patient.opt_in_emergency(
        responder.address, responder.umbral_public_key(), [LAB], threshold=people.cluster.threshold
    )
    with people.provider(responder) as er:
        block, _ = er.open_emergency_access(alice.address, 3600)
        people.patient.await_nodes(block)
        assert er.read_record(people.lab.record_id, "ETREAT") == lab_result()
        # The hospital takes the role away (the responder left): the hour-long window ends
        # now, at every node, though neither the patient nor the responder did anything.
        admin = people.cluster.identity("admin")
        revoked = people.registry.block_of_transaction(
            people.registry.revoke_emergency_role(admin.account, responder.address)
        )
        people.patient.await_nodes(revoked)
        with pytest.raises(AccessDenied, match="no longer holds the emergency role"):
            er.read_record(people.lab.record_id, "ETREAT")
    assert_still_serving(people)


def test_an_emergency_window_longer_than_the_maximum_is_refused(people: People) -> None:
    responder = people.new_identity("er-long", emergency=True)
    people.patient.opt_in_emergency(
        responder.address, responder.umbral_public_key(), [LAB], threshold=people.cluster.threshold
    )
    # The SDK refuses before sending; the registry enforces the same bound on-chain
    # (tests/contracts).
    with people.provider(responder) as er, pytest.raises(InvalidRequest, match="1 to 14400 s"):
        er.open_emergency_access(people.patient.identity.address, 4 * 3600 + 1)


# --- floods are stopped at the coordinator (issue 10) ---------------------------------------

#: the coordinator's default budgets (coordinator/settings.py), which the cluster runs with
REQUESTER_BURST = CoordinatorSettings.requester_burst
PEER_REFUSAL_BURST = CoordinatorSettings.peer_refusal_burst
PEER_REFUSALS_PER_S = CoordinatorSettings.peer_refusals_per_s


def flood(
    coordinator: CoordinatorStub, requests: list[common_pb2.ReencryptionRequest]
) -> Counter[grpc.StatusCode]:
    """Send every request at once; how each was answered."""
    calls = [coordinator.Reencrypt.future(r, timeout=10) for r in requests]
    return Counter(call.exception().code() for call in calls)  # type: ignore[union-attr]


def refill_the_address_budget() -> None:
    """Every test comes from 127.0.0.1: give its refusal budget back to the next ones."""
    time.sleep(PEER_REFUSAL_BURST / PEER_REFUSALS_PER_S + 0.5)


def test_one_requester_flooding_refused_requests_is_stopped_at_the_coordinator(
    people: People, coordinator: CoordinatorStub
) -> None:
    people.grant_doctor([LAB])
    assert_still_serving(people)  # the doctor has been served: its own budget is whole
    stranger = people.new_identity("stranger", provider=True)
    signer = RequestSigner(
        stranger.account, stranger.umbral_public_key(), people.registry.signing_domain()
    )
    capsule = capsule_of(people, people.lab.storage_uri)
    patient = people.patient.identity.address
    requests = [signer.single(patient, people.lab.record_id, LAB, capsule) for _ in range(40)]
    try:
        codes = flood(coordinator, requests)
        # A requester not served pays a refusal's price (10) up front, and one refusal of
        # its address's budget: at most 20 reach the nodes, which refuse them; the rest
        # never leave the coordinator.
        reached = min(REQUESTER_BURST // 10, PEER_REFUSAL_BURST) + 2  # 2: refills meanwhile
        assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert 1 <= codes[grpc.StatusCode.PERMISSION_DENIED] <= reached
        assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 40 - reached
        assert_still_serving(people)
    finally:
        refill_the_address_budget()


def _throw_away_reads(people: People, count: int) -> list[common_pb2.ReencryptionRequest]:
    """Reads of the lab record signed by ``count`` fresh keys nobody granted."""
    capsule = capsule_of(people, people.lab.storage_uri)
    patient = people.patient.identity.address
    domain = people.registry.signing_domain()
    return [
        RequestSigner(Account.create(), Identity.generate("x").umbral_public_key(), domain).single(
            patient, people.lab.record_id, LAB, capsule
        )
        for _ in range(count)
    ]


def test_throw_away_keys_are_held_to_their_address_budget(
    people: People, coordinator: CoordinatorStub
) -> None:
    people.grant_doctor([LAB])
    assert_still_serving(people)
    requests = _throw_away_reads(people, 40)
    try:
        codes = flood(coordinator, requests)
        assert set(codes) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes[grpc.StatusCode.PERMISSION_DENIED] <= PEER_REFUSAL_BURST + 2
        assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 40 - PEER_REFUSAL_BURST - 2
        assert_still_serving(people)  # served lately: not held to the address's budget
    finally:
        refill_the_address_budget()


def _answered_at(
    stub: CoordinatorStub, requests: list[common_pb2.ReencryptionRequest]
) -> list[tuple[grpc.StatusCode, float]]:
    """Every request sent at once on ``stub``'s connection: each one's status and when
    (seconds after the first was sent) it was answered."""
    started = time.monotonic()
    calls = [stub.Reencrypt.future(r, timeout=10) for r in requests]
    at: dict[int, float] = {}

    def answered(i: int) -> Callable[[object], None]:
        def note(_call: object) -> None:
            at[i] = time.monotonic() - started

        return note

    for i, call in enumerate(calls):
        call.add_done_callback(answered(i))
    codes = [call.exception().code() for call in calls]  # type: ignore[union-attr]
    while len(at) < len(calls):  # the callbacks run on gRPC's threads
        time.sleep(0.01)
    return [(code, at[i]) for i, code in enumerate(codes)]


def test_one_connection_holds_at_most_64_calls_at_the_coordinator(people: People) -> None:
    """The threat model's "a connection holds at most 64 calls": throw-away keys past
    their address's budget are each answered after THROTTLED_ANSWER_DELAY_S (1 s),
    holding their call meanwhile. Of 100 sent at once on one plain connection, at most
    64 are held together (those answered in the first second's wave); the others wait
    for a turn, or are refused (UNAVAILABLE) when grpcio's client sends them past the
    limit anyway."""
    try:
        with people.cluster.coordinator_channel() as channel:
            stub = CoordinatorStub(channel)
            flood(stub, _throw_away_reads(people, PEER_REFUSAL_BURST + 5))  # budget spent
            answers = _answered_at(stub, _throw_away_reads(people, 100))
        codes = Counter(code for code, _ in answers)
        # Throttled, or refused a slot; a few are judged by the nodes (PERMISSION_DENIED)
        # as the address's refusal budget refills meanwhile (5/s).
        assert set(codes) <= {
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.PERMISSION_DENIED,
        }, codes
        held = [t for code, t in answers if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(held) >= 60, codes
        assert min(held) >= 0.9, sorted(held)  # each throttled call is answered after 1 s
        first_wave = [t for t in held if t < 1.5]
        assert rpc.MAX_CALLS_PER_CONNECTION == 64
        assert 50 <= len(first_wave) <= 64, sorted(held)
    finally:
        refill_the_address_budget()


def test_an_apps_channel_never_sends_more_calls_than_the_coordinator_holds(
    people: People,
) -> None:
    """The SDK's channel (proto/rpc.py ``bounded``) holds back calls past half the 64 a
    connection may have in flight: 100 at once are all answered (in waves), none refused
    for want of a slot. (A bound of 64 itself still met refusals, 8 to 10 of 100: the
    coordinator still counts a call the app has seen answered, and refuses the one sent
    in its place.)"""
    try:
        with rpc.bounded(people.cluster.coordinator_channel()) as channel:
            stub = CoordinatorStub(channel)
            flood(stub, _throw_away_reads(people, PEER_REFUSAL_BURST + 5))  # budget spent
            answers = _answered_at(stub, _throw_away_reads(people, 100))
        codes = Counter(code for code, _ in answers)
        assert set(codes) <= {
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.PERMISSION_DENIED,
        }, codes
        assert rpc.APP_CALLS_PER_CONNECTION == 32
        assert max(t for _, t in answers) >= 1.8  # the last went in a second wave
    finally:
        refill_the_address_budget()


# --- a hostile ReencryptMany call (ADR 16) ----------------------------------------------------


@pytest.mark.parametrize("target", ["coordinator", "node"])
def test_calls_that_never_send_their_request_are_ended(people: People, target: str) -> None:
    """Half-open calls (headers, then nothing) held a server's memory for as long as
    their connection lived (3,200 of them: 70 MiB of the coordinator, none ended). On
    two connections of their own, 16 calls each to a read method and to the health
    check (at the coordinator, as an app; at a node, with the operator's certificate,
    and to the audit service too): every one is ended DEADLINE_EXCEEDED at
    FIRST_MESSAGE_TIMEOUT_S, and counted; an honest doctor reads meanwhile."""
    people.grant_doctor([LAB])
    cluster = people.cluster
    if target == "coordinator":
        transport, address, server_name = cluster.app_transport, cluster.coordinator_address, None
        url = cluster.coordinator_metrics_url
        counted = "kms_coordinator_calls_without_request_total"
        paths = ["/kms.v1.Coordinator/Reencrypt", "/grpc.health.v1.Health/Check"]
    else:
        node = cluster.nodes[0]
        transport, address, server_name = cluster.transport, node.address, node.node_id
        url, counted = node.metrics_url, "kms_node_calls_without_request_total"
        paths = [
            "/kms.v1.KmsNode/Reencrypt",
            "/kms.v1.Audit/GetCheckpoint",
            "/grpc.health.v1.Health/Check",
        ]
    before = metrics_scrape.total(metrics_scrape.scrape(url), counted)
    never = threading.Event()

    def nothing() -> Iterator[bytes]:
        never.wait()
        yield from ()

    channels = [
        transport.channel(
            address,
            server_name=server_name,
            options=[("grpc.use_local_subchannel_pool", 1), ("medkms.test.connection", i)],
        )
        for i in range(2)
    ]
    try:
        started = time.monotonic()
        calls: list[Any] = [
            channel.stream_unary(path).future(nothing())  # type: ignore[arg-type]
            for channel in channels
            for path in paths
            for _ in range(16)
        ]
        assert_still_serving(people)
        errors = [call.exception(timeout=FIRST_MESSAGE_TIMEOUT_S + 20) for call in calls]
        ended = time.monotonic() - started
        assert all(isinstance(e, grpc.Call) for e in errors), errors
        assert {e.code() for e in errors} == {grpc.StatusCode.DEADLINE_EXCEEDED}, errors
        assert FIRST_MESSAGE_TIMEOUT_S <= ended < FIRST_MESSAGE_TIMEOUT_S + 10
        after = metrics_scrape.total(metrics_scrape.scrape(url), counted)
        assert after - before == len(calls) == 32 * len(paths)
    finally:
        never.set()
        for channel in channels:
            channel.close()


def test_a_hostile_many_call_has_each_read_judged_alone(people: People) -> None:
    """Sent straight to a node by a holder of a client certificate: a call larger than
    allowed, or empty, is refused whole; in one call the same signed read twice is served
    once, and a stranger's read and a tampered one are refused alone, while the doctor's
    read is served with a receipt of its own."""
    people.grant_doctor([LAB])
    capsule = capsule_of(people, people.lab.storage_uri)
    patient, record_id = people.patient.identity.address, people.lab.record_id
    doctor = people.doctor_signer()
    stranger = people.new_identity("stranger", provider=True)
    domain = people.registry.signing_domain()
    stranger_read = RequestSigner(stranger.account, stranger.umbral_public_key(), domain).single(
        patient, record_id, LAB, capsule
    )
    read = doctor.single(patient, record_id, LAB, capsule)
    tampered = doctor.single(patient, record_id, LAB, capsule)
    tampered.deadline += 1  # no longer what the doctor signed
    tampered.request_id = ""  # the node derives it from what is sent
    reads = [read, read, stranger_read, tampered]
    call = node_pb2.ReencryptManyRequest(reads=[node_pb2.NodeRead(single=r) for r in reads])
    with people.cluster.transport.channel(people.cluster.nodes[0].address) as channel:
        node = NodeStub(channel)
        results = node.ReencryptMany(call, timeout=10).results
        for too_large in (
            node_pb2.ReencryptManyRequest(reads=[node_pb2.NodeRead(single=read)] * 17),
            node_pb2.ReencryptManyRequest(),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                node.ReencryptMany(too_large, timeout=5)
            assert isinstance(caught.value, grpc.Call)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "a call holds 1 to 16 reads" in (caught.value.details() or "")
    assert [r.WhichOneof("result") for r in results] == ["single", "refusal", "refusal", "refusal"]
    fragment = results[0].single.fragment
    assert verify_receipt(
        Receipt.from_fields(fragment.receipt), registered_node(people).signing_public_key
    )
    refusals = [(r.refusal.status, r.refusal.message) for r in results[1:]]
    assert refusals[0] == ("UNAUTHENTICATED", "nonce already used")
    assert refusals[1][0] == "PERMISSION_DENIED"
    assert refusals[2][0] == "UNAUTHENTICATED"
    assert_still_serving(people)
