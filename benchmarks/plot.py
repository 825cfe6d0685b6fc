"""latency.png: latency distributions of each phase, and the scaling points.

Drawn from latest.json alone (each distribution is kept there as its 0th..100th
percentiles), so ``python -m benchmarks.report`` can redraw it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from benchmarks.stats import CDF_POINTS  # noqa: E402


def _cdf(ax: Any, cdf_ms: list[float], label: str, style: str = "-") -> None:
    if cdf_ms:
        ax.plot(cdf_ms, [q / 100 for q in CDF_POINTS[: len(cdf_ms)]], style, label=label)


def latency_plot(results: dict[str, Any], path: Path) -> None:
    fig, (dist, nodes, thresholds) = plt.subplots(
        1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [2, 1, 1]}
    )
    base = results["baseline"]
    _cdf(dist, base["bound_request"]["cdf_ms"], "bare crypto, one 3-of-5 request", "k--")
    _cdf(dist, base["ops"]["reencrypt"]["cdf_ms"], "bare reencrypt", "k:")
    for name, phase in results.get("phases", {}).items():
        style = "-" if name.endswith("_c1") else "-."
        _cdf(dist, phase["cdf_ms"], name, style)
    dist.set_xscale("log")
    dist.set_xlabel("latency (ms, log scale)")
    dist.set_ylabel("fraction of requests")
    dist.set_title("Latency distributions (batches: per batch of 32)")
    dist.grid(True, which="both", alpha=0.3)
    dist.legend(fontsize=8, loc="lower right")

    scaling = results.get("scaling", [])
    main_nodes, main_threshold = 5, 3
    for ax, key, fixed, xlabel in (
        (nodes, "nodes", ("threshold", main_threshold), "nodes (threshold 3)"),
        (thresholds, "threshold", ("nodes", main_nodes), "threshold (of 5 nodes)"),
    ):
        rows = sorted(
            (s for s in scaling if s[fixed[0]] == fixed[1] and s.get("processes_per_node", 1) == 1),
            key=lambda s: s[key],
        )
        xs = [s[key] for s in rows]
        ax.plot(xs, [s["read_p50_ms"] for s in rows], "o-", label="read p50 ms (c1)")
        ax.plot(xs, [s["dek_p50_ms"] for s in rows], "s-", label="DEK path p50 ms (c1)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.set_xticks(xs)
        ax.grid(True, alpha=0.3)
        rate = ax.twinx()
        c = results["plan"]["concurrency"]
        rate.plot(
            xs, [s["read_throughput_rps"] for s in rows], "^--", color="tab:green", label="read/s"
        )
        rate.set_ylabel(f"read_record per s (c{c})")
        ax.set_ylim(bottom=0)
        rate.set_ylim(bottom=0)
        lines = ax.get_legend_handles_labels()
        more = rate.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
        ax.set_title(f"Scaling with {key}")
    m = results["machine"]
    fig.suptitle(
        f"medkms benchmark ({results['mode']}), {m['cpu_model']}, {m['cores']} cores, {m['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
