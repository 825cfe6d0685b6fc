"""Whether the node can serve now, as its health checks say: NOT_SERVING while it
cannot, so that an orchestrator (a readiness probe) or a load balancer routes around it
before a request finds out.

A node cannot serve while its grant index is stale (it would refuse every request as
UNAVAILABLE, ADR 2) or while its data directory cannot be written (its audit log would
refuse every decision). Both are checked every ``interval_s`` by a background thread,
independently of requests, so a node that was taken out of traffic is seen recovering
without any. Each change is logged once, with the reasons.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger("medkms.node")

#: a check: None when the node may serve as far as it sees, else why not
Check = Callable[[], str | None]
PROBE_FILE = ".write-probe"
#: written, synced and removed: a full disk or a read-only mount refuses it
PROBE_BYTES = 4096


def data_dir_writable(data_dir: Path) -> Check:
    """The data directory takes a 4 KiB write and an fsync (a full disk or a read-only
    mount refuses; the audit log would too)."""

    def check() -> str | None:
        path = data_dir / f"{PROBE_FILE}-{os.getpid()}"  # one per server process
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as e:
            return f"the data directory {data_dir} cannot be written: {e.strerror}"
        return None

    return check


class Readiness:
    """Runs the checks every ``interval_s`` and reports SERVING or NOT_SERVING through
    ``report`` (called with True or False on every change, and once at start)."""

    def __init__(
        self,
        checks: Sequence[Check],
        report: Callable[[bool], None],
        *,
        interval_s: float = 0.5,
    ) -> None:
        self._checks = list(checks)
        self._report = report
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the reasons the node cannot serve, as last checked (empty: it can)
        self.problems: list[str] = []
        self._reported: bool | None = None

    def check_now(self) -> list[str]:
        problems = [p for p in (check() for check in self._checks) if p is not None]
        serving = not problems
        if serving != self._reported:
            self._report(serving)
            if serving:
                log.info("node_serving")
            else:
                log.warning("node_not_serving", problems=problems)
            self._reported = serving
        self.problems = problems
        return problems

    def start(self) -> None:
        self.check_now()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check_now()
            except Exception:  # a check must never take the node's health down with it
                log.exception("readiness_check_failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
