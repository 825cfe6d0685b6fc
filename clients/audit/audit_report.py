"""What an audit hands over: the per-request report (JSON and CSV), and the summary and
failures ``kmsctl audit verify`` prints (the HTML report: clients/audit/report_html.py; the
files: clients/audit/report_files.py).

Each report row is one leaf of one node's log: who asked for whose record, why, what the
node decided at which block, and whether the auditor found that entry sound.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any, Final, TextIO

from clients.audit.auditor import ClusterReport
from core.audit_findings import EntryResult, NodeReport, Verdict
from core.formats import hex_0x, iso_utc

CSV_COLUMNS: Final = (
    "node",
    "leaf_index",
    "request_id",
    "time",
    "requester",
    "patient",
    "record",
    "record_type",
    "purpose",
    "decision",
    "reason",
    "block",
    "verdict",
    "problem",
)


def entry_row(node: NodeReport, result: EntryResult) -> dict[str, Any]:
    """One leaf's row: the entry's fields as written in every report, the auditor's verdict
    and its problems on one line."""
    entry = result.entry
    problems = "; ".join(p.message for p in result.problems)
    row: dict[str, Any] = {
        "node": node.node_id,
        "leaf_index": result.leaf_index,
        "request_id": result.request_id,
        "time": "",
        "requester": "",
        "patient": "",
        "record": "",
        "record_type": "",
        "purpose": "",
        "decision": "",
        "reason": "",
        "block": "",
        "verdict": "ok" if result.ok else "failed",
        "problem": problems,
    }
    if entry is not None:
        row.update(
            time=iso_utc(entry.time),
            requester=entry.requester,
            patient=entry.patient,
            record=hex_0x(entry.record_id),
            # recorded by version 2 entries only
            record_type=entry.record_type.label if entry.record_type is not None else "",
            purpose=entry.purpose_of_use,
            decision=entry.decision,
            reason=entry.reason_code,
            block=entry.block_number,
        )
    return row


def _unread_row(node: NodeReport) -> dict[str, Any]:
    """The row of a node that could not be read (after its entries that were)."""
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(
        node=node.node_id,
        verdict=str(Verdict.COULD_NOT_READ),
        problem="; ".join(node.could_not_read),
    )
    return row


def rows(report: ClusterReport) -> Iterator[dict[str, Any]]:
    """One row per leaf (and per missing range) of every node, in log order; then, for a
    node that could not be read, one row saying why."""
    for node in report.nodes:
        for result in node.entries:
            yield entry_row(node, result)
        if node.could_not_read:
            yield _unread_row(node)


def node_summary(report: ClusterReport, node: NodeReport) -> dict[str, Any]:
    first = node.first_failure()
    cp = node.checkpoint
    return {
        "node_id": node.node_id,
        "ok": node.ok,
        "verdict": str(node.verdict),
        "could_not_read": list(node.could_not_read),
        "tree_size": cp.tree_size if cp is not None else None,
        "root": hex_0x(cp.root) if cp is not None else None,
        "checkpoint_time": iso_utc(cp.timestamp) if cp is not None else None,
        "entries": len(node.entries),
        "first_entry_read": node.start,
        "granted": node.granted,
        "denied": node.denied,
        "anchors_checked": node.anchors_checked,
        "anchored_size": node.anchored_size,
        "anchored_block": node.anchored_block,
        "failed_entries": node.failed_entries,
        "first_failure": node.describe(first) if first is not None else None,
        "problems": [
            {
                "check": str(p.check),
                "leaf_index": p.leaf_index,
                "request_id": node.request_id(p.leaf_index) if p.leaf_index is not None else None,
                "primary": p.primary,
                "message": p.message,
            }
            for p in node.problems
        ],
        "warnings": list(node.warnings),
        "seconds": round(report.node_seconds.get(node.node_id, 0.0), 3),
    }


def write_report_json(report: ClusterReport, out: TextIO) -> None:
    """``report.json`` to ``out``, one entry at a time, so that a report of 100,000s of
    entries is never held whole: indented as ``json.dumps(document, indent=2)`` would,
    except that each entry is one line (json's C encoder, which indenting turns off, is
    several times faster)."""
    head = {
        "ok": report.ok,
        "verdict": str(report.verdict),
        "registry": report.registry_address,
        "block": report.block,
        "seconds": round(report.seconds, 3),
        "nodes": [node_summary(report, n) for n in report.nodes],
        "entries": [],
    }
    text = json.dumps(head, indent=2)
    out.write(text[: text.rindex("[]")] + "[")
    first = True
    for node in report.nodes:
        for result in node.entries:
            row = entry_row(node, result)
            row["problems"] = [p.message for p in result.problems]
            row["warnings"] = list(result.warnings)
            del row["problem"]
            out.write("\n    " if first else ",\n    ")
            out.write(json.dumps(row))
            first = False
    out.write("]\n}\n" if first else "\n  ]\n}\n")


def report_json(report: ClusterReport) -> str:
    out = io.StringIO()
    write_report_json(report, out)
    return out.getvalue()


def _csv_cell(value: object) -> object:
    """Text a spreadsheet would run as a formula is quoted (OWASP, CSV injection): request
    ids come from requesters."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_report_csv(report: ClusterReport, out: TextIO) -> None:
    """``report.csv`` to ``out``, one row at a time."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows(report):
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})


def report_csv(report: ClusterReport) -> str:
    out = io.StringIO()
    write_report_csv(report, out)
    return out.getvalue()


def summary_lines(report: ClusterReport) -> list[str]:
    """The summary ``kmsctl audit verify`` prints: one line per node, then its warnings."""
    lines = [
        f"audit of {len(report.nodes)} nodes (registry {report.registry_address}, block "
        f"{report.block}): {report.entries} entries in {report.seconds:.2f} s, "
        f"{report.chain_reads} chain reads"
    ]
    width = max((len(n.node_id) for n in report.nodes), default=0)
    for node in report.nodes:
        counts = (
            f"{len(node.entries):>6} entries {node.granted:>6} granted {node.denied:>6} denied "
            f"{node.anchors_checked:>4} anchors"
        )
        if node.start:
            counts += f" (from entry {node.start}: those before were verified earlier)"
        first = node.first_failure()
        if first is None and node.could_not_read:
            verdict = f"COULD NOT READ: {node.could_not_read[0]}"
        elif first is None:
            verdict = str(Verdict.PASSED)
        else:
            log_wide = sum(1 for p in node.problems if p.leaf_index is None)
            verdict = (
                f"FAILED ({_count(node.failed_entries, 'entry', 'entries')}, "
                f"{_count(log_wide, 'log-wide problem', 'log-wide problems')}); "
                f"first: {node.describe(first)}"
            )
        lines.append(f"  {node.node_id:<{width}}  {counts}  {verdict}")
    for node in report.nodes:
        lines += [f"  warning {node.node_id}: {w}" for w in node.warnings]
    lines.append(
        f"{_CLOSING[report.verdict]} ({report.entries} entries of {len(report.nodes)} nodes in "
        f"{report.seconds:.1f} s)"
    )
    return lines


_CLOSING: Final = {
    Verdict.PASSED: "audit passed",
    Verdict.FAILED: "audit FAILED",
    Verdict.COULD_NOT_READ: "audit INCOMPLETE: some nodes could not be read (no check failed)",
}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def failures(report: ClusterReport) -> str:
    """Each failing node's first failure, then why each node that could not be read was
    not, on one line."""
    named = []
    for node in report.nodes:
        first = node.first_failure()
        if first is not None:
            named.append(f"{node.node_id}: {node.describe(first)}")
    for node in report.nodes:
        if node.verdict is Verdict.COULD_NOT_READ:
            named.append(f"{node.node_id} could not be read: {node.could_not_read[0]}")
    return "; ".join(named)
