"""Reads under a fault, summed up per phase (before, during and after it): what the chaos
suite (``benchmarks/chaos.py``) and the partition across hosts
(``tests/multihost/test_cluster_across_hosts.py``) report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import stats

PHASES = ("before", "during", "after")


@dataclass(frozen=True)
class Read:
    """One read: when it started (any clock the phases' bounds share), how long it took,
    and its error (None if served)."""

    started: float
    seconds: float
    error: str | None


def phase(reads: Sequence[Read], start: float, end: float) -> dict[str, Any]:
    """The reads started in ``[start, end)``: how many were sent and failed (counted by
    error), and the p50 and p99 of those served, in ms."""
    chosen = [r for r in reads if start <= r.started < end]
    errors = Counter(r.error for r in chosen if r.error is not None)
    served = [r.seconds for r in chosen if r.error is None]
    summary = stats.summarize(served, max(end - start, 1e-9), sum(errors.values()))
    return {
        "sent": len(chosen),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
    }


def table(rows: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]], what: str) -> str:
    """A markdown table of ``(name, {phase: phase(...)})`` rows."""
    lines = [
        f"| {what} | phase | sent | failed | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, phases in rows:
        for name_of_phase in PHASES:
            p = phases[name_of_phase]
            errors = "; ".join(f"{n} x {e}" for e, n in p["errors"].items())
            lines.append(
                f"| {name} | {name_of_phase} | {p['sent']} | {p['failed']} | "
                f"{p['p50_ms'] or 0:.1f} | {p['p99_ms'] or 0:.1f} | {errors} |"
            )
    return "\n".join(lines)
