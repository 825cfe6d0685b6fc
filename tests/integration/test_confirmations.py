"""A confirmation depth (issue 12, ADR 12) on a real cluster: with ``chain_confirmations = 3``
every node judges by the registry three blocks below the head, for a grant and for its
revocation alike. Anchoring is off, so that only this test mines blocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contracts.registry import RegistryClient
from core.errors import AccessDenied
from deploy.anvil import mine
from deploy.local_cluster import LocalCluster
from deploy.sample_records import lab_result
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster

DEPTH = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.up(
        tmp_path_factory.mktemp("confirmations"),
        nodes=3,
        threshold=2,
        node_settings={"chain_confirmations": DEPTH, "anchoring": False},
    )
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def registry(cluster: LocalCluster) -> RegistryClient:
    return cluster.registry()


def test_a_grant_is_served_once_k_deep_and_a_revocation_honoured_until_k_deep(
    people: People,
) -> None:
    rpc_url, record = people.cluster.rpc_url, people.lab.record_id
    # Kfrags are accepted at once (enrollment reads at the head: storing one serves nothing).
    people.grant_doctor()
    granted_at = people.registry.latest_block()[0]
    with people.provider() as doctor:
        for mined in range(DEPTH):
            people.patient.await_nodes(granted_at - DEPTH + mined)
            # Each node holds a kfrag, so it confirms the refusal against the chain: at the
            # same depth, where the grant is not yet either.
            with pytest.raises(AccessDenied, match="not granted access"):
                doctor.read_record(record)
            mine(rpc_url)
        people.patient.await_nodes(granted_at)
        assert doctor.read_record(record) == lab_result()

        revoked_at = people.patient.revoke(people.doctor.address)
        for mined in range(DEPTH):
            people.patient.await_nodes(revoked_at - DEPTH + mined)
            assert doctor.read_record(record) == lab_result()
            mine(rpc_url)
        people.patient.await_nodes(revoked_at)
        with pytest.raises(AccessDenied, match="revoked"):
            doctor.read_record(record)
