"""The chaos suite (issue 13): faults injected into a real 3-of-5 cluster under load.

``make chaos`` (``python -m benchmarks.chaos [--out FILE]``; as root, for the full-disk
fault) starts a 3-of-5 cluster (TLS, anvil, SoftHSM) and keeps a granted doctor's DEK
path busy (``benchmarks.workload.DekPath``, two readers) while, in turn:

1. two nodes (n - m) are killed with SIGKILL, then restarted;
2. two nodes are SIGSTOPped (hung: connections open, no answers), then SIGCONTed;
3. the chain is paused (anvil SIGSTOPped), then resumed;
4. the coordinator is restarted;
5. one node's audit disk fills up (its data directory on a small tmpfs), then frees;
6. every node is restarted, one after another.

For each it prints reads sent, failed (with the errors), p50 and p99 before, during and
after. It fails (exit 1) if the node with the full disk does not report NOT_SERVING on
its health checks while full and SERVING once freed, on any failed read in a fault that
leaves at least ``m`` nodes able to serve (all but the paused chain), on any read a
revoked doctor was served after the revocation had had time to reach every node (during
each fault a grant is revoked), and on any acknowledged read missing from the nodes'
audit logs (every receipt a read returned is checked by the auditor at the end, with
every log verified against the chain).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import machine, phases
from benchmarks.json_results import emit
from benchmarks.phases import Read
from benchmarks.workload import DekPath, Workload, prepare
from clients.audit.audit_report import failures
from clients.audit.auditor import audit_cluster, channel_factory
from core.errors import AccessDenied, KmsError
from deploy import processes
from deploy.local_cluster import LocalCluster

READERS = 2
BEFORE_S, DURING_S, AFTER_S = 4.0, 8.0, 4.0
#: a revocation is in force at a node once its grant index has read the block (ADR 2:
#: within chain_max_age_s, 2 s, plus a poll); later than this, a served read is stale
STALE_AFTER_S = 3.0
#: how long a node's full disk is given to fill
FILLER_CHUNK = 1 << 20


@dataclass
class Readers:
    """Reads of a granted doctor, from two threads, for the whole run."""

    dek: DekPath
    reads: list[Read] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(READERS):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, offset: int) -> None:
        index = offset
        while not self._stop.is_set():
            started = time.monotonic()
            error = None
            try:
                self.dek(index)
            except KmsError as e:
                error = f"{e.grpc_status}: {e.message[:100]}"
            with self._lock:
                self.reads.append(Read(started, time.monotonic() - started, error))
            index += READERS

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def between(self, start: float, end: float) -> dict[str, Any]:
        with self._lock:
            return phases.phase(list(self.reads), start, end)


@dataclass
class Fault:
    name: str
    inject: Callable[[], None]
    heal: Callable[[], None]
    #: at least m nodes can serve throughout: no read may fail
    threshold_serves: bool
    #: a grant is revoked during the fault (not while the chain is paused)
    revoke: bool = True


class StaleReadWatch:
    """A doctor whose grant is revoked during a fault, reading all along: any read
    served to it later than STALE_AFTER_S after the revocation was mined is stale."""

    def __init__(self, workload: Workload, number: int) -> None:
        self._workload = workload
        self.doctor = workload.new_identity(f"revoked-{number}", provider=True)
        workload.grant(self.doctor)
        self._dek = workload.dek_path([self.doctor])
        self.revoked_at: float | None = None
        self.stale: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def revoke(self) -> None:
        self._workload.registry.revoke_access(
            self._workload.patient.identity.account, self.doctor.address
        )
        self.revoked_at = time.monotonic()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            try:
                self._dek(index)
                at = time.monotonic()
                if self.revoked_at is not None and at - self.revoked_at > STALE_AFTER_S:
                    self.stale.append(at - self.revoked_at)
            except (AccessDenied, KmsError):
                pass
            index += 1
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._dek.close()


class FullDisk:
    """One node's data directory moved onto a small tmpfs (needs root), which can be
    filled up and freed while the node runs."""

    def __init__(self, cluster: LocalCluster, node_id: str) -> None:
        self._cluster = cluster
        self.node_id = node_id
        self.directory = Path(cluster.node(node_id).config).parent
        self._filler = self.directory / "filler.bin"
        self.mounted = False
        #: whether its health checks said NOT_SERVING once full, SERVING once freed
        self.health_when_full = False
        self.health_when_freed = False

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the full-disk fault mounts a tmpfs: run `make chaos` as root")
        self._cluster.stop_node(self.node_id)
        aside = self.directory.with_name(self.directory.name + ".aside")
        shutil.copytree(self.directory, aside, symlinks=True)
        used = sum(f.stat().st_size for f in aside.rglob("*") if f.is_file())
        size_kb = used // 1024 + 256 * 1024  # its files, and 256 MiB for the run to write
        subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={size_kb}k,mode=0700",
                "tmpfs",
                str(self.directory),
            ],
            check=True,
        )
        self.mounted = True
        for item in aside.iterdir():
            target = self.directory / item.name
            if item.is_dir():
                shutil.copytree(item, target, symlinks=True)
            else:
                shutil.copy2(item, target)
        shutil.rmtree(aside)
        self._cluster.start_node(self.node_id)

    def fill(self) -> None:
        """Write zeros until the tmpfs refuses another byte (unbuffered: nothing is
        left to flush at close)."""
        try:
            fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            return  # already full
        try:
            for chunk in (FILLER_CHUNK, 4096, 1):  # then the last pages, the last bytes
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError:
                    continue
        finally:
            os.close(fd)

        self.health_when_full = self._health_within(serving=False)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)
        self.health_when_freed = self._health_within(serving=True)

    def _health_within(self, *, serving: bool, timeout_s: float = 5.0) -> bool:
        """Whether the node's health checks came to say ``serving`` within the time."""
        node = self._cluster.node(self.node_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            said = processes.grpc_serving(
                node.address, self._cluster.transport, server_name=self.node_id
            )
            if said == serving:
                return True
            time.sleep(0.1)
        return False

    def unmount(self) -> None:
        if self.mounted:
            self._cluster.stop_node(self.node_id)
            subprocess.run(["umount", str(self.directory)], check=False)
            self.mounted = False


def _faults(cluster: LocalCluster, disk: FullDisk) -> list[Fault]:
    anvil_pid = int(cluster.data["chain"]["pid"])
    killed, hung = ("node-4", "node-5"), ("node-2", "node-3")

    def kill() -> None:
        for node_id in killed:
            cluster.stop_node(node_id, kill=True)

    def restart_killed() -> None:
        for node_id in killed:
            cluster.start_node(node_id)

    def signal_hung(sig: signal.Signals) -> None:
        for node_id in hung:
            os.kill(cluster.node(node_id).pid, sig)

    def restart_coordinator() -> None:
        cluster.stop_coordinator()
        cluster.start_coordinator()

    def restart_every_node() -> None:
        for node in cluster.nodes:
            cluster.stop_node(node.node_id)
            cluster.start_node(node.node_id)

    def nothing() -> None:
        return None

    return [
        Fault("kill -9 of n-m nodes", kill, restart_killed, threshold_serves=True),
        Fault(
            "SIGSTOP of n-m nodes",
            lambda: signal_hung(signal.SIGSTOP),
            lambda: signal_hung(signal.SIGCONT),
            threshold_serves=True,
        ),
        Fault(
            "paused chain",
            lambda: os.kill(anvil_pid, signal.SIGSTOP),
            lambda: os.kill(anvil_pid, signal.SIGCONT),
            threshold_serves=False,
            revoke=False,
        ),
        Fault("coordinator restart", restart_coordinator, nothing, threshold_serves=True),
        Fault(f"full audit disk at {disk.node_id}", disk.fill, disk.free, threshold_serves=True),
        Fault("restart of every node", restart_every_node, nothing, threshold_serves=True),
    ]


def run() -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    violations: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medkms-chaos-") as tmp:
        cluster = LocalCluster.up(Path(tmp) / "cluster", nodes=5, threshold=3)
        disk = FullDisk(cluster, "node-5")
        try:
            disk.mount()
            workload = prepare(cluster, records=4, doctors=2)
            dek = workload.dek_path(keep_receipts=True)
            readers = Readers(dek)
            readers.start()
            time.sleep(1.0)
            for number, fault in enumerate(_faults(cluster, disk)):
                watch = StaleReadWatch(workload, number) if fault.revoke else None
                t0 = time.monotonic()
                time.sleep(BEFORE_S)
                t1 = time.monotonic()
                fault.inject()
                if watch is not None:
                    watch.revoke()
                time.sleep(max(0.0, t1 + DURING_S - time.monotonic()))
                fault.heal()
                t2 = time.monotonic()
                time.sleep(2.0)  # recovering: not measured
                t3 = time.monotonic()
                time.sleep(AFTER_S)
                t4 = time.monotonic()
                if watch is not None:
                    watch.stop()
                row: dict[str, Any] = {
                    "fault": fault.name,
                    "before": readers.between(t0, t1),
                    "during": readers.between(t1, t2),
                    "after": readers.between(t3, t4),
                    "stale_reads": [] if watch is None else watch.stale,
                }
                results.append(row)
                if fault.threshold_serves and row["during"]["failed"]:
                    violations.append(f"{fault.name}: {row['during']['failed']} reads failed")
                for phase in ("before", "after"):
                    if row[phase]["failed"]:
                        violations.append(
                            f"{fault.name}: {row[phase]['failed']} reads failed {phase}"
                        )
                if row["stale_reads"]:
                    violations.append(f"{fault.name}: a revoked grant was served")
            if not (disk.health_when_full and disk.health_when_freed):
                violations.append(
                    f"{disk.node_id}'s health checks did not follow its disk: NOT_SERVING when "
                    f"full {disk.health_when_full}, SERVING when freed {disk.health_when_freed}"
                )
            readers.stop()
            dek.close()
            report = audit_cluster(
                cluster.registry(), channel_factory(cluster.transport), receipts=dek.receipts
            )
            audit = {"ok": report.ok, "entries": report.entries, "receipts": len(dek.receipts)}
            if not report.ok:
                violations.append(f"audit: {failures(report)}")
        finally:
            disk.unmount()
            cluster.down()
    return {
        "machine": machine.describe(),
        "faults": results,
        "audit": audit,
        "violations": violations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    results = run()
    emit(results, args.out)
    print(phases.table([(r["fault"], r) for r in results["faults"]], "fault"))
    audit = results["audit"]
    print(
        f"audit: {audit['entries']} entries, {audit['receipts']} receipts checked, ok={audit['ok']}"
    )
    for violation in results["violations"]:
        print(f"VIOLATION: {violation}", file=sys.stderr)
    return 1 if results["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
