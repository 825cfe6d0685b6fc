"""Rotation: a node that faults or hangs is passed over, then probed by exactly one
request when its cooldown ends, and put back in rotation by its answer; a node passed
over while all is well is asked again once its latency is stale
(coordinator/node_pool.py; time is passed in)."""

from __future__ import annotations

import pytest

from coordinator.node_pool import (
    BASE_COOLDOWN_S,
    LATENCY_STALE_S,
    MAX_COOLDOWN_S,
    MIN_HEDGE_S,
    SUSPICION_S,
    NodePool,
    Rotation,
)

NODES = ["node-1", "node-2", "node-3", "node-4", "node-5"]
HEDGE_S = 0.01


@pytest.fixture
def pool() -> NodePool:
    pool = NodePool(NODES, max_hedge_s=0.5)
    for node_id in NODES:  # node-1 is known to be the fastest
        pool.succeeded(node_id, 0.001 if node_id == "node-1" else 0.002, 99.0)
    return pool


def test_a_call_served_around_takes_its_node_out_of_rotation(pool: NodePool) -> None:
    assert pool.plan(100.0)[0] == "node-1"
    assert pool.abandoned("node-1", HEDGE_S * 3, HEDGE_S, 100.0) is Rotation.OUT
    plan = pool.plan(100.1)
    assert plan[-1] == "node-1"  # asked only if the other four are not enough
    assert "node-1" not in pool.in_rotation(100.1)
    # A second strike while out says nothing new.
    assert pool.abandoned("node-1", HEDGE_S * 3, HEDGE_S, 100.1) is None


def test_a_hedge_abandoned_before_the_hedge_delay_is_no_strike(pool: NodePool) -> None:
    assert pool.abandoned("node-1", HEDGE_S / 2, HEDGE_S, 100.0) is None
    assert pool.plan(100.0)[0] == "node-1"
    assert "node-1" in pool.in_rotation(100.0)


def test_a_fault_status_takes_a_node_out_a_refusal_does_not(pool: NodePool) -> None:
    assert pool.answered("node-2", 0.001, "PERMISSION_DENIED", 100.0) is None
    assert "node-2" in pool.in_rotation(100.0)
    assert pool.answered("node-2", 0.001, "UNAVAILABLE", 100.0) is Rotation.OUT
    assert "node-2" not in pool.in_rotation(100.0)


def test_after_its_cooldown_exactly_one_request_probes_the_node(pool: NodePool) -> None:
    pool.abandoned("node-3", 1.0, HEDGE_S, 100.0)
    assert pool.plan(100.0 + BASE_COOLDOWN_S / 2)[-1] == "node-3"
    after = 100.0 + BASE_COOLDOWN_S + 0.01
    assert pool.plan(after)[0] == "node-3"  # the probe goes first
    # Requests planned while the probe is out pass it over.
    assert pool.plan(after)[-1] == "node-3"
    assert pool.plan(after + 0.1)[-1] == "node-3"


def test_a_probe_answered_puts_the_node_back_judged_on_its_new_latency(pool: NodePool) -> None:
    pool.abandoned("node-1", 1.0, HEDGE_S, 100.0)
    after = 100.0 + BASE_COOLDOWN_S + 0.01
    assert pool.plan(after)[0] == "node-1"
    assert pool.succeeded("node-1", 0.0015, after) is Rotation.BACK
    assert "node-1" in pool.in_rotation(after)
    assert pool.health["node-1"].latency_s == 0.0015
    assert pool.plan(after)[0] == "node-1"  # ranked by the latency it has now


def test_a_probe_still_unanswered_doubles_the_cooldown(pool: NodePool) -> None:
    pool.abandoned("node-1", 1.0, HEDGE_S, 100.0)
    probe_at = 100.0 + BASE_COOLDOWN_S + 0.01
    assert pool.plan(probe_at)[0] == "node-1"
    assert pool.abandoned("node-1", 1.0, HEDGE_S, probe_at) is None  # it was already out
    assert pool.plan(probe_at + BASE_COOLDOWN_S + 0.01)[-1] == "node-1"
    assert pool.plan(probe_at + 2 * BASE_COOLDOWN_S + 0.01)[0] == "node-1"


def test_a_probe_the_request_did_not_wait_for_is_asked_again(pool: NodePool) -> None:
    pool.abandoned("node-1", 1.0, HEDGE_S, 100.0)
    after = 100.0 + BASE_COOLDOWN_S + 0.01
    assert pool.plan(after)[0] == "node-1"
    assert pool.abandoned("node-1", HEDGE_S / 2, HEDGE_S, after) is None
    assert pool.plan(after)[0] == "node-1"


def test_the_cooldown_is_bounded(pool: NodePool) -> None:
    now = 100.0
    for _ in range(20):
        pool.answered("node-4", 0.001, "UNAVAILABLE", now)
    assert pool.health["node-4"].cooldown_until == now + MAX_COOLDOWN_S


def test_a_node_caught_lying_is_suspected_for_a_doubling_time(pool: NodePool) -> None:
    assert pool.lied("node-1", 100.0) is Rotation.OUT
    assert pool.suspect("node-1", 100.0 + SUSPICION_S - 1)
    assert pool.plan(100.0 + SUSPICION_S - 1)[-1] == "node-1"
    # Answering while suspected does not bring it back.
    assert pool.succeeded("node-1", 0.001, 100.0 + 1) is None
    assert "node-1" not in pool.in_rotation(100.0 + 1)
    # Then it is probed, and back on an answer.
    after = 100.0 + SUSPICION_S + 0.01
    assert not pool.suspect("node-1", after)
    assert pool.plan(after)[0] == "node-1"
    assert pool.succeeded("node-1", 0.001, after) is Rotation.BACK
    # A second lie: twice as long.
    assert pool.lied("node-1", 200.0) is Rotation.OUT
    assert pool.suspect("node-1", 200.0 + 2 * SUSPICION_S - 1)
    assert not pool.suspect("node-1", 200.0 + 2 * SUSPICION_S + 0.01)


def test_excluded_nodes_are_not_planned_nor_probed(pool: NodePool) -> None:
    pool.abandoned("node-1", 1.0, HEDGE_S, 100.0)
    after = 100.0 + BASE_COOLDOWN_S + 0.01
    assert "node-1" not in pool.plan(after, exclude={"node-1"})
    assert pool.plan(after)[0] == "node-1"  # still due for its probe


def test_nodes_planned_last_come_after_those_out_of_rotation_and_are_not_probed(
    pool: NodePool,
) -> None:
    """A node stale for the read's grant (stale_nodes.py) is asked only when every other
    node, even one out of rotation, is not enough; it is not used to probe."""
    pool.abandoned("node-1", 1.0, HEDGE_S, 100.0)  # out of rotation, due for its probe soon
    pool.abandoned("node-2", 1.0, HEDGE_S, 100.0)
    after = 100.0 + BASE_COOLDOWN_S + 0.01
    plan = pool.plan(after, last={"node-1", "node-3"})
    assert set(plan[-2:]) == {"node-1", "node-3"}
    assert plan[0] == "node-2"  # probed instead
    assert pool.plan(after)[0] == "node-1"  # still due for its probe in other reads


def test_a_node_passed_over_is_asked_again_once_its_latency_is_stale() -> None:
    pool = NodePool(NODES, max_hedge_s=0.5)
    for node_id in NODES:  # node-4 and node-5 answered slowly once
        pool.succeeded(node_id, 0.05 if node_id in ("node-4", "node-5") else 0.001, 0.0)
    for now in (1.0, 2.0, LATENCY_STALE_S - 0.1):  # the threshold's three keep answering
        assert set(pool.plan(now)[:3]) == {"node-1", "node-2", "node-3"}
        for node_id in ("node-1", "node-2", "node-3"):
            pool.succeeded(node_id, 0.001, now)
    stale = LATENCY_STALE_S + 0.1
    # One request each asks a stale node first; the next finds none left to refresh.
    refreshed = {pool.plan(stale)[0], pool.plan(stale)[0]}
    assert refreshed == {"node-4", "node-5"}
    assert set(pool.plan(stale)[:3]) == {"node-1", "node-2", "node-3"}
    # Unanswered past the hedge delay (it hung while passed over): out of rotation.
    assert pool.abandoned("node-4", 1.0, HEDGE_S, stale + 1.0) is Rotation.OUT
    # Answered: ranked by what it measures now, and not stale again before its time.
    pool.succeeded("node-5", 0.0005, stale + 0.001)
    assert pool.plan(stale + 0.002)[0] == "node-5"
    assert "node-4" not in pool.in_rotation(stale + 1.0)


def test_the_hedge_delay_follows_the_window_of_recent_latencies() -> None:
    """A little over the 95th percentile of the last ``window`` successful calls, within
    [MIN_HEDGE_S, max_hedge_s]: older latencies no longer count."""
    pool = NodePool(NODES, max_hedge_s=0.5, window=20)
    assert pool.hedge_delay() == 0.5  # too few calls to judge by
    slow = [0.2 - i * 0.001 for i in range(20)]
    for latency in slow:
        pool.succeeded("node-1", latency, 0.0)
    assert pool.hedge_delay() == pytest.approx(min(0.5, 1.5 * max(slow)))
    fast = [0.010 + (i % 7) * 0.001 for i in range(20)]
    for latency in fast:  # the slow ones leave the window one by one
        pool.succeeded("node-2", latency, 0.0)
    assert pool.hedge_delay() == pytest.approx(1.5 * sorted(fast)[19])
    for _ in range(20):
        pool.succeeded("node-3", 0.0001, 0.0)
    assert pool.hedge_delay() == MIN_HEDGE_S
