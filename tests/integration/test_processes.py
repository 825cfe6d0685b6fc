"""A node running several server processes on one port (issue 5)."""

from __future__ import annotations

import itertools
import json
import shutil
import sqlite3
import stat
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest
import umbral_pre as umbral
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient, StoredRecord
from clients.sdk.provider import ProviderClient
from clients.sdk.records import parse_envelope
from clients.sdk.signed_requests import RequestSigner
from core.audit import DENIED, GRANTED
from core.policy import Reason
from core.record_types import RecordType
from deploy import processes
from deploy.anvil import set_balance
from deploy.local_cluster import FUNDING_WEI, LocalCluster, NodeEntry
from deploy.sample_records import lab_result
from kms_node.index_snapshot import SNAPSHOT_FILE
from kms_node.settings import NodeSettings
from proto.kms.v1 import common_pb2, node_pb2
from proto.stubs import NodeStub
from tests.integration.conftest import core_file_limit

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.up(tmp_path_factory.mktemp("multi"), nodes=3, threshold=2, processes=2)
    try:
        yield cluster
    finally:
        cluster.down()


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.fixture(scope="module")
def granted(multi: LocalCluster) -> tuple[Identity, StoredRecord]:
    """A patient's lab result, granted to the cluster's doctor."""
    return _grant_lab_result(multi)


def _grant_lab_result(multi: LocalCluster) -> tuple[Identity, StoredRecord]:
    """A new patient's lab result, granted to the cluster's doctor."""
    alice = Identity.generate("alice")
    set_balance(multi.rpc_url, alice.address, FUNDING_WEI)
    with _patient(multi, alice) as patient:
        patient.register()
        record = patient.store_record(lab_result(), RecordType.LAB_RESULT)
        _grant_doctor(multi, patient)
    return alice, record


def _patient(multi: LocalCluster, alice: Identity) -> PatientClient:
    return PatientClient(
        alice,
        registry=multi.registry(),
        blobs=multi.blob_store(),
        coordinator_address=multi.coordinator_address,
        transport=multi.app_transport,
    )


def _grant_doctor(multi: LocalCluster, patient: PatientClient) -> None:
    """Grant the cluster's doctor the patient's lab results (a new set of kfrags)."""
    bob = multi.identity("doctor")
    patient.grant(
        bob.address, bob.umbral_public_key(), [RecordType.LAB_RESULT], duration_s=3600, threshold=2
    )


def test_workers_share_the_port_and_metrics_are_summed(
    multi: LocalCluster, granted: tuple[Identity, StoredRecord]
) -> None:
    _, record = granted
    bob = multi.identity("doctor")
    with ProviderClient(
        bob,
        registry=multi.registry(),
        blobs=multi.blob_store(),
        coordinator_address=multi.coordinator_address,
        transport=multi.app_transport,
    ) as p:
        for _ in range(20):
            assert p.read_record(record.record_id) == lab_result()

    node = multi.nodes[0]
    assert len(_children(node.pid)) == 2
    body = urllib.request.urlopen(node.metrics_url, timeout=5).read().decode()
    assert 'kms_node_requests_total{method="Reencrypt",outcome="ok"}' in body
    assert "kms_node_kfrags_stored" in body


def test_no_process_of_a_node_writes_a_core_dump(multi: LocalCluster) -> None:
    """The supervisor holds the user PIN too (it hands it to its workers): it is
    hardened as they are (kms_node/hardening.py)."""
    for node in multi.nodes:
        workers = _children(node.pid)
        assert len(workers) == 2
        for pid in [node.pid, *workers]:
            assert core_file_limit(pid) == ["0", "0"], (node.node_id, pid)


def test_a_replay_is_refused_by_every_process_of_a_node(
    multi: LocalCluster, granted: tuple[Identity, StoredRecord]
) -> None:
    """The workers share one replay memory: the same signed request, sent on fresh
    connections (which the kernel spreads over the processes), is served once."""
    alice, record = granted
    bob = multi.identity("doctor")
    registry = multi.registry()
    capsule = parse_envelope(multi.blob_store().get(record.storage_uri)).capsule
    signer = RequestSigner(bob.account, bob.umbral_public_key(), registry.signing_domain())
    request = signer.single(alice.address, record.record_id, RecordType.LAB_RESULT, capsule)
    node = multi.nodes[0]
    outcomes = []
    for _ in range(8):
        with multi.transport.channel(node.address, server_name=node.node_id) as channel:
            try:
                NodeStub(channel).Reencrypt(request, timeout=5)
                outcomes.append("served")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "nonce already used" in (e.details() or "")
                outcomes.append("replay refused")
    assert outcomes.count("served") == 1
    assert outcomes.count("replay refused") == 7


def _by_process(
    node: NodeEntry, scratch: Path, kind: str, name: str, labels: dict[str, str]
) -> list[float]:
    """The sample ``name{labels}`` of each of the node's live server processes, read from
    its own ``kind`` metrics file (the node's endpoint serves them merged)."""
    metrics_dir = NodeSettings.from_toml(Path(node.config)).data_dir / "metrics"
    values = []
    for pid in sorted(_children(node.pid)):
        own = scratch / f"{pid}-{time.monotonic_ns()}"
        own.mkdir()
        written = metrics_dir / f"{kind}_{pid}.db"
        if written.exists():
            shutil.copy(written, own / written.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(own))
        values.append(registry.get_sample_value(name, labels) or 0.0)
    return values


def _decisions_by_process(
    node: NodeEntry, scratch: Path, decision: str, reason: str
) -> list[float]:
    """``kms_node_decisions_total{decision, reason}`` of each of the node's processes."""
    labels = {"decision": decision, "reason": reason}
    return _by_process(node, scratch, "counter", "kms_node_decisions_total", labels)


def _reencrypt_at(
    multi: LocalCluster, node: NodeEntry, request: common_pb2.ReencryptionRequest
) -> node_pb2.ReencryptResponse | grpc.RpcError:
    """``request`` sent to ``node`` on a fresh connection (the kernel spreads those over
    the node's processes): the answer, or the refusal."""
    with multi.transport.channel(node.address, server_name=node.node_id) as channel:
        try:
            answer: node_pb2.ReencryptResponse = NodeStub(channel).Reencrypt(request, timeout=5)
        except grpc.RpcError as e:
            return e
    return answer


def test_every_process_refuses_the_next_read_once_it_has_indexed_a_revocation(
    multi: LocalCluster, tmp_path: Path
) -> None:
    """Both processes of a node serve a grant (each keeps the unwrapped kfrag, ADR 13);
    the patient revokes it; once each process has indexed the revocation, every read is
    refused, by each process, well within kfrag_cache_ttl_s."""
    alice, record = _grant_lab_result(multi)
    bob, node = multi.identity("doctor"), multi.nodes[0]
    registry = multi.registry()
    capsule = parse_envelope(multi.blob_store().get(record.storage_uri)).capsule
    signer = RequestSigner(bob.account, bob.umbral_public_key(), registry.signing_domain())

    def read() -> str:
        """One freshly signed read: "served", or the refusal."""
        request = signer.single(alice.address, record.record_id, RecordType.LAB_RESULT, capsule)
        answer = _reencrypt_at(multi, node, request)
        if isinstance(answer, grpc.RpcError):
            return f"{answer.code().name}: {answer.details()}"
        return "served"

    started = time.monotonic()
    served = [0.0, 0.0]
    for _ in range(40):
        assert read() == "served"
        served = _decisions_by_process(node, tmp_path, GRANTED, Reason.GRANTED)
        if all(served):
            break
    assert len(served) == 2 and all(served), f"granted by process: {served}"

    revoked = registry.block_of_transaction(registry.revoke_access(alice.account, bob.address))
    deadline = time.monotonic() + 10
    while (
        min(indexed := _by_process(node, tmp_path, "gauge_min", "kms_node_chain_index_block", {}))
        < revoked
    ):
        assert time.monotonic() < deadline, f"processes indexed {indexed}, not {revoked}"
        time.sleep(0.02)
    refused = [0.0, 0.0]
    for _ in range(40):
        outcome = read()
        assert outcome.startswith("PERMISSION_DENIED") and "revoked" in outcome, outcome
        refused = _decisions_by_process(node, tmp_path, DENIED, Reason.GRANT_REVOKED)
        if all(refused):
            break
    assert len(refused) == 2 and all(refused), f"refused by process: {refused}"
    ttl_s = NodeSettings.from_toml(Path(node.config)).kfrag_cache_ttl_s
    assert time.monotonic() - started < ttl_s  # the kfrags were still kept when refused


def test_a_stopped_node_has_anchored_every_entry_its_processes_wrote(
    multi: LocalCluster, granted: tuple[Identity, StoredRecord]
) -> None:
    _, record = granted
    bob, node = multi.identity("doctor"), multi.nodes[1]
    with ProviderClient(
        bob,
        registry=multi.registry(),
        blobs=multi.blob_store(),
        coordinator_address=multi.coordinator_address,
        transport=multi.app_transport,
    ) as p:
        for _ in range(12):
            assert p.read_record(record.record_id) == lab_result()
    multi.stop_node(node.node_id)
    try:
        audit_db = NodeSettings.from_toml(Path(node.config)).audit_db
        with closing(sqlite3.connect(audit_db)) as conn:
            (size,) = conn.execute("SELECT tree_size FROM tree").fetchone()
        anchored = multi.registry().latest_checkpoint(node.node_id)
        assert size > 0 and anchored is not None and anchored[0] == size
    finally:
        multi.start_node(node.node_id)


def test_killing_the_supervisor_takes_its_workers_down(multi: LocalCluster) -> None:
    node = multi.nodes[2]
    workers = _children(node.pid)
    assert len(workers) == 2
    multi.stop_node(node.node_id, kill=True)
    for pid in workers:
        processes.wait_gone(pid, timeout_s=10)
    multi.start_node(node.node_id)


def test_a_node_restarts_from_its_snapshot_in_every_process(
    multi: LocalCluster, granted: tuple[Identity, StoredRecord]
) -> None:
    """ADR 15 on the real node: a clean stop leaves the signed snapshot (mode 0600); at
    restart each server process loads it, then reads the events mined since and judges by
    them (a record anchored while the node was down is served at once)."""
    alice, _ = granted
    bob, node = multi.identity("doctor"), multi.nodes[0]
    snapshot = NodeSettings.from_toml(Path(node.config)).data_dir / SNAPSHOT_FILE
    multi.stop_node(node.node_id)
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    with PatientClient(
        alice,
        registry=multi.registry(),
        blobs=multi.blob_store(),
        coordinator_address=multi.coordinator_address,
        transport=multi.app_transport,
    ) as patient:
        newer = patient.store_record(lab_result(), RecordType.LAB_RESULT)
    log = Path(node.log)
    restarted_at = log.stat().st_size
    multi.start_node(node.node_id)

    def since_restart(prefix: str) -> list[str]:
        with log.open("rb") as f:
            f.seek(restarted_at)
            lines = f.read().decode(errors="replace").splitlines()
        names = [str(json.loads(line).get("event")) for line in lines if line.startswith("{")]
        return [n for n in names if n.startswith(prefix)]

    # The node serves once one process does; the other may still be starting.
    deadline = time.monotonic() + 30
    while len(since_restart("node_started")) < 2:
        assert time.monotonic() < deadline, "the node's second process did not start"
        time.sleep(0.1)
    assert since_restart("index_snapshot") == ["index_snapshot_loaded"] * 2
    capsule = parse_envelope(multi.blob_store().get(newer.storage_uri)).capsule
    signer = RequestSigner(bob.account, bob.umbral_public_key(), multi.registry().signing_domain())
    request = signer.single(alice.address, newer.record_id, RecordType.LAB_RESULT, capsule)
    with multi.transport.channel(node.address, server_name=node.node_id) as channel:
        assert NodeStub(channel).Reencrypt(request, timeout=5).fragment.cfrag


def test_a_renewed_grant_is_served_with_its_new_kfrags_by_every_process(
    multi: LocalCluster, tmp_path: Path
) -> None:
    """Every process of two nodes keeps the grant's unwrapped kfrag; the patient renews
    the grant (a new set of kfrags, enrolled through one process of each node); then
    every fragment of either node combines with every fragment of the other. A process
    serving its kept kfrag of the old set would break that: fragments of two sets do
    not combine (ADR 13: the cache key holds the wrapped bytes)."""
    alice, record = _grant_lab_result(multi)
    bob = multi.identity("doctor")
    registry = multi.registry()
    envelope = parse_envelope(multi.blob_store().get(record.storage_uri))
    signer = RequestSigner(bob.account, bob.umbral_public_key(), registry.signing_domain())
    capsule = umbral.Capsule.from_bytes(envelope.capsule)
    delegating = alice.record_public_key(RecordType.LAB_RESULT)
    verifying = umbral.PublicKey.from_compressed_bytes(alice.verifying_key())
    receiving = umbral.PublicKey.from_compressed_bytes(bob.umbral_public_key())

    def served_by_every_process(node: NodeEntry) -> list[umbral.VerifiedCapsuleFrag]:
        """Fragments of freshly signed reads at ``node``, until each of its processes
        has served one."""
        before = _decisions_by_process(node, tmp_path, GRANTED, Reason.GRANTED)
        fragments = []
        for _ in range(40):
            request = signer.single(
                alice.address, record.record_id, RecordType.LAB_RESULT, envelope.capsule
            )
            answer = _reencrypt_at(multi, node, request)
            assert isinstance(answer, node_pb2.ReencryptResponse), answer
            cfrag = umbral.CapsuleFrag.from_bytes(answer.fragment.cfrag)
            fragments.append(cfrag.verify(capsule, verifying, delegating, receiving))
            after = _decisions_by_process(node, tmp_path, GRANTED, Reason.GRANTED)
            if len(after) == 2 and all(a > b for a, b in zip(after, before, strict=True)):
                return fragments
        raise AssertionError(f"not every process of {node.node_id} served: {before}, {after}")

    nodes = multi.nodes[:2]  # the cluster's threshold
    for node in nodes:
        served_by_every_process(node)
    with _patient(multi, alice) as patient:
        _grant_doctor(multi, patient)
    first, second = (served_by_every_process(node) for node in nodes)
    opened = {
        umbral.decrypt_reencrypted(
            bob.umbral_secret_key(), delegating, capsule, list(pair), envelope.encrypted_dek
        )
        for pair in itertools.product(first, second)
    }
    assert len(opened) == 1 and None not in opened  # one DEK, whichever processes served
