"""Verifying once (issue 14, ADR 14): what the coordinator saves by relaying capsule
fragments unverified, leaving verification to the app (which must verify anyway).

``python -m benchmarks.verify_once [--seconds S] [--rounds R] [--out FILE]`` brings up
a 3-of-5 cluster (TLS, anvil, SoftHSM, the benchmark harness's settings) once per mode
and round, alternating the modes so that drift on a shared machine falls on both:

- ``verify_every_fragment``: the coordinator verifies every fragment (the behaviour
  before ADR 14, kept as a setting);
- ``verify_once``: the default; only the app verifies.

Each measures ``read_record`` end to end through the SDK at concurrency 1 (p50) and at
the harness's concurrency (throughput, CPU per read of every process). The report gives
each mode's medians over rounds and the ratios verify_once / verify_every_fragment,
with the crypto-only bound measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import baseline, stats
from benchmarks.harness import (
    BENCH_COORDINATOR_SETTINGS,
    BENCH_NODE_SETTINGS,
    MAIN_NODES,
    MAIN_THRESHOLD,
    QUICK,
    _pids,
    _reader,
    measure,
    say,
)
from benchmarks.json_results import emit
from benchmarks.workload import prepare
from deploy.local_cluster import LocalCluster

MODES = {"verify_every_fragment": True, "verify_once": False}


def _one(mode: str, seconds: float, state: Path) -> dict[str, float]:
    plan = dataclasses.replace(QUICK, latency_s=seconds, throughput_s=seconds)
    cluster = LocalCluster.up(
        state,
        nodes=MAIN_NODES,
        threshold=MAIN_THRESHOLD,
        node_settings=BENCH_NODE_SETTINGS,
        coordinator_settings={
            **BENCH_COORDINATOR_SETTINGS,
            "verify_every_fragment": MODES[mode],
        },
    )
    try:
        workload = prepare(cluster, records=8)
        providers = [workload.provider(d) for d in workload.doctors]
        try:
            read, pids, c = _reader(workload, providers), _pids(cluster), plan.concurrency
            latency = measure(read, pids=pids, concurrency=1, duration_s=seconds, plan=plan)
            load = measure(read, pids=pids, concurrency=c, duration_s=seconds, plan=plan)
        finally:
            for provider in providers:
                provider.close()
    finally:
        cluster.down()
    errors = latency["errors"] + load["errors"]
    if errors:
        raise SystemExit(f"{mode}: {errors} reads failed")
    return {
        "p50_ms": latency["p50_ms"],
        "throughput_rps": load["throughput_rps"],
        "coordinator_cpu_ms_per_read": load["cpu_ms_per_request"]["coordinator"],
        "coordinator_cpu_ms_per_read_c1": latency["cpu_ms_per_request"]["coordinator"],
        "total_cpu_ms_per_read": load["cpu_ms_per_request"]["total"],
    }


def run(seconds: float, rounds: int) -> dict[str, Any]:
    bound_ms = baseline.bound_ms(MAIN_THRESHOLD, MAIN_NODES, duration_s=1.0)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="medkms-verify-once-") as tmp:
        for round_ in range(rounds):
            for mode in MODES:
                say(f"round {round_ + 1}/{rounds}: {mode}")
                runs[mode].append(_one(mode, seconds, Path(tmp) / f"{mode}-{round_}"))
    cores = os.cpu_count() or 1
    medians = {
        mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for mode, results in runs.items()
    }
    for values in medians.values():
        values["cluster_3of5_ratio"] = (
            stats.cluster_ratio(values["throughput_rps"], bound_ms / 1000.0, cores) or 0.0
        )
        values["p50_over_bound"] = values["p50_ms"] / bound_ms
    before, after = medians["verify_every_fragment"], medians["verify_once"]
    return {
        "command": f"python -m benchmarks.verify_once --seconds {seconds:g} --rounds {rounds}",
        "bound_ms": bound_ms,
        "cores": cores,
        "medians": medians,
        "ratios_verify_once_over_every_fragment": {
            key: stats.ratio(after[key], before[key]) for key in before
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured phase")
    parser.add_argument("--rounds", type=int, default=2, help="clusters per mode")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    emit(run(args.seconds, args.rounds), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
