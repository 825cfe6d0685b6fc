"""The benchmark report's arithmetic (benchmarks/report.py)."""

from __future__ import annotations

import pytest

from benchmarks.report import audit_cpu_per_entry

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
