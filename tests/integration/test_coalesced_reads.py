"""Reads of different doctors meeting at a node go as one call (ADR 16), on the real
cluster: each is judged, audited and answered as if it had gone alone."""

from __future__ import annotations

import urllib.request

import pytest

from clients.sdk.provider import RecordRead
from core.audit import verify_receipt
from core.errors import KmsError
from deploy.sample_records import lab_result
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


def _calls_and_reads(metrics_url: str) -> tuple[float, float]:
    """Re-encryption calls the coordinator made to nodes, and the reads they carried."""
    found: dict[str, float] = {}
    with urllib.request.urlopen(metrics_url, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                found[name] = float(value)
    return (
        found["kms_coordinator_node_call_reads_count"],
        found["kms_coordinator_node_call_reads_sum"],
    )


def test_concurrent_reads_of_different_doctors_all_succeed(people: People) -> None:
    """Six granted doctors and one stranger read at once: the stranger's reads are
    refused and every other read opens the record with receipts that verify."""
    doctors = [people.granted_doctor(f"dr-{i}") for i in range(6)]
    stranger = people.new_identity("dr-stranger", provider=True)
    metrics_url = people.cluster.coordinator_metrics_url
    calls_before, reads_before = _calls_and_reads(metrics_url)
    results = people.read_at_once([*doctors, stranger], rounds=5)
    granted, refused = results[:30], results[30:]
    keys = {n.node_id: n.signing_public_key for n in people.registry.list_nodes()}
    for read in granted:
        assert isinstance(read, RecordRead), read
        assert read.plaintext == lab_result()
        assert len(read.receipts) == people.cluster.threshold
        assert all(verify_receipt(r, keys[r.node_id]) for r in read.receipts)
    assert all(isinstance(r, KmsError) for r in refused), refused
    calls, reads = _calls_and_reads(metrics_url)
    # Every read asked at least the threshold of nodes; some of those calls carried
    # several reads (seven apps at once on a cluster of five single-process nodes).
    assert reads - reads_before >= 30 * people.cluster.threshold
    assert calls - calls_before < reads - reads_before
