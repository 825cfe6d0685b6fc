"""`kmsctl audit verify` and `export` on real clusters: logs that were left alone pass; logs
tampered with on disk, a node killed under load, a forged entry each give the verdict the
issue asks for, naming the entry.

The tampering tests run on a 3-node cluster of their own, so the session's cluster stays
clean for the other tests; the session cluster is audited once, after every other test.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from cli import kmsctl
from clients.audit.receipts_file import receipt_to_json
from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient, StoredRecord
from clients.sdk.provider import ProviderClient
from clients.sdk.records import parse_envelope
from clients.sdk.signed_requests import RequestSigner
from contracts.registry import RegistryClient
from coordinator.settings import CoordinatorSettings
from core.audit import Checkpoint, Receipt, verify_receipt_inclusion
from core.record_types import RecordType
from deploy import sample_records
from deploy.anvil import set_balance
from deploy.local_cluster import FUNDING_WEI, LocalCluster
from deploy.metrics_scrape import scrape
from kms_node.settings import NodeSettings
from proto.kms.v1 import audit_pb2, common_pb2
from proto.stubs import AuditStub, NodeStub
from tests.core.test_audit_verify import rebuild_tree
from tests.headless_chromium import dump_dom
from tests.integration.conftest import People, append_forged_entry

pytestmark = pytest.mark.cluster

#: the local clusters anchor every 2 s; generous for a loaded machine
ANCHOR_WAIT_S = 20.0

#: the gauge a node sets while its audit log and its last anchor disagree
DIVERGES = "kms_node_audit_log_diverges_from_anchor"


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


Kmsctl = Callable[..., Ran]


@pytest.fixture
def run_kmsctl(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Kmsctl:
    """``kmsctl`` in this process, its report in ``tmp_path`` (its logging set-up is left
    out: tests/conftest.py)."""

    def run(cluster: LocalCluster, *args: str) -> Ran:
        capsys.readouterr()
        extra = (
            ["--report-dir", str(tmp_path / "report")] if args[:2] == ("audit", "verify") else []
        )
        code = kmsctl.main([*args, *extra, "--state-dir", str(cluster.state_dir)])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def report_rows(tmp_path: Path) -> list[dict[str, object]]:
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    rows: list[dict[str, object]] = document["entries"]
    return rows


def wait_anchored(registry: RegistryClient, node_id: str, size: int) -> None:
    deadline = time.monotonic() + ANCHOR_WAIT_S
    while (registry.latest_checkpoint(node_id) or (0,))[0] < size:
        assert time.monotonic() < deadline, f"{node_id} did not anchor {size} entries in time"
        time.sleep(0.2)


def _receipt(r: common_pb2.AuditReceipt) -> Receipt:
    return Receipt.from_fields(r)


# --- the cluster of this module ------------------------------------------------------------


@dataclass
class World:
    """A 3-of-2 cluster, a patient with a lab result, and a doctor she granted it to."""

    cluster: LocalCluster
    registry: RegistryClient
    patient: PatientClient
    doctor: Identity
    lab: StoredRecord
    capsule: bytes

    def signer(self) -> RequestSigner:
        domain = self.registry.signing_domain()
        return RequestSigner(self.doctor.account, self.doctor.umbral_public_key(), domain)

    def channel(self, node_id: str) -> grpc.Channel:
        node = self.cluster.node(node_id)
        return self.cluster.transport.channel(node.address, server_name=node_id)

    def read_at(self, node_id: str, count: int) -> list[tuple[str, Receipt]]:
        """``count`` decisions at one node, asked directly: (request id, receipt) each."""
        signer, done = self.signer(), []
        with self.channel(node_id) as channel:
            stub = NodeStub(channel)
            for _ in range(count):
                request = signer.single(
                    self.patient.identity.address,
                    self.lab.record_id,
                    RecordType.LAB_RESULT,
                    self.capsule,
                )
                response = stub.Reencrypt(request, timeout=5)
                done.append((request.request_id, _receipt(response.fragment.receipt)))
        return done

    def checkpoint(self, node_id: str) -> Checkpoint:
        with self.channel(node_id) as channel:
            cp = AuditStub(channel).GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5)
        return Checkpoint(cp.node_id, cp.tree_size, cp.root, cp.timestamp, cp.signature)

    def audit_db(self, node_id: str) -> Path:
        return NodeSettings.from_toml(Path(self.cluster.node(node_id).config)).audit_db


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    cluster = LocalCluster.up(tmp_path_factory.mktemp("audited"), nodes=3, threshold=2)
    try:
        registry = cluster.registry()
        alice, bob = Identity.generate("alice"), Identity.generate("dr-bob")
        for identity in (alice, bob):
            set_balance(cluster.rpc_url, identity.address, FUNDING_WEI)
        registry.grant_provider_role(cluster.identity("admin").account, bob.address)
        with PatientClient(
            alice,
            registry=registry,
            blobs=cluster.blob_store(),
            coordinator_address=cluster.coordinator_address,
            transport=cluster.app_transport,
        ) as patient:
            patient.register()
            lab = patient.store_record(sample_records.lab_result(), RecordType.LAB_RESULT)
            patient.grant(
                bob.address,
                bob.umbral_public_key(),
                [RecordType.LAB_RESULT],
                duration_s=3600,
                threshold=cluster.threshold,
            )
            capsule = parse_envelope(cluster.blob_store().get(lab.storage_uri)).capsule
            yield World(cluster, registry, patient, bob, lab, capsule)
    finally:
        cluster.down()


@pytest.fixture
def clean(world: World, run_kmsctl: Kmsctl) -> Iterator[World]:
    """Each test starts and ends with a cluster whose audit passes."""
    yield world
    after = run_kmsctl(world.cluster, "audit", "verify")
    assert after.code == 0, after.out + after.err


class Backup:
    """A stopped node's audit log files, copied aside and put back."""

    def __init__(self, db: Path, into: Path) -> None:
        self.db, self.into = db, into
        into.mkdir()
        for f in db.parent.glob(db.name + "*"):
            shutil.copy2(f, into / f.name)

    def restore(self) -> None:
        for f in self.db.parent.glob(self.db.name + "*"):
            f.unlink()
        for f in self.into.iterdir():
            shutil.copy2(f, self.db.parent / f.name)


@contextmanager
def tamper(db: Path) -> Iterator[sqlite3.Connection]:
    """A second writer on a node's audit log file: one transaction, committed."""
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")


def _hex_digit_changed(data: bytes, field: bytes) -> bytes:
    marker = b'"' + field + b'":"0x'
    at = data.index(marker) + len(marker)
    return data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]


# --- demo traffic, then the whole cluster ---------------------------------------------------


@pytest.mark.chromium
def test_after_the_demo_the_whole_cluster_verifies_and_exports(
    world: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    cluster = world.cluster
    assert run_kmsctl(cluster, "demo").code == 0
    world.read_at("node-1", 3)
    for node in cluster.nodes:
        wait_anchored(world.registry, node.node_id, world.checkpoint(node.node_id).tree_size)

    ran = run_kmsctl(cluster, "audit", "verify")
    assert ran.code == 0, ran.out + ran.err
    assert "audit passed" in ran.out
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    assert document["ok"] and len(document["nodes"]) == 3
    for node in document["nodes"]:
        assert node["ok"] and node["first_failure"] is None
        assert node["anchors_checked"] >= 1 or node["entries"] == 0
    # The coordinator asks 2 of the 3 nodes: not every node has seen a granted request.
    assert sum(node["granted"] for node in document["nodes"]) >= 2
    rows = document["entries"]
    assert {r["verdict"] for r in rows} == {"ok"}
    assert {r["reason"] for r in rows} >= {"granted", "grant_revoked", "type_not_allowed"}
    csv_lines = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    page = tmp_path / "report" / "report.html"
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    dom = dump_dom(page)
    shown = {
        section.find("h2", "node-id").text(): section.find("span", "verdict").text()
        for section in dom.find_all("section", "node")
    }
    assert shown == {node.node_id: "passed" for node in cluster.nodes}
    header = dom.find("table", "fields").text()
    assert f"chain id{world.registry.chain_id()}" in header
    assert f"registry{world.registry.address}" in header

    out = tmp_path / "audit-events.json"
    exported = run_kmsctl(cluster, "audit", "export", "--format", "fhir", "--out", str(out))
    assert exported.code == 0, exported.err
    bundle = Bundle.model_validate_json(out.read_text())
    assert bundle.entry is not None
    events = [e.resource for e in bundle.entry if isinstance(e.resource, AuditEvent)]
    assert len(events) == len(bundle.entry) == len(rows)
    outcomes = {e.outcome for e in events}
    assert outcomes == {"0", "4"}


def test_an_incremental_audit_starts_where_the_last_one_ended(
    clean: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    world, state = clean, tmp_path / "audit-state.json"
    world.read_at("node-1", 2)  # entries to verify first, whatever ran before
    first = run_kmsctl(world.cluster, "audit", "verify", "--state-file", str(state))
    assert first.code == 0, first.out + first.err
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    verified = {n: p["tree_size"] for n, p in json.loads(state.read_text())["nodes"].items()}
    assert sorted(verified) == ["node-1", "node-2", "node-3"]

    world.read_at("node-1", 4)
    again = run_kmsctl(world.cluster, "audit", "verify", "--state-file", str(state))

    assert again.code == 0, again.out + again.err
    assert f"(from entry {verified['node-1']}: those before were verified earlier)" in again.out
    nodes = {
        n["node_id"]: n
        for n in json.loads((tmp_path / "report" / "report.json").read_text())["nodes"]
    }
    assert (nodes["node-1"]["first_entry_read"], nodes["node-1"]["entries"]) == (
        verified["node-1"],
        4,
    )
    assert json.loads(state.read_text())["nodes"]["node-1"]["tree_size"] == verified["node-1"] + 4


# --- tampering with a node's stored log -----------------------------------------------------


@pytest.mark.chromium
def test_one_changed_byte_names_the_entry_after_a_restart(
    clean: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    world, node = clean, "node-1"
    sent = world.read_at(node, 8)
    request_id, receipt = sent[2]
    db = world.audit_db(node)
    world.cluster.stop_node(node)
    with tamper(db) as conn:
        (original,) = conn.execute(
            "SELECT entry FROM entries WHERE leaf_index = ?", (receipt.leaf_index,)
        ).fetchone()
        changed = _hex_digit_changed(original, b"capsule_hash")
        conn.execute(
            "UPDATE entries SET entry = ? WHERE leaf_index = ?", (changed, receipt.leaf_index)
        )
    try:
        world.cluster.start_node(node)  # its checks on open look at the newest entries only
        ran = run_kmsctl(world.cluster, "audit", "verify", "--node", node)
        assert ran.code == 1
        named = f"{node}: entry {receipt.leaf_index} (request {request_id}): not the entry"
        assert named in ran.err, ran.err
        failed = [r for r in report_rows(tmp_path) if r["verdict"] == "failed"]
        assert [(r["leaf_index"], r["request_id"]) for r in failed] == [
            (receipt.leaf_index, request_id)
        ]
        # the page a person opens says the same
        (section,) = dump_dom(tmp_path / "report" / "report.html").find_all("section", "node")
        assert section.find("span", "verdict").text() == "failed"
        (row,) = section.find("table", "failing").find_all("tr")[1:]
        assert [c.text() for c in row.find_all("td")][:2] == [
            str(receipt.leaf_index),
            request_id,
        ]
    finally:
        world.cluster.stop_node(node)
        with tamper(db) as conn:
            conn.execute(
                "UPDATE entries SET entry = ? WHERE leaf_index = ?",
                (original, receipt.leaf_index),
            )
        world.cluster.start_node(node)


def test_a_deleted_entry_is_named_on_a_live_node(
    clean: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    """Deleted under the running node (with the node stopped it would refuse to start:
    its entry count no longer matches its tree)."""
    world, node = clean, "node-2"
    sent = world.read_at(node, 6)
    (before_id, _), (_, gone) = sent[1], sent[2]
    with tamper(world.audit_db(node)) as conn:
        row = conn.execute(
            "SELECT leaf_index, entry, leaf_hash FROM entries WHERE leaf_index = ?",
            (gone.leaf_index,),
        ).fetchone()
        conn.execute("DELETE FROM entries WHERE leaf_index = ?", (gone.leaf_index,))
    try:
        ran = run_kmsctl(world.cluster, "audit", "verify", "--node", node)
        assert ran.code == 1
        assert f"{node}: entry {gone.leaf_index}: missing" in ran.err, ran.err
        assert f"after request {before_id}" in ran.err
    finally:
        with tamper(world.audit_db(node)) as conn:
            conn.execute("INSERT INTO entries (leaf_index, entry, leaf_hash) VALUES (?, ?, ?)", row)


def test_two_swapped_entries_are_both_named(
    clean: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    world, node = clean, "node-2"
    sent = world.read_at(node, 8)
    (id_a, a), (id_b, b) = sent[1], sent[5]

    def swap(conn: sqlite3.Connection) -> None:
        rows = dict(
            conn.execute(
                "SELECT leaf_index, entry FROM entries WHERE leaf_index IN (?, ?)",
                (a.leaf_index, b.leaf_index),
            ).fetchall()
        )
        for index, other in ((a.leaf_index, b.leaf_index), (b.leaf_index, a.leaf_index)):
            conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = ?", (rows[other], index))

    with tamper(world.audit_db(node)) as conn:
        swap(conn)
    try:
        ran = run_kmsctl(world.cluster, "audit", "verify", "--node", node)
        assert ran.code == 1
        # Each leaf now holds the other request, and the report names both.
        assert f"{node}: entry {a.leaf_index} (request {id_b}): not the entry" in ran.err, ran.err
        rows = report_rows(tmp_path)
        failed = {(r["leaf_index"], r["request_id"]) for r in rows if r["verdict"] == "failed"}
        assert failed == {(a.leaf_index, id_b), (b.leaf_index, id_a)}
    finally:
        with tamper(world.audit_db(node)) as conn:
            swap(conn)


def test_a_truncated_and_reappended_log_names_where_history_was_rewritten(
    clean: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    """The operator cuts the log below its last anchor and rebuilds the tree, so the node
    serves and signs the shorter log; new requests are appended after the cut."""
    world, node = clean, "node-3"
    world.read_at(node, 12)
    size = world.checkpoint(node).tree_size
    wait_anchored(world.registry, node, size)
    cut = size - 5
    db = world.audit_db(node)
    world.cluster.stop_node(node)
    backup = Backup(db, tmp_path / "backup")
    with tamper(db) as conn:
        conn.execute("DELETE FROM entries WHERE leaf_index >= ?", (cut,))
        rebuild_tree(conn)
    try:
        world.cluster.start_node(node)
        (first_new, _), *_ = world.read_at(node, 8)
        # The node sees it too: its log no longer extends its last anchor; it stops anchoring.
        # (It compares at start-up, in its anchoring thread: give that round a moment.)
        deadline = time.monotonic() + ANCHOR_WAIT_S
        while scrape(world.cluster.node(node).metrics_url)[DIVERGES] != 1:
            assert time.monotonic() < deadline, f"{node} never reported the divergence"
            time.sleep(0.1)
        ran = run_kmsctl(world.cluster, "audit", "verify", "--node", node)
        assert ran.code == 1
        assert f"{node}: entry {cut} (request {first_new}): written at" in ran.err, ran.err
        assert "truncated here and re-appended" in ran.err
    finally:
        world.cluster.stop_node(node)
        backup.restore()
        world.cluster.start_node(node)


def test_a_node_killed_under_load_keeps_every_receipt_it_issued(
    clean: World, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    world, node = clean, "node-2"
    receipts: list[Receipt] = []
    errors: list[BaseException] = []
    killed = threading.Event()
    lock = threading.Lock()

    def hammer() -> None:
        signer = world.signer()
        with world.channel(node) as channel:
            stub = NodeStub(channel)
            while not killed.is_set():
                request = signer.single(
                    world.patient.identity.address,
                    world.lab.record_id,
                    RecordType.LAB_RESULT,
                    world.capsule,
                )
                try:
                    response = stub.Reencrypt(request, timeout=5)
                except grpc.RpcError:
                    continue  # the node is gone: what it answered before is what counts
                with lock:
                    receipts.append(_receipt(response.fragment.receipt))

    def read_through_the_coordinator() -> None:
        with ProviderClient(
            world.doctor,
            registry=world.registry,
            blobs=world.cluster.blob_store(),
            coordinator_address=world.cluster.coordinator_address,
            transport=world.cluster.app_transport,
        ) as doctor:
            while not killed.is_set():
                try:
                    assert doctor.read_record(world.lab.record_id) == sample_records.lab_result()
                except Exception as e:  # the threshold of the other two nodes still answers
                    errors.append(e)
                    return
                # Paced well under the coordinator's budget for one requester (50/s, bursts
                # of 100): this reader shows the cluster serving, not the budget refusing.
                time.sleep(1 / (CoordinatorSettings.requester_rate_per_s / 2))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    threads.append(threading.Thread(target=read_through_the_coordinator))
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        world.cluster.stop_node(node, kill=True)  # SIGKILL, mid-append for some requests
    finally:
        killed.set()
        for thread in threads:
            thread.join(30)
        if node not in world.cluster.running():  # the next tests need it, whatever this finds
            world.cluster.start_node(node)
    assert len(receipts) > 20 and not errors, errors

    now = world.checkpoint(node)
    assert now.tree_size > max(r.leaf_index for r in receipts)
    with world.channel(node) as channel:
        audit = AuditStub(channel)
        for receipt in receipts:
            proof = audit.GetInclusionProof(
                audit_pb2.InclusionProofRequest(
                    leaf_index=receipt.leaf_index, tree_size=now.tree_size
                ),
                timeout=5,
            )
            assert verify_receipt_inclusion(receipt, now, list(proof.hashes))
    wait_anchored(world.registry, node, now.tree_size)
    assert scrape(world.cluster.node(node).metrics_url)[DIVERGES] == 0

    held = tmp_path / "receipts.json"
    held.write_text(json.dumps([receipt_to_json(r) for r in receipts]))
    ran = run_kmsctl(world.cluster, "audit", "verify", "--node", node, "--receipts", str(held))
    assert ran.code == 0, ran.out + ran.err


def test_an_entry_granted_after_the_revocation_is_flagged(world: World, run_kmsctl: Kmsctl) -> None:
    """The node's operator appends a 'granted' entry with the node's own HSM key, dated at
    a block where the patient had already revoked the grant. Signatures, proofs and anchors
    all hold; the grant state at that block does not. (Last in the module: left as is.)"""
    node = "node-3"
    world.read_at(node, 2)
    block = world.patient.revoke(world.doctor.address)
    world.patient.await_nodes(block)
    forged = {
        "request_id": "forged-after-revocation",
        "node_id": node,
        "time": int(time.time()),
        "requester": world.doctor.address,
        "patient": world.patient.identity.address,
        "record_id": world.lab.record_id.hex(),
        "capsule_hash": world.lab.capsule_hash.hex(),
        "purpose_of_use": "TREAT",
        "decision": "granted",
        "reason_code": "granted",
        "reason": "grant is active and covers this record",
        "block_number": block,
        "block_hash": world.registry.block(block).hash.hex(),
        "cfrag_hash": "ab" * 32,
    }
    index = append_forged_entry(world.cluster, node, forged)

    ran = run_kmsctl(world.cluster, "audit", "verify")
    assert ran.code == 1
    assert (
        f"{node}: entry {index} (request forged-after-revocation): granted, but at block "
        f"{block}: grant has been revoked by the patient"
    ) in ran.err, ran.err
    # Only that node, only that entry.
    assert "node-1" not in ran.err and "node-2" not in ran.err


# --- the session's cluster, after everything else -------------------------------------------


@pytest.mark.runs_last
def test_every_decision_of_the_session_verifies(
    people: People, run_kmsctl: Kmsctl, tmp_path: Path
) -> None:
    """After the demo and every other test of the session: every node's whole log. (It
    makes a granted decision at every node and waits for their anchors itself, so it also
    holds when run alone.)"""
    cluster = people.cluster
    people.grant_doctor()
    capsule = parse_envelope(cluster.blob_store().get(people.lab.storage_uri)).capsule
    doctor = people.doctor_signer()
    for node in cluster.nodes:
        request = doctor.single(
            people.patient.identity.address, people.lab.record_id, RecordType.LAB_RESULT, capsule
        )
        with cluster.transport.channel(node.address, server_name=node.node_id) as channel:
            assert NodeStub(channel).Reencrypt(request, timeout=5).fragment.cfrag
            size = (
                AuditStub(channel)
                .GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5)
                .tree_size
            )
        wait_anchored(people.registry, node.node_id, size)
    ran = run_kmsctl(cluster, "audit", "verify")
    assert ran.code == 0, ran.out + ran.err
    document = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all(node["anchors_checked"] >= 1 for node in document["nodes"])
    assert all(node["granted"] >= 1 for node in document["nodes"])
