"""`kmsctl` as a person uses it, against the running test cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clients.audit.receipts_file import MAX_RECEIPTS_FILE_BYTES, save_receipts
from clients.sdk.provider import RecordRead
from core.audit import Receipt, verify_receipt
from core.record_types import RecordType
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


def kmsctl(cluster: LocalCluster | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``kmsctl ARGS --state-dir`` the cluster's (or the directory given)."""
    state_dir = cluster if isinstance(cluster, Path) else cluster.state_dir
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.kmsctl",
            *args,
            "--state-dir",
            str(state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_runs_every_step(cluster: LocalCluster) -> None:
    result = kmsctl(cluster, "demo")
    assert result.returncode == 0, result.stderr
    assert "decrypted record equals the original" in result.stdout
    assert "grant has been revoked by the patient" in result.stdout
    assert "read under the emergency grant" in result.stdout
    assert "every decision is judged again at its block" in result.stdout
    assert "demo finished" in result.stdout
    assert re.search(
        r"patient did:pkh:eip155:\d+:0x[0-9a-fA-F]{40}, doctor did:pkh:", result.stdout
    )


def test_patient_and_provider_commands(cluster: LocalCluster, tmp_path: Path) -> None:
    document = tmp_path / "hba1c.json"
    document.write_bytes(lab_result())
    assert kmsctl(cluster, "patient", "register").returncode == 0
    stored = kmsctl(cluster, "patient", "store", str(document), "--type", "lab_result")
    assert stored.returncode == 0, stored.stderr
    record_id = json.loads(stored.stdout)["record_id"]

    granted = kmsctl(cluster, "patient", "grant", "doctor", "--types", "lab_result,imaging")
    assert granted.returncode == 0, granted.stderr
    assert len(json.loads(granted.stdout)["enrolled"]) == len(cluster.nodes)

    out, receipts = tmp_path / "read.json", tmp_path / "receipts.json"
    for _ in range(2):  # each read adds its nodes' receipts to the file
        read = kmsctl(
            cluster,
            "provider",
            "read",
            record_id,
            "--out",
            str(out),
            "--receipts-out",
            str(receipts),
        )
        assert read.returncode == 0, read.stderr
        assert out.read_bytes() == lab_result()
    kept = json.loads(receipts.read_text())
    assert len(kept) == 2 * cluster.threshold
    # Several records are one batch read: each written to the directory, every receipt kept.
    again = kmsctl(cluster, "patient", "store", str(document), "--type", "lab_result")
    assert again.returncode == 0, again.stderr
    both = [record_id, json.loads(again.stdout)["record_id"]]
    records, batch_receipts = tmp_path / "records", tmp_path / "batch-receipts.json"
    batch = kmsctl(
        cluster,
        "provider",
        "read",
        *both,
        "--out",
        str(records),
        "--receipts-out",
        str(batch_receipts),
    )
    assert batch.returncode == 0, batch.stderr
    assert sorted(p.name for p in records.iterdir()) == sorted(f"{r}.json" for r in both)
    assert all(p.read_bytes() == lab_result() for p in records.iterdir())
    assert len(json.loads(batch_receipts.read_text())) == 2 * cluster.threshold
    # The app's receipts are the auditor's evidence: every one is in its node's log...
    verified = kmsctl(cluster, "audit", "verify", "--receipts", str(receipts))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # ...and one the node did not sign (here: naming another entry's hash) is no evidence
    # against it (anyone can write one): named as bad evidence, the node still passes.
    hashed = kept[0]["entry_hash"]
    kept[0]["entry_hash"] = ("0" if hashed[0] != "0" else "1") + hashed[1:]
    receipts.write_text(json.dumps(kept))
    forged = kmsctl(cluster, "audit", "verify", "--receipts", str(receipts))
    assert forged.returncode == 0, forged.stdout + forged.stderr
    assert f"warning {kept[0]['node_id']}: bad evidence" in forged.stdout
    assert kept[0]["entry_hash"][:16] in forged.stdout

    opted_in = kmsctl(cluster, "patient", "emergency-opt-in", "responder", "--types", "lab_result")
    assert opted_in.returncode == 0, opted_in.stderr
    assert json.loads(opted_in.stdout)["record_types"] == ["lab_result"]
    opened = kmsctl(cluster, "emergency", "open", "patient", "--duration", "600")
    assert opened.returncode == 0, opened.stderr
    assert "read with --purpose ETREAT" in opened.stdout
    emergency = kmsctl(
        cluster, "provider", "read", record_id, "--as", "responder", "--purpose", "ETREAT"
    )
    assert emergency.returncode == 0, emergency.stderr
    assert kmsctl(cluster, "patient", "emergency-opt-out", "responder").returncode == 0

    allowed = kmsctl(cluster, "patient", "allow-writer", "doctor")
    assert allowed.returncode == 0, allowed.stderr
    registry = cluster.registry()
    doctor, patient = cluster.identity("doctor"), cluster.identity("patient")
    # Parties are named by their DIDs.
    chain_id = registry.chain_id()
    assert f"did:pkh:eip155:{chain_id}:{doctor.address} may now anchor records" in allowed.stdout
    assert f"for did:pkh:eip155:{chain_id}:{patient.address}" in allowed.stdout
    assert registry.is_record_writer(patient.address, doctor.address)
    stopped = kmsctl(cluster, "patient", "allow-writer", "doctor", "--stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not registry.is_record_writer(patient.address, doctor.address)

    assert kmsctl(cluster, "patient", "deactivate", record_id).returncode == 0
    refused = kmsctl(cluster, "provider", "read", record_id)
    assert refused.returncode == 1
    assert "deactivated" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bad_input_gets_a_message_not_a_traceback(cluster: LocalCluster, tmp_path: Path) -> None:
    not_fhir = tmp_path / "x.json"
    not_fhir.write_text('{"resourceType": "Condition"}')
    result = kmsctl(cluster, "patient", "store", str(not_fhir), "--type", "lab_result")
    assert result.returncode == 1
    assert "lab_result record must be a FHIR" in result.stderr
    result = kmsctl(cluster, "provider", "read", "0x1234")
    assert result.returncode == 1
    assert "record id must be 32 bytes of hex" in result.stderr
    result = kmsctl(cluster, "patient", "store", str(not_fhir), "--type", "xray")
    assert "unknown record type 'xray'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_hostile_file_gets_a_message_not_a_crash(cluster: LocalCluster, tmp_path: Path) -> None:
    """Files kmsctl reads are bounded in size and nesting: json.loads of 200 000 brackets,
    in a process that imported web3, dies of a C stack overflow."""
    nested = tmp_path / "nested.json"
    nested.write_bytes(b"[" * 200_000)
    sparse = tmp_path / "sparse.json"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # refused by size, never read whole
    fhir = tmp_path / "fhir.json"
    fhir.write_bytes(b'{"resourceType": "Observation", "note": ' + b"[" * 200_000 + b"}")
    accounts = cluster.state_dir / "accounts"
    (accounts / "hostile.json").write_bytes(b"[" * 60_000)
    cases = [
        (["audit", "verify", "--receipts", str(nested)], "nests deeper than 3 levels"),
        (
            ["audit", "verify", "--receipts", str(sparse)],
            f"larger than {MAX_RECEIPTS_FILE_BYTES} bytes",
        ),
        (["audit", "verify", "--state-file", str(nested)], "larger than|nests deeper"),
        (["patient", "store", str(fhir), "--type", "lab_result"], "nests deeper than 64 levels"),
        (["patient", "store", str(sparse), "--type", "lab_result"], "larger than 4194304 bytes"),
        (["patient", "register", "--as", "hostile"], "nests deeper than 1 level"),
    ]
    try:
        for args, message in cases:
            result = kmsctl(cluster, *args)
            assert result.returncode == 1, (args, result.returncode, result.stderr)
            assert result.stderr.startswith("kmsctl: "), (args, result.stderr)
            assert re.search(message, result.stderr), (args, result.stderr)
            assert "Traceback" not in result.stderr
    finally:
        (accounts / "hostile.json").unlink()

    state = tmp_path / "state"
    state.mkdir()
    (state / "cluster.json").write_bytes(b'{"nodes": ' + b"[" * 200_000)
    result = kmsctl(state, "cluster", "status")
    assert result.returncode == 1, result.stderr
    assert "cluster.json nests deeper than 4 levels" in result.stderr


def test_a_batch_reads_receipts_are_each_records_and_the_auditors_evidence(
    people: People, cluster: LocalCluster, tmp_path: Path
) -> None:
    records = [people.lab.record_id] + [
        people.patient.store_record(lab_result(), RecordType.LAB_RESULT).record_id for _ in range(2)
    ]
    people.grant_doctor([RecordType.LAB_RESULT])
    with people.provider() as doctor:
        reads = doctor.read_records_with_receipts(records)
    keys = {n.node_id: n.signing_public_key for n in people.registry.list_nodes()}
    signatures: dict[str, set[bytes]] = {}
    receipts: list[Receipt] = []
    for record_id in records:
        read = reads[record_id]
        assert isinstance(read, RecordRead), read
        assert read.plaintext == lab_result()
        receipts += read.receipts
        nodes = [r.node_id for r in read.receipts]
        assert len(nodes) == len(set(nodes)) == cluster.threshold
        for receipt in read.receipts:
            assert verify_receipt(receipt, keys[receipt.node_id])
            signatures.setdefault(receipt.node_id, set()).add(receipt.signature)
    # Each node signed the batch's entries once, each receipt carrying its own path.
    assert all(len(s) == 1 for s in signatures.values())

    held = tmp_path / "receipts.json"
    save_receipts(held, receipts)
    verified = kmsctl(cluster, "audit", "verify", "--receipts", str(held))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # Each receipt was noted as kept for this read and its fragment, as the entries say.
    assert "bad evidence" not in verified.stdout
    kept = json.loads(held.read_text())
    assert {k["kept_for_request"] for k in kept} == {receipts[0].kept_for_request}
    # Noted for another read (as if a relay had attached another read's receipts).
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps([{**k, "kept_for_request": "another-read"} for k in kept]))
    misattributed = kmsctl(cluster, "audit", "verify", "--receipts", str(elsewhere))
    assert misattributed.returncode == 0, misattributed.stdout + misattributed.stderr
    assert "was kept for request another-read, but the entry is request" in misattributed.stdout
    batched = next(k for k in kept if k["batch_path"])
    first = batched["batch_path"][0]
    batched["batch_path"][0] = ("0" if first[0] != "0" else "1") + first[1:]
    held.write_text(json.dumps(kept))
    # A path altered no longer leads to the root the node signed: bad evidence, not a failure.
    altered = kmsctl(cluster, "audit", "verify", "--receipts", str(held))
    assert altered.returncode == 0, altered.stdout + altered.stderr
    assert f"warning {batched['node_id']}: bad evidence" in altered.stdout
