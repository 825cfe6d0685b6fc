"""Starting, watching and stopping the local cluster's service processes.

Each service runs in its own session (so a Ctrl-C aimed at the launcher does
not reach a detached cluster) and logs to its own file. Processes started by
an earlier ``kmsctl`` are stopped by pid, after checking the pid still runs
the command we started (pids get reused).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.errors import Unavailable
from proto.transport import Transport

_LOG_TAIL_BYTES = 3000


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and outside the kernel's ephemeral range.

    Ports are chosen before the services bind them; one from the ephemeral range
    (what binding port 0 returns) can meanwhile be taken by any outgoing
    connection, such as a web3 client's, so the choice is made below that range.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12_000), low))
    random.shuffle(candidates)
    for port in candidates[:500]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded: any free port
        s.bind((host, 0))
        fallback: int = s.getsockname()[1]
        return fallback


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def spawn(
    cmd: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def log_tail(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def grpc_serving(
    address: str, transport: Transport, *, server_name: str | None = None, timeout_s: float = 1.0
) -> bool:
    """True when the gRPC server at ``address`` reports SERVING on health checks
    (through ``transport``, so a TLS misconfiguration shows as not ready)."""
    with transport.channel(address, server_name=server_name) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its stubs leave methods untyped
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_until(
    name: str,
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float = 30.0,
) -> None:
    """Wait for ``ready()``; fail early, with the log's tail, if the process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.poll()
        if code is not None:
            raise Unavailable(
                f"{name} exited with code {code}; log {log_path}:\n{log_tail(log_path)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise Unavailable(
                f"{name} not ready after {timeout_s}s; log {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.1)


def pid_runs(pid: int, marker: str) -> bool:
    """True if ``pid`` is alive and its command line contains ``marker``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def stop(process: subprocess.Popen[Any], timeout_s: float = 5.0, *, group: bool = False) -> None:
    """SIGTERM a child we started (or, with ``group``, its whole process group: a node's
    supervisor and its workers), then SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM) if group else process.terminate()
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
        process.wait()
    except ProcessLookupError:
        process.wait()


def stop_pid(pid: int, marker: str, timeout_s: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; False if it was not running."""
    if not pid_runs(pid, marker):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_runs(pid, marker) or _is_zombie(pid):
            _reap(pid)
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(pid: int, timeout_s: float) -> None:
    """Wait until ``pid`` has exited (or is a zombie); raise Unavailable if not."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
        if time.monotonic() > deadline:
            raise Unavailable(f"process {pid} still running after {timeout_s}s")
        time.sleep(0.05)
