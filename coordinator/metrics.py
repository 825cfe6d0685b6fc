"""The coordinator's Prometheus metrics, declared once with constant names.

Every labelled counter is created at zero for every label value it can take
(:func:`start_at_zero`, with the node ids of the configuration), so the first error
of a kind is an increase that ``rate()`` sees and its alert fires on; a series born at
1 would show no increase at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from coordinator.node_pool import NODE_FAULTS
from proto.rpc import OUTCOMES
from proto.stubs import COORDINATOR_SERVICE

REGISTRY = CollectorRegistry(auto_describe=True)

#: the Coordinator service's methods (coordinator/server.py serves exactly these)
METHODS = tuple(COORDINATOR_SERVICE.methods_by_name)

REQUESTS = Counter(
    "kms_coordinator_requests_total",
    "RPCs answered by the coordinator, by method and outcome (ok or the status name)",
    ["method", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "kms_coordinator_request_duration_seconds",
    "Time to answer an RPC, by method (a read: fan-out, verification, collection)",
    ["method"],
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
NODE_CALL_SECONDS = Histogram(
    "kms_coordinator_node_call_duration_seconds",
    "Time a node took to answer a re-encryption call, by node",
    ["node"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
NODE_FAULTS_TOTAL = Counter(
    "kms_coordinator_node_faults_total",
    "Node calls that ended in a status saying the node is unwell, by node and status",
    ["node", "status"],
    registry=REGISTRY,
)
NODE_ABANDONED = Counter(
    "kms_coordinator_node_abandoned_total",
    "Node calls still unanswered after the hedge delay when their read was served "
    "around them (a hung or slow node)",
    ["node"],
    registry=REGISTRY,
)
NODE_CALL_READS = Histogram(
    "kms_coordinator_node_call_reads",
    "Reads sent in one re-encryption call to a node: more than one when reads met at "
    "a connection while a call was in flight and went together (ADR 16)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
    registry=REGISTRY,
)
HEDGES = Counter(
    "kms_coordinator_hedges_total",
    "Extra nodes asked because the hedge delay passed without enough answers",
    registry=REGISTRY,
)
NODE_IN_ROTATION = Gauge(
    "kms_coordinator_node_in_rotation",
    "1 while the coordinator sends a node its share of reads, 0 while it is out of "
    "rotation (faulted or hung; probed back when its cooldown ends)",
    ["node"],
    registry=REGISTRY,
)

LYING_FRAGMENTS = Counter(
    "kms_coordinator_lying_fragments_total",
    "Fragments that do not verify, by the node that sent them (reported by an app and "
    "checked, or checked before relaying); the node is taken out of rotation (ADR 14)",
    ["node"],
    registry=REGISTRY,
)
STALE_FRAGMENTS = Counter(
    "kms_coordinator_stale_fragments_total",
    "Fragments that verify but are of another kfrag set than the one m nodes agree on, "
    "by the node that sent them: it missed the patient's last enrollment (or replays an "
    "earlier set). Not combined; the node stays in rotation (ADR 14, amended)",
    ["node"],
    registry=REGISTRY,
)
FALSE_REPORTS = Counter(
    "kms_coordinator_false_reports_total",
    "Fragments an app reported as bad that verify: refused and charged to the requester",
    registry=REGISTRY,
)
CALLS_WITHOUT_REQUEST = Counter(
    "kms_coordinator_calls_without_request_total",
    "Calls ended because their request message had not come within a few seconds of "
    "the call (proto/half_open_calls.py FIRST_MESSAGE_TIMEOUT_S): half-open calls, which "
    "would otherwise hold the coordinator's memory; a flood of them shows here",
    registry=REGISTRY,
)


def start_at_zero(node_ids: Sequence[str]) -> None:
    """Create every labelled series at its starting value."""
    for method in METHODS:
        REQUEST_SECONDS.labels(method=method)
        for outcome in OUTCOMES:
            REQUESTS.labels(method=method, outcome=outcome)
    for node in node_ids:
        NODE_CALL_SECONDS.labels(node=node)
        NODE_ABANDONED.labels(node=node)
        NODE_IN_ROTATION.labels(node=node).set(1)
        LYING_FRAGMENTS.labels(node=node)
        STALE_FRAGMENTS.labels(node=node)
        for status in sorted(NODE_FAULTS):
            NODE_FAULTS_TOTAL.labels(node=node, status=status.lower())


def observe_request(method: str, outcome: str, seconds: float) -> None:
    """The coordinator server's observer (``proto.rpc.Observer``)."""
    _requests(method, outcome).inc()
    _request_seconds(method).observe(seconds)


# Labelled children kept, rather than looked up with labels() on every read: their label
# values are the service's methods, the gRPC statuses and the configured nodes, so there
# are few of them.


@cache
def _requests(method: str, outcome: str) -> Counter:
    return REQUESTS.labels(method=method, outcome=outcome)


@cache
def _request_seconds(method: str) -> Histogram:
    return REQUEST_SECONDS.labels(method=method)


@cache
def node_call_seconds(node: str) -> Histogram:
    """``NODE_CALL_SECONDS`` of one node."""
    return NODE_CALL_SECONDS.labels(node=node)


def serve(host: str, port: int) -> None:
    """Expose /metrics over HTTP in a background thread."""
    start_http_server(port, addr=host, registry=REGISTRY)
