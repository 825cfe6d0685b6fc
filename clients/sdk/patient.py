"""The patient's side of the SDK: register, store records, grant, revoke.

Each record type has its own patient key, so a grant for one type can never open
another. Granting writes the grant on-chain first (nodes verify enrollments
against it), then, for each allowed type, splits a re-encryption key into one
kfrag per registered node; each node's kfrags are sealed to that node's HSM
delivery key, signed by the patient, and relayed by the coordinator, which can
read none of them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import umbral_pre as umbral

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.identity import Identity
from clients.sdk.records import seal
from clients.sdk.signed_requests import sealed_enrollment
from clients.sdk.timeouts import DEFAULT_TIMEOUTS, Timeouts
from core.errors import ChainRejected, InvalidRequest, NotFound, Unavailable
from core.record_types import RecordType, to_mask
from core.registry_interface import PatientRegistry
from core.registry_types import NodeInfo
from core.umbral_codec import capsule_hash as hash_capsule
from core.umbral_codec import load_public_key
from proto import rpc
from proto.kms.v1 import coordinator_pb2
from proto.stubs import CoordinatorStub
from proto.transport import Transport


@dataclass(frozen=True)
class StoredRecord:
    record_id: bytes
    record_type: RecordType
    storage_uri: str
    content_hash: bytes
    capsule_hash: bytes
    resource_type: str


@dataclass(frozen=True)
class GrantOutcome:
    """What a grant (or an emergency opt-in) came to: the terms written on-chain and
    where its kfrags were enrolled."""

    grantee: str
    expires_at: int
    allowed_types: frozenset[RecordType]
    threshold: int
    #: node id -> SHA-256 of each clear kfrag that node stored (one per record type, in
    #: record-type order): counted only when the node's confirmation, relayed by the
    #: coordinator, names that node and these hashes of what the SDK sealed to it
    enrolled: dict[str, list[bytes]]
    #: node id -> why enrollment failed there
    failed: dict[str, str]


class PatientClient:
    def __init__(
        self,
        identity: Identity,
        *,
        registry: PatientRegistry,
        blobs: LocalBlobStore,
        coordinator_address: str,
        transport: Transport,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        """``transport`` secures the channel to the coordinator: TLS with the CA
        that signed its certificate (``Transport.tls(ca_cert)``)."""
        self.identity = identity
        self._registry = registry
        self._blobs = blobs
        self._timeouts = timeouts
        # The coordinator refuses calls past its limit per connection: they wait here
        # (at most rpc.APP_CALLS_PER_CONNECTION in flight).
        self._channel = rpc.bounded(
            transport.channel(coordinator_address, options=rpc.APP_CHANNEL_OPTIONS)
        )
        self._coordinator = CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PatientClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def register(self) -> None:
        """Register the patient's per-record-type Umbral keys and kfrag-verifying key, once."""
        if self._registry.get_patient(self.identity.address) is not None:
            return
        self._registry.register_patient(
            self.identity.account,
            self.identity.record_public_keys(),
            self.identity.verifying_key(),
        )

    def store_record(self, document: bytes, record_type: RecordType) -> StoredRecord:
        """Validate, encrypt, store and anchor a FHIR record."""
        public_key = self.identity.record_public_key(record_type)
        sealed = seal(self.identity.address, record_type, document, public_key)
        storage_uri, written = self._blobs.add(sealed.envelope)
        capsule_hash = hash_capsule(sealed.capsule)
        try:
            self._registry.anchor_record(
                self.identity.account,
                patient=self.identity.address,
                content_hash=sealed.content_hash,
                storage_uri=storage_uri,
                record_type=record_type,
                capsule_hash=capsule_hash,
            )
        except ChainRejected:
            # Certainly not anchored (refused or reverted): no blob is left dangling. Not
            # on ChainUnavailable, where the transaction may yet be mined.
            if written:
                self._blobs.delete(storage_uri)
            raise
        return StoredRecord(
            record_id=sealed.record_id,
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
    ) -> GrantOutcome:
        """Grant ``grantee`` access to records of ``record_types`` for ``duration_s``
        seconds of chain time, and enroll kfrags at every active node."""
        types = frozenset(record_types)
        if not types:
            raise InvalidRequest("a grant must allow at least one record type")
        if duration_s <= 0:
            raise InvalidRequest("duration_s must be positive")
        nodes = self._active_nodes(threshold)
        _, chain_now = self._registry.latest_block()
        expires_at = chain_now + duration_s
        self._registry.grant_access(
            self.identity.account,
            grantee=grantee,
            grantee_umbral_key=grantee_umbral_key,
            expires_at=expires_at,
            allowed_types_mask=to_mask(types),
        )
        enrolled, failed = self._enroll(nodes, grantee, grantee_umbral_key, types, threshold)
        return GrantOutcome(grantee, expires_at, types, threshold, enrolled, failed)

    def opt_in_emergency(
        self,
        responder: str,
        responder_umbral_key: bytes,
        record_types: Iterable[RecordType],
        *,
        threshold: int,
    ) -> GrantOutcome:
        """Standing consent that ``responder`` (an emergency-role holder) may open short
        emergency grants to records of ``record_types``. Kfrags for the responder's key are
        enrolled now and lie dormant: nodes serve them only inside an open emergency window."""
        types = frozenset(record_types)
        if not types:
            raise InvalidRequest("an opt-in must allow at least one record type")
        nodes = self._active_nodes(threshold)
        self._registry.opt_in_emergency(
            self.identity.account,
            responder=responder,
            responder_umbral_key=responder_umbral_key,
            allowed_types_mask=to_mask(types),
        )
        enrolled, failed = self._enroll(nodes, responder, responder_umbral_key, types, threshold)
        return GrantOutcome(responder, 0, types, threshold, enrolled, failed)

    def opt_out_emergency(self, responder: str) -> int:
        """Withdraw the opt-in (closing any open emergency grant); return its block."""
        tx = self._registry.opt_out_emergency(self.identity.account, responder)
        return self._registry.block_of_transaction(tx)

    def _active_nodes(self, threshold: int) -> list[NodeInfo]:
        nodes = [n for n in self._registry.list_nodes() if n.active]
        if not 1 <= threshold <= len(nodes):
            raise InvalidRequest(
                f"threshold {threshold} needs between 1 and {len(nodes)} active nodes"
            )
        return nodes

    def _enroll(
        self,
        nodes: list[NodeInfo],
        grantee: str,
        receiving_key: bytes,
        types: frozenset[RecordType],
        threshold: int,
    ) -> tuple[dict[str, list[bytes]], dict[str, str]]:
        """Make kfrags for each type, seal each node's share to it, and have the
        coordinator relay them; (node id -> stored kfrag hashes, node id -> failure).

        The coordinator cannot open the sealed kfrags, so it cannot know their SHA-256: a
        node counts as enrolled only when its answer names it and lists exactly the hashes
        of the clear kfrags sealed to it, in the order sent. Any other answer is a failure
        there, whatever its status says.

        Every call signs new enrollments, each with a fresh nonce: a node accepts one
        signed enrollment once, so calling again after a failure is a new enrollment,
        never a replay."""
        receiving = load_public_key(receiving_key, "grantee umbral key")
        signer = self.identity.kfrag_signer()
        per_node: list[dict[RecordType, bytes]] = [{} for _ in nodes]
        for record_type in sorted(types):
            kfrags = umbral.generate_kfrags(
                delegating_sk=self.identity.record_secret_key(record_type),
                receiving_pk=receiving,
                signer=signer,
                threshold=threshold,
                shares=len(nodes),
                sign_delegating_key=True,
                sign_receiving_key=True,
            )
            for shares, kfrag in zip(per_node, kfrags, strict=True):
                shares[record_type] = bytes(kfrag)
            del kfrags
        # What each node must confirm: the SHA-256 of each clear kfrag, in the order
        # sealed (sealed_enrollment seals them in the mapping's order).
        sent = {
            node.node_id: [hashlib.sha256(k).digest() for k in shares.values()]
            for node, shares in zip(nodes, per_node, strict=True)
        }
        domain = self._registry.signing_domain()
        request = coordinator_pb2.RelayEnrollmentsRequest(
            enrollments=[
                sealed_enrollment(
                    self.identity.account, domain, node, grantee, receiving_key, shares
                )
                for node, shares in zip(nodes, per_node, strict=True)
            ]
        )
        del per_node
        try:
            response = self._coordinator.EnrollKeyFragments(
                request, timeout=self._timeouts.fan_out_s, wait_for_ready=True
            )
        except grpc.RpcError as e:
            raise rpc.error_from_rpc(e, "coordinator") from None
        enrolled: dict[str, list[bytes]] = {}
        failed = {n.node_id: "the coordinator returned no answer for this node" for n in nodes}
        for result in response.results:
            if result.node_id not in failed:
                continue
            if result.status:
                failed[result.node_id] = f"{result.status}: {result.reason}"
                continue
            confirmed = [bytes(h) for h in result.response.kfrag_sha256]
            if result.response.node_id != result.node_id or confirmed != sent[result.node_id]:
                failed[result.node_id] = (
                    "the node's confirmation does not match what was sent "
                    "(another node id, or other kfrag hashes than those sealed to it)"
                )
                continue
            del failed[result.node_id]
            enrolled[result.node_id] = confirmed
        if len(enrolled) < threshold:
            details = "; ".join(f"{n}: {m}" for n, m in failed.items())
            raise Unavailable(
                f"written on-chain but only {len(enrolled)} of {threshold} required nodes "
                f"accepted kfrags ({details}); enroll again once the nodes are back"
            )
        return enrolled, failed

    def revoke(self, grantee: str) -> int:
        """Revoke the grant on-chain; return the block it was mined in."""
        tx = self._registry.revoke_access(self.identity.account, grantee)
        return self._registry.block_of_transaction(tx)

    def allow_writer(self, provider: str, *, allowed: bool = True) -> int:
        """Let a provider (PROVIDER_ROLE) anchor records for this patient, or stop it;
        return the block. Nobody else can anchor a record in her name."""
        tx = self._registry.set_record_writer(self.identity.account, provider, allowed=allowed)
        return self._registry.block_of_transaction(tx)

    def deactivate(self, record_id: bytes) -> int:
        """Deactivate a record on-chain; return the block it was mined in."""
        tx = self._registry.deactivate_record(self.identity.account, record_id)
        return self._registry.block_of_transaction(tx)

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
        """Wait until every node's grant index reflects ``block`` (so a revocation or
        deactivation mined there is in force at each node), as the coordinator reports it;
        return the seconds waited.

        Asks the coordinator, which asks the nodes (:meth:`cluster_status`): an app needs
        no certificate for the nodes themselves. Every node active in the registry (read
        from the chain, not from the coordinator) must appear in the status exactly once,
        at or past ``block``, and so must any other node the status names; until then this
        keeps asking, and after ``timeout_s`` raises :class:`Unavailable` naming the nodes
        missing, named twice, failing or behind. So the coordinator cannot end the wait by
        leaving nodes out. The block numbers themselves are still the coordinator's word
        (the nodes do not sign them): a dishonest coordinator can claim a node is current
        when it is not. This bounds an honest cluster's lag; it proves nothing against a
        lying coordinator."""
        start = time.monotonic()
        active = [n.node_id for n in self._registry.list_nodes() if n.active]
        while True:
            behind = _not_at(block, active, self.cluster_status())
            waited = time.monotonic() - start
            if not behind:
                return waited
            if waited > timeout_s:
                lagging = "; ".join(f"{n}: {why}" for n, why in behind.items())
                raise Unavailable(f"nodes not at block {block} after {timeout_s:g}s: {lagging}")
            time.sleep(0.02)

    def cluster_status(self) -> coordinator_pb2.ClusterStatus:
        """Each node's state as the coordinator reaches it now."""
        try:
            return self._coordinator.GetClusterStatus(
                coordinator_pb2.GetClusterStatusRequest(),
                timeout=self._timeouts.status_s,
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            raise rpc.error_from_rpc(e, "coordinator") from None


def _not_at(block: int, active: list[str], status: coordinator_pb2.ClusterStatus) -> dict[str, str]:
    """Node id -> why ``status`` does not show it at ``block``: each of the ``active``
    nodes must be in it exactly once, and every node in it, once and at the block."""
    reported: dict[str, list[coordinator_pb2.NodeStatus]] = {}
    for n in status.nodes:
        reported.setdefault(n.node_id, []).append(n)
    behind: dict[str, str] = {}
    for node_id in active:
        if node_id not in reported:
            behind[node_id] = "missing from the coordinator's status"
    for node_id, entries in reported.items():
        shown = node_id if node_id in active else repr(node_id[:64])
        if len(entries) > 1:
            behind[shown] = f"named {len(entries)} times in the coordinator's status"
            continue
        n = entries[0]
        if n.status:
            behind[shown] = f"{n.status}: {n.reason}"
        elif n.index_block < block:
            behind[shown] = f"at block {n.index_block}"
    return behind
