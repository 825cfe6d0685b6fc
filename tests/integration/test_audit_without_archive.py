"""The auditor against a chain that keeps state for recent blocks only (issue 12): anvil with
``--prune-history``, as most full and hosted nodes, answers blocks and logs for every block
but a call at an old block fails. Historical calls then cannot judge a decision; the state
rebuilt from the registry's events can, and still catches a forged one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import kmsctl
from clients.audit.auditor import ClusterReport, audit_cluster, channel_factory
from contracts.registry import RegistryClient
from core.errors import AccessDenied
from deploy.anvil import mine
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from tests.integration.conftest import People, append_forged_entry

pytestmark = pytest.mark.cluster

#: recent states anvil keeps
KEPT_STATES = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.up(
        tmp_path_factory.mktemp("pruned"), nodes=3, threshold=2, prune_history=KEPT_STATES
    )
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def registry(cluster: LocalCluster) -> RegistryClient:
    return cluster.registry()


def _problems(report: ClusterReport) -> list[str]:
    return [f"{n.node_id}: {p.message}" for n in report.nodes for p in n.problems]


def _by_events(people: People) -> ClusterReport:
    cluster = people.cluster
    return audit_cluster(
        people.registry,
        channel_factory(cluster.transport),
        events=people.registry,
        start_block=int(cluster.data["chain"]["registry_start_block"]),
    )


def test_an_honest_log_passes_from_events_where_historical_calls_fail(people: People) -> None:
    people.grant_doctor()
    with people.provider() as doctor:
        for _ in range(3):
            assert doctor.read_record(people.lab.record_id) == lab_result()
    stranger = people.new_identity("stranger", provider=True)
    with people.provider(stranger) as nosy, pytest.raises(AccessDenied):
        nosy.read_record(people.lab.record_id)
    # Revoked since: the reads were allowed by the state at their blocks, not by today's.
    people.patient.revoke(people.doctor.address)
    # Every decision's block falls out of the states the chain keeps.
    mine(people.cluster.rpc_url, 4 * KEPT_STATES)

    by_calls = audit_cluster(people.registry, channel_factory(people.cluster.transport))
    assert not by_calls.ok
    assert any("cannot read the grant state at block" in p for p in _problems(by_calls))

    by_events = _by_events(people)
    assert by_events.ok, _problems(by_events)
    assert sum(n.granted for n in by_events.nodes) >= 6  # 3 reads, 2 of 3 nodes each
    assert sum(n.denied for n in by_events.nodes) >= 2


def test_kmsctl_audits_from_events_when_asked(
    people: People, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    people.grant_doctor()
    with people.provider() as doctor:
        assert doctor.read_record(people.lab.record_id) == lab_result()
    mine(people.cluster.rpc_url, 4 * KEPT_STATES)
    common = ["--report-dir", str(tmp_path), "--state-dir", str(people.cluster.state_dir)]
    assert kmsctl.main(["audit", "verify", *common]) == 1
    assert kmsctl.main(["audit", "verify", "--state-from-events", *common]) == 0


def test_a_decision_the_events_do_not_allow_fails_the_audit(people: People) -> None:
    node = "node-3"
    people.grant_doctor()
    revoked_at = people.patient.revoke(people.doctor.address)
    people.patient.await_nodes(revoked_at)
    index = append_forged_entry(
        people.cluster,
        node,
        {
            "request_id": "forged-after-revocation",
            "node_id": node,
            "time": int(time.time()),
            "requester": people.doctor.address,
            "patient": people.patient.identity.address,
            "record_id": people.lab.record_id.hex(),
            "capsule_hash": people.lab.capsule_hash.hex(),
            "purpose_of_use": "TREAT",
            "decision": "granted",
            "reason_code": "granted",
            "reason": "grant is active and covers this record",
            "block_number": revoked_at,
            "block_hash": people.registry.block(revoked_at).hash.hex(),
            "cfrag_hash": "ab" * 32,
        },
    )
    mine(people.cluster.rpc_url, 4 * KEPT_STATES)

    report = _by_events(people)
    assert not report.ok
    assert _problems(report) == [
        f"{node}: granted, but at block {revoked_at}: grant has been revoked by the patient"
    ]
    failing = next(n for n in report.nodes if n.node_id == node)
    first = failing.first_failure()
    assert first is not None and first.leaf_index == index
