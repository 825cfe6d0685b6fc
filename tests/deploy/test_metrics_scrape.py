"""deploy.metrics_scrape against a real prometheus_client page served over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from deploy.metrics_scrape import scrape, total
from deploy.processes import free_port


@pytest.fixture
def page() -> Iterator[str]:
    registry = CollectorRegistry()
    calls = Counter("kms_test_calls_total", "calls", ["node", "reason"], registry=registry)
    calls.labels(node="node-1", reason="a reason with spaces").inc(3)
    calls.labels(node="node-2", reason="ok").inc(2)
    Counter("kms_test_calls_more_total", "another metric sharing a prefix", registry=registry).inc(
        100
    )
    Gauge("kms_test_depth", "a gauge", registry=registry).set(7.5)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        thread.join(5)


def test_every_sample_is_read_by_its_series(page: str) -> None:
    samples = scrape(page)
    assert samples['kms_test_calls_total{node="node-1",reason="a reason with spaces"}'] == 3.0
    assert samples["kms_test_depth"] == 7.5


def test_a_total_sums_one_metric_over_its_labels_and_no_other(page: str) -> None:
    samples = scrape(page)
    assert total(samples, "kms_test_calls_total") == 5.0
    assert total(samples, "kms_test_depth") == 7.5
    assert total(samples, "kms_test_absent_total") == 0.0
