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
"""

from __future__ import annotations

import heapq
import sqlite3
import threading
from pathlib import Path
from typing import Protocol

from core.errors import InvalidRequest, ResourceExhausted, Unauthenticated
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
    memory does not survive a crash of the machine, only of a process. ``max_entries``
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
