"""`kmsctl audit verify` of a local cluster whose nodes hold large logs (issue 13, item 1).

A real 5-node local cluster serves one real granted read on each node; then each node is
stopped, its log is filled with ``--entries`` entries (default 100,000) and started again.
The entries are written offline through the node's own audit writer
(``kms_node.audit_log.AuditLog.append_many`` with the node's SoftHSM token, in batches of
``BATCH``): copies of the node's real granted entry with fresh request ids and cfrag hashes,
so every one of them is judged again against the real chain and passes.

Timed, each in its own process (its peak RSS is its own):

- ``stream``: only reading every node's entries over gRPC, as the auditor reads them
  (``GrpcLogSource.entries``, one thread per node): the floor the audit is compared with;
- ``verify``: ``kmsctl audit verify`` itself, reports written, with its progress on stderr.

Reports the verify time, per 100,000 entries, its ratio to streaming alone, and both
processes' peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from benchmarks.harness import running_cluster, say
from benchmarks.json_results import emit
from benchmarks.workload import prepare

#: entries per append: one transaction and one receipt signature (under MAX_RECEIPT_BATCH)
BATCH: Final = 1000
PER_100K: Final = 100_000


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------ filling a node's log offline


def _fill(config: str, count: int, queue: Any) -> None:
    """In a child process (SoftHSM reads its configuration once per process): append
    ``count`` copies of the node's newest granted entry through its audit writer."""
    from core.audit import GRANTED
    from kms_node.audit_log import AuditLog
    from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
    from kms_node.settings import NodeSettings

    settings = NodeSettings.from_toml(Path(config), os.environ)
    keystore = Pkcs11KeyStore.open(
        settings.hsm_module,
        settings.hsm_token_label,
        settings.user_pin(),
        softhsm_conf=settings.softhsm_conf,
    )
    log = AuditLog(settings.audit_db, keystore, settings.node_id)
    try:
        template = next(
            entry
            for index in range(log.size() - 1, -1, -1)
            if (entry := log.entry(index)).decision == GRANTED
        )
        started = time.perf_counter()
        for first in range(0, count, BATCH):
            log.append_many(
                [
                    dataclasses.replace(
                        template,
                        request_id=f"bench-{k}",
                        cfrag_hash=hashlib.sha256(b"bench cfrag %d" % k).digest(),
                    )
                    for k in range(first, min(first + BATCH, count))
                ]
            )
        queue.put((log.size(), time.perf_counter() - started))
    finally:
        log.close()
        keystore.close()


def fill_node(config: str, count: int) -> tuple[int, float]:
    """The node's log size after filling, and the seconds the writes took."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_fill, args=(config, count, queue))
    child.start()
    size, seconds = queue.get(timeout=600)
    child.join(timeout=60)
    return int(size), float(seconds)


# ------------------------------------------------------------ the timed children


def _child_stream(state_dir: Path) -> dict[str, Any]:
    """Every node's entries, read as the auditor reads them, and nothing else."""
    from clients.audit.auditor import GrpcLogSource, channel_factory
    from deploy.local_cluster import LocalCluster

    cluster = LocalCluster.open(state_dir)
    nodes = cluster.registry().list_nodes()
    open_channel = channel_factory(cluster.transport)

    def stream(node: Any) -> int:
        with open_channel(node) as channel:
            source = GrpcLogSource(channel, node.node_id)
            size = source.checkpoint().tree_size
            return sum(1 for _ in source.entries(0, size))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        entries = sum(pool.map(stream, nodes))
    return {
        "seconds": time.perf_counter() - started,
        "entries": entries,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _child_verify(state_dir: Path, report_dir: Path) -> dict[str, Any]:
    """`kmsctl audit verify` in this process (progress on stderr)."""
    from cli import kmsctl

    argv = ["audit", "verify", "--state-dir", str(state_dir), "--report-dir", str(report_dir)]
    started = time.perf_counter()
    code = kmsctl.main(argv)
    seconds = time.perf_counter() - started
    peak = _peak_rss_mib()  # before the report is read back below
    # Only the head: the entries are one line each after it (audit_report.write_report_json).
    text = (report_dir / "report.json").read_text()
    cut = text.index('\n  "entries": [')
    head = json.loads(text[:cut] + '\n  "entries": []\n}')
    return {
        "seconds": seconds,
        "exit_code": code,
        "verdict": head["verdict"],
        "entries": sum(n["entries"] for n in head["nodes"]),
        "peak_rss_mib": peak,
    }


def _in_child(*args: str) -> dict[str, Any]:
    """Run this module with ``args`` in a fresh interpreter; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        # kmsctl prints its summary on stdout: keep it out of the result.
        subprocess.run(
            [sys.executable, "-m", "benchmarks.audit_large", *args, "--result", out.name],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        result: dict[str, Any] = json.loads(Path(out.name).read_text())
    return result


# ------------------------------------------------------------ the run


def run(entries: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medkms-audit-large-") as tmp:
        root = Path(tmp)
        with running_cluster(root, nodes, min(3, nodes)) as cluster:
            workload = prepare(cluster, records=1, doctors=1)
            for node in cluster.nodes:
                target = workload.node_target(node, connections=1)
                try:
                    target.single(0)  # one real granted decision in each node's log
                finally:
                    target.close()
            fill_s = 0.0
            for node in cluster.nodes:
                cluster.stop_node(node.node_id)
                size, seconds = fill_node(node.config, entries)
                fill_s += seconds
                cluster.start_node(node.node_id)
                say(f"{node.node_id}: {size} entries ({entries} written in {seconds:.1f} s)")
            stream = _in_child("--child-stream", str(cluster.state_dir))
            say(f"streaming alone: {stream['entries']} entries in {stream['seconds']:.1f} s")
            verify = _in_child(
                "--child-verify", str(cluster.state_dir), "--report-dir", str(root / "report")
            )
            say(f"audit verify: {verify['verdict']} in {verify['seconds']:.1f} s")
    total = verify["entries"]
    return {
        "nodes": nodes,
        "entries_per_node": entries,
        "entries_audited": total,
        "fill": (
            "offline, through each node's AuditLog.append_many with its SoftHSM token, "
            f"batches of {BATCH}"
        ),
        "fill_seconds": round(fill_s, 1),
        "verify_exit_code": verify["exit_code"],
        "verify_verdict": verify["verdict"],
        "verify_seconds": round(verify["seconds"], 1),
        "verify_seconds_per_100k": round(verify["seconds"] * PER_100K / max(total, 1), 1),
        "stream_seconds": round(stream["seconds"], 1),
        "verify_to_stream_ratio": round(verify["seconds"] / stream["seconds"], 2),
        "verify_peak_rss_mib": round(verify["peak_rss_mib"]),
        "stream_peak_rss_mib": round(stream["peak_rss_mib"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="per node")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    # The timed children (internal).
    parser.add_argument("--child-stream", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-verify", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_stream or args.child_verify:
        result = (
            _child_stream(args.child_stream)
            if args.child_stream
            else _child_verify(args.child_verify, args.report_dir)
        )
        args.result.write_text(json.dumps(result))
        return 0
    if args.entries < 1 or args.nodes < 1:
        parser.error("--entries and --nodes must be positive")
    emit(run(args.entries, args.nodes), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
