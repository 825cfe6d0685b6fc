"""The audit's outputs: report rows (JSON, CSV), FHIR R4B AuditEvents, the receipts file."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from clients.audit.audit_report import (
    CSV_COLUMNS,
    fhir_bundle,
    load_receipts,
    load_state,
    receipt_to_json,
    report_csv,
    report_json,
    write_reports,
)
from clients.audit.auditor import ClusterReport
from core.audit_verify import verify_node
from core.errors import InvalidRequest
from tests.core.test_audit_verify import DOCTOR, FIRST_BLOCK, NODE, T0, Node, make_entry
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)

CHAIN_ID = 31337


def cluster_report(node: Node) -> ClusterReport:
    report = verify_node(node.info, node.log, node.chain)
    return ClusterReport("0x" + "ab" * 20, 2000, (report,), 0.5, {NODE: 0.5}, 7)


def test_csv_has_one_row_per_entry_and_names_failures(node: Node) -> None:
    node.chain.revoked_at = FIRST_BLOCK + 30
    rows = list(csv.DictReader(io.StringIO(report_csv(cluster_report(node)))))
    assert len(rows) == 40 and tuple(rows[0]) == CSV_COLUMNS
    assert rows[0] == {
        "node": NODE,
        "leaf_index": "0",
        "request_id": "req-0",
        "time": "2027-01-15T08:00:00Z",
        "requester": DOCTOR,
        "patient": rows[0]["patient"],
        "record": "0x" + bytes(range(32)).hex(),
        "record_type": "",  # a version 1 entry did not record it
        "purpose": "TREAT",
        "decision": "granted",
        "reason": "granted",
        "block": str(FIRST_BLOCK),
        "verdict": "ok",
        "problem": "",
    }
    assert (rows[30]["verdict"], rows[30]["problem"]) == (
        "failed",
        "granted, but at block 130: grant has been revoked by the patient",
    )
    assert rows[34]["verdict"] == "ok"  # a denial


def test_a_request_id_a_spreadsheet_would_run_is_quoted(node: Node) -> None:
    node.append([make_entry(40, tag="-2")])  # request ids may start with '-'
    rows = list(csv.DictReader(io.StringIO(report_csv(cluster_report(node)))))
    assert rows[40]["request_id"] == "'-2-40"


def test_json_report_summarises_each_node(node: Node, tmp_path: Path) -> None:
    node.chain.revoked_at = FIRST_BLOCK + 30
    report = cluster_report(node)
    document = json.loads(report_json(report))
    (summary,) = document["nodes"]
    assert document["ok"] is False
    assert (summary["entries"], summary["granted"], summary["denied"]) == (40, 32, 8)
    assert summary["anchors_checked"] == 2 and summary["failed_entries"] == 8
    assert summary["first_failure"].startswith("entry 30 (request req-30): granted, but")
    assert document["entries"][30]["problems"] == [
        "granted, but at block 130: grant has been revoked by the patient"
    ]
    json_path, csv_path = write_reports(report, tmp_path / "audit")
    assert json.loads(json_path.read_text()) == document
    assert (json_path.stat().st_mode & 0o777, csv_path.stat().st_mode & 0o777) == (0o600, 0o600)


def test_fhir_export_is_a_valid_r4b_bundle_of_audit_events(node: Node) -> None:
    bundle = fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0 + 100)
    parsed = Bundle.model_validate_json(bundle)
    assert parsed.type == "collection" and len(parsed.entry) == 40
    granted, denied = parsed.entry[0].resource, parsed.entry[4].resource
    assert granted.get_resource_type() == "AuditEvent"
    assert (granted.action, granted.outcome, denied.outcome) == ("E", "0", "4")
    assert granted.type.code == "110110" and granted.subtype[0].code == "reencrypt"
    assert granted.recorded.isoformat() == "2027-01-15T08:00:00+00:00"
    assert granted.purposeOfEvent[0].coding[0].code == "TREAT"
    assert granted.agent[0].who.identifier.value == f"eip155:{CHAIN_ID}:{DOCTOR}"
    assert granted.agent[0].requestor is True
    assert granted.source.observer.display == NODE
    patient, record, capsule = granted.entity
    assert patient.role.code == "1" and record.what.identifier.value.startswith("0x0001")
    assert {d.type: d.valueString for d in record.detail}["request_id"] == "req-0"
    assert capsule.what.identifier.system == "urn:medkms:capsule-sha256"
    # Stable ids: exporting twice gives the same resources.
    assert bundle == fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0 + 100)


def test_an_unknown_denial_reason_is_a_serious_failure(node: Node) -> None:
    odd = dataclasses.replace(
        make_entry(44), reason_code="hsm_failed", reason="the HSM failed"
    )  # entry 44 is a denial
    node.append([make_entry(i) for i in range(40, 44)] + [odd])
    bundle = Bundle.model_validate_json(fhir_bundle(cluster_report(node).nodes, CHAIN_ID, now=T0))
    assert bundle.entry[44].resource.outcome == "8"


def test_receipts_round_trip_through_their_file(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    path.write_text(json.dumps([receipt_to_json(r) for r in node.receipts]))
    assert load_receipts(path) == node.receipts
    path.write_text('[{"node_id": "node-1"}]')
    with pytest.raises(InvalidRequest, match="not a receipts file"):
        load_receipts(path)


NESTED = b"[" * 200_000  # json.loads of it, in a process that imported web3, dies


def test_a_hostile_receipts_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    path.write_bytes(NESTED)
    with pytest.raises(InvalidRequest, match="nests deeper than 3 levels"):
        load_receipts(path)
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # sparse: refused after 64 MiB, never read whole
    with pytest.raises(InvalidRequest, match="larger than 67108864 bytes"):
        load_receipts(path)


def test_a_hostile_state_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"nodes": {"node-1": ' + NESTED + b"}}")
    with pytest.raises(InvalidRequest, match="audit state .* nests deeper than 4 levels"):
        load_state(path, [])
    path.write_bytes(b"[]")
    with pytest.raises(InvalidRequest, match="not a JSON object"):
        load_state(path, [])
    path.write_bytes(b'{"nodes": []}')
    with pytest.raises(InvalidRequest, match="not an audit state file"):
        load_state(path, [])
