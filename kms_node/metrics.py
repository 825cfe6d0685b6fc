"""The node's Prometheus metrics, declared once with constant names.

With several server processes (``processes`` > 1) each writes its values to
files under PROMETHEUS_MULTIPROC_DIR, set by the supervisor before the process
starts, and the supervisor serves their sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from core.audit import DENIED, GRANTED
from core.policy import Reason
from proto.rpc import OUTCOMES

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "kms_node_requests_total",
    "RPCs handled by this node, by method and outcome (granted, denied, invalid, error...)",
    ["method", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "kms_node_request_duration_seconds",
    "Time spent serving an RPC, by method",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
DECISIONS = Counter(
    "kms_node_decisions_total",
    "Decisions this node logged, one per capsule, by decision and reason code "
    "(core/policy.py Reason): a rise in one refusal is worth a look",
    ["decision", "reason"],
    registry=REGISTRY,
)

CALLS_WITHOUT_REQUEST = Counter(
    "kms_node_calls_without_request_total",
    "Calls ended because their request message had not come within a few seconds of "
    "the call (proto/half_open_calls.py FIRST_MESSAGE_TIMEOUT_S): half-open calls from "
    "a certificate holder, which would otherwise hold the node's memory",
    registry=REGISTRY,
)

AUDIT_COMMIT_ENTRIES = Histogram(
    "kms_node_audit_commit_entries",
    "Audit entries made durable by one commit (one fsync, one HSM signature): the reads "
    "of one pass of the node's event loop (ADR 17)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
)

KFRAGS_STORED = Gauge(
    "kms_node_kfrags_stored",
    "Key fragments currently held (wrapped) by this node",
    registry=REGISTRY,
    multiprocess_mode="max",  # every process sees the same database
)


# Each request touches three series; ``labels()`` validates and looks its labels up under
# a lock every time, so the children are kept (prometheus_client's own advice for hot
# paths). Label values come from fixed sets (method names, status names, Reason codes);
# the bound only guards against a caller passing free text.
_SERIES_KEPT = 512


@lru_cache(maxsize=_SERIES_KEPT)
def _requests(method: str, outcome: str) -> Counter:
    return REQUESTS.labels(method=method, outcome=outcome)


@lru_cache(maxsize=_SERIES_KEPT)
def _request_seconds(method: str) -> Histogram:
    return REQUEST_SECONDS.labels(method=method)


@lru_cache(maxsize=_SERIES_KEPT)
def _decisions(decision: str, reason: str) -> Counter:
    return DECISIONS.labels(decision=decision, reason=reason)


def observe_request(method: str, outcome: str, seconds: float) -> None:
    """Count one RPC by method and outcome, and time it (``kms_node_requests_total``,
    ``kms_node_request_duration_seconds``)."""
    _requests(method, outcome).inc()
    _request_seconds(method).observe(seconds)


def count_decision(decision: str, reason: str) -> None:
    """Count one durable decision (``kms_node_decisions_total``)."""
    _decisions(decision, reason).inc()


def start_at_zero(methods: Sequence[str], anchor_outcomes: Sequence[str]) -> None:
    """Create every labelled series at zero, so that the first error of a kind is an
    increase ``rate()`` sees and its alert fires on (a series born at 1 shows none)."""
    for outcome in anchor_outcomes:
        AUDIT_ANCHORS.labels(outcome=outcome)
    for method in methods:
        REQUEST_SECONDS.labels(method=method)
        for outcome in OUTCOMES:
            REQUESTS.labels(method=method, outcome=outcome)
    for reason in Reason:
        decision = GRANTED if reason is Reason.GRANTED else DENIED
        DECISIONS.labels(decision=decision, reason=reason.value)


def serve(host: str, port: int) -> None:
    """Expose this process's /metrics over HTTP in a background thread."""
    start_http_server(port, addr=host, registry=REGISTRY)


def serve_merged(host: str, port: int, directory: str) -> None:
    """Expose the sum of several server processes' metrics (prometheus_client's
    multiprocess mode: each process writes to ``directory``)."""
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=merged)


CHAIN_INDEX_BLOCK = Gauge(
    "kms_node_chain_index_block",
    "Block number the node's grant index reflects (the most behind process)",
    registry=REGISTRY,
    multiprocess_mode="min",
)
CHAIN_SYNC_FAILURES = Counter(
    "kms_node_chain_sync_failures_total",
    "Failed attempts to bring the grant index up to the chain head",
    registry=REGISTRY,
)

# Audit anchoring (kms_node/anchoring.py) runs in one process per node; "max" merges its
# values with the zeros of the other processes.
AUDIT_ANCHORS = Counter(
    "kms_node_audit_anchors_total",
    "Attempts to anchor the audit log's checkpoint on-chain, by outcome "
    "(anchored, failed, refused: the local log diverges from the last anchor)",
    ["outcome"],
    registry=REGISTRY,
)
AUDIT_ANCHOR_SECONDS = Histogram(
    "kms_node_audit_anchor_duration_seconds",
    "Time to anchor one checkpoint: HSM signatures, transaction, receipt",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
AUDIT_ANCHORED_TREE_SIZE = Gauge(
    "kms_node_audit_anchored_tree_size",
    "Tree size of the node's latest checkpoint anchored on-chain",
    registry=REGISTRY,
    multiprocess_mode="max",
)
AUDIT_UNANCHORED_ENTRIES = Gauge(
    "kms_node_audit_unanchored_entries",
    "Audit log entries not yet covered by an on-chain anchor",
    registry=REGISTRY,
    multiprocess_mode="max",
)
AUDIT_LOG_DIVERGES = Gauge(
    "kms_node_audit_log_diverges_from_anchor",
    "1 when the local audit log is not an extension of its last on-chain anchor "
    "(shorter, or another root at the anchored size); anchoring then stops",
    registry=REGISTRY,
    multiprocess_mode="max",
)
