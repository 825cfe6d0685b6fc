"""The benchmark report's arithmetic (benchmarks/report.py)."""

from __future__ import annotations

import pytest

from benchmarks.report import TARGETS_14, _read_layers, _target, audit_cpu_per_entry

AUDIT = {
    "single": {"entries_per_append": 1, "cpu_ms_per_entry": 0.4},
    "batch": {"entries_per_append": 32, "cpu_ms_per_entry": 0.05},
}


def test_the_audit_share_is_exact_at_the_two_measured_commit_sizes() -> None:
    assert audit_cpu_per_entry(AUDIT, 1) == pytest.approx(0.4)
    assert audit_cpu_per_entry(AUDIT, 32) == pytest.approx(0.05)


def test_the_audit_share_falls_as_commits_group_more_entries() -> None:
    # A commit of 32 costs 1.6 ms, of 1 costs 0.4: 1.2 / 31 more per entry.
    per_entry = 1.2 / 31
    assert audit_cpu_per_entry(AUDIT, 2) == pytest.approx((0.4 - per_entry + 2 * per_entry) / 2)
    shares = [audit_cpu_per_entry(AUDIT, k) for k in (1, 1.5, 2, 4, 8, 16)]
    assert shares == sorted(shares, reverse=True)


def test_a_reads_layers_are_shown_as_what_each_adds_to_the_one_below() -> None:
    phases = {
        "cluster_read_c1": {
            "layers_ms": {
                "app_ms": 6.0,
                "coordinator_ms": 4.25,
                "node_call_ms": 3.25,
                "node_handler_ms": 1.75,
            }
        },
        "cluster_read_c4": {"layers_ms": {"app_ms": 9.0, "coordinator_ms": None}},
        "node_single_c1": {},
    }
    lines = _read_layers(phases)
    rows = [line for line in lines if line.startswith("| cluster_read")]
    assert rows == ["| cluster_read_c1 | 6.000 | 1.750 | 1.000 | 1.500 | 1.750 |"]


def test_no_layers_no_section() -> None:
    assert _read_layers({"node_single_c1": {}}) == []


def test_issue_14_targets_are_judged_beside_issue_5s() -> None:
    assert _target("cluster_3of5_ratio", 0.36, TARGETS_14) == ">= 0.35: met"
    assert _target("cluster_3of5_ratio", 0.36) == ">= 0.5: not met"
    assert _target("cluster_p50_over_bound", 2.3, TARGETS_14) == "<= 2: not met"
    assert _target("restart_s_100k_patients", None, TARGETS_14) == "<= 10: not measured"
    assert _target("cluster_3of5_ratio_c8", 0.4, TARGETS_14) == ""
