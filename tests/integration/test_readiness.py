"""Health checks say whether a node can serve: NOT_SERVING while its grant index is
stale (here: the chain paused), SERVING again once it has caught up, with no restart;
and every refusal for the missing dependency is logged."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy import processes
from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.cluster


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _serving(cluster: LocalCluster, node_id: str) -> bool:
    node = cluster.node(node_id)
    return processes.grpc_serving(node.address, cluster.transport, server_name=node_id)


def _events(log: Path, name: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue  # gRPC's own C-core lines
        entry = json.loads(line)
        if entry.get("event") == name:
            found.append(entry)
    return found


def test_a_node_that_cannot_follow_the_chain_reports_not_serving_until_it_can(
    cluster: LocalCluster,
) -> None:
    node_ids = [n.node_id for n in cluster.nodes]
    assert all(_serving(cluster, n) for n in node_ids)
    log = Path(cluster.node("node-1").log)
    before = len(_events(log, "node_not_serving"))
    anvil = int(cluster.data["chain"]["pid"])
    os.kill(anvil, signal.SIGSTOP)
    try:
        # The grant index goes stale after chain_max_age_s (2 s).
        _until(
            lambda: not any(_serving(cluster, n) for n in node_ids),
            15,
            "nodes kept reporting SERVING with the chain paused",
        )
    finally:
        os.kill(anvil, signal.SIGCONT)
    _until(
        lambda: all(_serving(cluster, n) for n in node_ids),
        15,
        "nodes did not report SERVING again after the chain resumed",
    )
    logged = _events(log, "node_not_serving")[before:]
    assert logged and "chain sync" in str(logged[0]["problems"])
