"""A node running several server processes on one port (issue 5)."""

from __future__ import annotations

import json
import sqlite3
import stat
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest

from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient, StoredRecord
from clients.sdk.provider import ProviderClient
from clients.sdk.records import parse_envelope
from clients.sdk.signed_requests import RequestSigner
from core.record_types import RecordType
from deploy import processes
from deploy.anvil import set_balance
from deploy.local_cluster import FUNDING_WEI, LocalCluster
from deploy.sample_records import lab_result
from kms_node.index_snapshot import SNAPSHOT_FILE
from kms_node.settings import NodeSettings
from proto.stubs import NodeStub

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
    alice, bob = Identity.generate("alice"), multi.identity("doctor")
    set_balance(multi.rpc_url, alice.address, FUNDING_WEI)
    with PatientClient(
        alice,
        registry=multi.registry(),
        blobs=multi.blob_store(),
        coordinator_address=multi.coordinator_address,
        transport=multi.app_transport,
    ) as patient:
        patient.register()
        record = patient.store_record(lab_result(), RecordType.LAB_RESULT)
        patient.grant(
            bob.address,
            bob.umbral_public_key(),
            [RecordType.LAB_RESULT],
            duration_s=3600,
            threshold=2,
        )
    return alice, record


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
