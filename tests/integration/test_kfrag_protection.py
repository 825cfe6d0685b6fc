"""Kfrags at rest: wrapped by the node's HSM, and destroyed when the grant is revoked."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import umbral_pre as umbral
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clients.sdk.identity import umbral_seed
from clients.sdk.records import parse_envelope
from core.record_types import RecordType
from deploy.local_cluster import DEMO_ACCOUNTS, LocalCluster
from deploy.sample_records import lab_result
from kms_node.kfrag_store import KfragStore
from proto.rpc import MAX_RECONNECT_BACKOFF_MS
from tests.integration.conftest import CREATED_IDENTITIES, People

pytestmark = pytest.mark.cluster


def _db(cluster: LocalCluster, index: int) -> Path:
    return Path(cluster.nodes[index].config).parent / "kfrags.sqlite"


def _copy_db(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (its WAL included), as a backup takes.

    Both connections are closed here: a connection's ``with`` block commits but does not
    close, and a connection left open to the node's file shares SQLite's per-process
    lock and shared-memory state with a later connection to the same file, even after
    the test has replaced the file under it (a "disk I/O error" when garbage collection
    runs late)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _rows(db: Path, query: str) -> list[Any]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(query).fetchall()


def test_a_copied_node_database_reveals_no_usable_kfrag(
    people: People, cluster: LocalCluster, tmp_path: Path
) -> None:
    people.grant_doctor()
    copy = tmp_path / "stolen.sqlite"
    _copy_db(_db(cluster, 0), copy)
    blobs = [bytes(row[0]) for row in _rows(copy, "SELECT wrapped FROM kfrags")]
    assert blobs
    for blob in blobs:
        for start in range(0, len(blob) - 310 + 1):
            with pytest.raises(ValueError):
                umbral.KeyFrag.from_bytes(blob[start : start + 310])


def _kms_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.node", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


_TRY_PINS = """
import json, sys
from core.errors import KmsError
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.settings import DEFAULT_SOFTHSM_MODULE

conf, label = sys.argv[1:3]
outcomes = []
for pin in json.load(sys.stdin):
    try:
        store = Pkcs11KeyStore.open(DEFAULT_SOFTHSM_MODULE, label, pin, softhsm_conf=conf)
    except KmsError as e:
        outcomes.append(str(e))
    else:
        outcomes.append("opened " + store.eth_address())
        store.close()
print(json.dumps(outcomes))
"""


def _try_pins(conf: Path, label: str, pins: list[str]) -> list[str]:
    """Open the token ``label`` under ``conf`` with each PIN in turn, in a process of its
    own (SoftHSM reads its configuration once per process); the PINs go through stdin."""
    ran = subprocess.run(
        [sys.executable, "-c", _TRY_PINS, str(conf), label],
        input=json.dumps(pins),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    outcomes: list[str] = json.loads(ran.stdout)
    return outcomes


def test_a_copied_node_directory_opens_nothing_without_the_pin(
    people: People, cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thief copies a serving node's whole directory as the cluster lays it out (kfrag
    and audit databases, SoftHSM token, configs) and restores it elsewhere. The copy holds
    no PIN, no kfrag in the clear, a token that refuses wrong PINs, and a node that will
    not start. (With the right PIN the copied token does open: the token directory is the
    key, see docs/threat-model.md.)"""
    made: list[bytes] = []
    generate_kfrags = umbral.generate_kfrags

    def keep_kfrags(**kwargs: Any) -> list[umbral.VerifiedKeyFrag]:
        kfrags = generate_kfrags(**kwargs)
        made.extend(bytes(k) for k in kfrags)
        return kfrags

    monkeypatch.setattr(umbral, "generate_kfrags", keep_kfrags)
    receipt = people.patient.grant(
        people.doctor.address,
        people.doctor.umbral_public_key(),
        [RecordType.LAB_RESULT],
        duration_s=3600,
        threshold=cluster.threshold,
    )
    node = cluster.nodes[1]
    stored = set(receipt.enrolled[node.node_id])
    clear = [k for k in made if hashlib.sha256(k).digest() in stored]
    assert len(clear) == len(stored) == 1  # the kfrag this node holds, in the clear

    state, node_dir = cluster.state_dir, Path(node.config).parent
    restored = tmp_path / "restored"
    copy = restored / node_dir.relative_to(state)
    shutil.copytree(node_dir, copy)
    # Restored under another root: what the copy holds is found where it was, what it
    # does not hold is missing.
    for config in (copy / "node.toml", copy / "softhsm2.conf"):
        config.write_text(config.read_text().replace(str(state), str(restored)))
    files = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert any(copy / "tokens" in p.parents for p in files)
    assert copy / "kfrags.sqlite" in files

    assert not [p for p in files if p.name.endswith(".pin")]
    pins = [
        (cluster.node_secrets_dir(node.node_id) / name).read_text().strip()
        for name in ("user.pin", "so.pin")
    ]
    for path, data in files.items():
        for secret in [*(p.encode() for p in pins), *clear]:
            assert secret not in data and secret.hex().encode() not in data, path

    account = next(n.account for n in people.registry.list_nodes() if n.node_id == node.node_id)
    label = f"medkms-{node.node_id}"
    guesses = [secrets.token_hex(16), "1234", "0000", label, node.node_id]
    outcomes = _try_pins(copy / "softhsm2.conf", label, [*guesses, pins[0]])
    assert outcomes[:-1] == [f"cannot log in to token {label!r}: wrong user PIN"] * len(guesses)
    assert outcomes[-1] == f"opened {account}"  # the copy is a working token: the PIN guards it

    served = _kms_node("serve", "--config", str(copy / "node.toml"))
    missing = restored / "secrets" / node.node_id / "user.pin"
    assert served.returncode == 1
    assert served.stderr.strip() == (
        f"kms-node: cannot read hsm_pin_file {missing}: No such file or directory"
    )


def test_revocation_shreds_the_kfrag_at_every_node(people: People, cluster: LocalCluster) -> None:
    people.grant_doctor()
    alice, bob = people.patient.identity.address, people.doctor.address
    stores = [KfragStore(_db(cluster, i)) for i in range(len(cluster.nodes))]
    try:
        assert all(s.get(alice, bob, RecordType.LAB_RESULT) is not None for s in stores)
        people.patient.await_nodes(people.patient.revoke(bob))
        deadline = time.monotonic() + 5
        while any(s.get(alice, bob, RecordType.LAB_RESULT) is not None for s in stores):
            assert time.monotonic() < deadline, "kfrags still present 5 s after revocation"
            time.sleep(0.05)
    finally:
        for store in stores:
            store.close()


def test_a_kfrag_store_restored_older_than_the_snapshot_is_shredded_again(
    people: People, cluster: LocalCluster, tmp_path: Path
) -> None:
    """An operator restores a node's kfrag store from a backup taken before a revocation,
    beside the snapshot the node wrote after it (README, "Restoring a node"). The copy
    holds the revoked grant's kfrag again, and the snapshot's block is past the
    revocation, so starting from it would never shred that kfrag. The node sees that the
    store's shredding stops short of the snapshot, replays every event instead, and
    shreds the kfrag again."""
    people.grant_doctor()
    alice, bob = people.patient.identity.address, people.doctor.address
    node = cluster.nodes[0]
    backup = tmp_path / "kfrags-backup.sqlite"
    cluster.stop_node(node.node_id)  # a clean stop saves the snapshot
    try:
        _copy_db(_db(cluster, 0), backup)
    finally:
        cluster.start_node(node.node_id)
    people.patient.await_nodes(people.patient.revoke(bob))
    cluster.stop_node(node.node_id)
    restarted_at = Path(node.log).stat().st_size
    try:
        for leftover in ("-wal", "-shm"):
            Path(str(_db(cluster, 0)) + leftover).unlink(missing_ok=True)
        shutil.copyfile(backup, _db(cluster, 0))
        restored = KfragStore(_db(cluster, 0))
        try:
            assert restored.get(alice, bob, RecordType.LAB_RESULT) is not None
        finally:
            restored.close()
    finally:
        cluster.start_node(node.node_id)
    with Path(node.log).open("rb") as log:
        log.seek(restarted_at)
        events = [json.loads(line) for line in log.read().splitlines() if line.startswith(b"{")]
    refusals = [e["reason"] for e in events if e.get("event") == "index_snapshot_refused"]
    assert len(refusals) == 1 and refusals[0].startswith(
        "the kfrag store has shredded revoked kfrags through block "
    ), refusals
    store = KfragStore(_db(cluster, 0))
    try:
        deadline = time.monotonic() + 10
        while store.get(alice, bob, RecordType.LAB_RESULT) is not None:
            assert time.monotonic() < deadline, "the restored kfrag of a revoked grant stays"
            time.sleep(0.05)
    finally:
        store.close()


def test_a_rotated_kek_keeps_serving_and_old_database_copies_need_destroyed_keys(
    people: People, cluster: LocalCluster, tmp_path: Path
) -> None:
    people.grant_doctor()
    node = cluster.nodes[0]
    # A serving node's data directory is not rotated under it.
    refused = _kms_node("rotate-kek", "--config", node.config)
    assert refused.returncode == 1 and "the node is running: stop it first" in refused.stderr
    before = tmp_path / "before.sqlite"
    _copy_db(_db(cluster, 0), before)
    cluster.stop_node(node.node_id)
    try:
        ran = _kms_node("rotate-kek", "--config", node.config)
        assert ran.returncode == 0, ran.stderr
        rotation = json.loads(ran.stdout)
        assert rotation["rewrapped"] >= 1 and rotation["destroyed"] == [
            g for g in range(1, rotation["generation"])
        ]
        store = KfragStore(_db(cluster, 0))
        try:
            assert store.generations() == {rotation["generation"]}
        finally:
            store.close()
    finally:
        cluster.start_node(node.node_id)
    # The rotated node serves the grant; with two others down its share is needed.
    stopped = [n.node_id for n in cluster.nodes[1:3]]
    for node_id in stopped:
        cluster.stop_node(node_id)
    try:
        time.sleep(MAX_RECONNECT_BACKOFF_MS / 1000 + 0.3)
        with people.provider() as doctor:
            assert doctor.read_record(people.lab.record_id) == lab_result()
    finally:
        for node_id in stopped:
            cluster.start_node(node_id)
        time.sleep(MAX_RECONNECT_BACKOFF_MS / 1000 + 0.3)
    # A copy of the store from before the rotation: wrapped under keys the rotation destroyed
    # in the live token (a copy of the old token would still hold them, with the PIN).
    old = _rows(before, "SELECT DISTINCT kek_generation FROM kfrags")
    assert {g for (g,) in old} <= set(rotation["destroyed"])


@pytest.mark.runs_last
def test_logs_hold_no_key_material(people: People, cluster: LocalCluster) -> None:
    """After the whole suite: scan every log the cluster wrote for the secrets of every
    party the suite created (Ethereum keys, Umbral seeds and derived keys), the nodes'
    PINs and the TLS private keys, and a record's DEK and plaintext, in hex and raw."""
    people.grant_doctor()
    with people.provider() as doctor:
        plaintext = doctor.read_record(people.lab.record_id)
    people.patient.await_nodes(people.patient.revoke(people.doctor.address))
    envelope = parse_envelope(people.cluster.blob_store().get(people.lab.storage_uri))
    dek = umbral.decrypt_original(
        people.patient.identity.record_secret_key(RecordType.LAB_RESULT),
        umbral.Capsule.from_bytes(bytes(envelope.capsule)),
        bytes(envelope.encrypted_dek),
    )
    assert plaintext == lab_result()  # the suite's sample lab result: read in many tests
    # The plaintext as a JSON log line would carry it, too (its quotes escaped).
    escaped = json.dumps(plaintext.decode())[1:-1].encode()
    secrets_to_find: list[bytes] = [bytes(dek), plaintext, escaped]
    demo_accounts = [cluster.identity(name) for name in DEMO_ACCOUNTS]
    for identity in [*CREATED_IDENTITIES, *demo_accounts]:
        secrets_to_find.append(bytes(identity.account.key))
        secrets_to_find.append(umbral_seed(bytes(identity.account.key)))
        secrets_to_find.append(bytes(identity.umbral_secret_key().to_be_bytes()))
        for record_type in RecordType:
            secrets_to_find.append(bytes(identity.record_secret_key(record_type).to_be_bytes()))
    assert len(CREATED_IDENTITIES) >= 2  # the suite's parties so far, this test's included
    for node in cluster.nodes:
        for pin_file in ("user.pin", "so.pin"):
            pin = cluster.node_secrets_dir(node.node_id) / pin_file
            secrets_to_find.append(pin.read_text().strip().encode())
    for key_file in (cluster.state_dir / "tls").glob("*.key"):  # the CA's and every TLS key
        pem = key_file.read_bytes()
        # the PEM's second base64 line: the private scalar's end (the first is a fixed header)
        secrets_to_find.append(pem.splitlines()[2])
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        secrets_to_find.append(key.private_numbers().private_value.to_bytes(32, "big"))
    logs = [p.read_bytes() for p in (cluster.state_dir / "logs").glob("*.log")]
    assert logs
    for secret in secrets_to_find:
        for form in (secret, secret.hex().encode()):
            assert all(form not in log for log in logs)
