"""Runs a node as several server processes sharing one port.

umbral-pre holds the GIL and PKCS#11 calls are serialised per process, so a
node scales its crypto with processes. Each worker is a full server (own HSM
session, grant index, database connection) bound with SO_REUSEPORT; the kernel
spreads *connections* between them, so clients that want the parallelism open
several (the coordinator does). The supervisor serves the workers' summed
metrics, restarts a worker that dies, and stops them all on SIGTERM, the
anchoring worker (0) last.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

import structlog

from core.endpoints import parse_host_port
from kms_node import data_lock, metrics
from kms_node.hardening import forbid_core_dumps
from kms_node.settings import NodeSettings

log = structlog.get_logger("medkms.node.supervisor")

RESTART_BACKOFF_S = 1.0
#: a worker's graceful stop: 2 s of gRPC grace, the follower, the last anchor (5 s at most)
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Make this worker get SIGTERM when its supervisor dies (even by SIGKILL), so
    no orphan keeps holding the node's port and HSM session (Linux prctl)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(settings: NodeSettings, worker_command: Sequence[str]) -> None:
    """Run ``settings.processes`` server processes, each started with ``worker_command``
    plus ``--worker N`` (the entry point that called this knows how it is started).

    The supervisor holds the user PIN (its settings, and the environment it hands the
    workers), so it is hardened as a worker is (``kms_node.hardening``); the workers
    inherit the core limit and set their own ``PR_SET_DUMPABLE``."""
    forbid_core_dumps()
    data_lock.hold_as_the_serving_instance(settings.data_dir)
    metrics_dir = settings.data_dir / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}

    def start(worker: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*worker_command, "--worker", str(worker)], env=env)

    workers = {i: start(i) for i in range(settings.processes)}
    if settings.metrics_listen:
        metrics.serve_merged(
            *parse_host_port(settings.metrics_listen, "metrics_listen"), str(metrics_dir)
        )
    log.info("supervisor_started", node_id=settings.node_id, processes=settings.processes)

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("supervisor_stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.2):
        for i, process in list(workers.items()):
            code = process.poll()
            if code is not None and not stopping.is_set():
                log.error("worker_died", worker=i, exit_code=code)
                time.sleep(RESTART_BACKOFF_S)
                workers[i] = start(i)
    # Worker 0 anchors the audit log, one last time as it stops: it stops after the others,
    # so that its last anchor covers what they appended while finishing their requests.
    _stop([p for i, p in workers.items() if i != 0])
    _stop([workers[0]])
    log.info("supervisor_stopped", node_id=settings.node_id)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then wait; SIGKILL what has not stopped after STOP_TIMEOUT_S."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
