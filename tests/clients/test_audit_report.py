"""The audit's report: one row per entry (JSON, CSV), a summary per node."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from clients.audit.audit_report import (
    CSV_COLUMNS,
    failures,
    report_csv,
    report_json,
    summary_lines,
)
from clients.audit.auditor import ClusterReport
from clients.audit.report_files import write_reports
from core.audit_verify import verify_node
from core.errors import Unavailable
from tests.core.test_audit_verify import (
    DOCTOR,
    FIRST_BLOCK,
    NODE,
    T0,
    Node,
    StopsAfter,
    make_entry,
)
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)


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
    assert (summary["verdict"], summary["anchored_size"], summary["anchored_block"]) == (
        "failed",
        32,
        FIRST_BLOCK + 1001,
    )
    assert summary["first_failure"].startswith("entry 30 (request req-30): granted, but")
    assert document["entries"][30]["problems"] == [
        "granted, but at block 130: grant has been revoked by the patient"
    ]
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "report.html").write_text("an earlier report, readable by all")
    (tmp_path / "audit" / "report.html").chmod(0o644)
    paths = write_reports(report, tmp_path / "audit", audited_at=T0, chain_id=31337)
    assert [p.name for p in paths] == ["report.json", "report.csv", "report.html"]
    assert json.loads(paths[0].read_text()) == document
    assert paths[1].read_text() == report_csv(report)
    assert "31337" in paths[2].read_text()
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o600, 0o600, 0o600]


def test_a_node_that_could_not_be_read_is_reported_so_not_as_failed(node: Node) -> None:
    cut = StopsAfter(node.log, 25, Unavailable("node-1: Deadline Exceeded"))
    report = ClusterReport(
        "0x" + "ab" * 20, 2000, (verify_node(node.info, cut, node.chain),), 0.5, {NODE: 0.5}, 0
    )
    reason = "the node stopped serving entries at entry 25: node-1: Deadline Exceeded"
    document = json.loads(report_json(report))
    (summary,) = document["nodes"]
    assert (document["ok"], document["verdict"]) == (False, "could not read")
    assert (summary["verdict"], summary["could_not_read"]) == ("could not read", [reason])
    assert summary["first_failure"] is None and summary["problems"] == []
    rows = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert len(rows) == 26  # the 25 entries read, then why the rest could not be
    assert {r["verdict"] for r in rows[:25]} == {"ok"}
    assert (rows[25]["node"], rows[25]["leaf_index"], rows[25]["verdict"]) == (
        NODE,
        "",
        "could not read",
    )
    assert rows[25]["problem"] == reason
    lines = summary_lines(report)
    assert lines[1].endswith(f"COULD NOT READ: {reason}")
    assert lines[-1].startswith("audit INCOMPLETE")
    assert failures(report) == f"{NODE} could not be read: {reason}"


def test_the_json_report_has_one_line_per_entry(node: Node) -> None:
    node.chain.revoked_at = FIRST_BLOCK + 30
    text = report_json(cluster_report(node))
    entries = json.loads(text)["entries"]
    lines = text.splitlines()
    start = lines.index('  "entries": [') + 1
    rows = [f"    {json.dumps(row)}" for row in entries]
    assert len(rows) == 40
    assert lines[start:] == [row + "," for row in rows[:-1]] + [rows[-1], "  ]", "}"]
    assert json.loads(report_json(ClusterReport("", 1, (), 0, {}, 0)))["entries"] == []
