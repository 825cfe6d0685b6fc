"""Refuses a signed request (or enrollment) seen before: the replay guard.

A signed request (:mod:`core.request_auth`) carries a requester-chosen
32-byte nonce and a deadline at most ``max_window_s`` ahead of the node's clock.
The guard remembers each (requester, nonce) until that request's deadline, and
no longer: once the deadline has passed, a replay of the same signed request
fails the deadline check instead (the deadline is inside the signature, so it
cannot be moved). Memory is therefore bounded by the requests accepted within
one window, and ``max_entries`` caps it outright under attack.

The guard's clock only moves forward: it keeps the latest ``now`` it was given,
so a wall clock stepping back cannot revive a request whose entry was already
forgotten.

:class:`ReplayGuard` keeps its memory in the process (roughly 300 bytes per live
entry). A node that runs several worker processes on one port uses
:class:`SharedReplayGuard` instead: the same rules over one SQLite table that
all its processes share, so a replay routed to another process is refused too.

Enrollments use the same memory, keyed by the patient who signed them; the node
takes a cheap look (``check_unused``) before its chain reads and spends the nonce
only once the chain shows the signer may enroll (see the node service).

The shared memory is not fsync'd, and an operator may delete ``replay.sqlite`` or put
an older copy back. The node's audit log is durable and names every read it granted
by its request id, so at start-up :class:`ServedBeforeStart` takes from it the reads
granted within one window before the start, and the node refuses those again
whatever its replay memory lost.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Protocol

from core.audit import GRANTED
from core.errors import IntegrityError, InvalidRequest, ResourceExhausted, Unauthenticated
from core.request_auth import check_deadline
from kms_node.sqlite_db import open_durable, unavailable


class NonceReused(Unauthenticated):
    """This signer's nonce was already used by a message still within its deadline."""

    def __init__(self) -> None:
        super().__init__("nonce already used")


class NonceMemory(Protocol):
    """What the node service needs from a replay guard.

    Requests and enrollments share it, each keyed by its signer: nonces are 32 random
    bytes the signer chose under its own signature, so the two never meet by chance,
    and nobody else can make a signer's nonce look used.
    """

    def check_and_remember(
        self, requester: str, nonce: bytes, deadline: int, now: float
    ) -> None: ...

    def check_unused(self, requester: str, nonce: bytes, now: float) -> None: ...


def _check_limits(max_window_s: int, max_entries: int) -> None:
    if max_window_s <= 0:
        raise ValueError("max_window_s must be positive")
    if max_entries <= 0:
        raise ValueError("max_entries must be positive")


def _too_many() -> ResourceExhausted:
    return ResourceExhausted("too many requests in flight at this node; retry after a short wait")


class ReplayGuard:
    """Remembers (requester, nonce) until the request's deadline; thread-safe."""

    def __init__(self, max_window_s: int, max_entries: int) -> None:
        _check_limits(max_window_s, max_entries)
        self.max_window_s = max_window_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # (requester, nonce) -> deadline, and a min-heap of the same entries by deadline.
        self._seen: dict[tuple[str, bytes], int] = {}
        self._expiry: list[tuple[int, str, bytes]] = []
        self._latest_now: float = float("-inf")

    def __len__(self) -> int:
        """Live entries, as of the last call (expired ones are dropped lazily)."""
        with self._lock:
            return len(self._seen)

    def check_and_remember(self, requester: str, nonce: bytes, deadline: int, now: float) -> None:
        """Accept this (requester, nonce) once, or raise.

        Raises :class:`Unauthenticated` if the deadline has passed or the nonce
        was already used by this requester, :class:`InvalidRequest` if the
        deadline is further ahead than ``max_window_s``, and
        :class:`ResourceExhausted` if ``max_entries`` requests are already live.

        Call it after the signature has been verified and the signer found to hold
        a grant, so that nobody without a grant can fill the guard; the nonce is
        used up from then on, even if serving the request fails later.
        """
        if not isinstance(nonce, bytes):
            raise InvalidRequest("nonce must be bytes")
        key = (requester, nonce)
        with self._lock:
            now = max(now, self._latest_now)
            self._latest_now = now
            check_deadline(deadline, now, self.max_window_s)
            self._evict_expired(now)
            if key in self._seen:
                raise NonceReused()
            if len(self._seen) >= self.max_entries:
                raise _too_many()
            self._seen[key] = deadline
            heapq.heappush(self._expiry, (deadline, requester, nonce))

    def check_unused(self, requester: str, nonce: bytes, now: float) -> None:
        """Raise :class:`NonceReused` if this (requester, nonce) is remembered and live;
        remember nothing. A cheap look before costly work, for callers that spend the
        nonce (:meth:`check_and_remember`) only once the signer has earned it."""
        with self._lock:
            deadline = self._seen.get((requester, nonce))
            if deadline is not None and deadline > max(now, self._latest_now):
                raise NonceReused()

    def _evict_expired(self, now: float) -> None:
        # Amortised O(log n) per entry: each entry is pushed once and popped once.
        # An entry whose deadline has passed can be forgotten: check_deadline
        # refuses any request with deadline <= now, and now never goes back.
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, requester, nonce = heapq.heappop(expiry)
            del self._seen[(requester, nonce)]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (
    requester TEXT    NOT NULL,
    nonce     BLOB    NOT NULL,
    deadline  INTEGER NOT NULL,
    PRIMARY KEY (requester, nonce)
) WITHOUT ROWID
"""
# A row whose deadline has passed may be reused: check_deadline has already refused
# the request that wrote it, should it come again.
_REMEMBER = """
INSERT INTO nonces (requester, nonce, deadline) VALUES (?, ?, ?)
ON CONFLICT (requester, nonce) DO UPDATE SET deadline = excluded.deadline
WHERE nonces.deadline <= ?
"""
_LIVE = "SELECT 1 FROM nonces WHERE requester = ? AND nonce = ? AND deadline > ?"
#: forget expired rows (and recount) once per this many accepted requests
_SWEEP_EVERY = 512


class SharedReplayGuard:
    """:class:`ReplayGuard`'s rules over a SQLite table that every process of one node
    shares (``<data_dir>/replay.sqlite``); thread- and process-safe.

    Writes are not fsync'd (``synchronous = OFF``): like the in-process guard, the
    memory does not survive a crash of the machine, only of a process; what it loses,
    :class:`ServedBeforeStart` takes from the audit log at the next start. ``max_entries``
    is enforced on the count taken at each sweep, so it may be overshot by at most
    ``_SWEEP_EVERY`` entries.
    """

    def __init__(self, path: Path, max_window_s: int, max_entries: int) -> None:
        _check_limits(max_window_s, max_entries)
        self.max_window_s = max_window_s
        self.max_entries = max_entries
        self._path = path
        self._lock = threading.Lock()
        self._latest_now: float = float("-inf")
        self._accepted = 0
        self._live = 0

        def prepare(conn: sqlite3.Connection) -> None:
            conn.execute(_SCHEMA)

        self._conn = open_durable(
            path, "replay memory", prepare, extra_pragmas=("synchronous = OFF",)
        )

    def __repr__(self) -> str:
        return f"SharedReplayGuard({str(self._path)!r})"

    def check_and_remember(self, requester: str, nonce: bytes, deadline: int, now: float) -> None:
        """As :meth:`ReplayGuard.check_and_remember`, for every process of the node."""
        if not isinstance(nonce, bytes):
            raise InvalidRequest("nonce must be bytes")
        with self._lock:
            now = max(now, self._latest_now)
            self._latest_now = now
            check_deadline(deadline, now, self.max_window_s)
            try:
                if self._accepted % _SWEEP_EVERY == 0:
                    self._conn.execute("DELETE FROM nonces WHERE deadline <= ?", (int(now),))
                    (self._live,) = self._conn.execute("SELECT count(*) FROM nonces").fetchone()
                if self._live >= self.max_entries:
                    raise _too_many()
                cursor = self._conn.execute(_REMEMBER, (requester, nonce, deadline, int(now)))
            except sqlite3.Error as e:
                raise unavailable("replay memory", e) from e
            if cursor.rowcount != 1:
                raise NonceReused()
            self._accepted += 1
            self._live += 1

    def check_unused(self, requester: str, nonce: bytes, now: float) -> None:
        """As :meth:`ReplayGuard.check_unused`, for every process of the node."""
        with self._lock:
            now = max(now, self._latest_now)
            try:
                row = self._conn.execute(_LIVE, (requester, nonce, int(now))).fetchone()
            except sqlite3.Error as e:
                raise unavailable("replay memory", e) from e
        if row is not None:
            raise NonceReused()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


#: how many entries older than the window :meth:`ServedBeforeStart.from_audit_log`
#: reads, one after the other, before it stops looking further back (the entries' times
#: are the node's wall clock, which may have stepped back while it served)
OLDER_ENTRIES_READ: Final = 1024


class ServedBeforeStart:
    """The reads this node granted within one request window before it started, by
    request id, from its audit log: refused again as replays, whatever the replay
    memory lost (deleted, restored from an older copy, or cut short by a machine
    crash, since it is not fsync'd).

    A request id is the first 16 bytes of the request's signing digest, which covers the
    nonce, so a replay carries the id of the read it repeats. A read whose deadline was
    accepted at time ``t`` expired by ``t + window``; so does its entry here. Only
    granted entries count: the node spends a nonce only on a read it grants, and a
    refused read may be judged again, as before a restart. Empty (and free) once the
    window has passed.
    """

    def __init__(self, served: dict[str, int], window_s: int) -> None:
        """``served`` maps a request id to the time (unix seconds) it was granted."""
        self._until = {request_id: t + window_s for request_id, t in served.items()}
        self._ends = max(self._until.values(), default=0)
        self._latest_now: float = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_audit_log(
        cls, newest_first: Iterable[tuple[int, bytes]], window_s: int, now: float
    ) -> ServedBeforeStart:
        """Read ``(leaf_index, canonical entry)`` pairs from the newest back, until
        :data:`OLDER_ENTRIES_READ` entries in a row are older than ``now - window_s``.

        Only three fields are read from each entry (the node wrote them; its log's
        integrity is checked when it opens). An entry that is not such JSON is an
        :class:`IntegrityError` naming its index: the node does not start on it."""
        cutoff = now - window_s
        served: dict[str, int] = {}
        older_in_a_row = 0
        for index, data in newest_first:
            request_id, granted_at, decision = _served_fields(index, data)
            if granted_at < cutoff:
                older_in_a_row += 1
                if older_in_a_row >= OLDER_ENTRIES_READ:
                    break
                continue
            older_in_a_row = 0
            if decision == GRANTED:
                served[request_id] = max(granted_at, served.get(request_id, granted_at))
        return cls(served, window_s)

    def __len__(self) -> int:
        with self._lock:
            return len(self._until)

    def check(self, request_id: str, now: float) -> None:
        """Raise :class:`NonceReused` if this read was granted before the start and its
        window has not passed. The clock only moves forward, as the replay guard's."""
        with self._lock:
            if not self._until:
                return
            now = max(now, self._latest_now)
            self._latest_now = now
            if now >= self._ends:
                self._until = {}
                return
            until = self._until.get(request_id)
        if until is not None and until > now:
            raise NonceReused()


def _served_fields(index: int, data: bytes) -> tuple[str, int, str]:
    try:
        fields = json.loads(data)
        request_id, granted_at, decision = fields["request_id"], fields["time"], fields["decision"]
        if isinstance(request_id, str) and type(granted_at) is int and isinstance(decision, str):
            return request_id, granted_at, decision
    except (ValueError, TypeError, KeyError):
        pass
    raise IntegrityError(f"audit log is damaged: entry {index} is not an audit entry")
