"""Pure statistics: percentiles, latency summaries and the ratios to the baseline.

No I/O and no clocks here, so every number the harness reports can be checked
by a unit test (tests/benchmarks/test_stats.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: percentiles kept for each latency distribution (0, 1, ..., 100): enough to
#: redraw the plot from latest.json without keeping every sample
CDF_POINTS = tuple(range(101))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between the two
    nearest ranks (numpy's default, "linear" / Hyndman-Fan type 7)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must be between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Several percentiles of one distribution, sorting it once."""
    ordered = sorted(values)
    return [percentile(ordered, q) for q in qs]


@dataclass(frozen=True)
class LatencySummary:
    """One closed-loop phase: ``count`` successful requests in ``wall_s``."""

    count: int
    errors: int
    wall_s: float
    throughput_rps: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(latencies_s: Sequence[float], wall_s: float, errors: int = 0) -> LatencySummary:
    """Throughput and latency percentiles (in ms) of successful requests."""
    if wall_s <= 0:
        raise ValueError("wall_s must be positive")
    if not latencies_s:
        nan = float("nan")
        return LatencySummary(0, errors, wall_s, 0.0, nan, nan, nan, nan, nan, nan)
    ms = sorted(v * 1000.0 for v in latencies_s)
    p50, p95, p99 = (percentile(ms, q) for q in (50, 95, 99))
    return LatencySummary(
        count=len(ms),
        errors=errors,
        wall_s=wall_s,
        throughput_rps=len(ms) / wall_s,
        mean_ms=sum(ms) / len(ms),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        min_ms=ms[0],
        max_ms=ms[-1],
    )


def cdf_ms(latencies_s: Sequence[float]) -> list[float]:
    """The distribution as its 0th..100th percentiles, in ms (for the plot)."""
    if not latencies_s:
        return []
    return [round(v, 4) for v in percentiles([x * 1000.0 for x in latencies_s], CDF_POINTS)]


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing, zero or not finite."""
    if value is None or reference is None:
        return None
    if not (math.isfinite(value) and math.isfinite(reference)) or reference <= 0:
        return None
    return value / reference


def per_cpu_second(units: float, cpu_s: float) -> float | None:
    """Work done per CPU-second (e.g. re-encryptions per second of one busy core)."""
    if cpu_s <= 0 or units <= 0:
        return None
    return units / cpu_s


def node_ratio(units: float, node_cpu_s: float, bare_rate_per_core: float) -> float | None:
    """Node efficiency: re-encryptions the node serves per second of node-process
    CPU (i.e. throughput per node-process core), over the bare library's
    re-encryptions per second of one core. 1.0 means the node spends nothing
    beyond the re-encryption itself."""
    return ratio(per_cpu_second(units, node_cpu_s), bare_rate_per_core)


def node_cost_x(units: float, node_cpu_s: float, bare_rate_per_core: float) -> float | None:
    """Node cost: node-process CPU per unit of work over the bare library's CPU per
    re-encryption (``1 / node_ratio``). 1.0 means the node spends nothing beyond it."""
    efficiency = node_ratio(units, node_cpu_s, bare_rate_per_core)
    return 1.0 / efficiency if efficiency else None


def cluster_ratio(throughput_rps: float, bound_s: float, cores: int) -> float | None:
    """Cluster throughput over the crypto-only bound's throughput on ``cores``
    cores: one bound request takes ``bound_s`` of one core, so the machine
    could finish at most ``cores / bound_s`` of them per second."""
    if bound_s <= 0 or cores < 1:
        return None
    return ratio(throughput_rps, cores / bound_s)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)
