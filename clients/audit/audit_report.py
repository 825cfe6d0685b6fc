"""What an audit hands over: the per-request report (JSON and CSV), FHIR R4B AuditEvent
resources for a hospital's security tooling, and the receipts file an auditor may bring.

Each report row is one leaf of one node's log: who asked for whose record, why, what the
node decided at which block, and whether the auditor found that entry sound.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from clients.audit.auditor import ClusterReport
from clients.sdk.input_files import load_json, load_json_object
from core.audit import GRANTED, AuditEntry, Receipt
from core.audit_findings import EntryResult, NodeReport, VerifiedPrefix
from core.errors import InvalidRequest, KmsError
from core.policy import Reason
from core.registry_types import NodeInfo
from core.requests import PURPOSES_OF_USE

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

# FHIR code systems (R4B terminology).
DICOM: Final = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
#: an identifier whose value is itself a URI (here a CAIP-10 account id, eip155:CHAIN:ADDRESS)
URI_IDENTIFIER: Final = "urn:ietf:rfc:3986"
MEDKMS_EVENT: Final = "urn:medkms:audit-event"
MEDKMS_RECORD: Final = "urn:medkms:record-id"
MEDKMS_CAPSULE: Final = "urn:medkms:capsule-sha256"
MEDKMS_NODE: Final = "urn:medkms:node-id"
_ID_NAMESPACE: Final = uuid.UUID("6f1c1a52-2f35-5d0c-9d55-6d65646b6d73")

# Bounds on the files an audit reads (clients/sdk/input_files.py).
#: a receipt is under 1 KiB (its batch path at most 10 hashes): some 100 000 receipts
MAX_RECEIPTS_FILE_BYTES: Final = 64 * 1024 * 1024
#: a list of receipts, each an object, its batch path a list
RECEIPTS_FILE_DEPTH: Final = 3
#: per node a checkpoint and a frontier of at most 64 hashes, some 5 KiB: thousands of nodes
MAX_STATE_FILE_BYTES: Final = 16 * 1024 * 1024
#: {"nodes": {node id: {"frontier": [...]}}}
STATE_FILE_DEPTH: Final = 4

#: refusals by the access policy or for want of a kfrag: the request was wrong, the node was
#: not (AuditEvent outcome 4, "minor failure"); any other code is 8, "serious failure"
_MINOR_DENIALS: Final = frozenset(Reason) - {Reason.GRANTED}


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


# --- the per-request report ------------------------------------------------------------------


def _row(node: NodeReport, result: EntryResult) -> dict[str, Any]:
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
            time=_iso(entry.time),
            requester=entry.requester,
            patient=entry.patient,
            record=_hex(entry.record_id),
            # recorded by version 2 entries only
            record_type=entry.record_type.label if entry.record_type is not None else "",
            purpose=entry.purpose_of_use,
            decision=entry.decision,
            reason=entry.reason_code,
            block=entry.block_number,
        )
    return row


def rows(report: ClusterReport) -> Iterator[dict[str, Any]]:
    """One row per leaf (and per missing range) of every node, in log order."""
    for node in report.nodes:
        for result in node.entries:
            yield _row(node, result)


def node_summary(report: ClusterReport, node: NodeReport) -> dict[str, Any]:
    first = node.first_failure()
    cp = node.checkpoint
    return {
        "node_id": node.node_id,
        "ok": node.ok,
        "tree_size": cp.tree_size if cp is not None else None,
        "root": _hex(cp.root) if cp is not None else None,
        "checkpoint_time": _iso(cp.timestamp) if cp is not None else None,
        "entries": len(node.entries),
        "first_entry_read": node.start,
        "granted": node.granted,
        "denied": node.denied,
        "anchors_checked": node.anchors_checked,
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


def report_json(report: ClusterReport) -> str:
    entries = []
    for node in report.nodes:
        for result in node.entries:
            row = _row(node, result)
            row["problems"] = [p.message for p in result.problems]
            row["warnings"] = list(result.warnings)
            del row["problem"]
            entries.append(row)
    document = {
        "ok": report.ok,
        "registry": report.registry_address,
        "block": report.block,
        "seconds": round(report.seconds, 3),
        "nodes": [node_summary(report, n) for n in report.nodes],
        "entries": entries,
    }
    return json.dumps(document, indent=2) + "\n"


def _csv_cell(value: object) -> object:
    """Text a spreadsheet would run as a formula is quoted (OWASP, CSV injection): request
    ids come from requesters."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def report_csv(report: ClusterReport) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows(report):
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return out.getvalue()


def write_reports(report: ClusterReport, directory: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.csv`` in ``directory`` (created, owner-only: the report
    says who read whose records)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    json_path, csv_path = directory / "report.json", directory / "report.csv"
    for path, text in ((json_path, report_json(report)), (csv_path, report_csv(report))):
        path.touch(mode=0o600)
        path.chmod(0o600)  # also when an earlier report left it wider
        path.write_text(text)
    return json_path, csv_path


def load_state(path: Path, nodes: Sequence[NodeInfo]) -> dict[str, VerifiedPrefix]:
    """The prefixes an earlier ``audit verify --state-file`` verified, of the registered
    ``nodes`` (each checked with its registered key); none if the file does not exist."""
    if not path.exists():
        return {}
    try:
        data = load_json_object(
            path, max_bytes=MAX_STATE_FILE_BYTES, max_depth=STATE_FILE_DEPTH, what="audit state"
        )
    except InvalidRequest:
        raise
    except OSError as e:
        raise InvalidRequest(f"cannot read the audit state {path}: {e}") from None
    if not isinstance(data.get("nodes"), dict):
        raise InvalidRequest(f"{path} is not an audit state file")
    keys = {n.node_id: n.signing_public_key for n in nodes}
    return {
        node_id: VerifiedPrefix.from_json(item, keys[node_id])
        for node_id, item in data["nodes"].items()
        if node_id in keys
    }


def save_state(path: Path, report: ClusterReport, earlier: dict[str, VerifiedPrefix]) -> None:
    """What this audit verified, for the next run: a node that failed keeps its earlier
    prefix (so the next run checks again from there)."""
    prefixes = dict(earlier)
    for node in report.nodes:
        if node.verified is not None:
            prefixes[node.node_id] = node.verified
    document = {
        "registry": report.registry_address,
        "nodes": {node_id: p.to_json() for node_id, p in sorted(prefixes.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(document, indent=2) + "\n")


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
        if first is None:
            verdict = "ok"
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
    lines.append("audit passed" if report.ok else "audit FAILED")
    return lines


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def failures(report: ClusterReport) -> str:
    """Each failing node's first failure, on one line."""
    named = []
    for node in report.nodes:
        first = node.first_failure()
        if first is not None:
            named.append(f"{node.node_id}: {node.describe(first)}")
    return "; ".join(named)


# --- FHIR ----------------------------------------------------------------------------------


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _account(chain_id: int, address: str) -> dict[str, Any]:
    return {"identifier": {"system": URI_IDENTIFIER, "value": f"eip155:{chain_id}:{address}"}}


def audit_event(node_id: str, leaf_index: int, entry: AuditEntry, chain_id: int) -> dict[str, Any]:
    """One decision as a FHIR R4B AuditEvent: a patient record's key was (or was not)
    released to the requester by re-encrypting its capsule."""
    purpose = [
        {
            "coding": [
                _coding(
                    ACT_REASON,
                    entry.purpose_of_use,
                    PURPOSES_OF_USE.get(entry.purpose_of_use, entry.purpose_of_use),
                )
            ]
        }
    ]
    if entry.decision == GRANTED:
        outcome = "0"
    else:
        outcome = "4" if entry.reason_code in _MINOR_DENIALS else "8"
    details = [
        ("request_id", entry.request_id),
        ("decision", entry.decision),
        ("reason_code", entry.reason_code),
        ("block_number", str(entry.block_number)),
        ("block_hash", _hex(entry.block_hash)),
        ("audit_leaf_index", str(leaf_index)),
    ]
    if entry.cfrag_hash:
        details.append(("cfrag_sha256", _hex(entry.cfrag_hash)))
    resource_id = uuid.uuid5(_ID_NAMESPACE, f"{node_id}/{leaf_index}/{entry.leaf_hash().hex()}")
    return {
        "resourceType": "AuditEvent",
        "id": str(resource_id),
        "type": _coding(DICOM, "110110", "Patient Record"),
        "subtype": [
            _coding(
                MEDKMS_EVENT,
                "reencrypt",
                "capsule re-encryption: a key fragment released to the requester",
            )
        ],
        "action": "E",
        "recorded": _iso(entry.time),
        "outcome": outcome,
        "outcomeDesc": entry.reason,
        "purposeOfEvent": purpose,
        "agent": [
            {
                "who": _account(chain_id, entry.requester),
                "requestor": True,
                "purposeOfUse": purpose,
            }
        ],
        "source": {
            "site": "medkms",
            "observer": {
                "identifier": {"system": MEDKMS_NODE, "value": node_id},
                "display": node_id,
            },
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
        "entity": [
            {
                "what": _account(chain_id, entry.patient),
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            },
            {
                "what": {"identifier": {"system": MEDKMS_RECORD, "value": _hex(entry.record_id)}},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
                "detail": [{"type": k, "valueString": v} for k, v in details],
            },
            {
                "what": {
                    "identifier": {"system": MEDKMS_CAPSULE, "value": _hex(entry.capsule_hash)}
                },
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "description": "SHA-256 of the Umbral capsule of the record's data key",
            },
        ],
    }


def fhir_bundle(nodes: Sequence[NodeReport], chain_id: int, *, now: int) -> str:
    """A FHIR R4B ``collection`` Bundle of one AuditEvent per entry of ``nodes``, validated
    against the R4B models."""
    entries = []
    for node in nodes:
        for result in node.entries:
            if result.entry is None:
                continue
            event = audit_event(node.node_id, result.leaf_index, result.entry, chain_id)
            entries.append({"fullUrl": f"urn:uuid:{event['id']}", "resource": event})
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": _iso(now),
        "entry": entries,
    }
    try:
        get_fhir_model_class("Bundle").model_validate(bundle)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KmsError(f"the FHIR export does not validate: {where}: {first['msg']}") from None
    return json.dumps(bundle, indent=2) + "\n"


# --- receipts ------------------------------------------------------------------------------


def receipt_to_json(receipt: Receipt) -> dict[str, Any]:
    return {
        "node_id": receipt.node_id,
        "leaf_index": receipt.leaf_index,
        "tree_size": receipt.tree_size,
        "entry_hash": receipt.entry_hash.hex(),
        "signature": receipt.signature.hex(),
        "batch_start": receipt.batch_start,
        "batch_size": receipt.batch_size,
        "batch_path": [node.hex() for node in receipt.batch_path],
    }


def load_receipts(path: Path) -> list[Receipt]:
    """A JSON list of receipts as :func:`receipt_to_json` writes them."""
    try:
        items = load_json(
            path, max_bytes=MAX_RECEIPTS_FILE_BYTES, max_depth=RECEIPTS_FILE_DEPTH, what="receipts"
        )
        if not isinstance(items, list):
            raise InvalidRequest(f"{path} must hold a JSON list of receipts")
        return [
            Receipt(
                node_id=str(item["node_id"]),
                leaf_index=int(item["leaf_index"]),
                tree_size=int(item["tree_size"]),
                entry_hash=bytes.fromhex(item["entry_hash"]),
                signature=bytes.fromhex(item["signature"]),
                batch_start=(None if item.get("batch_start") is None else int(item["batch_start"])),
                batch_size=int(item.get("batch_size", 1)),
                batch_path=tuple(bytes.fromhex(h) for h in item.get("batch_path", [])),
            )
            for item in items
        ]
    except (ValueError, KeyError, TypeError) as e:
        # InvalidRequest is a ValueError too: keep its message.
        message = e.message if isinstance(e, InvalidRequest) else f"{type(e).__name__}: {e}"
        raise InvalidRequest(f"{path} is not a receipts file: {message}") from None
