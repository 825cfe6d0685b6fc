"""The node's grant index saved in its data directory, so that a restart replays only the
events mined since (issue 14, ADR 15).

Rules this module follows:

- A snapshot is signed with the node's HSM signing key over its header, and the header holds
  the SHA-256 of the index bytes: only this node's HSM could have written it, whoever can
  write the data directory.
- It is used only if, in this order: the signature verifies under this node's key; it was
  written for this chain id and this registry; the index bytes are the signed size, hash to
  the signed digest and parse; and the block it reflects is still canonical (its hash at that
  height is the chain's now). Otherwise the node replays every event, and says why
  (``index_snapshot_refused``).
- Reading is bounded: the header and signature by fixed limits, the index bytes by the size
  the signed header gives, so a huge file costs no more memory than the node's own snapshot.
- It is written whole to a temporary file (mode 0600), synced, and renamed over the last one:
  a crash leaves the old snapshot or the new, never a mix.
- It is taken from the follower between two syncs (:meth:`ChainFollower.consistent_index`), so
  it never holds an event whose revoked kfrags were not yet shredded. Before it is written, the
  kfrag store records its block as the one its shredding has reached; at start-up the snapshot
  is used only if the kfrag store's record reaches its block. A kfrag store restored from a
  copy older than the snapshot (which would hold again the kfrags of grants revoked since,
  and the snapshot's block is past their revocations) makes the node replay every event,
  shredding them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO, Final, Protocol

import structlog

from core.audit import verify_node_signature
from core.errors import KmsError
from core.grant_index import GrantIndex
from core.registry_types import BlockRef

log = structlog.get_logger("medkms.node.index_snapshot")

SNAPSHOT_FILE: Final = "grant_index.snapshot"
_MAGIC: Final = b"medkms-index-snapshot/1\n"
#: what the HSM signs: this label, then the header
_SIGNED_LABEL: Final = b"medkms/index-snapshot/v1\x00"
_HEADER_LEN: Final = struct.Struct(">I")
_SIGNATURE_LEN: Final = struct.Struct(">H")
_MAX_HEADER_BYTES: Final = 4096


class SnapshotSigner(Protocol):
    """The part of the node's key store a snapshot needs (``kms_node.keystore.KeyStore``)."""

    def sign(self, message: bytes) -> bytes: ...
    def signing_public_key(self) -> bytes: ...


class ShreddingRecord(Protocol):
    """How far the node's kfrag store has shredded revoked kfrags
    (``kms_node.kfrag_store.KfragStore``)."""

    def shredded_through(self) -> int | None: ...
    def record_shredded_through(self, block: int) -> None: ...


class BlockSource(Protocol):
    def block(self, identifier: int | str = "latest") -> BlockRef: ...


class SnapshotRefused(Exception):
    """The snapshot file cannot be used; the message says why (and holds no secret)."""


class IndexSnapshots:
    """Writes and reads one node's snapshot file for one chain and registry."""

    def __init__(
        self,
        path: Path,
        signer: SnapshotSigner,
        shredding: ShreddingRecord,
        *,
        chain_id: int,
        registry_address: str,
    ) -> None:
        self.path = path
        self._signer = signer
        self._shredding = shredding
        self._chain_id = chain_id
        self._registry = registry_address.lower()

    def __repr__(self) -> str:
        return f"IndexSnapshots({str(self.path)!r}, registry={self._registry!r})"

    # -- writing ---------------------------------------------------------------------------

    def save(self, index: GrantIndex) -> BlockRef:
        """Write ``index`` (synced, every event through its block already handed to the
        shredding) as the snapshot; the block it reflects. The kfrag store records that
        block first: a crash in between leaves it ahead of the snapshot, which is safe."""
        body = index.to_bytes()
        block = index.block
        assert block is not None  # to_bytes refuses an unsynced index
        self._shredding.record_shredded_through(block.number)
        header = json.dumps(
            {
                "chain_id": self._chain_id,
                "registry": self._registry,
                "block": block.number,
                "block_hash": block.hash.hex(),
                "index_sha256": hashlib.sha256(body).hexdigest(),
                "index_bytes": len(body),
                "written_at": int(time.time()),
            },
            sort_keys=True,
        ).encode()
        signature = self._signer.sign(_SIGNED_LABEL + header)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # also when an earlier temporary file was left wider
            with os.fdopen(fd, "wb", closefd=False) as out:
                out.write(_MAGIC + _HEADER_LEN.pack(len(header)) + header)
                out.write(_SIGNATURE_LEN.pack(len(signature)) + signature)
                out.write(body)
                out.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return block

    # -- reading ---------------------------------------------------------------------------

    def load(self, chain: BlockSource) -> GrantIndex | None:
        """The snapshot's index if it may be used, else None (logged with the reason). Chain
        trouble while checking its block raises, as syncing would."""
        if not self.path.exists():
            log.info("index_snapshot_absent", path=str(self.path))
            return None
        try:
            with self.path.open("rb") as file:
                index = self._checked(file, chain)
        except (SnapshotRefused, OSError) as e:
            why = str(e) if isinstance(e, SnapshotRefused) else f"unreadable ({type(e).__name__})"
            log.warning("index_snapshot_refused", path=str(self.path), reason=why)
            return None
        assert index.block is not None
        patients, records, grants = index.sizes()
        log.info(
            "index_snapshot_loaded",
            block=index.block.number,
            patients=patients,
            records=records,
            grants=grants,
        )
        return index

    def _checked(self, file: BinaryIO, chain: BlockSource) -> GrantIndex:
        header_bytes, signature = _read_head(file)
        if not verify_node_signature(
            _SIGNED_LABEL + header_bytes, signature, self._signer.signing_public_key()
        ):
            raise SnapshotRefused("its signature is not this node's")
        try:
            header = json.loads(header_bytes)
            chain_id, registry = int(header["chain_id"]), str(header["registry"])
            number, block_hash = int(header["block"]), bytes.fromhex(header["block_hash"])
            digest, size = bytes.fromhex(header["index_sha256"]), int(header["index_bytes"])
        except (ValueError, KeyError, TypeError):
            raise SnapshotRefused("its header is malformed") from None
        if chain_id != self._chain_id:
            raise SnapshotRefused(f"it is for chain {chain_id}, not {self._chain_id}")
        if registry != self._registry:
            raise SnapshotRefused(f"it is for registry {registry}, not {self._registry}")
        # One local read, before the index bytes are read, hashed and parsed.
        shredded = self._shredding.shredded_through()
        if shredded is None:
            raise SnapshotRefused(
                "the kfrag store records no block its shredding has reached (written by a "
                "node version before that record, or a copy of such a store)"
            )
        if shredded < number:
            raise SnapshotRefused(
                f"the kfrag store has shredded revoked kfrags through block {shredded} only, "
                f"before the snapshot's block {number} (a kfrag store restored from an "
                "older copy)"
            )
        body = file.read(size + 1)  # no more than the node wrote, and one byte to see more
        if len(body) != size:
            raise SnapshotRefused("its index is not the size its header was signed with")
        if hashlib.sha256(body).digest() != digest:
            raise SnapshotRefused("its index does not match its signed digest")
        try:
            index = GrantIndex.from_bytes(body)
        except ValueError as e:
            raise SnapshotRefused(str(e)) from None
        if index.block is None or (index.block.number, index.block.hash) != (number, block_hash):
            raise SnapshotRefused("its index reflects another block than its header")
        head = chain.block("latest")
        if head.number < number:
            raise SnapshotRefused(f"its block {number} is ahead of the chain's head {head.number}")
        if chain.block(number).hash != block_hash:
            raise SnapshotRefused(f"its block {number} is no longer canonical (a reorganisation)")
        return index


def _read_head(file: BinaryIO) -> tuple[bytes, bytes]:
    """(header, signature) of a snapshot file, read from its start; the index bytes follow."""
    if file.read(len(_MAGIC)) != _MAGIC:
        raise SnapshotRefused("it is not an index snapshot (or another version)")
    (header_len,) = _HEADER_LEN.unpack(_read_exactly(file, _HEADER_LEN.size))
    if header_len > _MAX_HEADER_BYTES:
        raise SnapshotRefused("its header is too large")
    header = _read_exactly(file, header_len)
    (signature_len,) = _SIGNATURE_LEN.unpack(_read_exactly(file, _SIGNATURE_LEN.size))
    return header, _read_exactly(file, signature_len)


def _read_exactly(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise SnapshotRefused("it is cut short")
    return data


class ConsistentIndex(Protocol):
    """The chain follower, as the snapshotter reads it."""

    def consistent_index(self) -> GrantIndex | None: ...


class IndexSnapshotter:
    """Saves the follower's index every ``interval_s`` (when it has moved on) and once more
    at :meth:`stop`, from a thread of its own: writing never holds up syncing."""

    def __init__(
        self, follower: ConsistentIndex, snapshots: IndexSnapshots, interval_s: float
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self._follower = follower
        self._snapshots = snapshots
        self._interval_s = interval_s
        self._saved: BlockRef | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-snapshot", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, then save a last time (call it after the follower has stopped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.save_now()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.save_now()

    def save_now(self) -> None:
        """Save the index if it reflects another block than the last saved; a failure is
        logged (the node serves on; the next restart replays more events)."""
        index = self._follower.consistent_index()
        if index is None or index.block == self._saved:
            return
        started = time.perf_counter()
        try:
            self._saved = self._snapshots.save(index)
        except (OSError, KmsError) as e:
            why = e.message if isinstance(e, KmsError) else type(e).__name__
            log.warning("index_snapshot_failed", path=str(self._snapshots.path), error=why)
            return
        log.info(
            "index_snapshot_saved",
            block=self._saved.number,
            seconds=round(time.perf_counter() - started, 3),
        )
