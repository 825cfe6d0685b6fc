"""A hung node (issue 13): what a granted doctor's reads cost while one node of a 3-of-5
cluster is SIGSTOPped, and after it recovers.

``python -m benchmarks.hung_node [--seconds S] [--out FILE]`` starts a 3-of-5 cluster
(TLS, anvil, SoftHSM) and drives the DEK path (``benchmarks.workload.DekPath``) at
concurrency 4:

1. healthy;
2. one node SIGSTOPped (it keeps its connections open and answers nothing): the first
   ``SETTLE_S`` seconds are load but not measured, then ``S`` seconds are;
3. the node SIGCONTed: again ``SETTLE_S`` unmeasured, then ``S`` measured.

The report gives each phase's p50 and p99 and the p50 ratios to healthy, measured in
the same run (target for the hung phase: at most 1.3), and every failed read.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import machine, stats
from benchmarks.json_results import emit
from benchmarks.load import run_closed_loop, warm_up
from benchmarks.workload import DekPath, prepare
from deploy.local_cluster import LocalCluster

CONCURRENCY = 4
SETTLE_S = 3.0
HUNG_NODE = "node-2"


def _phase(dek: DekPath, seconds: float) -> dict[str, Any]:
    result = run_closed_loop(
        dek, concurrency=CONCURRENCY, duration_s=seconds, max_requests=1_000_000
    )
    summary = stats.summarize(result.latencies_s, result.wall_s, result.error_count)
    return {
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
        "count": summary.count,
        "failed": dict(result.errors),
    }


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medkms-hung-") as tmp:
        cluster = LocalCluster.up(Path(tmp) / "cluster", nodes=5, threshold=3)
        try:
            workload = prepare(cluster, records=4, doctors=4)
            dek = workload.dek_path()
            try:
                warm_up(dek, 20)
                healthy = _phase(dek, seconds)
                pid = cluster.node(HUNG_NODE).pid
                os.kill(pid, signal.SIGSTOP)
                try:
                    settling = _phase(dek, SETTLE_S)
                    hung = _phase(dek, seconds)
                finally:
                    os.kill(pid, signal.SIGCONT)
                recovering = _phase(dek, SETTLE_S)
                recovered = _phase(dek, seconds)
            finally:
                dek.close()
        finally:
            cluster.down()
    return {
        "machine": machine.describe(),
        "concurrency": CONCURRENCY,
        "hung_node": HUNG_NODE,
        "healthy": healthy,
        "hung_first_seconds": settling,
        "hung": hung,
        "recovering_first_seconds": recovering,
        "recovered": recovered,
        "hung_p50_ratio": stats.ratio(hung["p50_ms"], healthy["p50_ms"]),
        "recovered_p50_ratio": stats.ratio(recovered["p50_ms"], healthy["p50_ms"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured phase")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    emit(run(args.seconds), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
