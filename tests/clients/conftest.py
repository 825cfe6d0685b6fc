"""Fixtures for the SDK clients' and the auditor's tests without a chain or a cluster: the
registry's in-memory twin (``tests/registry_twin.py``), accounts registered in it, a
coordinator on loopback that answers as a test tells it, and ``connect``, which builds either
SDK client against them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import pytest
import umbral_pre as umbral
from cryptography.hazmat.primitives.asymmetric import ec
from eth_account import Account
from eth_account.signers.local import LocalAccount

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient
from clients.sdk.provider import ProviderClient
from clients.sdk.timeouts import Timeouts
from core.addresses import checksum
from core.audit import AuditEntry, Receipt
from core.errors import KmsError
from core.kfrag_delivery import compressed, delivery_binding, open_with_shared_secret
from core.record_types import RecordType
from core.registry_types import NodeInfo
from kms_node.keystore import MemoryKeyStore
from proto import rpc
from proto.kms.v1 import common_pb2, coordinator_pb2
from proto.stubs import COORDINATOR_SERVICE
from proto.transport import Transport
from tests.registry_twin import RegistryTwin

NODE_IDS = ("node-1", "node-2", "node-3")
#: a test that goes wrong fails in seconds, not the default tens of seconds
TIMEOUTS = Timeouts(fan_out_s=2.0, status_s=2.0)


@pytest.fixture
def admin() -> LocalAccount:
    account: LocalAccount = Account.create()
    return account


@pytest.fixture
def twin(admin: LocalAccount) -> RegistryTwin:
    """A fresh registry with three active nodes."""
    registry = RegistryTwin(admin)
    for node_id in NODE_IDS:
        register_node(registry, admin, node_id)
    return registry


@cache
def delivery_key(node_id: str) -> ec.EllipticCurvePrivateKey:
    """The delivery key ``register_node`` registers for ``node_id`` (one per node id in a
    test session), so that the fake coordinator can open kfrags sealed to it, as the node
    would."""
    return ec.generate_private_key(ec.SECP256R1())


def clear_kfrag_hashes(enrollment: common_pb2.EnrollKeyFragmentRequest) -> list[bytes]:
    """What a node answers to ``enrollment``: the SHA-256 of each kfrag it opens, in order."""
    key = delivery_key(enrollment.node_id)
    hashes = []
    for sealed in enrollment.kfrags:
        binding = delivery_binding(
            enrollment.node_id,
            "0x" + enrollment.patient.hex(),
            "0x" + enrollment.grantee.hex(),
            enrollment.receiving_key,
            sealed.record_type,
        )
        shared_x = key.exchange(
            ec.ECDH(),
            ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), sealed.ephemeral_public_key
            ),
        )
        clear = open_with_shared_secret(
            shared_x,
            sealed.ephemeral_public_key,
            compressed(key.public_key()),
            sealed.sealed,
            info=binding,
            aad=binding,
        )
        hashes.append(hashlib.sha256(clear).digest())
    return hashes


@cache
def node_keys(node_id: str) -> MemoryKeyStore:
    """The key store whose signing key ``register_node`` registers for ``node_id`` (one per
    node id in a test session): the fake coordinator signs its receipts with it, as the node
    would."""
    return MemoryKeyStore()


def register_node(
    registry: RegistryTwin,
    admin: LocalAccount,
    node_id: str,
    *,
    endpoint: str = "127.0.0.1:1",
    signing_public_key: bytes | None = None,
    account: str | None = None,
) -> NodeInfo:
    delivery = delivery_key(node_id).public_key()
    registry.register_node(
        admin,
        node_id=node_id,
        endpoint=endpoint,
        signing_public_key=signing_public_key or node_keys(node_id).signing_public_key(),
        delivery_public_key=compressed(delivery),
        account=account or Account.create().address,
    )
    return next(n for n in registry.list_nodes() if n.node_id == node_id)


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def alice() -> Identity:
    """A patient, not registered yet."""
    return Identity.generate("alice")


@pytest.fixture
def doctor(twin: RegistryTwin, admin: LocalAccount) -> Identity:
    """A provider (PROVIDER_ROLE)."""
    identity = Identity.generate("dr-bob")
    twin.grant_provider_role(admin, identity.address)
    return identity


@pytest.fixture
def responder(twin: RegistryTwin, admin: LocalAccount) -> Identity:
    """An emergency department (EMERGENCY_ROLE)."""
    identity = Identity.generate("er")
    twin.grant_emergency_role(admin, identity.address)
    return identity


@dataclass
class FakeCoordinator:
    """A coordinator on loopback (plaintext gRPC) that answers as the test sets it: which
    nodes refuse an enrollment (the others open their kfrags and confirm them as a node
    does), the block every node's index is at, and the kfrags it re-encrypts with
    (standing in for the nodes); or, as a hostile coordinator, what it makes up."""

    address: str = ""
    #: every enrollment relayed, in order
    enrollments: list[common_pb2.EnrollKeyFragmentRequest] = field(default_factory=list)
    #: node id -> why that node refuses enrollments
    refusing: dict[str, str] = field(default_factory=dict)
    #: node id -> the answer a hostile coordinator makes up for that node's enrollment
    #: (relayed as a success) instead of relaying it
    forged: dict[
        str,
        Callable[[common_pb2.EnrollKeyFragmentRequest], common_pb2.EnrollKeyFragmentResponse],
    ] = field(default_factory=dict)
    index_block: int = 0
    #: the cluster status a hostile coordinator makes up; None reports every node of
    #: NODE_IDS at index_block
    statuses: list[coordinator_pb2.NodeStatus] | None = None
    #: the kfrags the "nodes" hold, one cfrag each per re-encryption
    kfrags: list[umbral.VerifiedKeyFrag] = field(default_factory=list)
    reencrypt_requests: list[common_pb2.ReencryptionRequest] = field(default_factory=list)
    batch_requests: list[common_pb2.ReencryptionBatchRequest] = field(default_factory=list)
    #: nodes whose fragments are corrupted in a read's first answer (not in a retry)
    lying: set[str] = field(default_factory=set)
    #: nodes whose fragment is changed in a read's first answer after its receipt was
    #: made (one bit of its kfrag signature: it still opens the record, and no longer
    #: verifies)
    changed_after_logging: set[str] = field(default_factory=set)
    #: node id -> a kfrag of another set, which that node re-encrypts with in a read's
    #: first answer (a replayed or stale fragment: it verifies but does not combine)
    stale: dict[str, umbral.VerifiedKeyFrag] = field(default_factory=dict)
    #: node id -> another capsule, which that node re-encrypts with its own kfrag in a
    #: read's first answer (a well-formed fragment, of the right kfrag, for the wrong capsule)
    foreign: dict[str, umbral.Capsule] = field(default_factory=dict)
    #: what a hostile coordinator relays in a read's first answer instead of the nodes'
    #: fragments: cfrags it makes up for the capsule (tests/forged_cfrags.py), one a node
    forge: Callable[[umbral.Capsule], list[bytes]] | None = None
    #: every retry the app sent (ADR 14)
    retries: list[coordinator_pb2.RetryReadRequest] = field(default_factory=list)
    #: the answer to a retry; None answers with the read's fragments, none corrupted
    retry_error: KmsError | None = None
    #: whether each fragment carries a receipt, signed with its node's registered key
    #: (node_keys): leaf 0 of its node's log for the first fragment relayed, 1 for the
    #: next, and so on
    with_receipts: bool = False
    relayed: int = 0
    #: leaf index -> the entry the fake's node logged for it
    entries: dict[int, AuditEntry] = field(default_factory=dict)
    #: what a hostile coordinator does to a receipt it relays (given the fragment's node
    #: id and the signed receipt, which it may change in place)
    tamper_receipt: Callable[[str, common_pb2.AuditReceipt], None] | None = None
    #: nodes whose fragment (the same bytes, with its receipt) is relayed twice
    echoed: set[str] = field(default_factory=set)
    #: label -> node id: a second fragment of that node's kfrag (re-encrypted again, so
    #: other bytes) relayed under ``label``, after the others
    again: dict[str, str] = field(default_factory=dict)

    def enroll(self, request: coordinator_pb2.RelayEnrollmentsRequest, _: Any) -> Any:
        results = []
        for enrollment in request.enrollments:
            self.enrollments.append(enrollment)
            node_id = enrollment.node_id
            if node_id in self.refusing:
                results.append(
                    coordinator_pb2.RelayedEnrollment(
                        node_id=node_id, status="PERMISSION_DENIED", reason=self.refusing[node_id]
                    )
                )
                continue
            if node_id in self.forged:
                results.append(
                    coordinator_pb2.RelayedEnrollment(
                        node_id=node_id, response=self.forged[node_id](enrollment)
                    )
                )
                continue
            hashes = clear_kfrag_hashes(enrollment)
            response = common_pb2.EnrollKeyFragmentResponse(node_id=node_id, kfrag_sha256=hashes)
            results.append(coordinator_pb2.RelayedEnrollment(node_id=node_id, response=response))
        return coordinator_pb2.RelayEnrollmentsResponse(results=results)

    def cluster_status(self, _request: Any, _: Any) -> Any:
        if self.statuses is not None:
            return coordinator_pb2.ClusterStatus(nodes=self.statuses)
        return coordinator_pb2.ClusterStatus(
            nodes=[
                coordinator_pb2.NodeStatus(node_id=n, index_block=self.index_block)
                for n in NODE_IDS
            ]
        )

    def _fragments(
        self, request: Any, ref: common_pb2.CapsuleRef | None = None, *, lie: bool
    ) -> Any:
        """The fragments for ``request`` (a single request, or ``ref`` of a batch)."""
        capsule_bytes = (ref if ref is not None else request).capsule
        capsule = umbral.Capsule.from_bytes(capsule_bytes)
        if lie and self.forge is not None:
            forged = self.forge(capsule)
            return [
                common_pb2.CapsuleFragment(node_id=n, cfrag=c)
                for n, c in zip(NODE_IDS, forged, strict=False)
            ]
        kfrags = dict(zip(NODE_IDS, self.kfrags, strict=False))
        fragments = []
        again = [(label, kfrags[node]) for label, node in self.again.items()]
        for n, k in [*kfrags.items(), *again]:
            if lie and n in self.stale:
                k = self.stale[n]
            cfrag = bytes(umbral.reencrypt(self.foreign.get(n, capsule) if lie else capsule, k))
            if lie and n in self.lying:
                cfrag = cfrag[:-40] + bytes(40)
            fragment = common_pb2.CapsuleFragment(node_id=n, cfrag=cfrag)
            if self.with_receipts:
                fragment.receipt.CopyFrom(self._receipt(n, cfrag, request, ref))
            if lie and n in self.changed_after_logging:
                # the last bit of its kfrag signature: it parses, and decryption does not
                # use it
                fragment.cfrag = cfrag[:-1] + bytes([cfrag[-1] ^ 1])
            fragments.append(fragment)
            if n in self.echoed:
                fragments.append(fragment)
        return fragments

    def _receipt(
        self, node_id: str, cfrag: bytes, request: Any, ref: common_pb2.CapsuleRef | None
    ) -> common_pb2.AuditReceipt:
        """The receipt ``node_id`` signs for the next leaf of its log (the fake's count),
        for the 'granted' entry a node logs (kms_node/service.py), with its facts."""
        source = ref if ref is not None else request
        facts = common_pb2.EntryFacts(
            time=1_700_000_000 + self.relayed,
            block_number=7,
            block_hash=bytes(32),
            reason_code="granted",
            reason="grant is active and covers this record",
        )
        entry = AuditEntry(
            request_id=request.request_id,
            node_id=node_id,
            time=facts.time,
            requester=checksum(bytes(request.requester)),
            patient=checksum(bytes(request.patient)),
            record_id=bytes(source.record_id),
            capsule_hash=hashlib.sha256(source.capsule).digest(),
            purpose_of_use=request.purpose_of_use,
            decision="granted",
            reason_code=facts.reason_code,
            reason=facts.reason,
            block_number=facts.block_number,
            block_hash=facts.block_hash,
            cfrag_hash=hashlib.sha256(cfrag).digest(),
            record_type=RecordType(source.record_type),
            requester_umbral_key=bytes(request.requester_umbral_key),
        )
        receipt = Receipt(
            node_id=node_id,
            leaf_index=self.relayed,
            tree_size=self.relayed + 1,
            entry_hash=entry.leaf_hash(),
        )
        self.entries[receipt.leaf_index] = entry
        self.relayed += 1
        signed = common_pb2.AuditReceipt(
            node_id=node_id,
            leaf_index=receipt.leaf_index,
            tree_size=receipt.tree_size,
            entry_hash=receipt.entry_hash,
            signature=node_keys(node_id).sign(receipt.canonical_bytes()),
            entry=facts,
        )
        if self.tamper_receipt is not None:
            self.tamper_receipt(node_id, signed)
        return signed

    def reencrypt(self, request: common_pb2.ReencryptionRequest, _: Any) -> Any:
        self.reencrypt_requests.append(request)
        fragments = self._fragments(request, lie=True)
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=fragments, threshold=len(fragments), read_id=b"r" * 16
        )

    def retry(self, request: coordinator_pb2.RetryReadRequest, _: Any) -> Any:
        self.retries.append(request)
        if self.retry_error is not None:
            raise self.retry_error
        fragments = self._fragments(self.reencrypt_requests[-1], lie=False)
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=fragments, threshold=len(fragments)
        )

    def reencrypt_batch(self, request: common_pb2.ReencryptionBatchRequest, _: Any) -> Any:
        self.batch_requests.append(request)
        return coordinator_pb2.CoordinatorBatchResponse(
            results=self._capsules(request, lie=True), threshold=len(self.kfrags), read_id=b"b" * 16
        )

    def retry_batch(self, request: coordinator_pb2.RetryReadRequest, _: Any) -> Any:
        self.retries.append(request)
        if self.retry_error is not None:
            raise self.retry_error
        reported = {bytes(r.record_id) for r in request.reported}
        reported |= {bytes(r) for r in request.inconsistent}
        results = self._capsules(self.batch_requests[-1], lie=False)
        return coordinator_pb2.CoordinatorBatchResponse(
            results=[r for r in results if r.record_id in reported], threshold=len(self.kfrags)
        )

    def _capsules(self, request: common_pb2.ReencryptionBatchRequest, *, lie: bool) -> Any:
        return [
            coordinator_pb2.CapsuleFragments(
                record_id=ref.record_id, fragments=self._fragments(request, ref, lie=lie)
            )
            for ref in request.capsules
        ]


@pytest.fixture
def coordinator() -> Iterator[FakeCoordinator]:
    fake = FakeCoordinator()
    methods = [
        rpc.Method("EnrollKeyFragments", coordinator_pb2.RelayEnrollmentsRequest, fake.enroll),
        rpc.Method(
            "GetClusterStatus", coordinator_pb2.GetClusterStatusRequest, fake.cluster_status
        ),
        rpc.Method("Reencrypt", common_pb2.ReencryptionRequest, fake.reencrypt),
        rpc.Method("RetryReencrypt", coordinator_pb2.RetryReadRequest, fake.retry),
        rpc.Method("ReencryptBatch", common_pb2.ReencryptionBatchRequest, fake.reencrypt_batch),
        rpc.Method("RetryReencryptBatch", coordinator_pb2.RetryReadRequest, fake.retry_batch),
    ]
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([rpc.service_handler(COORDINATOR_SERVICE, methods)])
    port = Transport.plaintext().add_port(server, "127.0.0.1:0", require_client_cert=False)
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(grace=None)


Client = TypeVar("Client", PatientClient, ProviderClient)


class Connect(Protocol):
    def __call__(self, kind: type[Client], identity: Identity, /) -> Client: ...


@pytest.fixture
def connect(
    twin: RegistryTwin, blobs: LocalBlobStore, coordinator: FakeCoordinator
) -> Iterator[Connect]:
    """Builds either SDK client for an identity, the one way both are built (the twin,
    the blob store, the loopback coordinator); closes them after the test."""
    opened: list[PatientClient | ProviderClient] = []

    def connect(kind: type[Client], identity: Identity, /) -> Client:
        client = kind(
            identity,
            registry=twin,
            blobs=blobs,
            coordinator_address=coordinator.address,
            transport=Transport.plaintext(),
            timeouts=TIMEOUTS,
        )
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()
