"""The patient's side of the SDK: register, store records, grant, revoke.

Granting writes the grant on-chain first (nodes verify enrollments against it),
then splits a re-encryption key into one kfrag per registered node and
delivers each to its node.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import umbral_pre as umbral

from medkms.clients.blob_store import LocalBlobStore
from medkms.clients.identity import Identity
from medkms.clients.records import seal
from medkms.contracts.registry import RegistryClient
from medkms.core.errors import InvalidRequest, KmsError, NotFound, Unavailable
from medkms.core.record_types import RecordType, to_mask
from medkms.core.registry_types import NodeInfo
from medkms.core.requests import address_bytes
from medkms.core.umbral_codec import capsule_hash as hash_capsule
from medkms.core.umbral_codec import load_public_key
from medkms.proto import rpc
from medkms.proto.kms.v1 import node_pb2
from medkms.proto.stubs import NodeStub

ENROLL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StoredRecord:
    record_id: bytes
    record_type: RecordType
    storage_uri: str
    content_hash: bytes
    capsule_hash: bytes
    resource_type: str


@dataclass(frozen=True)
class GrantReceipt:
    grantee: str
    expires_at: int
    allowed_types: frozenset[RecordType]
    threshold: int
    #: node id -> SHA-256 of the kfrag that node stored
    enrolled: dict[str, bytes]
    #: node id -> why enrollment failed there
    failed: dict[str, str]


class PatientClient:
    def __init__(self, identity: Identity, registry: RegistryClient, blobs: LocalBlobStore) -> None:
        self.identity = identity
        self._registry = registry
        self._blobs = blobs

    def register(self) -> None:
        """Register the patient's Umbral and kfrag-verifying keys, once."""
        if self._registry.get_patient(self.identity.address) is not None:
            return
        self._registry.register_patient(
            self.identity.account, self.identity.umbral_public_key(), self.identity.verifying_key()
        )

    def store_record(self, document: bytes, record_type: RecordType) -> StoredRecord:
        """Validate, encrypt, store and anchor a FHIR record."""
        record_id = secrets.token_bytes(32)
        public_key = self.identity.umbral_secret_key().public_key()
        sealed = seal(record_id, record_type, document, public_key)
        storage_uri = self._blobs.put(sealed.envelope)
        capsule_hash = hash_capsule(sealed.capsule)
        self._registry.anchor_record(
            self.identity.account,
            record_id=record_id,
            patient=self.identity.address,
            content_hash=sealed.content_hash,
            storage_uri=storage_uri,
            record_type=record_type,
            capsule_hash=capsule_hash,
        )
        return StoredRecord(
            record_id=record_id,
            record_type=record_type,
            storage_uri=storage_uri,
            content_hash=sealed.content_hash,
            capsule_hash=capsule_hash,
            resource_type=sealed.resource_type,
        )

    def grant(
        self,
        grantee: str,
        grantee_umbral_key: bytes,
        record_types: Iterable[RecordType],
        *,
        duration_s: int,
        threshold: int,
    ) -> GrantReceipt:
        """Grant ``grantee`` access to records of ``record_types`` for ``duration_s``
        seconds of chain time, and enroll kfrags at every active node."""
        types = frozenset(record_types)
        if not types:
            raise InvalidRequest("a grant must allow at least one record type")
        if duration_s <= 0:
            raise InvalidRequest("duration_s must be positive")
        receiving_key = load_public_key(grantee_umbral_key, "grantee umbral key")
        nodes = [n for n in self._registry.list_nodes() if n.active]
        if not 1 <= threshold <= len(nodes):
            raise InvalidRequest(
                f"threshold {threshold} needs between 1 and {len(nodes)} active nodes"
            )
        _, chain_now = self._registry.latest_block()
        expires_at = chain_now + duration_s
        self._registry.grant_access(
            self.identity.account,
            grantee=grantee,
            grantee_umbral_key=grantee_umbral_key,
            expires_at=expires_at,
            allowed_types_mask=to_mask(types),
        )
        kfrags = umbral.generate_kfrags(
            delegating_sk=self.identity.umbral_secret_key(),
            receiving_pk=receiving_key,
            signer=self.identity.kfrag_signer(),
            threshold=threshold,
            shares=len(nodes),
            sign_delegating_key=True,
            sign_receiving_key=True,
        )
        enrolled: dict[str, bytes] = {}
        failed: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            futures = {
                node.node_id: pool.submit(self._enroll, node, grantee, bytes(kfrag))
                for node, kfrag in zip(nodes, kfrags, strict=True)
            }
            for node_id, future in futures.items():
                try:
                    enrolled[node_id] = future.result()
                except KmsError as e:
                    failed[node_id] = e.message
        del kfrags
        if len(enrolled) < threshold:
            details = "; ".join(f"{n}: {m}" for n, m in failed.items())
            raise Unavailable(
                f"grant written on-chain but only {len(enrolled)} of {threshold} required nodes "
                f"accepted a kfrag ({details}); grant again once the nodes are back"
            )
        return GrantReceipt(grantee, expires_at, types, threshold, enrolled, failed)

    def _enroll(self, node: NodeInfo, grantee: str, kfrag: bytes) -> bytes:
        request = node_pb2.EnrollKeyFragmentRequest(
            patient=address_bytes(self.identity.address),
            grantee=address_bytes(grantee),
            kfrag=kfrag,
        )
        with grpc.insecure_channel(node.endpoint, options=rpc.CHANNEL_OPTIONS) as channel:
            stub = NodeStub(channel)
            try:
                response = stub.EnrollKeyFragment(request, timeout=ENROLL_TIMEOUT_S)
            except grpc.RpcError as e:
                raise rpc.error_from_rpc(e, node.node_id) from None
        return bytes(response.kfrag_sha256)

    def revoke(self, grantee: str) -> int:
        """Revoke the grant on-chain; return the block it was mined in."""
        tx = self._registry.revoke_access(self.identity.account, grantee)
        return self._registry.receipt_block(tx)

    def deactivate(self, record_id: bytes) -> int:
        """Deactivate a record on-chain; return the block it was mined in."""
        tx = self._registry.deactivate_record(self.identity.account, record_id)
        return self._registry.receipt_block(tx)

    def erase(self, record_id: bytes) -> int:
        """Erasure (right to be forgotten): deactivate the record on-chain, so every
        node refuses its capsule, then delete the encrypted blob. The chain keeps the
        hashes and metadata only. Returns the block of the deactivation."""
        record = self._registry.get_record(record_id)
        if record is None:
            raise NotFound(f"record 0x{record_id.hex()} is not in the registry")
        block = self.deactivate(record_id) if record.active else self._registry.latest_block()[0]
        self._blobs.delete(record.storage_uri)
        return block

    def await_nodes(self, block: int, timeout_s: float = 5.0) -> float:
        """Wait until every active node's grant index reflects ``block`` (so a revocation
        or deactivation mined there is in force everywhere); return the seconds waited."""
        nodes = [n for n in self._registry.list_nodes() if n.active]
        start = time.monotonic()
        behind = {n.node_id: "not asked yet" for n in nodes}
        with contextlib.ExitStack() as channels:
            # One connection per node for the whole wait, not one per poll.
            stubs = {
                n.node_id: NodeStub(
                    channels.enter_context(
                        grpc.insecure_channel(n.endpoint, options=rpc.CHANNEL_OPTIONS)
                    )
                )
                for n in nodes
            }
            while True:
                for node_id in list(behind):
                    try:
                        info = stubs[node_id].GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=2)
                    except grpc.RpcError as e:
                        behind[node_id] = rpc.error_from_rpc(e, node_id).message
                        continue
                    if info.index_block >= block:
                        del behind[node_id]
                    else:
                        behind[node_id] = f"at block {info.index_block}"
                waited = time.monotonic() - start
                if not behind:
                    return waited
                if waited > timeout_s:
                    lagging = "; ".join(f"{n}: {why}" for n, why in behind.items())
                    raise Unavailable(f"nodes not at block {block} after {timeout_s:g}s: {lagging}")
                time.sleep(0.02)
