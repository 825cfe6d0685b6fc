"""`kmsctl audit verify`'s progress lines (cli/audit_progress.py), on a clock the test
moves."""

from __future__ import annotations

import io

from cli.audit_progress import AuditProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_at_most_one_line_per_interval_with_each_node_and_the_rate() -> None:
    out, clock = io.StringIO(), Clock()
    progress = AuditProgress(out, interval_s=1.0, clock=clock)
    progress("node-1", 0, 3000)
    progress("node-2", 0, 1000)
    for read in range(1, 1001):
        clock.now += 0.001
        progress("node-1", read, 3000)
    assert out.getvalue() == "audit: node-1 1000/3000  node-2 0/1000  1000 entries/s\n"
    clock.now += 0.5
    progress("node-2", 500, 1000)  # half a second since the last line: none
    clock.now += 0.5
    progress("node-2", 1000, 1000)
    assert (
        out.getvalue().splitlines()[1]
        == "audit: node-1 1000/3000  node-2 1000/1000  1000 entries/s"
    )
