"""Flood resistance (issue 10): what an honest doctor's reads cost while one party floods
the cluster through the coordinator, as any app can reach it.

``python -m benchmarks.flood [--seconds S] [--out FILE]`` starts a 3-of-5 cluster (TLS,
anvil, SoftHSM) and measures the DEK path of a granted doctor (signed request,
coordinator, cfrag verification, decryption; ``benchmarks.workload.DekPath``), one
request at a time:

1. idle;
2. while one requester floods: a provider with no grant sends signed requests for the
   patient's record, ``FLOOD_IN_FLIGHT`` at a time over ``FLOOD_CONNECTIONS``
   connections, as fast as the answers come;
3. while throw-away keys flood: every request signed by a different fresh key.

The flooder runs in its own process. Its requests are signed before the clock starts
(signing is the attacker's cost, not the cluster's), and it runs at the lowest CPU
priority (``nice 19``): on this one machine its CPU would otherwise be taken from the
cluster, which is not what a remote attacker does; it still sends as fast as the CPU
the cluster leaves it allows. The report gives each flood's rate and how it was
answered, and each legitimate p50 as a ratio to the idle p50 measured in the same run
(target: at most 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from eth_account import Account

from benchmarks import machine, stats
from benchmarks.json_results import emit
from benchmarks.load import run_closed_loop, warm_up
from benchmarks.workload import Workload, prepare
from clients.sdk.identity import Identity
from clients.sdk.signed_requests import RequestSigner
from deploy.local_cluster import LocalCluster
from proto.kms.v1 import common_pb2
from proto.stubs import CoordinatorStub

#: the flooder's calls in flight, spread over FLOOD_CONNECTIONS connections (the
#: coordinator allows 64 per connection)
FLOOD_IN_FLIGHT = 256
FLOOD_CONNECTIONS = 4
#: distinct signed requests the throw-away flood cycles through (one fresh key each)
THROWAWAY_KEYS = 2000
RPC_TIMEOUT_S = 10.0


def _signed_requests(workload: Workload, *, throwaway: bool) -> list[bytes]:
    """The flood's requests, serialised: for the patient's first record, by one stranger
    (a provider without a grant) or by a fresh key each."""
    record = workload.capsules()[0]
    patient = workload.patient.identity.address
    domain = workload.registry.signing_domain()
    if throwaway:
        signers = [
            RequestSigner(Account.create(), Identity.generate("x").umbral_public_key(), domain)
            for _ in range(THROWAWAY_KEYS)
        ]
    else:
        stranger = workload.new_identity("stranger", provider=True)
        signers = [RequestSigner(stranger.account, stranger.umbral_public_key(), domain)] * 64
    return [
        s.single(
            patient, record.record_id, record.record_type, record.capsule, "TREAT"
        ).SerializeToString()
        for s in signers
    ]


def _write_requests(path: Path, requests: list[bytes]) -> None:
    with path.open("wb") as f:
        for request in requests:
            f.write(len(request).to_bytes(4, "big") + request)


def _read_requests(path: Path) -> list[common_pb2.ReencryptionRequest]:
    data, requests, at = path.read_bytes(), [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        requests.append(common_pb2.ReencryptionRequest.FromString(data[at + 4 : at + 4 + size]))
        at += 4 + size
    return requests


def _flood(state_dir: Path, requests_file: Path, seconds: float) -> dict[str, Any]:
    """Send the requests in turn, FLOOD_IN_FLIGHT at a time, for ``seconds``."""
    cluster = LocalCluster.open(state_dir)
    requests = _read_requests(requests_file)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    slots = threading.Semaphore(FLOOD_IN_FLIGHT)

    def done(call: grpc.Future[Any]) -> None:
        error = call.exception()
        name = "OK" if error is None else error.code().name  # type: ignore[attr-defined]
        with lock:
            outcomes[name] += 1
        slots.release()

    sent = 0
    # Separate TCP connections (a local subchannel pool each).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        cluster.app_transport.channel(cluster.coordinator_address, options=options)
        for _ in range(FLOOD_CONNECTIONS)
    ]
    stubs = [CoordinatorStub(channel) for channel in channels]
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        slots.acquire()
        stubs[sent % len(stubs)].Reencrypt.future(
            requests[sent % len(requests)], timeout=RPC_TIMEOUT_S
        ).add_done_callback(done)
        sent += 1
    for _ in range(FLOOD_IN_FLIGHT):  # wait for the last answers
        slots.acquire()
    wall = time.monotonic() - start
    for channel in channels:
        channel.close()
    return {
        "in_flight": FLOOD_IN_FLIGHT,
        "connections": FLOOD_CONNECTIONS,
        "sent": sent,
        "rate_per_s": sent / wall,
        "outcomes": dict(outcomes),
    }


def _legitimate_p50(workload: Workload, seconds: float) -> dict[str, Any]:
    dek = workload.dek_path()
    try:
        warm_up(dek, 3)
        result = run_closed_loop(dek, concurrency=1, duration_s=seconds, max_requests=100_000)
    finally:
        dek.close()
    summary = stats.summarize(result.latencies_s, result.wall_s, result.error_count)
    return {
        "p50_ms": summary.p50_ms,
        "p99_ms": summary.p99_ms,
        "count": summary.count,
        "errors": dict(result.errors),
    }


def _measure_under_flood(
    workload: Workload, state_dir: Path, requests: list[bytes], seconds: float
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        path = Path(f.name)
    _write_requests(path, requests)
    flood_s = seconds + 4.0  # the flood starts before, and ends after, the measurement
    flooder = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.flood", "--flooder", str(state_dir), str(path)]
        + ["--seconds", str(flood_s)],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.nice(19),  # the child has no threads yet
    )
    try:
        time.sleep(2.0)  # let the flood reach its pace
        legit = _legitimate_p50(workload, seconds)
        out, _ = flooder.communicate(timeout=flood_s + 60)
    finally:
        if flooder.poll() is None:
            flooder.kill()
        path.unlink()
    return {"legitimate": legit, "flood": json.loads(out)}


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medkms-flood-") as tmp:
        state_dir = Path(tmp) / "cluster"
        cluster = LocalCluster.up(state_dir, nodes=5, threshold=3)
        try:
            workload = prepare(cluster, records=4, doctors=1)
            one_requester = _signed_requests(workload, throwaway=False)
            throwaway = _signed_requests(workload, throwaway=True)
            idle = _legitimate_p50(workload, seconds)
            flooded = _measure_under_flood(workload, state_dir, one_requester, seconds)
            keys = _measure_under_flood(workload, state_dir, throwaway, seconds)
            after = _legitimate_p50(workload, seconds)
        finally:
            cluster.down()
    return {
        "machine": machine.describe(),
        "flooder": {"in_flight": FLOOD_IN_FLIGHT, "connections": FLOOD_CONNECTIONS, "nice": 19},
        "idle": idle,
        "one_requester": flooded,
        "throwaway_keys": keys,
        "idle_after": after,
        "one_requester_p50_ratio": stats.ratio(flooded["legitimate"]["p50_ms"], idle["p50_ms"]),
        "throwaway_keys_p50_ratio": stats.ratio(keys["legitimate"]["p50_ms"], idle["p50_ms"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument(
        "--flooder", nargs=2, metavar=("STATE_DIR", "REQUESTS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.flooder:
        result = _flood(Path(args.flooder[0]), Path(args.flooder[1]), args.seconds)
        print(json.dumps(result))
        return 0
    emit(run(args.seconds), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
