"""A node's grant index snapshot (ADR 15), on a real anvil chain and signed in real SoftHSM:
used when it is this node's, for this registry, at a canonical block; otherwise refused with
the reason, and the node replays every event and judges the same."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from structlog.testing import capture_logs

from contracts.registry import RegistryClient
from core.record_types import RecordType
from core.registry_types import BlockRef, RegistryEvent, record_id_of
from deploy.anvil import AnvilProcess, mine, rpc_call, set_balance
from kms_node.chain_follower import ChainFollower
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.index_snapshot import SNAPSHOT_FILE, IndexSnapshots, IndexSnapshotter
from kms_node.kfrag_store import KfragStore
from tests.contracts.conftest import FUNDING_WEI, compressed_point, umbral_keys
from tests.kms_node.conftest import SoftHsmDir

pytestmark = [pytest.mark.anvil, pytest.mark.softhsm]


class CountedReads:
    """The registry as the follower reads it, remembering which block ranges it asked for."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry
        self.ranges: list[tuple[int, int]] = []

    def block(self, identifier: int | str = "latest") -> BlockRef:
        return self.registry.block(identifier)

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        self.ranges.append((from_block, to_block))
        return self.registry.events(from_block, to_block)


@dataclass
class World:
    anvil: AnvilProcess
    registry: RegistryClient
    patient: LocalAccount
    doctor: LocalAccount
    capsule: bytes
    record: bytes
    path: Path
    kfrags: KfragStore

    def account(self) -> LocalAccount:
        account: LocalAccount = Account.create()
        set_balance(self.anvil.rpc_url, account.address, FUNDING_WEI)
        return account

    def snapshots(self, signer: Pkcs11KeyStore, **overrides: object) -> IndexSnapshots:
        chain_id = overrides.get("chain_id", self.registry.chain_id())
        registry = overrides.get("registry", self.registry.address)
        assert isinstance(chain_id, int) and isinstance(registry, str)
        return IndexSnapshots(
            self.path, signer, self.kfrags, chain_id=chain_id, registry_address=registry
        )

    def grant(self) -> None:
        self.registry.grant_access(
            self.patient,
            grantee=self.doctor.address,
            grantee_umbral_key=compressed_point(),
            expires_at=self.registry.latest_block()[1] + 3600,
            allowed_types_mask=1 << RecordType.LAB_RESULT,
        )

    def granted(self, follower: ChainFollower) -> bool:
        state = follower.index.access_state(self.record, self.doctor.address, self.capsule)
        grant = state.grant
        return grant is not None and grant.active


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with AnvilProcess(log_path=tmp_path / "anvil.log") as anvil:
        admin: LocalAccount = Account.create()
        set_balance(anvil.rpc_url, admin.address, FUNDING_WEI)
        registry = RegistryClient.deploy(anvil.rpc_url, admin)
        kfrags = KfragStore(tmp_path / "kfrags.sqlite")
        w = World(
            anvil, registry, admin, admin, os.urandom(32), b"", tmp_path / SNAPSHOT_FILE, kfrags
        )
        w.patient, w.doctor = w.account(), w.account()
        registry.grant_provider_role(admin, w.doctor.address)
        registry.register_patient(w.patient, umbral_keys(), compressed_point())
        registry.anchor_record(
            w.patient,
            patient=w.patient.address,
            content_hash=os.urandom(32),
            storage_uri="blob:test",
            record_type=RecordType.LAB_RESULT,
            capsule_hash=w.capsule,
        )
        w.record = record_id_of(w.patient.address, w.capsule)
        w.grant()
        yield w
        kfrags.close()


@pytest.fixture
def signer(softhsm_dir: SoftHsmDir) -> Iterator[Pkcs11KeyStore]:
    store = softhsm_dir.new_token().open()
    yield store
    store.close()


def synced(world: World) -> ChainFollower:
    follower = ChainFollower(world.registry)
    follower.sync_once()
    return follower


def refused(snapshots: IndexSnapshots, world: World, reason: str) -> None:
    """The snapshot is refused for ``reason``, and a full replay judges correctly."""
    with capture_logs() as logs:
        assert snapshots.load(world.registry) is None
    assert [e["reason"] for e in logs if e["event"] == "index_snapshot_refused"] == [reason]
    replayed = ChainFollower(world.registry, index=None)
    replayed.sync_once()
    assert replayed.index.is_registered(world.patient.address)
    assert world.granted(replayed)


def test_a_good_snapshot_is_used_and_only_later_events_are_read(
    world: World, signer: Pkcs11KeyStore
) -> None:
    snapshots = world.snapshots(signer)
    saved_at = snapshots.save(synced(world).index)
    assert stat.S_IMODE(world.path.stat().st_mode) == 0o600
    world.registry.revoke_access(world.patient, world.doctor.address)
    mine(world.anvil.rpc_url, 2)

    with capture_logs() as logs:
        index = snapshots.load(world.registry)
    assert index is not None and index.block == saved_at
    assert [e["block"] for e in logs if e["event"] == "index_snapshot_loaded"] == [saved_at.number]
    reads = CountedReads(world.registry)
    follower = ChainFollower(reads, index=index)
    assert world.granted(follower)  # as of the snapshot's block, before the revocation
    follower.sync_once()
    assert reads.ranges and min(start for start, _ in reads.ranges) == saved_at.number + 1
    assert not world.granted(follower)
    assert follower.index.is_registered(world.patient.address)


def test_saving_a_snapshot_records_its_block_in_the_kfrag_store(
    world: World, signer: Pkcs11KeyStore
) -> None:
    assert world.kfrags.shredded_through() is None
    saved_at = world.snapshots(signer).save(synced(world).index)
    assert world.kfrags.shredded_through() == saved_at.number


def test_a_snapshot_ahead_of_the_kfrag_stores_shredding_is_refused(
    world: World, signer: Pkcs11KeyStore
) -> None:
    """A kfrag store restored from a copy older than the snapshot: it holds again the
    kfrags of grants revoked since its copy, and the snapshot's block is past those
    revocations, so starting from the snapshot would never shred them. The node replays
    every event instead (the shredding of kfrags is tested on a real node in
    tests/integration/test_kfrag_protection.py)."""
    snapshots = world.snapshots(signer)
    first = snapshots.save(synced(world).index)
    world.registry.revoke_access(world.patient, world.doctor.address)
    second = snapshots.save(synced(world).index)
    assert second.number > first.number
    world.kfrags.record_shredded_through(first.number)  # the older copy's record
    with capture_logs() as logs:
        assert snapshots.load(world.registry) is None
    assert [e["reason"] for e in logs if e["event"] == "index_snapshot_refused"] == [
        f"the kfrag store has shredded revoked kfrags through block {first.number} only, "
        f"before the snapshot's block {second.number} (a kfrag store restored from an "
        "older copy)"
    ]
    world.kfrags.record_shredded_through(second.number + 5)  # ahead of it: a crash between
    index = snapshots.load(world.registry)
    assert index is not None and index.block == second


def test_a_snapshot_beside_a_kfrag_store_with_no_shredding_record_is_refused(
    world: World, signer: Pkcs11KeyStore, tmp_path: Path
) -> None:
    """A store written before the record existed (schema version 3), or a copy of one:
    nothing says how far its shredding reached."""
    world.snapshots(signer).save(synced(world).index)
    unrecorded = KfragStore(tmp_path / "unrecorded.sqlite")
    try:
        snapshots = IndexSnapshots(
            world.path,
            signer,
            unrecorded,
            chain_id=world.registry.chain_id(),
            registry_address=world.registry.address,
        )
        refused(
            snapshots,
            world,
            "the kfrag store records no block its shredding has reached (written by a "
            "node version before that record, or a copy of such a store)",
        )
    finally:
        unrecorded.close()


def test_a_tampered_snapshot_is_refused(world: World, signer: Pkcs11KeyStore) -> None:
    snapshots = world.snapshots(signer)
    snapshots.save(synced(world).index)
    good = world.path.read_bytes()
    world.path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # in the index bytes
    refused(snapshots, world, "its index does not match its signed digest")
    at = good.index(b'"block": ') + len(b'"block": ')
    other_digit = str((int(chr(good[at])) + 1) % 10).encode()
    world.path.write_bytes(good[:at] + other_digit + good[at + 1 :])  # another block, signed?
    refused(snapshots, world, "its signature is not this node's")
    world.path.write_bytes(good[:-10])
    refused(snapshots, world, "its index is not the size its header was signed with")
    world.path.write_bytes(good[:40])
    refused(snapshots, world, "it is cut short")
    world.path.write_bytes(b"not a snapshot")
    refused(snapshots, world, "it is not an index snapshot (or another version)")


def test_another_nodes_snapshot_is_refused(
    world: World, signer: Pkcs11KeyStore, softhsm_dir: SoftHsmDir
) -> None:
    other = softhsm_dir.new_token().open()
    try:
        index = synced(world).index
        world.snapshots(other).save(index)
        refused(world.snapshots(signer), world, "its signature is not this node's")
        # The signature is checked first: what an unsigned header claims is not read.
        world.snapshots(other, chain_id=1).save(index)
        refused(world.snapshots(signer), world, "its signature is not this node's")
    finally:
        other.close()


def test_a_snapshot_of_another_registry_or_chain_is_refused(
    world: World, signer: Pkcs11KeyStore
) -> None:
    index = synced(world).index
    other_registry = RegistryClient.deploy(world.anvil.rpc_url, world.account())
    world.snapshots(signer, registry=other_registry.address).save(index)
    refused(
        world.snapshots(signer),
        world,
        f"it is for registry {other_registry.address.lower()}, "
        f"not {world.registry.address.lower()}",
    )
    world.snapshots(signer, chain_id=1).save(index)
    refused(world.snapshots(signer), world, f"it is for chain 1, not {world.registry.chain_id()}")


def test_a_snapshot_of_a_block_reorganised_away_is_refused(
    world: World, signer: Pkcs11KeyStore
) -> None:
    mine(world.anvil.rpc_url, 3)
    saved_at = world.snapshots(signer).save(synced(world).index)
    # The last 2 blocks, the snapshot's among them, are replaced by empty ones.
    rpc_call(world.anvil.rpc_url, "anvil_reorg", [2, []])
    assert world.registry.block(saved_at.number).hash != saved_at.hash
    refused(
        world.snapshots(signer),
        world,
        f"its block {saved_at.number} is no longer canonical (a reorganisation)",
    )


def test_the_snapshotter_saves_once_more_when_stopped(world: World, signer: Pkcs11KeyStore) -> None:
    follower = synced(world)
    snapshotter = IndexSnapshotter(follower, world.snapshots(signer), interval_s=3600)
    snapshotter.start()
    world.registry.revoke_access(world.patient, world.doctor.address)
    follower.sync_once()
    assert not world.path.exists()
    snapshotter.stop()
    index = world.snapshots(signer).load(world.registry)
    assert index is not None and index.block == follower.index.block
    assert not world.granted(ChainFollower(world.registry, index=index))


def test_a_snapshot_of_a_block_above_the_head_is_refused(
    world: World, signer: Pkcs11KeyStore
) -> None:
    """A chain rolled back below the snapshot's block (another chain with the same id,
    restarted): the head is below it."""
    before = rpc_call(world.anvil.rpc_url, "evm_snapshot", [])
    head = world.registry.block("latest").number
    mine(world.anvil.rpc_url, 3)
    saved_at = world.snapshots(signer).save(synced(world).index)
    assert rpc_call(world.anvil.rpc_url, "evm_revert", [before]) is True
    assert world.registry.block("latest").number == head < saved_at.number
    refused(
        world.snapshots(signer),
        world,
        f"its block {saved_at.number} is ahead of the chain's head {head}",
    )


def test_a_huge_file_is_refused_without_being_read(world: World, signer: Pkcs11KeyStore) -> None:
    """The index bytes are read only up to the size the node signed: a file grown to a
    terabyte (sparse: no disk is used) is refused, not loaded into memory."""
    snapshots = world.snapshots(signer)
    snapshots.save(synced(world).index)
    os.truncate(world.path, 1 << 40)
    refused(snapshots, world, "its index is not the size its header was signed with")


def _parts(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(magic line, header, signature, index bytes) of a snapshot file, as the format
    lays them out: the magic line, a 4-byte header length, the header, a 2-byte signature
    length, the signature, the index bytes."""
    at = data.index(b"\n") + 1
    (header_len,) = struct.unpack_from(">I", data, at)
    header = data[at + 4 : at + 4 + header_len]
    after = at + 4 + header_len
    (signature_len,) = struct.unpack_from(">H", data, after)
    signature = data[after + 2 : after + 2 + signature_len]
    return data[:at], header, signature, data[after + 2 + signature_len :]


def _assembled(magic: bytes, header: bytes, signature: bytes, body: bytes) -> bytes:
    return (
        magic
        + struct.pack(">I", len(header))
        + header
        + struct.pack(">H", len(signature))
        + signature
        + body
    )


def test_the_node_signs_a_snapshot_under_a_label_of_its_own(
    world: World, signer: Pkcs11KeyStore
) -> None:
    """What the node's key signed without the snapshot's label (a receipt's or a
    checkpoint's bytes) is no snapshot; and a header the node did sign is still checked."""
    snapshots = world.snapshots(signer)
    snapshots.save(synced(world).index)
    magic, header, signature, body = _parts(world.path.read_bytes())
    label = b"medkms/index-snapshot/v1\x00"
    world.path.write_bytes(_assembled(magic, header, signer.sign(header), body))
    refused(snapshots, world, "its signature is not this node's")
    # Signed under the label, but without the size of the index bytes (an older format).
    fields = json.loads(header)
    del fields["index_bytes"]
    short = json.dumps(fields, sort_keys=True).encode()
    world.path.write_bytes(_assembled(magic, short, signer.sign(label + short), body))
    refused(snapshots, world, "its header is malformed")
    world.path.write_bytes(_assembled(magic, b" " * 5000, b"", body))
    refused(snapshots, world, "its header is too large")


def test_a_snapshot_is_written_with_mode_0600_over_a_wider_leftover(
    world: World, signer: Pkcs11KeyStore
) -> None:
    leftover = world.path.with_name(world.path.name + ".tmp")
    leftover.write_bytes(b"from a crash")
    leftover.chmod(0o644)
    world.snapshots(signer).save(synced(world).index)
    assert stat.S_IMODE(world.path.stat().st_mode) == 0o600
    assert not leftover.exists()
    assert world.snapshots(signer).load(world.registry) is not None
