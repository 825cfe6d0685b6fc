"""The harness's pure statistics: percentiles, summaries and ratios (no timing)."""

import math

import pytest

from benchmarks import stats


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 4.0
    assert stats.percentile(values, 50) == pytest.approx(2.5)
    assert stats.percentile(values, 25) == pytest.approx(1.75)  # numpy's "linear"


def test_percentile_of_one_value_and_bad_input() -> None:
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_percentiles_match_single_calls() -> None:
    values = [float(v) for v in range(1, 101)]
    assert stats.percentiles(values, [50, 95, 99]) == [
        stats.percentile(values, q) for q in (50, 95, 99)
    ]
    assert stats.percentile(values, 99) == pytest.approx(99.01)


def test_summarize_reports_ms_and_throughput() -> None:
    summary = stats.summarize([0.001, 0.002, 0.003, 0.004], wall_s=2.0, errors=1)
    assert summary.count == 4
    assert summary.errors == 1
    assert summary.throughput_rps == pytest.approx(2.0)
    assert summary.mean_ms == pytest.approx(2.5)
    assert summary.p50_ms == pytest.approx(2.5)
    assert summary.min_ms == pytest.approx(1.0)
    assert summary.max_ms == pytest.approx(4.0)


def test_summarize_with_no_successes_is_not_a_crash() -> None:
    summary = stats.summarize([], wall_s=1.0, errors=3)
    assert summary.count == 0
    assert summary.throughput_rps == 0.0
    assert math.isnan(summary.p50_ms)


def test_cdf_has_101_points_in_ms() -> None:
    cdf = stats.cdf_ms([0.001 * i for i in range(1, 11)])
    assert len(cdf) == 101
    assert cdf[0] == pytest.approx(1.0)
    assert cdf[-1] == pytest.approx(10.0)
    assert cdf == sorted(cdf)
    assert stats.cdf_ms([]) == []


def test_ratio_refuses_missing_or_zero_reference() -> None:
    assert stats.ratio(3.0, 4.0) == pytest.approx(0.75)
    assert stats.ratio(None, 4.0) is None
    assert stats.ratio(3.0, 0.0) is None
    assert stats.ratio(float("nan"), 1.0) is None


def test_node_ratio_is_work_per_node_cpu_second_over_bare_rate() -> None:
    # 1000 re-encryptions in 2 CPU-seconds of the node = 500/s per core; bare does 4000/s.
    assert stats.node_ratio(1000, 2.0, 4000.0) == pytest.approx(0.125)
    # A node that spends exactly the bare cost per request scores 1.
    assert stats.node_ratio(4000, 1.0, 4000.0) == pytest.approx(1.0)
    assert stats.node_ratio(10, 0.0, 4000.0) is None


def test_node_cost_is_node_cpu_per_unit_over_the_bare_cpu_per_reencryption() -> None:
    # 1000 units in 2 CPU-seconds = 2 ms each; bare does 4000/s = 0.25 ms: 8 times.
    assert stats.node_cost_x(1000, 2.0, 4000.0) == pytest.approx(8.0)
    assert stats.node_cost_x(4000, 1.0, 4000.0) == pytest.approx(1.0)
    assert stats.node_cost_x(10, 0.0, 4000.0) is None


def test_cluster_ratio_counts_every_core_of_the_bound() -> None:
    # A 3 ms bound on 2 cores allows 666.7 requests/s; 66.67/s is a tenth of that.
    assert stats.cluster_ratio(2 / 0.003 / 10, 0.003, 2) == pytest.approx(0.1)
    assert stats.cluster_ratio(100.0, 0.0, 2) is None
    assert stats.cluster_ratio(100.0, 0.003, 0) is None
