"""One node's CPU per request over the bare re-encryption, measured alone:
``python -m benchmarks.node_cost [--rounds 3] [--seconds 6] [--out FILE]``.

The harness's ``node_single_cost_x`` and ``node_batch32_cost_x``, without the rest of
``make bench``: a 1-of-1 cluster (one node, with TLS, anvil and SoftHSM, the harness's
node settings), the harness's node phases (single requests at concurrency 4, batches
of 32 at concurrency 2), and in each round, just before them, the bare
``reencrypt_from_bytes`` rate of this process. Each round gives both ratios; the
medians are reported. With ``--hold S`` the single-request load runs for ``S``
seconds first, with the node's pid printed, so that a profiler can attach to it
(``py-spy record --native --pid PID``).

With ``--gap-ms G`` each round also measures the node at concurrency 1, back to back
and then with ``G`` ms of idle between requests (a node of a 3-of-5 cluster serving
100 reads/s sees one call every 10 ms or so): what a request costs a node that is woken
for it, as a ratio to the same request served back to back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import baseline, stats
from benchmarks.harness import (
    BATCH,
    BENCH_COORDINATOR_SETTINGS,
    BENCH_NODE_SETTINGS,
    FULL,
    Plan,
    audit_commits,
    entries_per_commit,
    measure,
    say,
)
from benchmarks.load import run_closed_loop
from benchmarks.workload import prepare
from deploy.local_cluster import LocalCluster

SINGLE_CONCURRENCY = 4
BATCH_CONCURRENCY = 2


def _wire_rate(duration_s: float) -> float:
    """Bare ``reencrypt_from_bytes`` per CPU-second of this process, now."""
    base = baseline.measure(duration_s=duration_s, threshold=1, shares=1)
    rate: float = base["wire_reencrypt_rate_per_core"]
    return rate


def _paced(request: Callable[[int], object], gap_s: float) -> Callable[[int], object]:
    """``request``, then ``gap_s`` of idle before the next."""

    def paced(index: int) -> object:
        answer = request(index)
        time.sleep(gap_s)
        return answer

    return paced


def run(
    rounds: int,
    seconds: float,
    hold_s: float,
    node_settings: dict[str, object],
    gap_ms: float = 0.0,
) -> dict[str, Any]:
    plan = Plan(**{**FULL.__dict__, "throughput_s": seconds})
    with tempfile.TemporaryDirectory(prefix="medkms-node-cost-") as tmp:
        cluster = LocalCluster.up(
            Path(tmp) / "cluster",
            nodes=1,
            threshold=1,
            node_settings={**BENCH_NODE_SETTINGS, **node_settings},
            coordinator_settings=BENCH_COORDINATOR_SETTINGS,
        )
        try:
            workload = prepare(cluster, records=BATCH)
            node = workload.node_target(cluster.nodes[0])
            node_id = cluster.nodes[0].node_id
            pids = {node_id: cluster.nodes[0].pid}
            try:
                if hold_s > 0:
                    say(f"holding single-request load for {hold_s:.0f}s; node pid {pids[node_id]}")
                    run_closed_loop(
                        node.single,
                        concurrency=SINGLE_CONCURRENCY,
                        duration_s=hold_s,
                        max_requests=10**9,
                    )
                results = []
                for i in range(rounds):
                    wire = _wire_rate(1.0)
                    commits_before = audit_commits(cluster.nodes[0].metrics_url)
                    single = measure(
                        node.single,
                        pids=pids,
                        concurrency=SINGLE_CONCURRENCY,
                        duration_s=seconds,
                        plan=plan,
                    )
                    grouped = entries_per_commit(
                        commits_before, audit_commits(cluster.nodes[0].metrics_url)
                    )
                    batch = measure(
                        lambda j: node.batch(j, BATCH),
                        pids=pids,
                        concurrency=BATCH_CONCURRENCY,
                        duration_s=seconds,
                        plan=plan,
                        units=BATCH,
                    )
                    row = {
                        "wire_rate_per_core": wire,
                        "single_node_cpu_ms": single["cpu_ms_per_request"]["nodes"],
                        "single_client_cpu_ms": single["cpu_ms_per_request"]["client"],
                        "single_rps": single["throughput_rps"],
                        "single_entries_per_commit": grouped,
                        "batch_node_cpu_ms_per_capsule": batch["cpu_ms_per_request"]["nodes"]
                        / BATCH,
                        "node_single_cost_x": stats.node_cost_x(
                            single["count"], single["cpu_s"][node_id], wire
                        ),
                        "node_batch32_cost_x": stats.node_cost_x(
                            batch["count"] * BATCH, batch["cpu_s"][node_id], wire
                        ),
                        "errors": single["errors"] + batch["errors"],
                    }
                    if gap_ms > 0:
                        row.update(_idle_cost(node.single, pids, seconds, plan, gap_ms))
                    say(f"round {i + 1}: {json.dumps(row)}")
                    results.append(row)
            finally:
                node.close()
        finally:
            cluster.down()
    medians = {
        key: stats.median([r[key] for r in results if r[key] is not None])
        for key in results[0]
        if key != "errors"
    }
    return {"rounds": results, "medians": medians}


def _idle_cost(
    single: Callable[[int], object],
    pids: dict[str, int],
    seconds: float,
    plan: Plan,
    gap_ms: float,
) -> dict[str, float]:
    """The node's CPU per single request at concurrency 1, back to back and paced."""
    cpu_ms = {}
    for name, request in (("c1", single), ("paced", _paced(single, gap_ms / 1000.0))):
        phase = measure(request, pids=pids, concurrency=1, duration_s=seconds, plan=plan)
        cpu_ms[name] = phase["cpu_ms_per_request"]["nodes"]
    return {
        "c1_node_cpu_ms": cpu_ms["c1"],
        "paced_node_cpu_ms": cpu_ms["paced"],
        "paced_over_c1": cpu_ms["paced"] / cpu_ms["c1"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.node_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds of load to profile")
    parser.add_argument(
        "--gap-ms", type=float, default=0.0, help="also measure requests this far apart"
    )
    parser.add_argument("--out", type=Path, help="write the rounds and medians as JSON here")
    parser.add_argument(
        "--node-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node.toml setting for this run (a number), e.g. max_workers=4",
    )
    args = parser.parse_args(argv)
    settings: dict[str, object] = {}
    for item in args.node_setting:
        key, _, value = item.partition("=")
        settings[key] = float(value) if "." in value else int(value)
    started = time.perf_counter()
    result = run(args.rounds, args.seconds, args.hold, settings, args.gap_ms)
    say(f"medians: {json.dumps(result['medians'])} ({time.perf_counter() - started:.0f}s)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
