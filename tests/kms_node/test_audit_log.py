"""AuditLog over SQLite: receipts, proofs, checkpoints, durability, tamper evidence, fail-closed."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import merkle
from core.audit import (
    AuditEntry,
    Checkpoint,
    Receipt,
    verified_leaf_hashes,
    verify_checkpoint,
    verify_checkpoint_consistency,
    verify_log,
    verify_receipt,
    verify_receipt_inclusion,
)
from core.errors import (
    HsmUnavailable,
    IntegrityError,
    InvalidRequest,
    PreconditionFailed,
    Unavailable,
)
from kms_node.audit_log import SCHEMA_VERSION, AuditLog
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.keystore import MemoryKeyStore

NODE = "node-1"
PATIENT = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
REQUESTER = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"


def make_entry(n: int, *, node_id: str = NODE, tag: str = "") -> AuditEntry:
    granted = n % 4 != 3
    return AuditEntry(
        request_id=f"req-{n}{tag}",
        node_id=node_id,
        time=1_700_000_000 + n,
        requester=REQUESTER,
        patient=PATIENT,
        record_id=n.to_bytes(32, "big"),
        capsule_hash=bytes([n % 256]) * 32,
        purpose_of_use="TREAT",
        decision="granted" if granted else "denied",
        reason_code="granted" if granted else "grant_revoked",
        reason="grant is active" if granted else "grant has been revoked by the patient",
        block_number=100 + n,
        block_hash=bytes([7]) * 32,
        cfrag_hash=bytes([9]) * 32 if granted else b"",
    )


@pytest.fixture
def keys() -> MemoryKeyStore:
    return MemoryKeyStore()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite3"


class FixedClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.5

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(db_path: Path, keys: MemoryKeyStore) -> Iterator[AuditLog]:
    audit = AuditLog(db_path, keys, NODE, clock=FixedClock())
    yield audit
    audit.close()


def fill(log: AuditLog, n: int, *, start: int = 0, tag: str = "") -> list[Receipt]:
    return [log.append(make_entry(i, tag=tag)) for i in range(start, start + n)]


def leaf_hashes(n: int, tag: str = "") -> list[bytes]:
    return [make_entry(i, tag=tag).leaf_hash() for i in range(n)]


# --- behaviour ---------------------------------------------------------------------------


def test_append_returns_a_signed_receipt(log: AuditLog, keys: MemoryKeyStore) -> None:
    for i in range(5):
        entry = make_entry(i)
        receipt = log.append(entry)
        assert (receipt.node_id, receipt.leaf_index, receipt.tree_size) == (NODE, i, i + 1)
        assert receipt.entry_hash == entry.leaf_hash()
        assert verify_receipt(receipt, keys.signing_public_key())
        assert log.entry(i) == entry
    assert log.size() == 5
    assert list(log.entries()) == [(i, make_entry(i).canonical_bytes()) for i in range(5)]
    assert [i for i, _ in log.entries(1, 3)] == [1, 2]
    assert list(log.entries(5, 5)) == []


def test_newest_first_reads_every_entry_back_across_batches(log: AuditLog) -> None:
    assert list(log.newest_first()) == []
    entries = [make_entry(i) for i in range(2345)]
    for start in range(0, len(entries), 1000):
        log.append_many(entries[start : start + 1000])
    assert list(log.newest_first()) == [
        (i, entries[i].canonical_bytes()) for i in reversed(range(2345))
    ]


def test_roots_at_every_size(log: AuditLog) -> None:
    assert log.root() == merkle.EMPTY_ROOT
    leaves = leaf_hashes(40)
    fill(log, 40)
    assert log.root() == merkle.root(leaves)
    for size in range(41):
        assert log.root(size) == merkle.root(leaves[:size])


def test_proofs_verify_and_equal_the_pure_ones(log: AuditLog) -> None:
    n = 37
    leaves = leaf_hashes(n)
    fill(log, n)
    for size in range(1, n + 1):
        root = merkle.root(leaves[:size])
        for index in range(size):
            proof = log.inclusion_proof(index, size)
            assert proof == merkle.inclusion_proof(index, leaves[:size])
            assert merkle.verify_inclusion(leaves[index], index, size, proof, root)
        for old in range(size + 1):
            proof = log.consistency_proof(old, size)
            assert proof == merkle.consistency_proof(old, leaves[:size])
            assert merkle.verify_consistency(old, size, merkle.root(leaves[:old]), root, proof)


def test_a_checkpoint_asked_again_in_its_second_is_not_signed_again(
    db_path: Path, keys: MemoryKeyStore
) -> None:
    """An auditor (or anyone holding an auditor certificate) looping on GetCheckpoint
    costs one HSM signature per second and tree, not one per call."""
    clock = FixedClock()
    audit = AuditLog(db_path, keys, NODE, clock=clock)
    signed: list[bytes] = []
    sign = keys.sign

    def counted(message: bytes) -> bytes:
        signed.append(message)
        return sign(message)

    keys.sign = counted  # type: ignore[method-assign]
    try:
        fill(audit, 3)
        first = audit.checkpoint()
        assert [audit.checkpoint() for _ in range(100)] == [first] * 100
        assert len(signed) == 1 + 3  # the checkpoint, and the three receipts
        fill(audit, 1, start=3)
        grown = audit.checkpoint()
        assert grown.tree_size == 4 and len(signed) == 1 + 4 + 1
        clock.now += 1
        later = audit.checkpoint()
        assert (later.tree_size, later.timestamp) == (4, grown.timestamp + 1)
        assert len(signed) == 7
        key = keys.signing_public_key()
        assert all(verify_checkpoint(c, key) for c in (first, grown, later))
    finally:
        audit.close()


def test_receipts_are_included_in_later_checkpoints(log: AuditLog, keys: MemoryKeyStore) -> None:
    key = keys.signing_public_key()
    receipts = fill(log, 11)
    first = log.checkpoint()
    receipts += fill(log, 30, start=11)
    second = log.checkpoint()
    assert verify_checkpoint(first, key) and verify_checkpoint(second, key)
    assert (first.tree_size, second.tree_size) == (11, 41)
    assert first.timestamp == 1_700_000_000
    for receipt in receipts:
        for checkpoint in (first, second):
            if receipt.leaf_index < checkpoint.tree_size:
                proof = log.inclusion_proof(receipt.leaf_index, checkpoint.tree_size)
                assert verify_receipt_inclusion(receipt, checkpoint, proof)
    proof = log.consistency_proof(first.tree_size, second.tree_size)
    assert verify_checkpoint_consistency(first, second, proof)
    result = verify_log(
        [data for _, data in log.entries()],
        second,
        key,
        known_leaf_hashes=verified_leaf_hashes(receipts, key),
    )
    assert result.ok, result.problem


def test_reopen_keeps_size_root_and_continues(db_path: Path, keys: MemoryKeyStore) -> None:
    log = AuditLog(db_path, keys, NODE)
    fill(log, 21)
    root = log.root()
    log.close()
    log = AuditLog(db_path, keys, NODE)
    try:
        assert (log.size(), log.root()) == (21, root)
        receipt = log.append(make_entry(21))
        assert receipt.leaf_index == 21
        assert log.root() == merkle.root(leaf_hashes(22))
        log.verify_integrity()
    finally:
        log.close()


def test_refuses_bad_arguments(log: AuditLog) -> None:
    fill(log, 4)
    with pytest.raises(InvalidRequest, match="entry is for node 'node-2'"):
        log.append(make_entry(4, node_id="node-2"))
    with pytest.raises(InvalidRequest, match="only an AuditEntry"):
        log.append(make_entry(4).canonical_bytes())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="not in the log of 4 entries"):
        log.entry(4)
    with pytest.raises(InvalidRequest, match="tree size 5 is outside"):
        log.inclusion_proof(0, 5)
    with pytest.raises(InvalidRequest, match="not in a tree of 2"):
        log.inclusion_proof(2, 2)
    with pytest.raises(InvalidRequest, match="larger than the new tree size"):
        log.consistency_proof(3, 2)
    with pytest.raises(InvalidRequest, match="outside"):
        log.root(5)
    with pytest.raises(InvalidRequest, match="start 3 is outside"):
        log.entries(3, 2)
    assert log.size() == 4


def test_schema_is_versioned_wal_and_private(log: AuditLog, db_path: Path) -> None:
    fill(log, 1)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    wal = db_path.with_name(db_path.name + "-wal")
    assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_refuses_an_unknown_schema_version(db_path: Path, keys: MemoryKeyStore) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(PreconditionFailed, match="schema version 99"):
        AuditLog(db_path, keys, NODE)


def test_refuses_another_nodes_log(db_path: Path, keys: MemoryKeyStore) -> None:
    AuditLog(db_path, keys, NODE).close()
    with pytest.raises(PreconditionFailed, match="belongs to node 'node-1', not 'node-2'"):
        AuditLog(db_path, keys, "node-2")


def test_repr_names_no_key(log: AuditLog) -> None:
    assert repr(log).startswith("AuditLog(") and "MemoryKeyStore" not in repr(log)


def test_concurrent_appends_from_eight_threads(log: AuditLog) -> None:
    errors: list[BaseException] = []
    receipts: list[Receipt] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                receipts.append(log.append(make_entry(worker * 1000 + i)))
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.leaf_index for r in receipts) == list(range(200))
    by_index = {r.leaf_index: r.entry_hash for r in receipts}
    assert log.root() == merkle.root([by_index[i] for i in range(200)])
    log.verify_integrity()


class GatedSigner(MemoryKeyStore):
    """A key store whose first signature waits for the test: the append that makes it
    holds the log's commit lock meanwhile, so the appends started then queue up."""

    def __init__(self, *, fail_second: bool = False) -> None:
        super().__init__()
        self.signing = threading.Event()
        self.release = threading.Event()
        self.signatures = 0
        self._fail_second = fail_second

    def sign(self, message: bytes) -> bytes:
        self.signatures += 1
        if self.signatures == 1:
            self.signing.set()
            assert self.release.wait(10)
        elif self.signatures == 2 and self._fail_second:
            raise HsmUnavailable("the test's HSM is gone")
        return super().sign(message)


def _append_in_threads(
    log: AuditLog, keys: GatedSigner, batches: list[list[AuditEntry]]
) -> dict[int, list[Receipt] | BaseException]:
    """The first batch makes the gated signature; the others are appended meanwhile."""
    outcomes: dict[int, list[Receipt] | BaseException] = {}

    def work(i: int) -> None:
        try:
            outcomes[i] = log.append_many(batches[i])
        except BaseException as e:  # collected for the main thread
            outcomes[i] = e

    first = threading.Thread(target=work, args=(0,))
    first.start()
    assert keys.signing.wait(10)
    others = [threading.Thread(target=work, args=(i,)) for i in range(1, len(batches))]
    for thread in others:
        thread.start()
    # Every other append is queued behind the commit under way before it is let go.
    for _ in range(1000):
        if len(log._pending) == len(others):
            break
        threading.Event().wait(0.005)
    assert len(log._pending) == len(others)
    keys.release.set()
    for thread in [first, *others]:
        thread.join(10)
    return outcomes


def test_appends_waiting_on_a_commit_share_the_next_one(db_path: Path) -> None:
    keys = GatedSigner()
    log = AuditLog(db_path, keys, NODE)
    try:
        batches = [[make_entry(0)], [make_entry(1)], [make_entry(2), make_entry(3)]]
        outcomes = _append_in_threads(log, keys, batches)
        first, *others = [outcomes[i] for i in range(3)]
        waited = [o for o in others if isinstance(o, list)]
        assert isinstance(first, list) and len(waited) == len(others)
        # The waiting appends went in one commit: one signature for 3 entries of 2 callers.
        assert keys.signatures == 2
        grouped = [r for receipts in waited for r in receipts]
        assert len({r.signature for r in grouped}) == 1
        assert {(r.batch_start, r.batch_size, r.tree_size) for r in grouped} == {(1, 3, 4)}
        # Each caller got its own entries' receipts, and each verifies on its own.
        for batch, receipts in zip(batches, [first, *waited], strict=True):
            assert [r.entry_hash for r in receipts] == [
                merkle.leaf_hash(e.canonical_bytes()) for e in batch
            ]
        key = keys.signing_public_key()
        assert all(verify_receipt(r, key) for r in [*first, *grouped])
        log.verify_integrity()
    finally:
        log.close()


def test_a_failed_group_commit_fails_every_append_in_it(db_path: Path) -> None:
    keys = GatedSigner(fail_second=True)
    log = AuditLog(db_path, keys, NODE)
    try:
        batches = [[make_entry(0)], [make_entry(1)], [make_entry(2)]]
        outcomes = _append_in_threads(log, keys, batches)
        assert isinstance(outcomes[0], list)
        assert isinstance(outcomes[1], HsmUnavailable) and isinstance(outcomes[2], HsmUnavailable)
        # Fail closed: nothing of the failed group was written, and the log goes on.
        assert (log.size(), _row_count(db_path)) == (1, 1)
        assert log.append(make_entry(3)).leaf_index == 1
    finally:
        log.close()


def test_too_many_entries_at_once_are_refused_whole(log: AuditLog) -> None:
    with pytest.raises(InvalidRequest, match="at most 1024 entries"):
        log.append_many([make_entry(n) for n in range(1025)])
    assert log.size() == 0


def test_two_connections_append_to_one_log(db_path: Path, keys: MemoryKeyStore) -> None:
    # As two node processes would: the tree state is read inside each write transaction.
    first, second = AuditLog(db_path, keys, NODE), AuditLog(db_path, keys, NODE)
    try:
        for i in range(10):
            assert (first if i % 2 else second).append(make_entry(i)).leaf_index == i
        assert first.root() == second.root() == merkle.root(leaf_hashes(10))
        first.verify_integrity()
    finally:
        first.close()
        second.close()


# --- durability: kill -9 -----------------------------------------------------------------

_CHILD = """
import sys
from pathlib import Path
from core.audit import AuditEntry
from kms_node.audit_log import AuditLog
from kms_node.keystore import MemoryKeyStore

keys = MemoryKeyStore()
log = AuditLog(Path(sys.argv[1]), keys, "node-1")
print("key", keys.signing_public_key().hex(), flush=True)
for i in range(1_000_000):
    receipt = log.append(AuditEntry(
        request_id=f"req-{i}", node_id="node-1", time=1_700_000_000 + i,
        requester="0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2",
        patient="0x5B38Da6a701c568545dCfcB03FcB875f56beddC4",
        record_id=i.to_bytes(32, "big"), capsule_hash=bytes(32), purpose_of_use="TREAT",
        decision="granted", reason_code="granted", reason="grant is active",
        block_number=i, block_hash=bytes(32), cfrag_hash=bytes([1]) * 32,
    ))
    print("ok", receipt.leaf_index, receipt.entry_hash.hex(), receipt.signature.hex(), flush=True)
"""


def test_every_receipt_survives_kill_9(db_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    receipts: list[Receipt] = []
    try:
        tag, key_hex = child.stdout.readline().split()
        assert tag == "key"
        while len(receipts) < 300:
            line = child.stdout.readline()
            assert line.startswith("ok "), f"child said {line!r}"
            _, index, entry_hash, signature = line.split()
            receipts.append(Receipt(NODE, int(index), int(index) + 1, bytes.fromhex(entry_hash)))
            receipts[-1] = dataclasses.replace(receipts[-1], signature=bytes.fromhex(signature))
        # Killed right after reading a receipt: the child is mid-way through further appends.
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    key = bytes.fromhex(key_hex)
    log = AuditLog(db_path, MemoryKeyStore(), NODE)
    try:
        log.verify_integrity()
        size, root = log.size(), log.root()
        assert size >= len(receipts)
        for receipt in receipts:
            assert verify_receipt(receipt, key)
            assert log.entry(receipt.leaf_index).leaf_hash() == receipt.entry_hash
            proof = log.inclusion_proof(receipt.leaf_index, size)
            assert merkle.verify_inclusion(
                receipt.entry_hash, receipt.leaf_index, size, proof, root
            )
        # And the log carries on where it stopped.
        assert log.append(make_entry(size)).leaf_index == size
    finally:
        log.close()


# --- tamper evidence ----------------------------------------------------------------------


class Tampered:
    """A log of 20 entries whose receipts and checkpoint an auditor kept, before tampering."""

    def __init__(self, db_path: Path, keys: MemoryKeyStore) -> None:
        self.path = db_path
        self.key = keys.signing_public_key()
        log = AuditLog(db_path, keys, NODE)
        try:
            self.receipts = fill(log, 20)
            self.checkpoint = log.checkpoint()
        finally:
            log.close()
        self.known = verified_leaf_hashes(self.receipts, self.key)

    def sql(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            for statement, args in statements:
                conn.execute(statement, args)
        finally:
            conn.close()

    def stored(self, index: int) -> bytes:
        conn = sqlite3.connect(self.path)
        try:
            (data,) = conn.execute(
                "SELECT entry FROM entries WHERE leaf_index = ?", (index,)
            ).fetchone()
        finally:
            conn.close()
        return bytes(data)

    def raw_rows(self) -> list[tuple[int, bytes]]:
        """What a node that skipped its own checks would serve: the rows as they are."""
        conn = sqlite3.connect(self.path)
        try:
            return [
                (int(i), bytes(e))
                for i, e in conn.execute("SELECT leaf_index, entry FROM entries ORDER BY 1")
            ]
        finally:
            conn.close()

    def served_rows(self) -> list[tuple[int, bytes]]:
        log = AuditLog(self.path, MemoryKeyStore(), NODE)
        try:
            return list(log.entries())
        finally:
            log.close()

    def audit(
        self, rows: list[tuple[int, bytes]], *, receipts: bool = True
    ) -> tuple[int | None, str]:
        result = verify_log(
            rows, self.checkpoint, self.key, known_leaf_hashes=self.known if receipts else None
        )
        assert not result.ok
        return result.entry_index, result.problem


@pytest.fixture
def tampered(db_path: Path, keys: MemoryKeyStore) -> Tampered:
    return Tampered(db_path, keys)


def test_intact_log_passes_the_audit(tampered: Tampered) -> None:
    result = verify_log(
        tampered.served_rows(), tampered.checkpoint, tampered.key, known_leaf_hashes=tampered.known
    )
    assert result.ok, result.problem


def test_one_changed_byte_is_named(tampered: Tampered) -> None:
    data = tampered.stored(6)
    # One hex digit of the capsule hash: the entry still parses, only its hash tells.
    at = data.index(b'"capsule_hash":"0x') + len(b'"capsule_hash":"0x')
    changed = data[:at] + (b"1" if data[at : at + 1] != b"1" else b"2") + data[at + 1 :]
    assert AuditEntry.from_canonical(changed) != AuditEntry.from_canonical(data)
    tampered.sql(("UPDATE entries SET entry = ? WHERE leaf_index = 6", (changed,)))
    rows = tampered.served_rows()  # the node still opens: only the newest entries are checked
    assert tampered.audit(rows) == (6, "entry 6 differs from the entry the node vouched for")
    assert tampered.audit(rows, receipts=False) == (
        None,
        "the first 20 entries do not have the checkpoint's root",
    )
    log = AuditLog(tampered.path, MemoryKeyStore(), NODE)
    try:
        with pytest.raises(IntegrityError, match="entry 6 does not match its hash"):
            log.verify_integrity()
    finally:
        log.close()


def test_a_deleted_row_is_named(tampered: Tampered) -> None:
    tampered.sql(("DELETE FROM entries WHERE leaf_index = 9", ()))
    with pytest.raises(IntegrityError, match="its tree has 20 entries but 19 are stored"):
        AuditLog(tampered.path, MemoryKeyStore(), NODE)
    rows = tampered.raw_rows()
    assert tampered.audit(rows) == (9, "entry 9 is missing: the next row is 10")
    # Renumbered to hide the gap, the entry that moved into its place is named.
    renumbered = [(i, data) for i, (_, data) in enumerate(rows)]
    assert tampered.audit(renumbered) == (9, "entry 9 differs from the entry the node vouched for")


def test_swapped_rows_are_named(tampered: Tampered) -> None:
    four, eleven = tampered.stored(4), tampered.stored(11)
    tampered.sql(
        ("UPDATE entries SET entry = ? WHERE leaf_index = 4", (eleven,)),
        ("UPDATE entries SET entry = ? WHERE leaf_index = 11", (four,)),
    )
    rows = tampered.served_rows()
    assert tampered.audit(rows) == (4, "entry 4 differs from the entry the node vouched for")
    assert tampered.audit(rows, receipts=False)[1].endswith("do not have the checkpoint's root")


def test_truncated_and_reappended_log_is_named(tampered: Tampered) -> None:
    # A careful forger: drop entries 13.., fix every stored hash and the tree state, then
    # let the node append different entries. The log is self-consistent, but a fork.
    keep = 13
    kept = leaf_hashes(keep)
    compact = merkle.CompactRange.from_leaf_hashes(kept)
    tampered.sql(
        ("DELETE FROM entries WHERE leaf_index >= ?", (keep,)),
        ("DELETE FROM subtrees WHERE ((idx + 1) << level) > ?", (keep,)),
        (
            "UPDATE tree SET tree_size = ?, frontier = ? WHERE id = 1",
            (compact.size, compact.to_bytes()),
        ),
    )
    keys = MemoryKeyStore()
    log = AuditLog(tampered.path, keys, NODE)
    try:
        log.verify_integrity()
        fill(log, 7, start=keep, tag="-forged")
        log.verify_integrity()
        assert log.size() == 20
        # The node cannot prove its new tree extends the one the auditor holds.
        assert not verify_checkpoint_consistency(
            tampered.checkpoint, log.checkpoint(), log.consistency_proof(20, 20)
        )
        rows = list(log.entries())
    finally:
        log.close()
    assert tampered.audit(rows) == (
        keep,
        f"entry {keep} differs from the entry the node vouched for",
    )
    assert tampered.audit(rows, receipts=False)[0] is None


def test_open_detects_a_damaged_tail(tampered: Tampered) -> None:
    data = tampered.stored(19)
    tampered.sql(("UPDATE entries SET entry = ? WHERE leaf_index = 19", (data + b" ",)))
    with pytest.raises(IntegrityError, match="entry 19 does not match its hash"):
        AuditLog(tampered.path, MemoryKeyStore(), NODE)


def test_open_detects_a_wrong_newest_subtree(tampered: Tampered) -> None:
    # 20 = 16 + 4: the newest subtree covers entries 16..19; rewrite one of their hashes.
    tampered.sql(("UPDATE entries SET leaf_hash = ? WHERE leaf_index = 17", (bytes(32),)))
    with pytest.raises(IntegrityError, match="entries 16 to 19 do not match the stored tree"):
        AuditLog(tampered.path, MemoryKeyStore(), NODE)


def test_verify_integrity_detects_a_wrong_subtree(tampered: Tampered) -> None:
    tampered.sql(("UPDATE subtrees SET hash = ? WHERE level = 2 AND idx = 1", (bytes(32),)))
    log = AuditLog(tampered.path, MemoryKeyStore(), NODE)
    try:
        with pytest.raises(IntegrityError, match="subtree root over entries 4 to 7 is wrong"):
            log.verify_integrity()
    finally:
        log.close()


# --- fail closed ------------------------------------------------------------------------------


def _row_count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        (n,) = conn.execute("SELECT count(*) FROM entries").fetchone()
    finally:
        conn.close()
    return int(n)


def test_closed_log_refuses(log: AuditLog) -> None:
    fill(log, 3)
    log.close()
    for call in (lambda: log.append(make_entry(3)), log.size, log.checkpoint, log.root):
        with pytest.raises(Unavailable, match="audit log unavailable: it is closed"):
            call()
    log.close()  # idempotent


def test_failed_write_leaves_no_partial_entry(log: AuditLog, db_path: Path) -> None:
    fill(log, 5)
    root = log.root()
    # The entry row is written, then the tree update fails: the whole append must roll back.
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "CREATE TRIGGER fail BEFORE UPDATE ON tree BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
    )
    try:
        with pytest.raises(Unavailable, match="audit log unavailable: disk I/O error"):
            log.append(make_entry(5))
        assert (log.size(), log.root(), _row_count(db_path)) == (5, root, 5)
    finally:
        conn.execute("DROP TRIGGER fail")
        conn.close()
    assert log.append(make_entry(5)).leaf_index == 5
    log.verify_integrity()


def test_locked_database_is_unavailable(db_path: Path, keys: MemoryKeyStore) -> None:
    log = AuditLog(db_path, keys, NODE, busy_timeout_ms=50)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        fill(log, 2)
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Unavailable, match="audit log unavailable: database is locked"):
            log.append(make_entry(2))
        other.execute("ROLLBACK")
        assert log.size() == 2
        assert log.append(make_entry(2)).leaf_index == 2
    finally:
        other.close()
        log.close()


def test_read_only_database_is_unavailable(db_path: Path, keys: MemoryKeyStore) -> None:
    log = AuditLog(db_path, keys, NODE)
    try:
        fill(log, 2)
        # What a read-only file or volume does to SQLite, on this one connection (file modes
        # do not stop root, whom the tests may run as).
        conn = log._conn
        assert conn is not None
        conn.execute("PRAGMA query_only = ON")
        with pytest.raises(Unavailable, match="audit log unavailable: attempt to write a readonly"):
            log.append(make_entry(2))
        assert log.size() == 2
        conn.execute("PRAGMA query_only = OFF")
        assert log.append(make_entry(2)).leaf_index == 2
    finally:
        log.close()


def test_key_store_failure_writes_nothing(
    log: AuditLog, keys: MemoryKeyStore, db_path: Path
) -> None:
    fill(log, 3)
    keys.close()
    with pytest.raises(HsmUnavailable):
        log.append(make_entry(3))
    assert (log.size(), _row_count(db_path)) == (3, 3)


def test_unopenable_path_is_unavailable(tmp_path: Path, keys: MemoryKeyStore) -> None:
    with pytest.raises(Unavailable, match="cannot open the audit log"):
        AuditLog(tmp_path / "missing-dir" / "audit.sqlite3", keys, NODE)


# --- the real HSM -------------------------------------------------------------------------------


@pytest.mark.softhsm
def test_checkpoint_and_receipt_signed_in_softhsm(db_path: Path, hsm_store: Pkcs11KeyStore) -> None:
    log = AuditLog(db_path, hsm_store, NODE)
    try:
        receipts = fill(log, 9)
        checkpoint = log.checkpoint()
    finally:
        log.close()
    key = hsm_store.signing_public_key()
    assert isinstance(checkpoint, Checkpoint)
    assert verify_checkpoint(checkpoint, key)
    assert all(verify_receipt(r, key) for r in receipts)
    assert not verify_checkpoint(dataclasses.replace(checkpoint, tree_size=8), key)


def test_a_batch_shares_one_signature_and_each_receipt_verifies(
    log: AuditLog, keys: MemoryKeyStore
) -> None:
    fill(log, 3)
    key = keys.signing_public_key()
    receipts = log.append_many([make_entry(n) for n in range(3, 10)])
    assert len({r.signature for r in receipts}) == 1
    assert [r.leaf_index for r in receipts] == list(range(3, 10))
    assert {(r.batch_start, r.batch_size, r.tree_size) for r in receipts} == {(3, 7, 10)}
    assert all(verify_receipt(r, key) for r in receipts)
    # Each still proves its own entry, at its own index, in the later checkpoint.
    checkpoint = log.checkpoint()
    for r in receipts:
        proof = log.inclusion_proof(r.leaf_index, checkpoint.tree_size)
        assert verify_receipt_inclusion(r, checkpoint, proof)
    # Another entry's hash, another index or another path does not verify.
    r = receipts[2]
    assert not verify_receipt(dataclasses.replace(r, entry_hash=receipts[3].entry_hash), key)
    assert not verify_receipt(dataclasses.replace(r, leaf_index=r.leaf_index + 1), key)
    assert not verify_receipt(dataclasses.replace(r, batch_path=receipts[3].batch_path), key)
    assert not verify_receipt(dataclasses.replace(r, batch_path=r.batch_path[:-1]), key)
    assert not verify_receipt(dataclasses.replace(r, batch_size=6), key)
