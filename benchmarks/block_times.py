"""Revocation latency on chains that mine on an interval (issue 12): anvil with
``--block-time``, optionally nodes that judge ``chain_confirmations`` blocks deep.

``python -m benchmarks.block_times [--block-time S ...] [--confirmations K] [--trials N]
[--out FILE]`` starts a 3-of-5 cluster per block time and runs ``benchmarks.revocation``'s
trial ``N`` times: grant a fresh doctor, read, revoke, then read every 20 ms until refused.
It reports, per block time, the median of

- sent -> refused: from the revoke transaction being sent to the first refused read (what a
  patient waits: the wait for the next block, then the nodes' poll);
- mined -> refused: from the SDK holding the mined receipt to the first refused read (the
  nodes' share: their poll interval, plus ``k`` block times with confirmations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine, revocation, stats
from benchmarks.workload import prepare
from deploy.local_cluster import LocalCluster

DEFAULT_BLOCK_TIMES = (2, 12)
DEFAULT_TRIALS = 3


def say(message: str) -> None:
    print(f"[block-times] {message}", file=sys.stderr, flush=True)


def _median(trials: list[dict[str, Any]], key: str) -> float | None:
    values = [t[key] for t in trials if t[key] is not None]
    return stats.median(values) if values else None


def measure(block_time_s: int, confirmations: int, trials: int, state_root: Path) -> dict[str, Any]:
    """One cluster on a chain mining every ``block_time_s``: ``trials`` revocations."""
    started = time.perf_counter()
    cluster = LocalCluster.up(
        state_root / f"bt{block_time_s}-k{confirmations}",
        nodes=5,
        threshold=3,
        block_time_s=block_time_s,
        node_settings={"chain_confirmations": confirmations},
    )
    try:
        workload = prepare(cluster, records=1, doctors=1)
        say(
            f"block time {block_time_s}s, k={confirmations}: ready in "
            f"{time.perf_counter() - started:.0f}s"
        )
        # Past k blocks of waiting and the next block, with room for a loaded machine.
        timeout_s = (confirmations + 2) * block_time_s + 10.0
        runs = []
        for number in range(trials):
            run = revocation.trial(workload, number, timeout_s=timeout_s)
            say(
                f"  trial {number + 1}: sent->refused {run['sent_to_refused_s']}s, "
                f"mined->refused {run['revocation_s']}s"
            )
            runs.append(run)
    finally:
        cluster.down()
    return {
        "block_time_s": block_time_s,
        "confirmations": confirmations,
        "trials": runs,
        "sent_to_refused_median_s": _median(runs, "sent_to_refused_s"),
        "mined_to_refused_median_s": _median(runs, "revocation_s"),
        "unrefused_trials": sum(1 for r in runs if r["revocation_s"] is None),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| block time | confirmations | sent -> refused (median) | mined -> refused (median) "
        "| trials |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        sent, mined = r["sent_to_refused_median_s"], r["mined_to_refused_median_s"]
        lines.append(
            f"| {r['block_time_s']} s | {r['confirmations']} | "
            f"{'-' if sent is None else f'{sent:.2f} s'} | "
            f"{'-' if mined is None else f'{mined:.2f} s'} | {len(r['trials'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.block_times")
    parser.add_argument(
        "--block-time",
        type=int,
        action="append",
        dest="block_times",
        help="seconds between blocks (repeatable; default: 2 and 12)",
    )
    parser.add_argument(
        "--confirmations", type=int, default=0, help="the nodes' chain_confirmations (default 0)"
    )
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    with tempfile.TemporaryDirectory(prefix="medkms-block-times-") as root:
        results = [
            measure(bt, args.confirmations, args.trials, Path(root))
            for bt in (args.block_times or DEFAULT_BLOCK_TIMES)
        ]
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {"machine": machine.describe(), "results": results}
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(r["unrefused_trials"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
