"""A lying node and a lying coordinator, on the real cluster: neither can make an app
accept a wrong key, and honest answers still get through.

- A compromised node (its machine and TLS identity) returns corrupted capsule
  fragments: the coordinator relays them unverified, the app finds them bad and reports
  them (ADR 14); the coordinator checks, names the node (log, metric), takes it out of
  rotation and answers with verified replacements, so reads keep working, and the node's
  fragments are never relayed again while it is suspected.
- A lying app reports an honest node's fragment: refused, counted, and the node stays.
- A compromised coordinator returns one corrupted fragment among good ones: the app
  verifies every fragment itself and decrypts with the others. Returning garbage only
  gets it a clear IntegrityError at the app, never wrong plaintext.
- A compromised coordinator rewrites the request id: every node refuses the rewritten
  request, and derives the id it audits from what the app signed, so the audit logs
  (and the auditor's report) carry the app's id whatever the coordinator sends.
"""

from __future__ import annotations

import json
import secrets
import sys
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.sdk.provider import ProviderClient, RecordRead
from clients.sdk.records import parse_envelope
from core.audit import AuditEntry, verify_receipt
from core.errors import AccessDenied, IntegrityError, KmsError
from core.record_types import RecordType
from core.request_auth import signing_digest
from deploy import processes
from deploy.certs import ClusterCa
from deploy.local_cluster import HOST, LocalCluster
from deploy.sample_records import diagnosis, lab_result
from proto.kms.v1 import audit_pb2, common_pb2, coordinator_pb2, node_pb2
from proto.stubs import COORDINATOR_SERVICE, NODE_SERVICE, AuditStub, CoordinatorStub, NodeStub
from proto.transport import Transport
from tests.integration.conftest import People
from tests.kms_node.test_service import signed_claims

pytestmark = pytest.mark.cluster


def _corrupt(cfrag: bytes) -> bytes:
    """Flip one bit in the middle: still parses as often as not, never verifies."""
    middle = len(cfrag) // 2
    return cfrag[:middle] + bytes([cfrag[middle] ^ 0x01]) + cfrag[middle + 1 :]


def _serve(
    service: Any,
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
    transport: Transport,
    *,
    mtls: bool,
) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = processes.free_port()
    transport.add_port(server, f"{HOST}:{port}", require_client_cert=mtls)
    server.start()
    return server, f"{HOST}:{port}"


def _unary(
    request: type[Any], response: type[Any], handler: Callable[[Any, Any], Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def _app(people: People, coordinator_address: str) -> ProviderClient:
    """The test's doctor, as an app talking to the coordinator at ``coordinator_address``."""
    return ProviderClient(
        people.doctor,
        registry=people.registry,
        blobs=people.cluster.blob_store(),
        coordinator_address=coordinator_address,
        transport=people.cluster.app_transport,
    )


# --- a compromised node -------------------------------------------------------------------


class LyingNode:
    """Stands in for node-1 with node-1's own TLS identity; asks the real node-1 and
    corrupts every fragment it returns."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.node = cluster.nodes[0]
        self.corrupted = 0
        #: ReencryptMany calls: reads that met at the liar and went together (ADR 16)
        self.many_calls = 0
        self._upstream = cluster.transport.channel(self.node.address, server_name=self.node.node_id)
        self._stub = NodeStub(self._upstream)
        ca = ClusterCa.ensure(cluster.state_dir / "tls")
        identity = ca.server_cert(self.node.node_id)
        self.transport = Transport.tls(ca.ca_cert, identity.cert, identity.key)

    def tamper(self, cfrag: bytes) -> bytes:
        """What the liar returns instead of the real node's ``cfrag``."""
        return _corrupt(cfrag)

    def reencrypt(
        self, request: common_pb2.ReencryptionRequest, _ctx: object
    ) -> node_pb2.ReencryptResponse:
        response = self._stub.Reencrypt(request, timeout=5)
        response.fragment.cfrag = self.tamper(response.fragment.cfrag)
        self.corrupted += 1
        return response

    def reencrypt_batch(
        self, request: common_pb2.ReencryptionBatchRequest, _ctx: object
    ) -> node_pb2.ReencryptBatchResponse:
        response = self._stub.ReencryptBatch(request, timeout=5)
        for outcome in response.outcomes:
            if not outcome.status:
                outcome.fragment.cfrag = self.tamper(outcome.fragment.cfrag)
        self.corrupted += 1
        return response

    def reencrypt_many(
        self, request: node_pb2.ReencryptManyRequest, _ctx: object
    ) -> node_pb2.ReencryptManyResponse:
        response = self._stub.ReencryptMany(request, timeout=5)
        for result in response.results:
            if result.HasField("single"):
                result.single.fragment.cfrag = self.tamper(result.single.fragment.cfrag)
            for outcome in result.batch.outcomes:
                if not outcome.status:
                    outcome.fragment.cfrag = self.tamper(outcome.fragment.cfrag)
        self.corrupted += 1
        self.many_calls += 1
        return response

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        return {
            "ReencryptMany": _unary(
                node_pb2.ReencryptManyRequest, node_pb2.ReencryptManyResponse, self.reencrypt_many
            ),
            "Reencrypt": _unary(
                common_pb2.ReencryptionRequest, node_pb2.ReencryptResponse, self.reencrypt
            ),
            "ReencryptBatch": _unary(
                common_pb2.ReencryptionBatchRequest,
                node_pb2.ReencryptBatchResponse,
                self.reencrypt_batch,
            ),
        }

    def close(self) -> None:
        self._upstream.close()


class ReplayingNode(LyingNode):
    """Answers every read with the fragment ``replayed`` (once the test has set it): one
    the real node-1 gave earlier."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(cluster)
        self.replayed: bytes | None = None

    def tamper(self, cfrag: bytes) -> bytes:
        return cfrag if self.replayed is None else self.replayed


@dataclass(frozen=True)
class LiarsCoordinator:
    """A second, real coordinator process whose node-1 is the liar."""

    address: str
    liar: LyingNode
    metrics_url: str
    log: Path

    def metric(self, series: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == series:
                    return float(value)
        raise AssertionError(f"{series} is not exported")

    def lies(self) -> float:
        """The liar's fragments the coordinator found not to verify."""
        return self.metric(
            f'kms_coordinator_lying_fragments_total{{node="{self.liar.node.node_id}"}}'
        )

    def stale(self) -> float:
        """The liar's fragments the coordinator found of another kfrag set than m nodes'."""
        return self.metric(
            f'kms_coordinator_stale_fragments_total{{node="{self.liar.node.node_id}"}}'
        )

    def read_until_caught(self, read: Callable[[], None], tries: int = 30) -> float:
        """``read`` (which checks what it read) until the liar is caught, at most
        ``tries`` times; the lies counted then."""
        for _ in range(tries):
            read()
            if self.lies():
                break
        return self.lies()

    def liar_calls(self) -> str:
        """What the coordinator saw of the liar, for a failure's message."""
        node = self.liar.node.node_id
        series = [
            f'kms_coordinator_node_call_duration_seconds_count{{node="{node}"}}',
            f'kms_coordinator_node_abandoned_total{{node="{node}"}}',
            f'kms_coordinator_node_in_rotation{{node="{node}"}}',
        ]
        seen = ", ".join(f"{s.split('{')[0]} {self.metric(s)}" for s in series)
        return f"the liar corrupted {self.liar.corrupted} answers; coordinator: {seen}"

    def events(self, event: str) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        found = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in found if e.get("event") == event]


@pytest.fixture
def coordinator_with_a_lying_node(cluster: LocalCluster) -> Iterator[LiarsCoordinator]:
    """A second, real coordinator process whose node-1 is the liar."""
    with _coordinator_with(cluster, LyingNode(cluster)) as relay:
        yield relay


@pytest.fixture
def coordinator_with_a_replaying_node(cluster: LocalCluster) -> Iterator[LiarsCoordinator]:
    """A second, real coordinator process whose node-1 replays its first fragment."""
    with _coordinator_with(cluster, ReplayingNode(cluster)) as relay:
        yield relay


@pytest.fixture
def verifying_coordinator_with_a_lying_node(
    cluster: LocalCluster,
) -> Iterator[LiarsCoordinator]:
    """The same, verifying every fragment before relaying it."""
    with _coordinator_with(cluster, LyingNode(cluster), verify_every_fragment=True) as relay:
        yield relay


@contextmanager
def _coordinator_with(
    cluster: LocalCluster, liar: LyingNode, **settings: object
) -> Iterator[LiarsCoordinator]:
    """A second, real coordinator process whose node-1 is ``liar``, with ``settings``
    over the cluster coordinator's."""
    server, liar_address = _serve(
        NODE_SERVICE.full_name, liar.handlers(), liar.transport, mtls=True
    )
    config_path = Path(cluster.data["coordinator"]["config"])
    config = {**tomllib.loads(config_path.read_text()), **settings}
    address = f"{HOST}:{processes.free_port()}"
    metrics_listen = f"{HOST}:{processes.free_port()}"
    lines = []
    for key, value in config.items():
        if key == "listen":
            value = address
        if key == "metrics_listen":
            value = metrics_listen
        if key != "nodes":
            lines.append(f"{key} = {_toml(value)}")
    for node in config["nodes"]:
        target = liar_address if node["node_id"] == liar.node.node_id else node["address"]
        lines += ["[[nodes]]", f'node_id = "{node["node_id"]}"', f'address = "{target}"']
    name = f"coordinator-with-liar-{secrets.token_hex(4)}"  # its own log per test
    second = config_path.with_name(f"{name}.toml")
    second.write_text("\n".join(lines) + "\n")
    log = cluster.state_dir / "logs" / f"{name}.log"
    process = processes.spawn(
        [sys.executable, "-m", "cli.coordinator", "serve", "--config", str(second)], log
    )
    try:
        processes.wait_until(
            name,
            lambda: processes.grpc_serving(address, cluster.app_transport),
            process,
            log,
        )
        yield LiarsCoordinator(address, liar, f"http://{metrics_listen}/metrics", log)
    finally:
        process.terminate()
        process.wait(timeout=10)
        server.stop(grace=None)
        liar.close()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read_until_caught_and_after(people: People, relay: LiarsCoordinator) -> None:
    """The doctor reads through ``relay`` until its liar is caught, then six times more;
    every read opens the record. The liar was named once and is out of rotation: while
    suspected it is asked only if the four others are not enough, and what it sends is
    verified first."""
    liar = relay.liar.node.node_id
    people.grant_doctor()
    with _app(people, relay.address) as doctor:

        def read() -> None:
            assert doctor.read_record(people.lab.record_id) == lab_result()

        assert relay.read_until_caught(read) == 1, relay.liar_calls()
        assert relay.metric(f'kms_coordinator_node_in_rotation{{node="{liar}"}}') == 0
        for _ in range(6):
            read()
    assert relay.lies() == 1
    (lied,) = relay.events("node_lied")
    assert lied["node_id"] == liar
    assert lied["record_id"] == people.lab.record_id.hex()


def test_a_node_returning_corrupted_fragments_is_caught_named_and_taken_out(
    people: People, coordinator_with_a_lying_node: LiarsCoordinator
) -> None:
    relay = coordinator_with_a_lying_node
    assert relay.lies() == 0  # exported from the start: the alert sees the first
    _read_until_caught_and_after(people, relay)
    # The read the liar took part in succeeded through one retry, which replaced it;
    # nothing of it was relayed again.
    (retried,) = relay.events("reencrypt_retried")
    assert relay.liar.node.node_id not in retried["replaced"][people.lab.record_id.hex()]


def test_a_lying_node_is_named_and_taken_out_when_every_fragment_is_verified(
    people: People, verifying_coordinator_with_a_lying_node: LiarsCoordinator
) -> None:
    """With ``verify_every_fragment`` the coordinator drops the liar's fragment before
    relaying it, names the node as if an app had reported it, and takes it out."""
    relay = verifying_coordinator_with_a_lying_node
    _read_until_caught_and_after(people, relay)
    assert relay.events("reencrypt_retried") == []  # nothing bad reached the app


def test_a_batch_read_meeting_a_lying_node_is_retried_once_for_all_its_records(
    people: People, coordinator_with_a_lying_node: LiarsCoordinator
) -> None:
    relay = coordinator_with_a_lying_node
    liar = relay.liar.node.node_id
    people.grant_doctor([RecordType.LAB_RESULT, RecordType.DIAGNOSIS])
    records = [people.lab.record_id, people.condition.record_id]
    reads: list[dict[bytes, RecordRead | KmsError]] = []
    with _app(people, relay.address) as doctor:

        def read() -> None:
            reads.append(doctor.read_records_with_receipts(records))
            plaintexts = {r: getattr(o, "plaintext", o) for r, o in reads[-1].items()}
            assert plaintexts == {records[0]: lab_result(), records[1]: diagnosis()}

        # One lie per record, found in one batch: one retry replaced both.
        assert relay.read_until_caught(read) == 2, relay.liar_calls()
    assert {e["record_id"] for e in relay.events("node_lied")} == {r.hex() for r in records}
    (retried,) = relay.events("reencrypt_retried")
    assert set(retried["replaced"]) == {r.hex() for r in records}
    # The receipts returned are those of the fragments that opened each record: the
    # replacements', not the liar's (its receipt is genuine: it did log the request).
    keys = {n.node_id: n.signing_public_key for n in people.registry.list_nodes()}
    for record_id in records:
        caught = reads[-1][record_id]
        assert isinstance(caught, RecordRead)
        used = sorted(r.node_id for r in caught.receipts)
        assert used == sorted(retried["replaced"][record_id.hex()])
        assert liar not in retried["replaced"][record_id.hex()]
        assert len(caught.receipts) == people.cluster.threshold
        assert all(verify_receipt(r, keys[r.node_id]) for r in caught.receipts)


def test_a_lying_node_is_caught_while_reads_of_several_doctors_go_together(
    people: People, coordinator_with_a_lying_node: LiarsCoordinator
) -> None:
    """Reads of different doctors coalesced into one call to the liar (ADR 16) are each
    verified by their app and retried on their own: every read gets the record."""
    relay = coordinator_with_a_lying_node
    liar = relay.liar.node.node_id
    doctors = [people.granted_doctor(f"dr-{i}") for i in range(4)]
    results = people.read_at_once(doctors, rounds=4, coordinator_address=relay.address)
    plaintexts = [getattr(r, "plaintext", r) for r in results]
    assert plaintexts == [lab_result()] * 16, relay.liar_calls()
    assert relay.lies() >= 1, relay.liar_calls()
    assert relay.metric(f'kms_coordinator_node_in_rotation{{node="{liar}"}}') == 0
    assert {e["node_id"] for e in relay.events("node_lied")} == {liar}


def test_a_false_report_is_refused_counted_and_the_node_kept(
    people: People, coordinator_with_a_lying_node: LiarsCoordinator
) -> None:
    relay = coordinator_with_a_lying_node
    people.grant_doctor()
    capsule = parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule
    request = people.doctor_signer().single(
        people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
    )
    with people.cluster.app_transport.channel(relay.address) as channel:
        coordinator = CoordinatorStub(channel)
        answer = coordinator.Reencrypt(request, timeout=10)
        honest = next(f.node_id for f in answer.fragments if f.node_id != relay.liar.node.node_id)
        report = coordinator_pb2.RetryReadRequest(
            read_id=answer.read_id, reported=[coordinator_pb2.ReportedFragment(node_id=honest)]
        )
        with pytest.raises(grpc.RpcError) as caught:
            coordinator.RetryReencrypt(report, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"a false report (the fragment from {honest} verifies)" in str(
            caught.value.details()
        )
        # The read was retried once, falsely: it is gone.
        with pytest.raises(grpc.RpcError) as again:
            coordinator.RetryReencrypt(report, timeout=10)
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert relay.metric("kms_coordinator_false_reports_total") == 1
    assert relay.metric(f'kms_coordinator_lying_fragments_total{{node="{honest}"}}') == 0
    assert relay.metric(f'kms_coordinator_node_in_rotation{{node="{honest}"}}') == 1
    (false,) = relay.events("false_report")
    assert false["nodes"] == [honest]
    assert false["requester"].lower() == people.doctor.address.lower()


def test_a_node_replaying_a_fragment_of_an_earlier_grant_cannot_make_reads_fail(
    people: People, coordinator_with_a_replaying_node: LiarsCoordinator
) -> None:
    """A compromised node keeps the fragment it gave for a record under the patient's
    grant and, once she renews the grant (every node gets a kfrag of a new set), sends
    that one again. It verifies (same capsule, same keys) but does not combine with the
    new set's fragments: the app reports the record inconsistent, and the coordinator
    finds the set m nodes agree on, answers with it and names the node. It is counted as
    stale, not as a liar, and stays in rotation: an honest node that missed a re-grant
    looks the same, and the patient chooses who gets which set (ADR 14, amended). It is
    asked last for this grant's reads after that. Every read opens the record."""
    relay = coordinator_with_a_replaying_node
    liar = relay.liar
    assert isinstance(liar, ReplayingNode)
    people.grant_doctor()
    capsule = parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule
    request = people.doctor_signer().single(
        people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
    )
    node = liar.node
    with people.cluster.transport.channel(node.address, server_name=node.node_id) as channel:
        liar.replayed = NodeStub(channel).Reencrypt(request, timeout=10).fragment.cfrag
    people.grant_doctor()  # renewed: a new set of kfrags at every node
    with _app(people, relay.address) as doctor:
        # The coordinator asks a node it has no latency for first: the liar is in the
        # first read.
        for _ in range(30):
            assert doctor.read_record(people.lab.record_id) == lab_result()
            if liar.corrupted:
                break
        assert liar.corrupted, relay.liar_calls()
        assert relay.stale() == 1 and relay.lies() == 0
        (stale,) = relay.events("node_stale_fragment")
        assert stale["node_id"] == liar.node.node_id
        assert relay.metric(f'kms_coordinator_node_in_rotation{{node="{node.node_id}"}}') == 1
        assert relay.events("node_lied") == []
        # In rotation for everyone else, but asked last for this grant's reads: they go
        # to the other nodes and need no retry (without that, the liar answered about
        # 3 reads in 5). A hedge on a loaded machine may still reach it now and then.
        corrupted = liar.corrupted
        for _ in range(10):
            assert doctor.read_record(people.lab.record_id) == lab_result()
        assert liar.corrupted - corrupted <= 2, relay.liar_calls()


# --- a compromised coordinator ------------------------------------------------------------


class FakeCoordinator:
    """Answers apps with the cluster's coordinator identity and asks the nodes itself;
    subclasses decide how (``reencrypt``)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._nodes = cluster.nodes
        self._channels = [
            cluster.transport.channel(n.address, server_name=n.node_id) for n in cluster.nodes
        ]
        self._stubs = [NodeStub(c) for c in self._channels]
        self._threshold = cluster.threshold
        ca = ClusterCa.ensure(cluster.state_dir / "tls")
        identity = ca.server_cert("coordinator")
        self.transport = Transport.tls(ca.ca_cert, identity.cert, identity.key)

    def reencrypt(
        self, request: common_pb2.ReencryptionRequest, _ctx: object
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        raise NotImplementedError

    @contextmanager
    def serving(self) -> Iterator[str]:
        """Serve apps on a free port (its address) until the block ends."""
        handlers = {
            "Reencrypt": _unary(
                common_pb2.ReencryptionRequest,
                coordinator_pb2.CoordinatorReencryptResponse,
                self.reencrypt,
            )
        }
        server, address = _serve(
            COORDINATOR_SERVICE.full_name, handlers, self.transport, mtls=False
        )
        try:
            yield address
        finally:
            server.stop(grace=None)
            for channel in self._channels:
                channel.close()


class LyingCoordinator(FakeCoordinator):
    """Asks every node and corrupts (or replaces with garbage) what it returns."""

    def __init__(self, cluster: LocalCluster, mode: str) -> None:
        super().__init__(cluster)
        self.mode = mode

    def reencrypt(
        self, request: common_pb2.ReencryptionRequest, _ctx: object
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        if self.mode == "garbage":
            fragments = [
                common_pb2.CapsuleFragment(node_id=f"node-{i}", cfrag=secrets.token_bytes(381))
                for i in range(self._threshold)
            ]
        else:
            fragments = [stub.Reencrypt(request, timeout=5).fragment for stub in self._stubs]
            fragments[0].cfrag = _corrupt(fragments[0].cfrag)
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=fragments, threshold=self._threshold
        )


@pytest.fixture(params=["corrupt_one", "garbage"])
def lying_coordinator(
    request: pytest.FixtureRequest, cluster: LocalCluster
) -> Iterator[tuple[str, str]]:
    liar = LyingCoordinator(cluster, request.param)
    with liar.serving() as address:
        yield address, liar.mode


def test_the_app_verifies_what_a_coordinator_returns(
    people: People, lying_coordinator: tuple[str, str]
) -> None:
    address, mode = lying_coordinator
    people.grant_doctor()
    with _app(people, address) as doctor:
        if mode == "garbage":
            with pytest.raises(IntegrityError, match="0 valid capsule fragments"):
                doctor.read_record(people.lab.record_id)
        else:
            # One bad fragment among five: dropped, the other four suffice.
            assert doctor.read_record(people.lab.record_id) == lab_result()
    # The real cluster keeps serving.
    with people.provider() as honest:
        assert honest.read_record(people.lab.record_id) == lab_result()


# --- a coordinator rewriting request ids ----------------------------------------------------


def _audited(cluster: LocalCluster, node_id: str, leaf_index: int) -> AuditEntry:
    node = next(n for n in cluster.nodes if n.node_id == node_id)
    with cluster.transport.channel(node.address) as channel:
        (entry,) = AuditStub(channel).GetEntries(
            audit_pb2.GetEntriesRequest(start=leaf_index, end=leaf_index + 1), timeout=5
        )
    return AuditEntry.from_canonical(entry.entry)


def _latest_entries(cluster: LocalCluster, count: int) -> list[AuditEntry]:
    """The last ``count`` entries of every node's audit log."""
    entries = []
    for node in cluster.nodes:
        with cluster.transport.channel(node.address) as channel:
            audit = AuditStub(channel)
            size = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5).tree_size
            request = audit_pb2.GetEntriesRequest(start=max(0, size - count), end=size)
            entries += [AuditEntry.from_canonical(e.entry) for e in audit.GetEntries(request)]
    return entries


class RewritingCoordinator(FakeCoordinator):
    """Asks the first ``threshold`` nodes with a request id of its own; where refused,
    asks again with the id removed."""

    REWRITTEN = "rewritten-by-the-coordinator"

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(cluster)
        #: what the app sent
        self.received: list[common_pb2.ReencryptionRequest] = []
        #: each node's answer to the rewritten id: its status and message
        self.refusals: dict[str, tuple[grpc.StatusCode, str]] = {}
        #: node id -> the audit log index of the decision it made on the request
        self.audited: dict[str, int] = {}

    def reencrypt(
        self, request: common_pb2.ReencryptionRequest, _ctx: object
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        self.received.append(request)
        fragments = []
        asked = zip(self._nodes[: self._threshold], self._stubs, strict=False)
        for node, stub in asked:
            rewritten = common_pb2.ReencryptionRequest()
            rewritten.CopyFrom(request)
            rewritten.request_id = self.REWRITTEN
            try:
                fragment = stub.Reencrypt(rewritten, timeout=5).fragment
                self.refusals[node.node_id] = (grpc.StatusCode.OK, "served")
            except grpc.RpcError as e:
                self.refusals[node.node_id] = (e.code(), e.details() or "")
                rewritten.request_id = ""
                fragment = stub.Reencrypt(rewritten, timeout=5).fragment
            self.audited[node.node_id] = fragment.receipt.leaf_index
            fragments.append(fragment)
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=fragments, threshold=self._threshold
        )


def test_a_coordinator_cannot_change_the_request_id_nodes_audit(
    people: People, cluster: LocalCluster
) -> None:
    people.grant_doctor()
    relay = RewritingCoordinator(cluster)
    with relay.serving() as address, _app(people, address) as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()
    (sent,) = relay.received
    # The id of what the app signed, rebuilt from the wire without the node's code.
    signed_id = signing_digest(people.registry.signing_domain(), signed_claims(sent))[:16].hex()
    # Each node audited the request it served under the signed id, not the relay's...
    assert set(relay.audited) == {n.node_id for n in cluster.nodes[: cluster.threshold]}
    for node_id, leaf_index in relay.audited.items():
        entry = _audited(cluster, node_id, leaf_index)
        assert (entry.request_id, entry.decision) == (signed_id, "granted")
    assert sent.request_id == signed_id  # the id the SDK sent, and would name in an error
    # ...having refused the rewritten id, and named the one it derives.
    for code, details in relay.refusals.values():
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.endswith(signed_id) and details.startswith("request_id must be empty")


def test_an_sdk_error_names_the_request_the_audit_logs_hold(people: People) -> None:
    """An app that is refused can find the nodes' decisions in the auditor's report."""
    people.grant_doctor([RecordType.LAB_RESULT])
    with people.provider() as doctor:
        with pytest.raises(AccessDenied) as caught:
            doctor.read_record(people.condition.record_id)
    request_id = caught.value.request_id
    assert len(request_id) == 32
    denials = [e for e in _latest_entries(people.cluster, 5) if e.request_id == request_id]
    assert len(denials) >= people.cluster.threshold
    assert {(e.decision, e.record_id) for e in denials} == {("denied", people.condition.record_id)}
