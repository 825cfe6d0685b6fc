"""A node's grant index at scale (issue 14, ADR 15): memory per patient, restart-to-serving
time from a snapshot and by a full replay, and lookup latency, with registries of 10 000 and
100 000 patients (one record and one grant each), extrapolated to a million.

``python -m benchmarks.index_scale [--patients 10000 100000] [--out FILE] [--latest FILE]``
(``make bench-index-scale``). Each registry is a real one on anvil, filled by
``benchmarks/registry_fill.py`` (cached under ``benchmarks/cache/``). For each size, in one
process, through the node's own code (``ChainFollower``, ``IndexSnapshots``, a SoftHSM token):

- full replay: a follower with no snapshot syncs from block 0, in a fresh process (spawned):
  its wall time, the CPU time of that process and of anvil, and how much the process's
  resident memory (RSS) grew, per patient (what the index costs a node by RSS: the index,
  and what the allocators keep after the replay). The parent goes on with the index it
  built, handed over as bytes;
- restart from a snapshot: the index is saved (signed in the HSM), a few blocks are mined,
  then the snapshot is loaded and checked (signature, chain, registry, block still
  canonical) and the follower syncs the blocks after it, until it is fresh enough to judge;
- memory: bytes Python allocates (tracemalloc) to hold the index read from the snapshot,
  per patient (KB = 1024 B);
- lookup: ``access_state`` of a random patient's record and grant (a granted, fresh state);
  its p50 is also given as a ratio to one ``umbral_pre.reencrypt``, the bare library's step
  that every served request makes, measured in the same run.

A million is extrapolated linearly: memory from the 100k figure per patient, times from the
line through the two sizes. ``--latest`` adds ``index_kb_per_patient`` and
``restart_s_100k_patients`` (and the whole result under ``index_scale``) to the harness's
``latest.json``, keeping its other keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import umbral_pre as umbral

from benchmarks import machine, process_stats, registry_fill, report, stats
from benchmarks.json_results import emit
from benchmarks.scratch_token import scratch_keystore
from contracts.registry import RegistryClient
from core.grant_index import GrantIndex
from deploy.anvil import rpc_call
from kms_node.chain_follower import ChainFollower
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.index_snapshot import SNAPSHOT_FILE, IndexSnapshots
from kms_node.kfrag_store import KfragStore

DEFAULT_SIZES = (10_000, 100_000)
MILLION = 1_000_000
#: blocks mined between the snapshot and the restart, which the restart must read (anvil
#: takes seconds to mine each with a large state)
BLOCKS_AFTER_SNAPSHOT = 2
LOOKUPS = 5_000
REENCRYPTIONS = 300
#: a full replay reads hundreds of thousands of logs: calls may take long
CHAIN_TIMEOUT_S = 120.0


def _full_replay(
    rpc_url: str, registry_address: str, anvil_pid: int, out: Path
) -> dict[str, float]:
    """A follower with no snapshot syncs from block 0, in this (fresh) process; the index it
    built is written to ``out``. Wall and CPU seconds (this process, and anvil's), and RSS
    growth in MiB."""
    registry = RegistryClient(rpc_url, registry_address, timeout_s=CHAIN_TIMEOUT_S)
    registry.block("latest")  # connected, and web3's first-call set-up done
    gc.collect()
    rss_before = process_stats.rss_mb(os.getpid()) or 0.0
    cpu_before = process_stats.self_cpu_seconds()
    anvil_before = process_stats.cpu_seconds(anvil_pid)
    started = time.perf_counter()
    follower = ChainFollower(registry)
    follower.sync_once()
    wall_s = time.perf_counter() - started
    cpu_s = process_stats.self_cpu_seconds() - cpu_before
    anvil_s = process_stats.cpu_seconds(anvil_pid) - anvil_before
    gc.collect()
    rss_growth = (process_stats.rss_mb(os.getpid()) or 0.0) - rss_before
    out.write_bytes(follower.index.to_bytes())
    return {"wall_s": wall_s, "cpu_s": cpu_s, "anvil_cpu_s": anvil_s, "rss_growth_mb": rss_growth}


def _index_bytes_per_patient(data: bytes, patients: int) -> float:
    """Python allocations that hold the index read from ``data``, per patient."""
    gc.collect()
    tracemalloc.start()
    try:
        index = GrantIndex.from_bytes(data)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if index.sizes()[0] != patients:
        raise RuntimeError("the snapshot does not hold every patient")
    return held / patients


def _lookup_s(follower: ChainFollower, patients: int) -> list[float]:
    rng = random.Random(14)  # noqa: S311 - which patients to look up, not a secret
    latencies = []
    for i in (rng.randrange(patients) for _ in range(LOOKUPS)):
        record, grantee, capsule = (
            registry_fill.record(i),
            registry_fill.provider(i),
            registry_fill.capsule(i),
        )
        started = time.perf_counter()
        state = follower.access_state(record, grantee, capsule)
        latencies.append(time.perf_counter() - started)
        if state.grant is None or not state.grant.active or state.record is None:
            raise RuntimeError(f"patient {i}'s grant is not in the index")
    return latencies


def _reencrypt_s() -> list[float]:
    """The bare library's per-request step, timed one by one."""
    delegating, signer = umbral.SecretKey.random(), umbral.Signer(umbral.SecretKey.random())
    capsule, _ = umbral.encrypt(delegating.public_key(), b"\x07" * 32)
    (kfrag,) = umbral.generate_kfrags(
        delegating_sk=delegating,
        receiving_pk=umbral.SecretKey.random().public_key(),
        signer=signer,
        threshold=1,
        shares=1,
        sign_delegating_key=True,
        sign_receiving_key=True,
    )
    latencies = []
    for _ in range(REENCRYPTIONS):
        started = time.perf_counter()
        umbral.reencrypt(capsule, kfrag)
        latencies.append(time.perf_counter() - started)
    return latencies


def measure(patients: int, work_dir: Path, keystore: Pkcs11KeyStore) -> dict[str, Any]:
    anvil, chain = registry_fill.cached_chain(patients, work_dir)
    # The node's kfrag store records how far its shredding reached with each snapshot.
    kfrags = KfragStore(work_dir / "kfrags.sqlite")
    try:
        registry = RegistryClient(anvil.rpc_url, chain.registry, timeout_s=CHAIN_TIMEOUT_S)
        assert anvil.pid is not None
        replayed_file = work_dir / "replayed.index"
        with multiprocessing.get_context("spawn").Pool(1) as fresh:
            replay = fresh.apply(
                _full_replay, (anvil.rpc_url, chain.registry, anvil.pid, replayed_file)
            )
        replayed = ChainFollower(registry, index=GrantIndex.from_bytes(replayed_file.read_bytes()))
        replayed_file.unlink()
        if replayed.index.sizes() != (patients, patients, patients):
            raise RuntimeError(f"the registry holds {replayed.index.sizes()}, not {patients}")

        snapshots = IndexSnapshots(
            work_dir / SNAPSHOT_FILE,
            keystore,
            kfrags,
            chain_id=registry.chain_id(),
            registry_address=registry.address,
        )
        started = time.perf_counter()
        saved_at = snapshots.save(replayed.index)
        save_s = time.perf_counter() - started
        rpc_call(anvil.rpc_url, "anvil_mine", [hex(BLOCKS_AFTER_SNAPSHOT)], timeout_s=600)

        started = time.perf_counter()
        loaded = snapshots.load(registry)
        if loaded is None:
            raise RuntimeError("the node refused its own snapshot")
        restarted = ChainFollower(registry, index=loaded)
        restarted.sync_once()
        restart_s = time.perf_counter() - started
        if restarted.staleness() is not None or restarted.index_block() <= saved_at.number:
            raise RuntimeError("the restarted index is not fresh")

        snapshot_bytes = snapshots.path.stat().st_size
        per_patient_b = _index_bytes_per_patient(
            restarted.index.to_bytes(), patients
        )  # the index as a restart holds it
        restarted.sync_once()  # fresh again after the memory measurement (seconds)
        lookups = _lookup_s(restarted, patients)
    finally:
        kfrags.close()
        anvil.stop()
    return {
        "patients": patients,
        "fill_s": chain.fill_s,
        "full_replay_s": replay["wall_s"],
        "full_replay_cpu_s": replay["cpu_s"],
        "full_replay_anvil_cpu_s": replay["anvil_cpu_s"],
        "full_replay_rss_kb_per_patient": replay["rss_growth_mb"] * 1024 / patients,
        "restart_from_snapshot_s": restart_s,
        "snapshot_save_s": save_s,
        "snapshot_bytes_per_patient": snapshot_bytes / patients,
        "index_kb_per_patient": per_patient_b / 1024,
        "lookup_p50_us": stats.percentile(lookups, 50) * 1e6,
        "lookup_p99_us": stats.percentile(lookups, 99) * 1e6,
    }


def extrapolated(sizes: list[dict[str, Any]]) -> dict[str, float]:
    """At a million patients: memory per patient as at the largest size; times on the line
    through the two largest sizes (or through zero with one size), and no less than measured
    at the largest (noise can tilt the line down)."""
    largest = sizes[-1]
    smaller = sizes[-2] if len(sizes) > 1 else {k: 0.0 for k in largest} | {"patients": 0}

    def at_million(key: str) -> float:
        slope = (largest[key] - smaller[key]) / (largest["patients"] - smaller["patients"])
        return float(largest[key] + max(0.0, slope) * (MILLION - largest["patients"]))

    return {
        "index_mb": largest["index_kb_per_patient"] * MILLION / 1024,
        "snapshot_mb": largest["snapshot_bytes_per_patient"] * MILLION / 2**20,
        "restart_from_snapshot_s": at_million("restart_from_snapshot_s"),
        "full_replay_s": at_million("full_replay_s"),
    }


def run(sizes: list[int]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medkms-index-scale-") as tmp:
        root = Path(tmp)
        keystore = scratch_keystore(root, "medkms-index-bench")
        try:
            for patients in sorted(sizes):
                work_dir = root / str(patients)
                work_dir.mkdir()
                results.append(measure(patients, work_dir, keystore))
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            keystore.close()
    reencrypt_p50_us = stats.percentile(_reencrypt_s(), 50) * 1e6
    for size in results:
        size["lookup_p50_to_reencrypt_p50"] = size["lookup_p50_us"] / reencrypt_p50_us
    return {
        "machine": machine.describe(),
        "sizes": results,
        "reencrypt_p50_us": reencrypt_p50_us,
        "million": extrapolated(results),
    }


def add_to_latest(latest: Path, results: dict[str, Any]) -> None:
    """Add the headline figures to the harness's latest.json, keeping every other key."""
    document = json.loads(latest.read_text()) if latest.exists() else {}
    largest = results["sizes"][-1]
    document["index_kb_per_patient"] = round(largest["index_kb_per_patient"], 3)
    if largest["patients"] == 100_000:
        document["restart_s_100k_patients"] = round(largest["restart_from_snapshot_s"], 3)
    document["index_scale"] = results
    latest.write_text(report.compact_json(document) + "\n")  # as the harness writes it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--latest", type=Path, help="add the headline figures to this file")
    args = parser.parse_args(argv)
    results = run(args.patients)
    emit(results, args.out)
    if args.latest is not None:
        add_to_latest(args.latest, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
