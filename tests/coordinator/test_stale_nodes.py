"""The nodes found holding an earlier kfrag set of a grant: asked last for that grant,
for a while or until the patient enrolls them again; bounded."""

from __future__ import annotations

from coordinator.stale_nodes import AVOID_S, MAX_GRANTS, StaleNodes

ALICE, BOB, CAROL = "0xA11ce", "0xB0b", "0xCa401"


def test_a_node_is_avoided_for_its_grant_only_and_for_a_while() -> None:
    stale = StaleNodes()
    stale.mark(ALICE, BOB, "node-2", 100.0)
    stale.mark(ALICE, BOB, "node-4", 150.0)
    assert stale.avoided(ALICE, BOB, 101.0) == {"node-2", "node-4"}
    assert stale.avoided(ALICE, CAROL, 101.0) == frozenset()
    assert stale.avoided(CAROL, BOB, 101.0) == frozenset()
    assert stale.avoided(ALICE, BOB, 100.0 + AVOID_S) == {"node-4"}
    assert stale.avoided(ALICE, BOB, 150.0 + AVOID_S) == frozenset()
    assert len(stale) == 0  # an expired grant is forgotten
    assert AVOID_S == 600.0


def test_enrolling_the_node_again_forgets_it_for_that_grantee() -> None:
    stale = StaleNodes()
    stale.mark(ALICE, BOB, "node-2", 100.0)
    stale.mark(ALICE, CAROL, "node-2", 100.0)
    stale.forget(ALICE, BOB, "node-2")
    stale.forget(ALICE, BOB, "node-3")  # not stale: nothing to forget
    assert stale.avoided(ALICE, BOB, 101.0) == frozenset()
    assert stale.avoided(ALICE, CAROL, 101.0) == {"node-2"}


def test_grants_are_bounded_oldest_marked_first_out() -> None:
    stale = StaleNodes(max_grants=3)
    for i, patient in enumerate(["p1", "p2", "p3"]):
        stale.mark(patient, BOB, "node-1", float(i))
    stale.mark("p1", BOB, "node-2", 5.0)  # p1 marked again: now the newest
    stale.mark("p4", BOB, "node-1", 6.0)
    assert len(stale) == 3
    assert stale.avoided("p2", BOB, 7.0) == frozenset()  # the oldest, dropped
    assert stale.avoided("p1", BOB, 7.0) == {"node-1", "node-2"}
    assert MAX_GRANTS == 10_000
