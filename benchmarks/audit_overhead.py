"""What the audit log costs a node per request, measured on its own.

Each decision is appended to the node's Merkle audit log before the answer leaves
(``kms_node/audit_log.py``): one SQLite transaction fsync'd to disk, the tree's new
nodes, and a receipt per entry signed by the node's P-256 key in the HSM. This module
times ``AuditLog.append_many`` against a real SoftHSM2 token in a temporary directory,
for single requests (one entry) and batches of 32 (one transaction, 32 receipts), and
the receipt signature alone, so the report can say how much of a node's time per
request is the audit trail.

Runs in a child process: SoftHSM reads its configuration once per process.
"""

from __future__ import annotations

import multiprocessing
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import stats

BATCH = 32
_PATIENT = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
_REQUESTER = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"


def _entries(node_id: str, count: int) -> list[Any]:
    from core.audit import AuditEntry
    from core.record_types import RecordType

    now = int(time.time())
    return [
        AuditEntry(
            request_id=secrets.token_hex(8),
            node_id=node_id,
            time=now,
            requester=_REQUESTER,
            patient=_PATIENT,
            record_id=secrets.token_bytes(32),
            capsule_hash=secrets.token_bytes(32),
            purpose_of_use="TREAT",
            decision="granted",
            reason_code="granted",
            reason="grant is active and covers this record",
            block_number=1234,
            block_hash=secrets.token_bytes(32),
            cfrag_hash=secrets.token_bytes(32),
            record_type=RecordType.LAB_RESULT,
            requester_umbral_key=b"\x02" + secrets.token_bytes(32),
        )
        for _ in range(count)
    ]


def _timed_appends(log: Any, node_id: str, size: int, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < duration_s:
        entries = _entries(node_id, size)
        t0 = time.perf_counter()
        log.append_many(entries)
        latencies.append(time.perf_counter() - t0)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    summary = stats.summarize(latencies, wall_s).as_dict()
    return {
        "entries_per_append": size,
        "appends": len(latencies),
        "p50_ms": summary["p50_ms"],
        "p95_ms": summary["p95_ms"],
        "wall_ms_per_entry": summary["p50_ms"] / size,
        # CPU spent in this process over the whole loop (entry building included, so an
        # upper bound), per entry.
        "cpu_ms_per_entry": cpu_s / (len(latencies) * size) * 1000.0,
    }


def _measure_in_child(duration_s: float, queue: Any) -> None:
    from benchmarks.scratch_token import scratch_keystore
    from kms_node.audit_log import AuditLog

    with tempfile.TemporaryDirectory(prefix="medkms-audit-bench-") as tmp:
        root = Path(tmp)
        keystore = scratch_keystore(root, "medkms-audit-bench")
        log = AuditLog(root / "audit.sqlite", keystore, "bench-node")
        try:
            log.append_many(_entries("bench-node", 8))  # warm up
            single = _timed_appends(log, "bench-node", 1, duration_s)
            batch = _timed_appends(log, "bench-node", BATCH, duration_s)
            signs = []
            message = secrets.token_bytes(120)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < min(duration_s, 0.5):
                s0 = time.perf_counter()
                keystore.sign(message)
                signs.append(time.perf_counter() - s0)
            sign_ms = sorted(signs)[len(signs) // 2] * 1000.0
        finally:
            log.close()
            keystore.close()
    queue.put({"single": single, "batch": batch, "receipt_sign_p50_ms": sign_ms})


def measure(duration_s: float) -> dict[str, Any]:
    """Audit append cost: single entries and batches of 32, on a real SoftHSM token."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure_in_child, args=(duration_s, queue))
    child.start()
    result: dict[str, Any] = queue.get(timeout=120 + 4 * duration_s)
    child.join(timeout=30)
    return result
