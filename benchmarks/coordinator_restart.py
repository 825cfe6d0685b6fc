"""How fast an app reads again after a coordinator outage (issue 13).

``python -m benchmarks.coordinator_restart [--outage S] [--out FILE]`` starts a 3-of-5
cluster, opens one ``ProviderClient`` (one channel, kept across the outage, as an app
keeps it), reads, stops the coordinator for ``S`` seconds (default 30) while the app
keeps reading, starts it again, and reports the time from the coordinator serving again
to the app's first successful read, and every failed read meanwhile, by error. Each read
waits up to its timeout (1 s here) for the channel to be ready.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.json_results import emit
from benchmarks.workload import prepare
from clients.sdk.provider import ProviderClient
from clients.sdk.timeouts import Timeouts
from core.errors import KmsError
from deploy.local_cluster import LocalCluster

READ_TIMEOUT_S = 1.0


def run(outage_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medkms-restart-") as tmp:
        cluster = LocalCluster.up(Path(tmp) / "cluster", nodes=5, threshold=3)
        try:
            workload = prepare(cluster, records=1, doctors=1)
            record_id = workload.records[0].record_id
            app = ProviderClient(
                workload.doctors[0],
                registry=workload.registry,
                blobs=cluster.blob_store(),
                coordinator_address=cluster.coordinator_address,
                transport=cluster.app_transport,
                timeouts=Timeouts(fan_out_s=READ_TIMEOUT_S),
            )
            with app:
                app.read_record(record_id)
                failures: Counter[str] = Counter()
                served_again = threading.Event()
                first_read_after: list[float] = []
                stop = threading.Event()

                def reader() -> None:
                    while not stop.is_set():
                        try:
                            app.read_record(record_id)
                        except KmsError as e:
                            failures[f"{e.grpc_status}: {e.message[:80]}"] += 1
                            continue
                        if served_again.is_set() and not first_read_after:
                            first_read_after.append(time.monotonic())
                            return
                        time.sleep(0.05)

                cluster.stop_coordinator()
                thread = threading.Thread(target=reader, daemon=True)
                thread.start()
                time.sleep(outage_s)
                cluster.start_coordinator()  # returns once it answers health checks
                back = time.monotonic()
                served_again.set()
                thread.join(timeout=60)
                stop.set()
        finally:
            cluster.down()
    return {
        "machine": machine.describe(),
        "outage_s": outage_s,
        "read_timeout_s": READ_TIMEOUT_S,
        "recovery_s": first_read_after[0] - back if first_read_after else None,
        "failed_reads_during_outage": dict(failures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--outage", type=float, default=30.0, help="seconds the coordinator is down"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    emit(run(args.outage), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
