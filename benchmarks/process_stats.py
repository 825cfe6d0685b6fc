"""CPU time and peak memory of the processes under test, read from /proc.

A service is named by the pid the launcher recorded; when it runs workers
(a node with ``processes > 1`` is a supervisor and its server processes), its
live descendants are counted with it. CPU is user + system time of each
process (all its threads), from ``/proc/<pid>/stat`` (clock ticks, usually
10 ms); the harness's own process (the client) is read with ``getrusage``
(microseconds). Peak memory is the kernel's high-water mark of resident
memory, ``VmHWM`` in ``/proc/<pid>/status``, per process.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from pathlib import Path

CLIENT = "client"
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which is in
    parentheses and may hold spaces): index 0 is field 3 (state)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds ``pid`` has used so far (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # utime is field 14 (index 11), stime field 15 (index 12).
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))  # field 4: ppid
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kib(pid: int, key: str) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of ``pid`` in MiB, or None if it is gone."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024.0


def rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of ``pid`` now, in MiB, or None if it is gone."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib / 1024.0


def self_peak_rss_mb() -> float | None:
    return peak_rss_mb(os.getpid())


def tree_peak_rss_mb(pid: int) -> tuple[float | None, int]:
    """The largest peak RSS of any process in ``pid``'s tree, and how many there are."""
    tree = process_tree(pid)
    peaks = [p for p in (peak_rss_mb(t) for t in tree) if p is not None]
    return (max(peaks) if peaks else None), len(tree)


class CpuMeter:
    """CPU seconds used by named processes (and this one, as ``client``)
    between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        # Trees are listed once, at construction: workers are started with their node.
        self._trees = {name: process_tree(pid) for name, pid in pids.items()}
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(p) for p in tree) for name, tree in self._trees.items()}
        now[CLIENT] = self_cpu_seconds()
        return now

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds used by each process since :meth:`start`."""
        end = self._read()
        return {name: end[name] - self._start[name] for name in end}
