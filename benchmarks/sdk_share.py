"""The app's share of a read (issue 14, item 3): the client CPU of one
``ProviderClient.read_record``, split into its parts, against the bare umbral-pre cost
of the crypto the app must do (m cfrag verifications and one ``decrypt_reencrypted``),
measured in the same run.

``python -m benchmarks.sdk_share [--reads N] [--rounds R] [--out FILE]`` brings up a
3-of-5 cluster (TLS, anvil, SoftHSM, the harness's settings) and has one provider read
the patient's records in turn, one read at a time, in this process. The cluster runs in
other processes, so ``time.process_time`` here is the client's CPU (its gRPC threads
included). Each round reads N times as the SDK stands (the total), then N times with a
timer around each step (the parts); a step's time excludes the steps timed inside it:

- ``signing``: the EIP-712 request (``RequestSigner.single``);
- ``grpc_call``: the coordinator call, client side (``Reencrypt``);
- ``verification``: the cfrags verified one by one (``ProviderClient._check``): on the
  first read of a kfrag set only, or when the fragments as relayed do not open the record
  (ADR 19);
- ``cfrag_parsing``: the cfrags parsed (``load_cfrag``);
- ``precursor_reading``: each cfrag's kfrag set read, to see whether the app verified
  it before (``cfrag_precursor``);
- ``decryption``: ``decrypt_reencrypted`` (``provider._decrypt``);
- ``key_parsing``: the patient's public keys parsed (``load_public_key``);
- ``receiving_key``: the app's Umbral secret key derived (``Identity.umbral_secret_key``);
- ``record_decryption``: the record's AES-GCM (``open_envelope``);
- ``blob_and_hash``: the blob read, hashed, parsed, checked against the chain record
  (``ProviderClient._fetch``);
- ``chain_reads``: registry lookups (``get_record``, ``get_patient``), with their count;
- ``other``: the rest of the read.

Each round also measures the bare app crypto (``baseline.app_share_ms``) and gives each
part as a ratio to it; the report holds the medians over rounds. ``timer_overhead_ms``
is what the timers themselves cost per read (noise can make it negative).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchmarks import baseline
from benchmarks.harness import (
    BENCH_COORDINATOR_SETTINGS,
    BENCH_NODE_SETTINGS,
    MAIN_NODES,
    MAIN_THRESHOLD,
    say,
)
from benchmarks.json_results import add_out_option, emit
from benchmarks.workload import prepare
from clients.sdk import parsed_objects
from clients.sdk import provider as provider_module
from clients.sdk.identity import Identity
from clients.sdk.provider import ProviderClient
from deploy.local_cluster import LocalCluster

RECORDS = 8
#: seconds of each bare measurement, made in every round beside the reads
BARE_S = 1.0
WARMUP = 20
PARTS = (
    "signing",
    "grpc_call",
    "verification",
    "cfrag_parsing",
    "precursor_reading",
    "decryption",
    "key_parsing",
    "receiving_key",
    "record_decryption",
    "blob_and_hash",
    "chain_reads",
)
CHAIN_READS = ("get_record", "get_patient")


class _Timers:
    """Exclusive CPU seconds per part: a part's time excludes the parts timed inside it."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.calls = dict.fromkeys(PARTS, 0)
        self._inner: list[float] = []  # per open timer: CPU of the timers inside it

    def wrap(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                inner = self._inner.pop()
                self.seconds[part] += spent - inner
                self.calls[part] += 1
                if self._inner:
                    self._inner[-1] += spent

        return timed


@contextmanager
def _patched(owner: object, name: str, timers: _Timers, part: str) -> Iterator[None]:
    """``owner.name`` timed as ``part`` while inside; put back as it was afterwards."""
    own = name in vars(owner)
    original = vars(owner)[name] if own else getattr(owner, name)
    setattr(owner, name, timers.wrap(part, getattr(owner, name)))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _timed_reads(provider: ProviderClient, timers: _Timers) -> ExitStack:
    stack = ExitStack()
    points: list[tuple[object, str, str]] = [
        (provider._signer, "single", "signing"),
        (provider._coordinator, "Reencrypt", "grpc_call"),
        (provider, "_check", "verification"),
        (provider_module, "load_cfrag", "cfrag_parsing"),
        (provider_module, "cfrag_precursor", "precursor_reading"),
        (provider_module, "_decrypt", "decryption"),
        (parsed_objects, "load_public_key", "key_parsing"),
        (Identity, "umbral_secret_key", "receiving_key"),
        (provider_module, "open_envelope", "record_decryption"),
        (provider, "_fetch", "blob_and_hash"),
        *((provider._registry, name, "chain_reads") for name in CHAIN_READS),
    ]
    for owner, name, part in points:
        stack.enter_context(_patched(owner, name, timers, part))
    return stack


def _read_n(provider: ProviderClient, ids: list[bytes], reads: int) -> float:
    """CPU seconds of ``reads`` reads, one at a time."""
    start = time.process_time()
    for i in range(reads):
        provider.read_record(ids[i % len(ids)])
    return time.process_time() - start


def _round(provider: ProviderClient, ids: list[bytes], reads: int) -> dict[str, float]:
    bare = baseline.app_share_ms(MAIN_THRESHOLD, MAIN_NODES, duration_s=BARE_S)
    untimed_s = _read_n(provider, ids, reads)
    timers = _Timers()
    with _timed_reads(provider, timers):
        timed_s = _read_n(provider, ids, reads)
    result = {f"{p}_ms": timers.seconds[p] / reads * 1000.0 for p in PARTS}
    result["other_ms"] = (timed_s - sum(timers.seconds.values())) / reads * 1000.0
    result["total_ms"] = untimed_s / reads * 1000.0
    result["timer_overhead_ms"] = (timed_s - untimed_s) / reads * 1000.0
    result["chain_reads_per_read"] = timers.calls["chain_reads"] / reads
    result |= {f"bare_{k}": v for k, v in bare.items()}
    for part in (*PARTS, "other", "total"):
        result[f"{part}_x_bare"] = result[f"{part}_ms"] / bare["total_ms"]
    return result


def run(reads: int, rounds: int) -> dict[str, Any]:
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="medkms-sdk-share-") as tmp:
        cluster = LocalCluster.up(
            Path(tmp) / "cluster",
            nodes=MAIN_NODES,
            threshold=MAIN_THRESHOLD,
            node_settings=BENCH_NODE_SETTINGS,
            coordinator_settings=BENCH_COORDINATOR_SETTINGS,
        )
        try:
            workload = prepare(cluster, records=RECORDS, doctors=1)
            ids = [r.record_id for r in workload.records]
            with workload.provider(workload.doctors[0]) as provider:
                _read_n(provider, ids, WARMUP)
                for round_ in range(rounds):
                    say(f"round {round_ + 1}/{rounds}: {reads} reads, untimed then timed")
                    runs.append(_round(provider, ids, reads))
        finally:
            cluster.down()
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {
        "command": f"python -m benchmarks.sdk_share --reads {reads} --rounds {rounds}",
        "threshold": MAIN_THRESHOLD,
        "shares": MAIN_NODES,
        "bare_ms": {
            k.removeprefix("bare_"): v for k, v in medians.items() if k.startswith("bare_")
        },
        "client_cpu_ms_per_read": {k: v for k, v in medians.items() if not k.endswith("_x_bare")},
        "ratio_to_bare_app_crypto": {
            k.removesuffix("_x_bare"): v for k, v in medians.items() if k.endswith("_x_bare")
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    for flag, default, meaning in (
        ("--reads", 300, "reads per round (untimed, then as many timed)"),
        ("--rounds", 3, "rounds on one cluster; the report gives medians"),
    ):
        parser.add_argument(flag, type=int, default=default, help=meaning)
    add_out_option(parser)
    args = parser.parse_args(argv)
    emit(run(args.reads, args.rounds), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
