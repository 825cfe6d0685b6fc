"""KfragStore over SQLite: behaviour, persistence, and durability across kill -9."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidRequest, PreconditionFailed, Unauthenticated, Unavailable
from kms_node.kfrag_store import (
    ENROLLMENT_NONCE_KEPT_S,
    SCHEMA_VERSION,
    EnrollmentAlreadyStored,
    EnrollmentSuperseded,
    KfragStore,
    StoredKfrag,
)

PATIENT = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
GRANTEE = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"
OTHER_GRANTEE = "0x4B20993Bc481177ec7E8f571ceCaE8A9e22C02db"
LAB = 1


def _item(patient: str = PATIENT, grantee: str = GRANTEE, n: int = 1) -> StoredKfrag:
    return StoredKfrag(
        patient=patient,
        grantee=grantee,
        record_type=LAB,
        wrapped=bytes([n]) * 338,
        kfrag_sha256=bytes([n]) * 32,
        receiving_key=b"\x02" + bytes([n]) * 32,
        created_at=1_700_000_000 + n,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "kfrags.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[KfragStore]:
    kfrags = KfragStore(db_path)
    yield kfrags
    kfrags.close()


def test_roundtrip(store: KfragStore) -> None:
    item = _item()
    store.put(item)
    assert store.get(PATIENT, GRANTEE, LAB) == item
    assert store.count() == 1


def test_missing_is_none(store: KfragStore) -> None:
    assert store.get(PATIENT, GRANTEE, LAB) is None
    store.put(_item())
    assert store.get(PATIENT, OTHER_GRANTEE, LAB) is None
    assert store.get(GRANTEE, PATIENT, LAB) is None


def test_addresses_match_in_any_case(store: KfragStore) -> None:
    store.put(_item())
    found = store.get(PATIENT.lower(), GRANTEE.upper().replace("0X", "0x"), LAB)
    assert found == _item()  # returned as stored: checksummed


def test_put_replaces_the_kfrag_for_the_pair(store: KfragStore) -> None:
    store.put(_item(n=1))
    store.put(_item(patient=PATIENT.lower(), n=2))
    store.put(_item(grantee=OTHER_GRANTEE, n=3))
    assert store.count() == 2
    assert store.get(PATIENT, GRANTEE, LAB) == _item(patient=PATIENT.lower(), n=2)
    assert store.get(PATIENT, OTHER_GRANTEE, LAB) == _item(grantee=OTHER_GRANTEE, n=3)


def test_delete(store: KfragStore) -> None:
    store.put(_item())
    store.put(_item(grantee=OTHER_GRANTEE))
    assert store.delete(PATIENT, GRANTEE) is True
    assert store.delete(PATIENT, GRANTEE) is False
    assert store.get(PATIENT, GRANTEE, LAB) is None
    assert store.get(PATIENT, OTHER_GRANTEE, LAB) is not None
    assert store.count() == 1


def test_persists_across_reopen(db_path: Path) -> None:
    first = KfragStore(db_path)
    first.put(_item())
    first.close()
    second = KfragStore(db_path)
    try:
        assert second.get(PATIENT, GRANTEE, LAB) == _item()
    finally:
        second.close()


@pytest.mark.parametrize(
    ("patient", "grantee"),
    [
        ("did:ethr:" + PATIENT, GRANTEE),
        (PATIENT, GRANTEE[:-1]),
        (PATIENT[2:], GRANTEE),
        (PATIENT, GRANTEE + "0"),
        (PATIENT, "0x" + "g" * 40),
    ],
)
def test_refuses_malformed_addresses(store: KfragStore, patient: str, grantee: str) -> None:
    with pytest.raises(InvalidRequest, match="address"):
        store.put(_item(patient=patient, grantee=grantee))
    with pytest.raises(InvalidRequest, match="address"):
        store.get(patient, grantee, LAB)
    with pytest.raises(InvalidRequest, match="address"):
        store.delete(patient, grantee)


def test_refuses_a_malformed_item(store: KfragStore) -> None:
    item = _item()
    for bad in (
        StoredKfrag(PATIENT, GRANTEE, LAB, b"", item.kfrag_sha256, item.receiving_key, 1),
        StoredKfrag(PATIENT, GRANTEE, LAB, item.wrapped, b"\x00" * 31, item.receiving_key, 1),
        StoredKfrag(PATIENT, GRANTEE, LAB, item.wrapped, item.kfrag_sha256, b"", 1),
    ):
        with pytest.raises(InvalidRequest):
            store.put(bad)
    assert store.count() == 0


def test_repr_has_no_key_material() -> None:
    text = repr(_item())
    assert PATIENT in text
    assert "wrapped" not in text and "receiving_key" not in text


def test_schema_is_versioned_wal_and_private(store: KfragStore, db_path: Path) -> None:
    check = sqlite3.connect(db_path)
    try:
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        check.close()
    assert store._conn is not None
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_refuses_an_unknown_schema_version(db_path: Path) -> None:
    KfragStore(db_path).close()
    newer = sqlite3.connect(db_path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(PreconditionFailed, match="schema version"):
        KfragStore(db_path)


_VERSION_2_SCHEMA = """
CREATE TABLE kfrags (
    patient_key TEXT NOT NULL, grantee_key TEXT NOT NULL, record_type INTEGER NOT NULL,
    patient TEXT NOT NULL, grantee TEXT NOT NULL, wrapped BLOB NOT NULL,
    kfrag_sha256 BLOB NOT NULL CHECK (length(kfrag_sha256) = 32),
    receiving_key BLOB NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (patient_key, grantee_key, record_type)
) WITHOUT ROWID
"""


def test_a_version_2_store_opens_with_its_kfrags_under_the_first_kek(db_path: Path) -> None:
    """Stores written before key-encryption keys had generations."""
    old = sqlite3.connect(db_path)
    old.execute(_VERSION_2_SCHEMA)
    item = _item()
    old.execute(
        "INSERT INTO kfrags VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (PATIENT.lower(), GRANTEE.lower(), LAB, PATIENT, GRANTEE, item.wrapped,
         item.kfrag_sha256, item.receiving_key, item.created_at),
    )  # fmt: skip
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()
    store = KfragStore(db_path)
    try:
        assert store.get(PATIENT, GRANTEE, LAB) == dataclasses.replace(item, kek_generation=1)
        assert store.generations() == {1}
        assert store.shredded_through() is None
    finally:
        store.close()
    check = sqlite3.connect(db_path)
    assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    check.close()


def test_a_version_4_store_opens_with_its_kfrags_replaceable_by_any_enrollment(
    db_path: Path,
) -> None:
    """Stores written before enrollments were recorded: their kfrags' enrollment deadline
    is unknown (0), so the next enrollment replaces them whatever its deadline."""
    old = sqlite3.connect(db_path)
    old.execute(_VERSION_2_SCHEMA)
    old.execute("ALTER TABLE kfrags ADD COLUMN kek_generation INTEGER NOT NULL DEFAULT 1")
    old.execute("CREATE TABLE shredding (id INTEGER PRIMARY KEY, through_block INTEGER)")
    old.execute("INSERT INTO shredding VALUES (1, 77)")
    item = _item()
    old.execute(
        "INSERT INTO kfrags VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 2)",
        (PATIENT.lower(), GRANTEE.lower(), LAB, PATIENT, GRANTEE, item.wrapped,
         item.kfrag_sha256, item.receiving_key, item.created_at),
    )  # fmt: skip
    old.execute("PRAGMA user_version = 4")
    old.commit()
    old.close()
    store = KfragStore(db_path)
    try:
        assert store.get(PATIENT, GRANTEE, LAB) == dataclasses.replace(item, kek_generation=2)
        assert store.shredded_through() == 77
        enrolled = _enrolled(1, n=2)
        store.put_enrollment([enrolled], nonce=_nonce(1), retain_types={LAB}, now=NOW)
        assert store.get(PATIENT, GRANTEE, LAB) == enrolled
    finally:
        store.close()


def test_a_version_3_store_opens_with_no_shredding_record(db_path: Path) -> None:
    """Stores written before the shredding record: the grant index snapshot beside one is
    not trusted (kms_node/index_snapshot.py), until the node records a block."""
    old = sqlite3.connect(db_path)
    old.execute(_VERSION_2_SCHEMA)
    old.execute("ALTER TABLE kfrags ADD COLUMN kek_generation INTEGER NOT NULL DEFAULT 1")
    old.execute("PRAGMA user_version = 3")
    old.commit()
    old.close()
    store = KfragStore(db_path)
    try:
        assert store.shredded_through() is None
        store.record_shredded_through(1234)
    finally:
        store.close()
    reopened = KfragStore(db_path)
    try:
        assert reopened.shredded_through() == 1234
    finally:
        reopened.close()


def test_the_shredding_record_holds_the_last_block_recorded(store: KfragStore) -> None:
    assert store.shredded_through() is None
    store.record_shredded_through(0)
    assert store.shredded_through() == 0
    store.record_shredded_through(90)
    store.record_shredded_through(70)  # after a reorganisation: the snapshot's block, as is
    assert store.shredded_through() == 70
    for bad in (-1, True, 1.5, "90"):
        with pytest.raises(InvalidRequest, match="shredding block"):
            store.record_shredded_through(bad)  # type: ignore[arg-type]
    assert store.shredded_through() == 70


def test_a_shredded_kfrag_is_in_neither_the_database_nor_its_wal(
    store: KfragStore, db_path: Path
) -> None:
    marker = b"SHRED-ME" * 40
    kept = _item(grantee=OTHER_GRANTEE, n=7)
    store.put(kept)
    store.put(dataclasses.replace(_item(), wrapped=marker))

    def on_disk() -> bytes:
        wal = Path(f"{db_path}-wal")
        return db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    assert marker in on_disk()  # written: in the WAL (and maybe the file)
    assert store.delete(PATIENT, GRANTEE)
    assert marker not in on_disk()
    assert store.get(PATIENT, OTHER_GRANTEE, LAB) == kept  # the others are untouched


def test_a_reader_defers_a_shreds_checkpoint_but_not_the_shred(
    store: KfragStore, db_path: Path
) -> None:
    """Best effort: with another connection reading the store, a shred still deletes and
    returns at once (not after the 5 s busy timeout), leaving the kfrag's frames in the
    WAL; the next shred after the reader is done empties them out."""
    marker = b"SHRED-ME" * 40
    store.put(dataclasses.replace(_item(), wrapped=marker))
    store.put(_item(grantee=OTHER_GRANTEE, n=7))

    def on_disk() -> bytes:
        wal = Path(f"{db_path}-wal")
        return db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    with closing(sqlite3.connect(db_path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM kfrags").fetchone()  # holds its snapshot
        started = time.monotonic()
        assert store.delete(PATIENT, GRANTEE)
        assert time.monotonic() - started < 1
        assert store.get(PATIENT, GRANTEE, LAB) is None
        assert marker in on_disk()  # the checkpoint could not empty the WAL
        reader.execute("COMMIT")
    assert store.delete(PATIENT, OTHER_GRANTEE)
    assert marker not in on_disk()


def test_closed_store_refuses(store: KfragStore) -> None:
    store.close()
    with pytest.raises(Unavailable, match="closed"):
        store.get(PATIENT, GRANTEE, LAB)
    store.close()  # idempotent


def test_unreadable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        KfragStore(tmp_path / "missing-dir" / "kfrags.sqlite3")


def test_concurrent_use_from_eight_threads(store: KfragStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                grantee = f"0x{n * 1000 + i:040x}"
                item = _item(grantee=grantee, n=i % 256)
                store.put(item)
                assert store.get(PATIENT, grantee, LAB) == item
                if i % 2:
                    assert store.delete(PATIENT, grantee)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.count() == 8 * 25


_CHILD = """
import sys
from pathlib import Path
from kms_node.kfrag_store import KfragStore, StoredKfrag

store = KfragStore(Path(sys.argv[1]))
for i in range(100_000):
    store.put(StoredKfrag(
        patient="0x5B38Da6a701c568545dCfcB03FcB875f56beddC4",
        grantee="0x%040x" % i,
        record_type=1,
        wrapped=i.to_bytes(4, "big") * 80,
        kfrag_sha256=bytes(32),
        receiving_key=b"\\x02" + bytes(32),
        created_at=i,
    ))
    print("ok", i, flush=True)
"""


def test_acknowledged_puts_survive_kill_9(db_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = -1
    try:
        while acknowledged < 25:
            line = child.stdout.readline()
            assert line.startswith("ok "), f"child said {line!r}"
            acknowledged = int(line.split()[1])
        # Killed right after reading "ok": the child is mid-way through further puts.
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    store = KfragStore(db_path)
    try:
        for i in range(acknowledged + 1):
            found = store.get(PATIENT, f"0x{i:040x}", LAB)
            assert found is not None, f"acknowledged put {i} lost"
            assert found.wrapped == i.to_bytes(4, "big") * 80
        assert store.count() >= acknowledged + 1
    finally:
        store.close()


def test_kfrags_are_kept_per_record_type_and_delete_shreds_them_all(store: KfragStore) -> None:
    lab, diagnosis = _item(n=1), dataclasses.replace(_item(n=2), record_type=0)
    store.put_many([lab, diagnosis])
    assert store.get(PATIENT, GRANTEE, LAB) == lab
    assert store.get(PATIENT, GRANTEE, 0) == diagnosis
    assert store.get(PATIENT, GRANTEE, 2) is None
    assert store.delete(PATIENT, GRANTEE) is True
    assert store.count() == 0


def test_put_many_is_all_or_nothing(store: KfragStore) -> None:
    bad = dataclasses.replace(_item(n=2), record_type=0, wrapped=b"")
    with pytest.raises(InvalidRequest):
        store.put_many([_item(), bad])
    assert store.count() == 0


def _enrolled(deadline: int, n: int = 1, **changes: Any) -> StoredKfrag:
    return dataclasses.replace(_item(n=n), enrolled_deadline=deadline, **changes)


def _nonce(n: int) -> bytes:
    return bytes([n]) * 32


NOW = 1_700_000_000


def test_a_grant_replacement_drops_the_types_it_no_longer_covers(store: KfragStore) -> None:
    diagnosis = _enrolled(NOW + 300, n=2, record_type=0)
    store.put_enrollment(
        [_enrolled(NOW + 300), diagnosis], nonce=_nonce(1), retain_types={0, LAB}, now=NOW
    )
    store.put(_item(grantee=OTHER_GRANTEE))
    imaging = _enrolled(NOW + 300, n=4, record_type=2)
    store.put(imaging)
    replacement = _enrolled(NOW + 300, n=3)
    store.put_enrollment([replacement], nonce=_nonce(2), retain_types={LAB, 2}, now=NOW)
    assert store.get(PATIENT, GRANTEE, LAB) == replacement
    assert store.get(PATIENT, GRANTEE, 0) is None  # no longer covered: shredded
    assert store.get(PATIENT, GRANTEE, 2) == imaging  # still covered: kept
    assert store.get(PATIENT, OTHER_GRANTEE, LAB) is not None  # another grant is untouched


@pytest.mark.parametrize(
    ("items", "nonce", "message"),
    [
        ([_enrolled(NOW), _enrolled(NOW, grantee=OTHER_GRANTEE)], _nonce(1), "one grant"),
        ([_enrolled(NOW), _enrolled(NOW + 1, n=2, record_type=0)], _nonce(1), "one grant"),
        ([], _nonce(1), "one grant"),
        ([_item()], _nonce(1), "carry its deadline"),
        ([_enrolled(NOW)], b"\x01" * 31, "32 bytes"),
        ([_enrolled(-1)], _nonce(1), "must not be negative"),
    ],
)
def test_refuses_a_malformed_enrollment(
    store: KfragStore, items: list[StoredKfrag], nonce: bytes, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        store.put_enrollment(items, nonce=nonce, retain_types={LAB}, now=NOW)
    assert store.count() == 0


def test_an_enrollment_is_stored_once_even_across_a_restart(db_path: Path) -> None:
    """The nonce is written with the kfrags, durably: the node's replay memory (not
    fsync'd, and an operator may delete it) is not what stops a replay."""
    first, second = _enrolled(NOW + 300, n=1), _enrolled(NOW + 300, n=2)
    store = KfragStore(db_path)
    store.put_enrollment([first], nonce=_nonce(1), retain_types={LAB}, now=NOW)
    store.put_enrollment([second], nonce=_nonce(2), retain_types={LAB}, now=NOW)
    store.close()
    reopened = KfragStore(db_path)
    try:
        with pytest.raises(Unauthenticated, match="enrollment already received"):
            reopened.put_enrollment([first], nonce=_nonce(1), retain_types={LAB}, now=NOW + 1)
        with pytest.raises(EnrollmentAlreadyStored):  # for another grantee too: one nonce
            reopened.put_enrollment(
                [_enrolled(NOW + 300, grantee=OTHER_GRANTEE)],
                nonce=_nonce(2),
                retain_types={LAB},
                now=NOW + 1,
            )
        assert reopened.get(PATIENT, GRANTEE, LAB) == second
        assert reopened.count() == 1
    finally:
        reopened.close()


def test_an_older_enrollment_never_replaces_a_later_one(store: KfragStore) -> None:
    later = _enrolled(NOW + 300, n=2)
    store.put_enrollment([later], nonce=_nonce(2), retain_types={LAB}, now=NOW)
    relayed_late = _enrolled(NOW + 290, n=1)
    with pytest.raises(PreconditionFailed, match=r"later enrollment \(deadline 1700000300\)"):
        store.put_enrollment([relayed_late], nonce=_nonce(1), retain_types={LAB}, now=NOW)
    assert store.get(PATIENT, GRANTEE, LAB) == later
    # Refused whole: its nonce is not kept, and it is refused again for what it is.
    with pytest.raises(EnrollmentSuperseded):
        store.put_enrollment([relayed_late], nonce=_nonce(1), retain_types={LAB}, now=NOW)
    # One with the same deadline (signed in the same second) may replace it; so may a
    # later one, and one for another grantee is not compared with it.
    same_second = _enrolled(NOW + 300, n=3)
    store.put_enrollment([same_second], nonce=_nonce(3), retain_types={LAB}, now=NOW)
    assert store.get(PATIENT, GRANTEE, LAB) == same_second
    newest = _enrolled(NOW + 400, n=4)
    store.put_enrollment([newest], nonce=_nonce(4), retain_types={LAB}, now=NOW + 100)
    other = _enrolled(NOW + 200, n=5, grantee=OTHER_GRANTEE)
    store.put_enrollment([other], nonce=_nonce(5), retain_types={LAB}, now=NOW + 100)
    assert store.get(PATIENT, GRANTEE, LAB) == newest
    assert store.get(PATIENT, OTHER_GRANTEE, LAB) == other


def test_an_enrollment_after_a_shred_is_not_compared_with_the_shredded_kfrags(
    store: KfragStore,
) -> None:
    store.put_enrollment([_enrolled(NOW + 300)], nonce=_nonce(1), retain_types={LAB}, now=NOW)
    assert store.delete(PATIENT, GRANTEE)  # revoked; the patient grants again
    regranted = _enrolled(NOW + 280, n=2)  # signed on a device whose clock is behind
    store.put_enrollment([regranted], nonce=_nonce(2), retain_types={LAB}, now=NOW + 10)
    assert store.get(PATIENT, GRANTEE, LAB) == regranted
    # The enrollment before the revocation is still refused by its nonce.
    with pytest.raises(EnrollmentAlreadyStored):
        store.put_enrollment([_enrolled(NOW + 300)], nonce=_nonce(1), retain_types={LAB}, now=NOW)


def test_enrollment_nonces_are_forgotten_an_hour_past_their_deadline(
    store: KfragStore, db_path: Path
) -> None:
    store.put_enrollment([_enrolled(NOW + 300)], nonce=_nonce(1), retain_types={LAB}, now=NOW)
    kept_until = NOW + 300 + ENROLLMENT_NONCE_KEPT_S
    store.put_enrollment(
        [_enrolled(kept_until + 300, n=2)], nonce=_nonce(2), retain_types={LAB}, now=kept_until
    )
    store.put_enrollment(
        [_enrolled(kept_until + 301, n=3)], nonce=_nonce(3), retain_types={LAB}, now=kept_until + 1
    )
    with closing(sqlite3.connect(db_path)) as check:
        kept = check.execute("SELECT nonce FROM enrollments ORDER BY deadline").fetchall()
    assert kept == [(_nonce(2),), (_nonce(3),)]


def test_delete_can_keep_some_types(store: KfragStore) -> None:
    store.put_many([_item(), dataclasses.replace(_item(n=2), record_type=0)])
    assert store.delete(PATIENT, GRANTEE, keep_types={0}) is True
    assert store.get(PATIENT, GRANTEE, LAB) is None
    assert store.get(PATIENT, GRANTEE, 0) is not None
    assert store.delete(PATIENT, GRANTEE, keep_types={0}) is False
