"""The node's durable store of wrapped kfrags, one per (patient, grantee, record type), in SQLite.

Kfrags are stored only wrapped under the HSM key-encryption key (see
:mod:`kms_node.keystore`). Durability: WAL with ``synchronous=FULL`` fsyncs the log on
every commit, so an item is on disk once :meth:`KfragStore.put` returns and survives a kill -9
of the node (and a power cut). ``secure_delete`` overwrites the pages a deleted kfrag occupied
in the database file, and a shred then checkpoints and empties the WAL, whose frames from
the kfrag's writing still hold it.

The store also records the block through which this node has shredded the kfrags of
every revocation (:meth:`KfragStore.record_shredded_through`, written with each grant
index snapshot): a snapshot is used at start-up only if the kfrags are shredded at least
that far (``kms_node/index_snapshot.py``), so a kfrag store restored from an older copy
is caught rather than left holding kfrags revoked since.

Each kfrag row keeps the deadline of the patient's signed enrollment that delivered it,
and the store keeps the nonces of the enrollments it stored (until an hour past their
deadline), written in the same transaction as their kfrags (:meth:`KfragStore.put_enrollment`).
So an enrollment is stored once, whatever the node's replay memory (not fsync'd) has
lost, and an older enrollment of a grant (replayed, or relayed late) never replaces the
kfrags of one the patient signed after it.

Addresses are Ethereum addresses (``0x`` + 40 hex digits, usually EIP-55 checksummed). They
are keyed in lower case, so that any spelling of an address finds the same row, and returned
as they were stored.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InvalidRequest, PreconditionFailed, Unauthenticated, Unavailable
from kms_node.sqlite_db import open_durable, unavailable

SCHEMA_VERSION = 5

_KFRAGS_TABLE = """
CREATE TABLE kfrags (
    patient_key   TEXT    NOT NULL,  -- lower-case address
    grantee_key   TEXT    NOT NULL,  -- lower-case address
    record_type   INTEGER NOT NULL,  -- the patient key (per record type) it delegates
    patient       TEXT    NOT NULL,  -- address as given (checksummed)
    grantee       TEXT    NOT NULL,
    wrapped       BLOB    NOT NULL,  -- nonce || AES-256-GCM(kfrag) || tag, under the HSM KEK
    kfrag_sha256  BLOB    NOT NULL CHECK (length(kfrag_sha256) = 32),
    receiving_key BLOB    NOT NULL,  -- the grantee's Umbral public key
    created_at    INTEGER NOT NULL,  -- unix seconds
    kek_generation INTEGER NOT NULL DEFAULT 1,  -- the HSM key-encryption key that wrapped it
    enrolled_deadline INTEGER NOT NULL DEFAULT 0,  -- deadline of the patient's signed
                                                   -- enrollment that delivered it (0: unknown)
    PRIMARY KEY (patient_key, grantee_key, record_type)
) WITHOUT ROWID
"""

_SHREDDING_TABLE = """
CREATE TABLE shredding (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    through_block INTEGER NOT NULL CHECK (through_block >= 0)  -- every revocation mined up
                                                               -- to this block is shredded
)
"""

_ENROLLMENTS_TABLE = """
CREATE TABLE enrollments (
    patient_key TEXT    NOT NULL,  -- lower-case address of the patient who signed it
    nonce       BLOB    NOT NULL CHECK (length(nonce) = 32),
    deadline    INTEGER NOT NULL,  -- unix seconds; the row is kept an hour past it
    PRIMARY KEY (patient_key, nonce)
) WITHOUT ROWID
"""
_ENROLLMENTS_BY_DEADLINE = "CREATE INDEX enrollments_by_deadline ON enrollments (deadline)"

# Version 2 stores (before key-encryption keys had generations) were all wrapped by the first.
_MIGRATE_2_TO_3 = "ALTER TABLE kfrags ADD COLUMN kek_generation INTEGER NOT NULL DEFAULT 1"
# Kfrags stored before version 5 have no known enrollment deadline: any enrollment may
# replace them.
_MIGRATE_4_TO_5 = "ALTER TABLE kfrags ADD COLUMN enrolled_deadline INTEGER NOT NULL DEFAULT 0"

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_BUSY_TIMEOUT_MS = 5000
#: how long a checkpoint after a shred waits for other processes' readers
_CHECKPOINT_WAIT_MS = 100
#: how long past its deadline an enrollment's nonce is kept: a node clock stepped back by
#: less than this revives none (an enrollment is refused past its deadline anyway)
ENROLLMENT_NONCE_KEPT_S = 3600

_PUT = """
INSERT OR REPLACE INTO kfrags
    (patient_key, grantee_key, record_type, patient, grantee, wrapped, kfrag_sha256,
     receiving_key, created_at, kek_generation, enrolled_deadline)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_LATEST_ENROLLMENT = """
SELECT max(enrolled_deadline) FROM kfrags WHERE patient_key = ? AND grantee_key = ?
"""
_FORGET_ENROLLMENTS = "DELETE FROM enrollments WHERE deadline < ?"
_REMEMBER_ENROLLMENT = "INSERT INTO enrollments (patient_key, nonce, deadline) VALUES (?, ?, ?)"

# A pair's kfrags whose record type is not in a bitmask of types to keep (types are 0..5).
_DELETE_OTHER_TYPES = """
DELETE FROM kfrags WHERE patient_key = ? AND grantee_key = ? AND ((1 << record_type) & ?) = 0
"""

_HOLDS = """
SELECT 1 FROM kfrags WHERE patient_key = ? AND grantee_key = ? LIMIT 1
"""
_GET = """
SELECT patient, grantee, record_type, wrapped, kfrag_sha256, receiving_key, created_at,
       kek_generation, enrolled_deadline
FROM kfrags WHERE patient_key = ? AND grantee_key = ? AND record_type = ?
"""

_ALL = """
SELECT patient, grantee, record_type, wrapped, kfrag_sha256, receiving_key, created_at,
       kek_generation, enrolled_deadline
FROM kfrags
"""

_REWRAP = """
UPDATE kfrags SET wrapped = ?, kek_generation = ?
WHERE patient_key = ? AND grantee_key = ? AND record_type = ?
"""


@dataclass(frozen=True)
class StoredKfrag:
    """A kfrag as the node keeps it: wrapped, with the hash of the clear kfrag."""

    patient: str
    grantee: str
    record_type: int
    wrapped: bytes = field(repr=False)
    kfrag_sha256: bytes
    receiving_key: bytes = field(repr=False)
    created_at: int
    #: generation of the HSM key-encryption key that wrapped it
    kek_generation: int = 1
    #: deadline of the patient's signed enrollment that delivered it (0: not known)
    enrolled_deadline: int = 0


class EnrollmentAlreadyStored(Unauthenticated):
    """This store has stored the kfrags of this signed enrollment before."""

    def __init__(self) -> None:
        super().__init__("enrollment already received (nonce already used)")


class EnrollmentSuperseded(PreconditionFailed):
    """The store holds kfrags of this grant from an enrollment signed after this one."""

    def __init__(self, deadline: int, stored_deadline: int) -> None:
        super().__init__(
            f"this node holds kfrags of this grant from a later enrollment (deadline "
            f"{stored_deadline}) than this one (deadline {deadline}): an older enrollment, "
            "replayed or relayed late, is refused; to replace them, the patient signs a new "
            "enrollment (with a correct clock)"
        )
        self.deadline = deadline
        self.stored_deadline = stored_deadline


def _key(address: str, what: str) -> str:
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise InvalidRequest(f"{what} must be an address: 0x followed by 40 hex digits")
    return address.lower()


def _check_item(item: StoredKfrag) -> None:
    if not item.wrapped:
        raise InvalidRequest("wrapped kfrag is empty")
    if len(item.kfrag_sha256) != 32:
        raise InvalidRequest("kfrag_sha256 must be 32 bytes")
    if not item.receiving_key:
        raise InvalidRequest("receiving key is empty")
    if isinstance(item.record_type, bool) or not isinstance(item.record_type, int):
        raise InvalidRequest("record_type must be an integer")
    if isinstance(item.created_at, bool) or not isinstance(item.created_at, int):
        raise InvalidRequest("created_at must be an integer (unix seconds)")
    if isinstance(item.kek_generation, bool) or not isinstance(item.kek_generation, int):
        raise InvalidRequest("kek_generation must be an integer")
    if item.kek_generation < 1:
        raise InvalidRequest("kek_generation starts at 1")
    if isinstance(item.enrolled_deadline, bool) or not isinstance(item.enrolled_deadline, int):
        raise InvalidRequest("enrolled_deadline must be an integer (unix seconds)")
    if item.enrolled_deadline < 0:
        raise InvalidRequest("enrolled_deadline must not be negative")


def _rows_of(items: list[StoredKfrag]) -> list[tuple[object, ...]]:
    """The rows that store ``items`` (each checked first)."""
    for item in items:
        _check_item(item)
    return [
        (
            _key(i.patient, "patient"),
            _key(i.grantee, "grantee"),
            i.record_type,
            i.patient,
            i.grantee,
            bytes(i.wrapped),
            bytes(i.kfrag_sha256),
            bytes(i.receiving_key),
            i.created_at,
            i.kek_generation,
            i.enrolled_deadline,
        )
        for i in items
    ]


def _type_mask(types: Collection[int]) -> int:
    return sum(1 << int(t) for t in set(types))


def _unavailable(e: sqlite3.Error) -> Unavailable:
    return unavailable("kfrag store", e)


class KfragStore:
    """Wrapped kfrags by (patient, grantee, record type). Thread-safe: one connection
    behind a lock."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._path = path
        # Who may read a patient's records is itself sensitive: owner-only file.
        # secure_delete overwrites a shredded kfrag's pages in the database file.
        self._conn: sqlite3.Connection | None = open_durable(
            path,
            "kfrag store",
            self._migrate,
            busy_timeout_ms=_BUSY_TIMEOUT_MS,
            extra_pragmas=("secure_delete = ON",),
        )

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        # IMMEDIATE takes the write lock first, so two processes cannot both create the schema.
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 0:
                conn.execute(_KFRAGS_TABLE)
                conn.execute(_SHREDDING_TABLE)
                conn.execute(_ENROLLMENTS_TABLE)
                conn.execute(_ENROLLMENTS_BY_DEADLINE)
            elif 2 <= version < SCHEMA_VERSION:
                if version == 2:
                    conn.execute(_MIGRATE_2_TO_3)
                if version <= 3:
                    # Version 3 stores recorded no shredding block: the snapshot beside one
                    # is refused once, and the node replays every event.
                    conn.execute(_SHREDDING_TABLE)
                conn.execute(_MIGRATE_4_TO_5)
                conn.execute(_ENROLLMENTS_TABLE)
                conn.execute(_ENROLLMENTS_BY_DEADLINE)
            elif version != SCHEMA_VERSION:
                raise PreconditionFailed(
                    f"kfrag store has schema version {version}; this node knows {SCHEMA_VERSION}"
                )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def __repr__(self) -> str:
        return f"KfragStore({str(self._path)!r})"

    def _connection(self) -> sqlite3.Connection:
        """Caller holds the lock."""
        if self._conn is None:
            raise Unavailable("kfrag store is closed")
        return self._conn

    def _rows(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """What a read ``query`` returns, under the lock; SQLite errors become
        :class:`Unavailable`."""
        with self._lock:
            try:
                rows: list[tuple[Any, ...]] = self._connection().execute(query, params).fetchall()
            except sqlite3.Error as e:
                raise _unavailable(e) from e
        return rows

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed if the block ends normally,
        rolled back otherwise; SQLite errors become :class:`Unavailable`."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise _unavailable(e) from e

    def put(self, item: StoredKfrag) -> None:
        """Store ``item``, replacing any kfrag for (patient, grantee, record type); durable
        on return."""
        self.put_many([item])

    def put_many(self, items: list[StoredKfrag]) -> None:
        """Store several kfrags in one transaction (all or none); durable on return."""
        rows = _rows_of(items)
        with self._transaction() as conn:
            conn.executemany(_PUT, rows)

    def put_enrollment(
        self, items: list[StoredKfrag], *, nonce: bytes, retain_types: Collection[int], now: int
    ) -> None:
        """Store the kfrags of one signed enrollment (one patient and grantee, each item
        carrying the enrollment's deadline), in one transaction; durable on return.

        Refused with :class:`EnrollmentAlreadyStored` if this store has stored this
        enrollment (the patient's ``nonce``) before, and with :class:`EnrollmentSuperseded`
        if it holds kfrags of this grant from an enrollment with a later deadline. This
        grant's kfrags whose record type is not in ``retain_types`` are deleted in the same
        transaction: enrolling for a narrower grant leaves no kfrag behind for a type
        nothing covers any more."""
        rows = _rows_of(items)
        pairs = {(row[0], row[1]) for row in rows}
        deadlines = {i.enrolled_deadline for i in items}
        if len(pairs) != 1 or len(deadlines) != 1:
            raise InvalidRequest("an enrollment holds the kfrags of exactly one grant")
        ((patient_key, grantee_key),), (deadline,) = pairs, deadlines
        if deadline < 1:
            raise InvalidRequest("an enrollment's kfrags carry its deadline")
        if not isinstance(nonce, bytes) or len(nonce) != 32:
            raise InvalidRequest("an enrollment's nonce is 32 bytes")
        with self._transaction() as conn:
            conn.execute(_FORGET_ENROLLMENTS, (now - ENROLLMENT_NONCE_KEPT_S,))
            try:
                conn.execute(_REMEMBER_ENROLLMENT, (patient_key, nonce, deadline))
            except sqlite3.IntegrityError:
                raise EnrollmentAlreadyStored() from None
            ((latest,),) = conn.execute(_LATEST_ENROLLMENT, (patient_key, grantee_key))
            if latest is not None and latest > deadline:
                raise EnrollmentSuperseded(deadline, int(latest))
            conn.execute(_DELETE_OTHER_TYPES, (patient_key, grantee_key, _type_mask(retain_types)))
            conn.executemany(_PUT, rows)

    def get(self, patient: str, grantee: str, record_type: int) -> StoredKfrag | None:
        keys = (_key(patient, "patient"), _key(grantee, "grantee"), record_type)
        rows = self._rows(_GET, keys)
        return StoredKfrag(*rows[0]) if rows else None

    def holds(self, patient: str, grantee: str) -> bool:
        """Whether any kfrag of this patient's for this grantee is stored (no key material
        read)."""
        keys = (_key(patient, "patient"), _key(grantee, "grantee"))
        return bool(self._rows(_HOLDS, keys))

    def rewrap_all(self, rewrap: Callable[[StoredKfrag], tuple[bytes, int]]) -> int:
        """Replace every kfrag's wrapping by what ``rewrap`` gives (wrapped bytes and the
        key-encryption key generation), all in one transaction: all or none; the number of
        kfrags. For key rotation, with the node stopped."""
        with self._transaction() as conn:
            items = [StoredKfrag(*row) for row in conn.execute(_ALL).fetchall()]
            for item in items:
                wrapped, generation = rewrap(item)
                keys = (_key(item.patient, "patient"), _key(item.grantee, "grantee"))
                conn.execute(_REWRAP, (wrapped, generation, *keys, item.record_type))
        return len(items)

    def generations(self) -> set[int]:
        """The key-encryption key generations the stored kfrags are wrapped under."""
        return {int(g) for (g,) in self._rows("SELECT DISTINCT kek_generation FROM kfrags")}

    def delete(self, patient: str, grantee: str, *, keep_types: Collection[int] = ()) -> bool:
        """Remove the kfrags for (patient, grantee), all of them or those whose record type
        is not in ``keep_types``; False if there was none to remove."""
        keys = (_key(patient, "patient"), _key(grantee, "grantee"), _type_mask(keep_types))
        with self._lock:
            conn = self._connection()
            try:
                removed = conn.execute(_DELETE_OTHER_TYPES, keys).rowcount > 0
            except sqlite3.Error as e:
                raise _unavailable(e) from e
            if removed:
                self._checkpoint_wal(conn)
        return removed

    def shredded_through(self) -> int | None:
        """The block through which every revocation on the chain has had its kfrags
        shredded here, as last recorded; None if never recorded (a store written before
        version 4, or a copy of one)."""
        rows = self._rows("SELECT through_block FROM shredding WHERE id = 1")
        return int(rows[0][0]) if rows else None

    def record_shredded_through(self, block: int) -> None:
        """Record that every revocation mined up to ``block`` has had its kfrags shredded
        here; durable on return. The caller vouches for it (the grant index snapshot, taken
        between two syncs of the chain follower, every event of them handed to the
        shredding)."""
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise InvalidRequest("the shredding block must be a block number (an integer >= 0)")
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO shredding (id, through_block) VALUES (1, ?)", (block,)
            )

    @staticmethod
    def _checkpoint_wal(conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database file and empty it: the frames that still hold a
        shredded kfrag (from when it was written) go, and ``secure_delete`` has zeroed its
        pages in the file. Best effort, briefly: another process reading the store makes
        it wait for the next shred (or the next checkpoint SQLite makes by itself)."""
        try:
            conn.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_WAIT_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except sqlite3.Error:
            return  # the kfrag is deleted either way; its old frames go at a later checkpoint

    def count(self) -> int:
        ((n,),) = self._rows("SELECT count(*) FROM kfrags")
        return int(n)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
