"""The node's audit log: append-only, durable, fail-closed, an RFC 9162 Merkle tree in SQLite.

Every decision is appended as an :class:`~core.audit.AuditEntry` before the response
leaves the node; :meth:`AuditLog.append` returns a receipt signed by the node's key store
only once the entry is committed, and raises :class:`Unavailable` when it cannot be, so the
caller fails closed. The Merkle math and the data types live in :mod:`core.merkle`
and :mod:`core.audit`; this module only stores and signs.

Storage (one SQLite file, WAL, ``synchronous=FULL``, owner-only):

- ``entries``: leaf index, canonical entry bytes (the leaf data), leaf hash;
- ``subtrees``: the root of every completed perfect subtree of height >= 1 (the leaves are
  the height-0 ones), so that the root at any size and any proof are O(log n) lookups
  instead of a rehash of every leaf (Trillian, too, stores interior nodes);
- ``tree``: one row with the node id, the size and the compact range (the right-edge subtree
  roots of :class:`~core.merkle.CompactRange`), so an append costs O(log n) hashes.

A commit is one ``BEGIN IMMEDIATE`` transaction that reads the tree row, signs the receipts,
writes the entries, their new subtrees and the new tree row, and commits; it holds SQLite's
write lock throughout, so several processes may append to one log. Appends that arrive while
a commit is under way are committed together by the next one (group commit: one fsync and one
signature for all of them; their receipts are a batch's, and a receipt's path names the leaf
hashes of entries committed with it, never their contents). A failed commit rolls back: no
partial entry, no gap, and every append in it fails.

The log is tamper-evident, not tamper-proof: whoever can write the file can rewrite it. What
an auditor relies on is the signed receipts and checkpoints (and their on-chain anchors),
checked with :func:`core.audit.verify_log`; :meth:`AuditLog.verify_integrity` is the
node's own full self-check.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from core import merkle
from core.audit import MAX_RECEIPT_BATCH, AuditEntry, Checkpoint, Receipt
from core.errors import (
    IntegrityError,
    InvalidRequest,
    PreconditionFailed,
    Unavailable,
)
from kms_node.keystore import KeyStore
from kms_node.sqlite_db import open_durable, unavailable

SCHEMA_VERSION: Final = 1

_SCHEMA = (
    """
    CREATE TABLE entries (
        leaf_index INTEGER PRIMARY KEY CHECK (leaf_index >= 0),
        entry      BLOB    NOT NULL,  -- AuditEntry.canonical_bytes(): the Merkle leaf data
        leaf_hash  BLOB    NOT NULL CHECK (length(leaf_hash) = 32)
    )
    """,
    """
    CREATE TABLE subtrees (
        level INTEGER NOT NULL CHECK (level >= 1),  -- height; leaves (height 0) are in entries
        idx   INTEGER NOT NULL CHECK (idx >= 0),    -- leaves [idx << level, (idx+1) << level)
        hash  BLOB    NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE tree (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        node_id   TEXT    NOT NULL,
        tree_size INTEGER NOT NULL CHECK (tree_size >= 0),
        frontier  BLOB    NOT NULL  -- CompactRange.to_bytes(): right-edge subtree roots
    )
    """,
)

# Recomputing the last perfect subtree on open reads this many leaves at most.
_OPEN_CHECK_LEAVES = 1024
_BATCH = 1000


def _unavailable(e: sqlite3.Error) -> Unavailable:
    return unavailable("audit log", e)


class _Append:
    """One caller's entries waiting to be committed, and then their outcome."""

    def __init__(self, prepared: list[tuple[bytes, bytes]]) -> None:
        self.prepared = prepared
        self.done = False
        self._receipts: list[Receipt] = []
        self._error: BaseException | None = None

    def succeed(self, receipts: list[Receipt]) -> None:
        self._receipts, self.done = receipts, True

    def fail(self, error: BaseException) -> None:
        self._error, self.done = error, True

    def result(self) -> list[Receipt]:
        if self._error is not None:
            raise self._error
        return self._receipts


class AuditLog:
    """The node's Merkle audit log. Thread-safe: one connection behind one lock."""

    def __init__(
        self,
        path: Path,
        keystore: KeyStore,
        node_id: str,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = 5000,
    ) -> None:
        # Held while committing (and for reads); appends queue in _pending meanwhile.
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: deque[_Append] = deque()
        self._path = path
        self._keystore = keystore
        self._node_id = node_id
        self._clock = clock
        #: the last checkpoint signed, handed out again for the same tree within its second
        self._last_checkpoint: Checkpoint | None = None
        # Checks node_id the way receipts will (non-empty, printable, short).
        Checkpoint(node_id=node_id, tree_size=0, root=merkle.EMPTY_ROOT, timestamp=0)

        def prepare(conn: sqlite3.Connection) -> None:
            self._migrate(conn, node_id)
            with _snapshot(conn):
                self._check_on_open(conn)

        # Who asked for whose records is itself sensitive: owner-only, like the kfrags.
        self._conn: sqlite3.Connection | None = open_durable(
            path, "audit log", prepare, busy_timeout_ms=busy_timeout_ms
        )

    @staticmethod
    def _migrate(conn: sqlite3.Connection, node_id: str) -> None:
        # IMMEDIATE takes the write lock first, so two processes cannot both create the schema.
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO tree (id, node_id, tree_size, frontier) VALUES (1, ?, 0, x'')",
                    (node_id,),
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise PreconditionFailed(
                    f"audit log has schema version {version}; this node knows {SCHEMA_VERSION}"
                )
            row = conn.execute("SELECT node_id FROM tree WHERE id = 1").fetchone()
            if row is None:
                raise IntegrityError("audit log has no tree state")
            if row[0] != node_id:
                raise PreconditionFailed(f"audit log belongs to node {row[0]!r}, not {node_id!r}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _check_on_open(conn: sqlite3.Connection) -> None:
        """Cheap consistency checks: counts, index range, and the newest subtree root."""
        tree = _read_tree(conn)
        size = tree.size
        count, first, last = conn.execute(
            "SELECT count(*), min(leaf_index), max(leaf_index) FROM entries"
        ).fetchone()
        if count != size or (size and (first, last) != (0, size - 1)):
            raise IntegrityError(
                f"audit log is damaged: its tree has {size} entries but {count} are stored"
                + (f" (indices {first} to {last})" if count else "")
            )
        (subtrees,) = conn.execute("SELECT count(*) FROM subtrees").fetchone()
        # A tree of n leaves has n - popcount(n) perfect subtrees of height >= 1.
        if subtrees != size - size.bit_count():
            raise IntegrityError(
                f"audit log is damaged: {subtrees} subtree roots stored for {size} entries, "
                f"{size - size.bit_count()} expected"
            )
        if not size:
            return
        # The last entry's bytes must hash to its stored leaf hash...
        entry, stored_hash = conn.execute(
            "SELECT entry, leaf_hash FROM entries WHERE leaf_index = ?", (size - 1,)
        ).fetchone()
        if merkle.leaf_hash(entry) != stored_hash:
            raise IntegrityError(f"audit log is damaged: entry {size - 1} does not match its hash")
        # ...and the smallest subtree of the compact range (the newest leaves) must be the
        # MTH of their stored hashes, when that is cheap to recompute.
        width = size & -size
        if width <= _OPEN_CHECK_LEAVES:
            leaves = [
                h
                for (h,) in conn.execute(
                    "SELECT leaf_hash FROM entries WHERE leaf_index >= ? ORDER BY leaf_index",
                    (size - width,),
                )
            ]
            if merkle.root(leaves) != tree.hashes[-1]:
                raise IntegrityError(
                    f"audit log is damaged: entries {size - width} to {size - 1} do not match "
                    "the stored tree"
                )

    def __repr__(self) -> str:
        return f"AuditLog({str(self._path)!r}, node_id={self._node_id!r})"

    @property
    def node_id(self) -> str:
        return self._node_id

    def _connection(self) -> sqlite3.Connection:
        """Caller holds the lock."""
        if self._conn is None:
            raise Unavailable("audit log unavailable: it is closed")
        return self._conn

    # --- writing -----------------------------------------------------------------------

    def append(self, entry: AuditEntry) -> Receipt:
        """Append ``entry``; return the signed receipt once the entry is durable.

        Raises :class:`Unavailable` if the entry cannot be committed (nothing is then
        written) and the key store's error if the receipt cannot be signed (nothing is
        written either): in both cases the caller must not release the response.
        """
        return self.append_many([entry])[0]

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        """Append several entries (one request's: a batch) and return their receipts once
        they are durable. All or nothing, as ``append``.

        Group commit: appends that arrive while another is being committed wait for it,
        then the first of them commits all that are waiting in one transaction (one
        fsync) under one signature; each entry still gets its own receipt. Under
        concurrent load the fsync and the HSM signature are shared by several requests
        instead of paid by each.
        """
        if not entries:
            return []
        job = _Append(self._prepare(entries))
        with self._pending_lock:
            self._pending.append(job)
        with self._lock:
            # Done already if an earlier holder of the lock committed it with its group.
            while not job.done:
                self._commit_pending()
        return job.result()

    def _prepare(self, entries: Sequence[AuditEntry]) -> list[tuple[bytes, bytes]]:
        """Each entry's canonical bytes and leaf hash; refuses entries not for this log."""
        prepared = []
        for entry in entries:
            if not isinstance(entry, AuditEntry):
                raise InvalidRequest("only an AuditEntry can be appended to the audit log")
            if entry.node_id != self._node_id:
                raise InvalidRequest(
                    f"entry is for node {entry.node_id!r}; this log is {self._node_id!r}"
                )
            data = entry.canonical_bytes()
            prepared.append((data, merkle.leaf_hash(data)))
        if len(prepared) > MAX_RECEIPT_BATCH:
            raise InvalidRequest(f"append at most {MAX_RECEIPT_BATCH} entries at once")
        return prepared

    def _take_group(self) -> list[_Append]:
        """The waiting appends, oldest first, as many as one receipt batch holds."""
        with self._pending_lock:
            group: list[_Append] = []
            size = 0
            while self._pending and size + len(self._pending[0].prepared) <= MAX_RECEIPT_BATCH:
                job = self._pending.popleft()
                group.append(job)
                size += len(job.prepared)
            return group

    def _commit_pending(self) -> None:
        """Commit every waiting append as one group; caller holds the lock. Each append
        of the group gets its receipts or, if the group fails, the group's error."""
        group = self._take_group()
        try:
            receipts = self._commit([item for job in group for item in job.prepared])
        except BaseException as e:  # noqa: BLE001 - handed to every caller of the group
            for job in group:
                job.fail(e)
            return
        offset = 0
        for job in group:
            job.succeed(receipts[offset : offset + len(job.prepared)])
            offset += len(job.prepared)

    def _commit(self, prepared: list[tuple[bytes, bytes]]) -> list[Receipt]:
        """Append ``prepared`` (canonical bytes, leaf hash) in one transaction under one
        signature; caller holds the lock."""
        leaves = [leaf for _, leaf in prepared]
        # One signature per commit: a lone entry's receipt is signed directly; a group's
        # receipts share a signature over the root of the group's leaves, each with its
        # path (core/audit.py Receipt).
        paths = merkle.inclusion_proofs(leaves) if len(leaves) > 1 else [[]]
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                tree = _read_tree(conn)
                start = tree.size
                entry_rows, subtree_rows = [], []
                for data, leaf in prepared:
                    new_tree, nodes = tree.append_with_nodes(leaf)
                    entry_rows.append((tree.size, data, leaf))
                    subtree_rows += [(n.level, n.index, n.hash) for n in nodes[1:]]
                    tree = new_tree
                conn.executemany(
                    "INSERT INTO entries (leaf_index, entry, leaf_hash) VALUES (?, ?, ?)",
                    entry_rows,
                )
                conn.executemany(
                    "INSERT INTO subtrees (level, idx, hash) VALUES (?, ?, ?)", subtree_rows
                )
                size = tree.size

                def receipt(i: int, signature: bytes = b"") -> Receipt:
                    return Receipt(
                        node_id=self._node_id,
                        leaf_index=start + i,
                        tree_size=size,
                        entry_hash=leaves[i],
                        signature=signature,
                        batch_start=start if len(leaves) > 1 else None,
                        batch_size=len(leaves),
                        batch_path=tuple(paths[i]),
                    )

                # Every receipt of the commit signs the same bytes (the lone entry, or the
                # group's root): the first one's. Signed before the commit: if the key
                # store fails, nothing is written. Each receipt is then made (and checked)
                # once, with its signature.
                signature = self._keystore.sign(receipt(0).canonical_bytes())
                receipts = [receipt(i, signature) for i in range(len(leaves))]
                conn.execute(
                    "UPDATE tree SET tree_size = ?, frontier = ? WHERE id = 1",
                    (tree.size, tree.to_bytes()),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback_quietly(conn)
                raise
        except sqlite3.Error as e:
            raise _unavailable(e) from e
        return receipts

    def checkpoint(self) -> Checkpoint:
        """The current size and root, signed by the node's key. Asked again for the same
        tree within the same second (the checkpoint's resolution), the node hands out the
        one it signed: an auditor looping on it costs no HSM signature per call."""
        with self._lock:
            try:
                tree = _read_tree(self._connection())
            except sqlite3.Error as e:
                raise _unavailable(e) from e
        unsigned = Checkpoint(
            node_id=self._node_id,
            tree_size=tree.size,
            root=tree.root(),
            timestamp=int(self._clock()),
        )
        last = self._last_checkpoint
        if last is not None and dataclasses.replace(last, signature=b"") == unsigned:
            return last
        signed = dataclasses.replace(
            unsigned, signature=self._keystore.sign(unsigned.canonical_bytes())
        )
        self._last_checkpoint = signed
        return signed

    # --- reading -----------------------------------------------------------------------

    def size(self) -> int:
        with self._lock:
            try:
                (size,) = (
                    self._connection().execute("SELECT tree_size FROM tree WHERE id = 1").fetchone()
                )
            except sqlite3.Error as e:
                raise _unavailable(e) from e
        return int(size)

    def root(self, tree_size: int | None = None) -> bytes:
        """MTH of the first ``tree_size`` entries (default: all of them)."""
        with self._lock:
            conn = self._connection()
            try:
                tree = _read_tree(conn)
                if tree_size is None or tree_size == tree.size:
                    return tree.root()
                _check_within(tree_size, tree.size, "tree size")
                if tree_size == 0:
                    return merkle.EMPTY_ROOT
                return _range_root(conn, 0, tree_size)
            except sqlite3.Error as e:
                raise _unavailable(e) from e

    def entry(self, index: int) -> AuditEntry:
        """The entry at leaf ``index``, parsed."""
        with self._lock:
            conn = self._connection()
            try:
                size = _read_tree(conn).size
                _check_index(index, size)
                row = conn.execute(
                    "SELECT entry FROM entries WHERE leaf_index = ?", (index,)
                ).fetchone()
            except sqlite3.Error as e:
                raise _unavailable(e) from e
        if row is None:
            raise IntegrityError(f"audit log is damaged: entry {index} is missing")
        try:
            return AuditEntry.from_canonical(row[0])
        except InvalidRequest as e:
            raise IntegrityError(f"audit log is damaged: entry {index}: {e.message}") from None

    def entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """``(leaf_index, canonical entry bytes)`` for leaves ``[start, end)``, as stored.

        Rows are yielded as they are: a damaged log shows its gaps to the reader (an auditor
        checks the indices). The lock is taken per batch, not across the iteration.
        """
        size = self.size()
        end = size if end is None else end
        _check_within(end, size, "end")
        _check_within(start, end, "start")
        return self._rows(start, end)

    def newest_first(self) -> Iterator[tuple[int, bytes]]:
        """``(leaf_index, canonical entry bytes)`` from the last leaf back to the first, as
        stored; the lock is taken per batch, as in :meth:`entries`."""
        end = self.size()
        while end > 0:
            start = max(0, end - _BATCH)
            yield from reversed(list(self._rows(start, end)))
            end = start

    def _rows(self, position: int, end: int) -> Iterator[tuple[int, bytes]]:
        while position < end:
            with self._lock:
                try:
                    rows = (
                        self._connection()
                        .execute(
                            "SELECT leaf_index, entry FROM entries "
                            "WHERE leaf_index >= ? AND leaf_index < ? "
                            "ORDER BY leaf_index LIMIT ?",
                            (position, end, _BATCH),
                        )
                        .fetchall()
                    )
                except sqlite3.Error as e:
                    raise _unavailable(e) from e
            if not rows:
                return
            for index, data in rows:
                yield int(index), bytes(data)
            position = int(rows[-1][0]) + 1

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> list[bytes]:
        """RFC 9162 2.1.3.1 audit path of leaf ``index`` in the tree of ``tree_size`` leaves."""
        with self._lock:
            conn = self._connection()
            try:
                size = _read_tree(conn).size
                tree_size = size if tree_size is None else tree_size
                _check_within(tree_size, size, "tree size")
                ranges = merkle.inclusion_proof_ranges(index, tree_size)
                return [_range_root(conn, start, end) for start, end in ranges]
            except sqlite3.Error as e:
                raise _unavailable(e) from e

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 2.1.4.1 proof that the tree of ``old_size`` is a prefix of ``new_size``."""
        with self._lock:
            conn = self._connection()
            try:
                size = _read_tree(conn).size
                new_size = size if new_size is None else new_size
                _check_within(new_size, size, "new tree size")
                ranges = merkle.consistency_proof_ranges(old_size, new_size)
                return [_range_root(conn, start, end) for start, end in ranges]
            except sqlite3.Error as e:
                raise _unavailable(e) from e

    def verify_integrity(self) -> None:
        """Recompute everything from the stored entry bytes; O(n). Raises IntegrityError.

        Checks that every entry parses and belongs to this node, that its stored leaf hash is
        its hash, that every stored subtree root is right and the tree row's compact range is
        the one the entries give.
        """
        with self._lock:
            conn = self._connection()
            try:
                with _snapshot(conn):
                    tree, stored_subtrees, expected_subtrees, rebuilt = self._rebuild(conn)
            except sqlite3.Error as e:
                raise _unavailable(e) from e
        if rebuilt.size != tree.size:
            raise IntegrityError(
                f"audit log is damaged: its tree has {tree.size} entries, {rebuilt.size} stored"
            )
        if rebuilt != tree:
            raise IntegrityError("audit log is damaged: the stored tree state is wrong")
        if stored_subtrees != expected_subtrees:
            wrong = sorted(
                set(stored_subtrees.items()).symmetric_difference(expected_subtrees.items())
            )
            level, idx = wrong[0][0]
            raise IntegrityError(
                f"audit log is damaged: subtree root over entries {idx << level} to "
                f"{((idx + 1) << level) - 1} is wrong"
            )

    def _rebuild(
        self, conn: sqlite3.Connection
    ) -> tuple[
        merkle.CompactRange,
        dict[tuple[int, int], bytes],
        dict[tuple[int, int], bytes],
        merkle.CompactRange,
    ]:
        """Stored tree and subtrees, and what the stored entries say they should be."""
        tree = _read_tree(conn)
        stored_subtrees = {
            (level, idx): bytes(h)
            for level, idx, h in conn.execute("SELECT level, idx, hash FROM subtrees")
        }
        rebuilt = merkle.CompactRange()
        expected_subtrees: dict[tuple[int, int], bytes] = {}
        for index, data, stored_hash in conn.execute(
            "SELECT leaf_index, entry, leaf_hash FROM entries ORDER BY leaf_index"
        ):
            if index != rebuilt.size:
                raise IntegrityError(f"audit log is damaged: entry {rebuilt.size} is missing")
            try:
                entry = AuditEntry.from_canonical(data)
            except InvalidRequest as e:
                raise IntegrityError(f"audit log is damaged: entry {index}: {e.message}") from None
            if entry.node_id != self._node_id:
                raise IntegrityError(
                    f"audit log is damaged: entry {index} is from {entry.node_id!r}"
                )
            leaf = merkle.leaf_hash(data)
            if leaf != stored_hash:
                raise IntegrityError(f"audit log is damaged: entry {index} does not match its hash")
            rebuilt, nodes = rebuilt.append_with_nodes(leaf)
            expected_subtrees.update(((n.level, n.index), n.hash) for n in nodes[1:])
        return tree, stored_subtrees, expected_subtrees, rebuilt

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _read_tree(conn: sqlite3.Connection) -> merkle.CompactRange:
    row = conn.execute("SELECT tree_size, frontier FROM tree WHERE id = 1").fetchone()
    if row is None:
        raise IntegrityError("audit log is damaged: its tree state is missing")
    try:
        return merkle.CompactRange.from_bytes(int(row[0]), bytes(row[1]))
    except InvalidRequest as e:
        raise IntegrityError(f"audit log is damaged: {e.message}") from None


def _range_root(conn: sqlite3.Connection, start: int, end: int) -> bytes:
    """MTH(D[start:end]) of a tree node, from the stored perfect subtrees it is made of."""
    hashes = []
    for level, idx in merkle.range_subtrees(start, end):
        if level == 0:
            row = conn.execute(
                "SELECT leaf_hash FROM entries WHERE leaf_index = ?", (idx,)
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT hash FROM subtrees WHERE level = ? AND idx = ?", (level, idx)
            ).fetchone()
        if row is None:
            first, last = idx << level, ((idx + 1) << level) - 1
            raise IntegrityError(
                f"audit log is damaged: no stored hash over entries {first} to {last}"
            )
        hashes.append(bytes(row[0]))
    return merkle.fold(hashes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_within(value: int, limit: int, what: str) -> None:
    if not _is_int(value) or not 0 <= value <= limit:
        raise InvalidRequest(f"{what} {value!r} is outside the log's range [0, {limit}]")


def _check_index(index: int, size: int) -> None:
    if not _is_int(index) or not 0 <= index < size:
        raise InvalidRequest(f"leaf index {index!r} is not in the log of {size} entries")


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: other processes' appends stay invisible until it ends."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        # The connection is broken; SQLite rolls back an unfinished transaction itself.
        pass
