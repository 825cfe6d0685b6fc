"""`kmsctl audit verify`'s progress on stderr: for each node, the entries read of those to
read, and the rate of the whole audit, at most one line per ``interval_s``.

    audit: node-1 41200/100000  node-2 40950/100000  ...  20375 entries/s
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO


class AuditProgress:
    """A :data:`clients.audit.auditor.ReadProgress`: called from the nodes' threads."""

    def __init__(
        self,
        out: TextIO,
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        #: node id -> (entries read, entries to read), in the order nodes started
        self._nodes: dict[str, tuple[int, int]] = {}
        self._started = clock()
        self._printed = self._started

    def __call__(self, node_id: str, read: int, total: int) -> None:
        with self._lock:
            self._nodes[node_id] = (read, total)
            now = self._clock()
            if now - self._printed < self._interval_s:
                return
            self._printed = now
            line = self._line(now)
        print(line, file=self._out, flush=True)

    def _line(self, now: float) -> str:
        nodes = "  ".join(f"{n} {read}/{total}" for n, (read, total) in self._nodes.items())
        read = sum(r for r, _ in self._nodes.values())
        rate = read / (now - self._started) if now > self._started else 0.0
        return f"audit: {nodes}  {rate:.0f} entries/s"
