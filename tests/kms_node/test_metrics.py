"""The node's metrics helpers count into the declared series."""

from __future__ import annotations

import pytest

from core.audit import DENIED
from core.policy import Reason
from kms_node import metrics


def _value(name: str, labels: dict[str, str]) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_observe_request_counts_and_times_each_call() -> None:
    labels = {"method": "MetricsTestMethod", "outcome": "ok"}
    for expected in (1.0, 2.0):
        metrics.observe_request("MetricsTestMethod", "ok", 0.003)
        assert _value("kms_node_requests_total", labels) == expected
        count = _value("kms_node_request_duration_seconds_count", {"method": "MetricsTestMethod"})
        assert count == expected
    # 2 x 3 ms, in the 5 ms bucket and not in the 2.5 ms one.
    seconds = {"method": "MetricsTestMethod"}
    assert _value("kms_node_request_duration_seconds_sum", seconds) == pytest.approx(0.006)
    assert _value("kms_node_request_duration_seconds_bucket", {**seconds, "le": "0.005"}) == 2
    assert _value("kms_node_request_duration_seconds_bucket", {**seconds, "le": "0.0025"}) == 0
    # Another outcome is its own series.
    metrics.observe_request("MetricsTestMethod", "internal", 0.001)
    assert _value("kms_node_requests_total", labels) == 2.0
    assert _value("kms_node_requests_total", {**labels, "outcome": "internal"}) == 1.0


def test_count_decision_counts_by_decision_and_reason() -> None:
    labels = {"decision": DENIED, "reason": Reason.NO_GRANT.value}
    before = _value("kms_node_decisions_total", labels)
    metrics.count_decision(DENIED, Reason.NO_GRANT)
    metrics.count_decision(DENIED, Reason.NO_GRANT.value)
    assert _value("kms_node_decisions_total", labels) == before + 2
