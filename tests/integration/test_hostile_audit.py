"""Hostile nodes under audit: real gRPC audit services in front of the session cluster's
nodes serve each node's log with one entry swapped for something hostile (nested deeply
enough to kill a JSON parser, over the message size, of the wrong type), stall the stream or
close it mid-stream. A node that serves something hostile fails with a clear reason; one whose
stream fails in transit "could not be read", never "missing"; every node is still reported."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from cli import kmsctl
from clients.audit import auditor
from clients.audit.auditor import audit_cluster, channel_factory
from clients.sdk.records import parse_envelope
from contracts.registry import RegistryClient
from core.audit_findings import Check, NodeReport, Verdict
from core.audit_sources import ReadPolicy
from core.errors import ChainUnavailable, InvalidRequest
from core.record_types import RecordType
from core.registry_types import NodeInfo
from deploy.local_cluster import LocalCluster
from proto.kms.v1 import audit_pb2
from proto.stubs import AUDIT_SERVICE, AuditStub, NodeStub
from proto.transport import Transport
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster

#: what a hostile node serves in place of entry HOSTILE_INDEX
HOSTILE_INDEX = 0
NESTED = b"[" * 200_000  # under the 256 KiB message bound; json.loads of it dies
HUGE = b'{"request_id":"' + b"x" * 300_000 + b'"}'  # over the message bound
WRONG_TYPE = b'{"v":2,"request_id":["r"],"node_id":{"a":[1]},"time":"soon"}'
#: the auditor's deadline per call in this test (10 s plus a page's bytes in production)
CALL_TIMEOUT_S = 2.0
#: the auditor's read policy in this test: short deadlines, one quick retry
POLICY = ReadPolicy(deadline_s=CALL_TIMEOUT_S, bytes_per_s=1 << 30, retries=1, backoff_s=0.05)


class HostileAuditService:
    """``kms.v1.Audit`` for one node on loopback (plaintext): every call is passed to the
    real node, except that GetEntries serves ``entry`` at HOSTILE_INDEX, or with ``stall``
    stops for that long before it, or with ``close`` ends the stream there as a dropped
    connection does (UNAVAILABLE)."""

    def __init__(
        self,
        upstream: grpc.Channel,
        *,
        entry: bytes = b"",
        stall_s: float = 0,
        close: bool = False,
    ) -> None:
        stub = AuditStub(upstream)
        self.entries_calls = 0

        def entries(
            request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext
        ) -> Iterator[audit_pb2.AuditLogEntry]:
            self.entries_calls += 1
            for row in stub.GetEntries(request, timeout=30):
                if row.leaf_index == HOSTILE_INDEX:
                    if stall_s:
                        time.sleep(stall_s)
                    if close:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
                    if entry:
                        row = audit_pb2.AuditLogEntry(leaf_index=row.leaf_index, entry=entry)
                yield row

        def unary(name: str, request_type: Any) -> grpc.RpcMethodHandler[Any, Any]:
            call = getattr(stub, name)
            return grpc.unary_unary_rpc_method_handler(
                lambda request, _context: call(request, timeout=30),
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )

        handlers = {
            "GetCheckpoint": unary("GetCheckpoint", audit_pb2.GetCheckpointRequest),
            "GetInclusionProof": unary("GetInclusionProof", audit_pb2.InclusionProofRequest),
            "GetConsistencyProof": unary("GetConsistencyProof", audit_pb2.ConsistencyProofRequest),
            "GetEntries": grpc.unary_stream_rpc_method_handler(
                entries,
                request_deserializer=audit_pb2.GetEntriesRequest.FromString,
                response_serializer=audit_pb2.AuditLogEntry.SerializeToString,
            ),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(AUDIT_SERVICE.full_name, handlers)]
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=0)


HostileFactory = Callable[[dict[str, dict[str, Any]]], Callable[[NodeInfo], grpc.Channel]]

#: node-1 is reached directly; node-2 serves NESTED, node-3 HUGE, node-4 WRONG_TYPE, node-5
#: stalls beyond the auditor's deadline
HOSTILE_ENTRIES: dict[str, dict[str, Any]] = {
    "node-2": {"entry": NESTED},
    "node-3": {"entry": HUGE},
    "node-4": {"entry": WRONG_TYPE},
    "node-5": {"stall_s": 3 * CALL_TIMEOUT_S},
}


@pytest.fixture
def hostile(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileFactory]:
    """Makes a channel factory in which the nodes named are reached through a
    :class:`HostileAuditService` with the given behaviour, the others directly."""
    kwdefaults = auditor.audit_cluster.__kwdefaults__  # kmsctl's audit too
    assert kwdefaults is not None
    monkeypatch.setitem(kwdefaults, "policy", POLICY)
    direct = channel_factory(cluster.transport)
    upstreams = {n.node_id: direct(n) for n in cluster.registry().list_nodes()}
    started: list[HostileAuditService] = []

    def make(behaviours: dict[str, dict[str, Any]]) -> Callable[[NodeInfo], grpc.Channel]:
        services = {
            node_id: HostileAuditService(upstreams[node_id], **kwargs)
            for node_id, kwargs in behaviours.items()
        }
        started.extend(services.values())

        def open_channel(node: NodeInfo) -> grpc.Channel:
            service = services.get(node.node_id)
            if service is None:
                return direct(node)
            # The auditor's own channel options, message size bound included.
            return Transport.plaintext().channel(service.address)

        return open_channel

    try:
        yield make
    finally:
        for service in started:
            service.stop()
        for channel in upstreams.values():
            channel.close()


def decide_once_on_each_node(people: People) -> None:
    """Every node's log holds a decision: one request to each."""
    people.grant_doctor()
    capsule = bytes(parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri)).capsule)
    signer = people.doctor_signer()
    for node in people.cluster.nodes:
        request = signer.single(
            people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
        )
        with people.cluster.transport.channel(node.address, server_name=node.node_id) as channel:
            NodeStub(channel).Reencrypt(request, timeout=10)


def test_each_hostile_node_fails_alone_with_a_reason(
    people: People, registry: RegistryClient, hostile: HostileFactory
) -> None:
    decide_once_on_each_node(people)
    started = time.perf_counter()
    report = audit_cluster(registry, hostile(HOSTILE_ENTRIES), rejudge_decisions=False)
    assert time.perf_counter() - started < 60
    by_node: dict[str, NodeReport] = {n.node_id: n for n in report.nodes}
    assert sorted(by_node) == [f"node-{i}" for i in range(1, 6)]

    def failure(node_id: str) -> tuple[Check, int | None, str]:
        problem = by_node[node_id].first_failure()
        assert problem is not None, f"{node_id} passed"
        return problem.check, problem.leaf_index, problem.message

    assert by_node["node-1"].ok, by_node["node-1"].problems
    assert failure("node-2") == (
        Check.FORMAT,
        HOSTILE_INDEX,
        "not a valid audit entry: audit entry is larger than 32768 bytes",
    )
    assert by_node["node-2"].request_id(HOSTILE_INDEX) == ""
    check, index, message = failure("node-4")
    assert (check, index) == (Check.FORMAT, HOSTILE_INDEX)
    assert message.startswith("not a valid audit entry: ")
    # Over the message bound (RESOURCE_EXHAUSTED) and past the deadline: the stream failed
    # in transit, so those nodes could not be read; nothing is reported missing.
    stopped = could_not_read(by_node["node-3"])
    assert "RESOURCE_EXHAUSTED" in stopped or "larger than max" in stopped, stopped
    stopped = could_not_read(by_node["node-5"])
    assert "Deadline Exceeded" in stopped or "DEADLINE_EXCEEDED" in stopped, stopped
    assert report.verdict is Verdict.FAILED


def test_a_stream_that_stalls_or_drops_could_not_be_read_and_exits_3(
    people: People,
    hostile: HostileFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    decide_once_on_each_node(people)
    cut: dict[str, dict[str, Any]] = {
        "node-4": {"close": True},
        "node-5": {"stall_s": 3 * CALL_TIMEOUT_S},
    }
    monkeypatch.setattr(kmsctl, "_node_channels", lambda _cluster: hostile(cut))
    state = ["--state-dir", str(people.cluster.state_dir), "--report-dir", str(tmp_path)]
    assert kmsctl.main(["audit", "verify", *state]) == kmsctl.EXIT_COULD_NOT_READ
    out, err = capsys.readouterr()
    assert "missing" not in out + err
    assert "audit INCOMPLETE" in out and "node-5 could not be read" in err
    document = json.loads((tmp_path / "report.json").read_text())
    verdicts = {n["node_id"]: n["verdict"] for n in document["nodes"]}
    assert verdicts == {
        "node-1": "passed",
        "node-2": "passed",
        "node-3": "passed",
        "node-4": "could not read",
        "node-5": "could not read",
    }
    (reason,) = next(n for n in document["nodes"] if n["node_id"] == "node-4")["could_not_read"]
    assert reason.startswith(f"the node stopped serving entries at entry {HOSTILE_INDEX}: ")
    assert "connection reset" in reason
    # A node that serves a tampered entry still fails the audit, whatever else could not be read.
    tampered = {**cut, "node-2": {"entry": WRONG_TYPE}}
    monkeypatch.setattr(kmsctl, "_node_channels", lambda _cluster: hostile(tampered))
    assert kmsctl.main(["audit", "verify", *state]) == 1
    document = json.loads((tmp_path / "report.json").read_text())
    assert (document["verdict"], document["nodes"][1]["verdict"]) == ("failed", "failed")


def could_not_read(report: NodeReport) -> str:
    """Why the node could not be read from HOSTILE_INDEX on; it has no problem."""
    assert report.verdict is Verdict.COULD_NOT_READ and report.problems == (), report.problems
    prefix = f"the node stopped serving entries at entry {HOSTILE_INDEX}: "
    (message,) = report.could_not_read
    assert message.startswith(prefix), message
    return message


def test_a_chain_that_cannot_be_read_before_any_node_exits_3(
    cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Failing in transit before any node is read is "could not read" (exit 3); any other
    error is still an error (exit 1)."""
    state = ["--state-dir", str(cluster.state_dir), "--report-dir", str(tmp_path)]
    for error, code in (
        (ChainUnavailable("latest block: chain at http://127.0.0.1:1 unavailable"), 3),
        (InvalidRequest("not registered on-chain: node-9"), 1),
    ):

        def fail(*_args: object, error: Exception = error, **_kwargs: object) -> None:
            raise error

        monkeypatch.setattr(kmsctl, "audit_cluster", fail)
        assert kmsctl.main(["audit", "verify", *state]) == code
        err = capsys.readouterr().err
        assert ("could not read the chain: latest block" in err) == (code == 3), err
