"""Closed-loop load: ``concurrency`` workers each send one request, wait for its
answer, and send the next, until a time or count limit.

Every loop is bounded twice (``duration_s`` and ``max_requests``) and stops
early when requests keep failing, so a broken cluster cannot keep the harness
busy. Workers are threads: the requests spend their time in gRPC and HTTP
calls that release the GIL.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from core.errors import KmsError

#: a request: called with a running index (to cycle over records); its return value is ignored
Request = Callable[[int], object]

#: stop a phase once this many requests have failed (and more failed than succeeded)
MAX_ERRORS = 20


@dataclass
class LoadResult:
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    #: why the phase ended: "duration", "count" or "errors"
    stopped_by: str = "duration"

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _error_name(e: BaseException) -> str:
    if isinstance(e, KmsError):
        return f"{type(e).__name__}({e.grpc_status}): {e.message[:120]}"
    if isinstance(e, grpc.Call):
        return f"RpcError({e.code().name}): {(e.details() or '')[:120]}"
    return type(e).__name__


def warm_up(request: Request, count: int) -> None:
    """Open connections and fill caches before measuring; failures here are fatal."""
    for i in range(count):
        request(i)


def run_closed_loop(
    request: Request, *, concurrency: int, duration_s: float, max_requests: int
) -> LoadResult:
    if concurrency < 1 or duration_s <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration_s and max_requests must be positive")
    result = LoadResult(concurrency)
    lock = threading.Lock()
    issued = 0
    stop = threading.Event()
    start = time.perf_counter()
    deadline = start + duration_s

    def worker() -> None:
        nonlocal issued
        while not stop.is_set():
            with lock:
                if issued >= max_requests:
                    result.stopped_by = "count"
                    stop.set()
                    return
                index = issued
                issued += 1
            t0 = time.perf_counter()
            if t0 >= deadline:
                stop.set()
                return
            try:
                request(index)
            except (KmsError, grpc.RpcError) as e:
                with lock:
                    result.errors[_error_name(e)] += 1
                    if result.error_count >= MAX_ERRORS and result.error_count > len(
                        result.latencies_s
                    ):
                        result.stopped_by = "errors"
                        stop.set()
                continue
            elapsed = time.perf_counter() - t0
            with lock:
                result.latencies_s.append(elapsed)

    threads = [
        threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A request never takes longer than its own RPC timeout; this is a last resort.
        thread.join(timeout=duration_s + 30.0)
    stop.set()
    result.wall_s = time.perf_counter() - start
    return result
