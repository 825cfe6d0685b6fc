"""A node's audit report names the request of each entry's problem."""

from __future__ import annotations

from core.audit_findings import Check, EntryResult, NodeReport, Problem


def test_a_problem_names_its_entrys_request_and_the_first_where_a_leaf_came_twice() -> None:
    served_twice = Problem(Check.SEQUENCE, "served twice", leaf_index=1)
    entries = (
        EntryResult(0, None, "req-0"),
        EntryResult(1, None, "req-1"),
        EntryResult(1, None, "req-1-again", (served_twice,)),
        EntryResult(2, None, ""),
    )
    report = NodeReport("node-1", None, entries, 0, (served_twice,), ())
    assert report.request_id(0) == "req-0"
    assert report.request_id(1) == "req-1"
    assert report.request_id(2) == "" and report.request_id(99) == ""
    assert report.describe(served_twice) == "entry 1 (request req-1): served twice"
