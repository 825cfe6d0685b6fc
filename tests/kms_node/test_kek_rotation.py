"""Key-encryption key rotation: every kfrag wrapped again, the old keys destroyed, all or
nothing; and the data directory lock that keeps it away from a serving node."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import IntegrityError, PreconditionFailed
from kms_node import data_lock
from kms_node.kek_rotation import rotate_kek
from kms_node.keystore import KeyStore
from kms_node.kfrag_store import KfragStore, StoredKfrag
from kms_node.service import kfrag_aad

NODE = "node-1"
PATIENT = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
GRANTEES = [
    "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2",
    "0x4B20993Bc481177ec7E8f571ceCaE8A9e22C02db",
]
RECEIVING_KEY = b"\x02" + b"r" * 32


@pytest.fixture
def kfrags(tmp_path: Path) -> Iterator[KfragStore]:
    store = KfragStore(tmp_path / "kfrags.sqlite")
    yield store
    store.close()


def _aad(item: StoredKfrag) -> bytes:
    return kfrag_aad(NODE, item.patient, item.grantee, item.receiving_key, item.record_type)


def enroll(keystore: KeyStore, kfrags: KfragStore) -> dict[tuple[str, int], bytes]:
    """Three kfrags wrapped as the node wraps them; their clear bytes by (grantee, type)."""
    clear: dict[tuple[str, int], bytes] = {}
    items = []
    for grantee, record_type in [(GRANTEES[0], 1), (GRANTEES[0], 2), (GRANTEES[1], 1)]:
        value = secrets.token_bytes(310)
        aad = kfrag_aad(NODE, PATIENT, grantee, RECEIVING_KEY, record_type)
        items.append(
            StoredKfrag(
                patient=PATIENT,
                grantee=grantee,
                record_type=record_type,
                wrapped=keystore.wrap(value, aad),
                kfrag_sha256=hashlib.sha256(value).digest(),
                receiving_key=RECEIVING_KEY,
                created_at=1_700_000_000,
                kek_generation=keystore.kek_generation(),
            )
        )
        clear[(grantee, record_type)] = value
    kfrags.put_many(items)
    return clear


def stored(kfrags: KfragStore) -> list[StoredKfrag]:
    found = [kfrags.get(PATIENT, g, t) for g, t in [(GRANTEES[0], 1), (GRANTEES[0], 2)]]
    found.append(kfrags.get(PATIENT, GRANTEES[1], 1))
    present = [item for item in found if item is not None]
    assert len(present) == len(found)
    return present


def test_rotation_wraps_every_kfrag_again_and_destroys_the_old_key(
    fresh_keystore: KeyStore, kfrags: KfragStore
) -> None:
    keystore = fresh_keystore
    clear = enroll(keystore, kfrags)
    backup = stored(kfrags)  # what a copy of the store taken before the rotation holds

    rotation = rotate_kek(keystore, kfrags, NODE)

    assert (rotation.generation, rotation.rewrapped, rotation.destroyed) == (2, 3, [1])
    assert keystore.kek_generation() == 2 and kfrags.generations() == {2}
    for item in stored(kfrags):
        assert item.kek_generation == 2
        value = keystore.unwrap(item.wrapped, _aad(item), 2)
        assert value == clear[(item.grantee, item.record_type)]
        assert hashlib.sha256(value).digest() == item.kfrag_sha256
    # The backup's kfrags cannot be opened any more: their key is gone.
    for item in backup:
        with pytest.raises(IntegrityError, match="no key-encryption key of generation 1"):
            keystore.unwrap(item.wrapped, _aad(item), item.kek_generation)
    # A second rotation works the same way.
    assert rotate_kek(keystore, kfrags, NODE).destroyed == [2]


def test_a_rotation_that_fails_changes_nothing_and_can_run_again(
    fresh_keystore: KeyStore, kfrags: KfragStore
) -> None:
    keystore = fresh_keystore
    enroll(keystore, kfrags)
    before = stored(kfrags)
    # One kfrag's wrapping is damaged: it does not authenticate.
    damaged = before[1]
    flipped = damaged.wrapped[:-1] + bytes([damaged.wrapped[-1] ^ 1])
    kfrags.put(dataclasses.replace(damaged, wrapped=flipped))
    with pytest.raises(IntegrityError, match="failed authentication"):
        rotate_kek(keystore, kfrags, NODE)
    # Nothing was rewrapped and no key destroyed: every other kfrag still opens.
    assert kfrags.generations() == {1}
    for item in (before[0], before[2]):
        assert keystore.unwrap(item.wrapped, _aad(item), 1)
    # Repaired (here: the damaged kfrag deleted), the rotation runs again.
    kfrags.delete(PATIENT, GRANTEES[0], keep_types=[1])
    rotation = rotate_kek(keystore, kfrags, NODE)
    assert (rotation.generation, rotation.rewrapped) == (3, 2)
    assert rotation.destroyed == [1, 2]  # 2 was made by the failed run and never used


def test_maintenance_waits_for_no_serving_process(tmp_path: Path) -> None:
    serving = tmp_path / "serving"
    data_lock.hold_while_serving(serving)  # held until this process ends, as a server does
    data_lock.hold_while_serving(serving)  # several server processes share it
    with pytest.raises(PreconditionFailed, match="the node is running: stop it first"):
        with data_lock.alone(serving):
            pass
    idle = tmp_path / "idle"
    with data_lock.alone(idle):
        with pytest.raises(PreconditionFailed, match="maintenance is under way"):
            data_lock.hold_while_serving(idle)
    data_lock.hold_while_serving(idle)  # free again once maintenance is over
