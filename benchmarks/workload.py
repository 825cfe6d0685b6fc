"""What the harness asks of a running cluster: a patient with records, a doctor
with a grant, and the requests timed against it.

The set-up copies tests/integration/conftest.py (fresh funded identities, a
registered patient, anchored records, an on-chain grant with kfrags enrolled
at every node) without importing from the tests.

Three requests, from the outside in:

- ``read``: ``ProviderClient.read_record``, the SDK end to end (registry reads,
  blob fetch, signing, DEK through the coordinator, record decryption);
- ``DekPath``: only the DEK part of ``read_record``, rebuilt from public
  pieces: a signed request, the coordinator RPC, cfrag verification,
  ``decrypt_reencrypted`` (what ``ProviderClient._open_dek`` does); the
  record, patient and envelope are read once up front;
- ``NodeTarget``: one node's ``Reencrypt`` RPC and its ``ReencryptBatch`` RPC.

Wire requests are built in one place, :class:`RequestSigner`, as the SDK
builds them (EIP-712 signature, fresh nonce, deadline).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import umbral_pre as umbral

from clients.sdk.identity import Identity
from clients.sdk.patient import PatientClient, StoredRecord
from clients.sdk.provider import ProviderClient, send_read
from clients.sdk.records import parse_envelope
from clients.sdk.signed_requests import RequestSigner as SdkSigner
from contracts.registry import RegistryClient
from core.audit import Receipt
from core.errors import IntegrityError, InvalidRequest, KmsError, PreconditionFailed
from core.record_types import RecordType
from core.registry_types import PatientInfo
from core.umbral_codec import (
    VerificationError,
    load_cfrag,
    load_public_key,
)
from deploy import metrics_scrape
from deploy.anvil import set_balance
from deploy.local_cluster import FUNDING_WEI, LocalCluster, NodeEntry
from deploy.sample_records import lab_result
from proto import rpc
from proto.kms.v1 import common_pb2
from proto.stubs import CoordinatorStub, NodeStub

RPC_TIMEOUT_S = 10.0
#: the node's handler-time histogram (kms_node.metrics.REQUEST_SECONDS)
HANDLER_METRIC = "kms_node_request_duration_seconds"
PURPOSE = "TREAT"


class BatchIncomplete(KmsError):
    """A batch came back with fewer cfrags than capsules sent."""

    grpc_status = "DATA_LOSS"


@dataclass(frozen=True)
class Capsule:
    """A record's id and capsule, as read once from the blob store."""

    record_id: bytes
    capsule: bytes
    #: the workload stores lab results only
    record_type: RecordType = RecordType.LAB_RESULT


class RequestSigner:
    """A requester's signed wire requests for one patient, built by the SDK's
    ``RequestSigner`` exactly as ``ProviderClient`` builds them."""

    def __init__(self, identity: Identity, registry: RegistryClient, patient: str) -> None:
        self.identity = identity
        self.patient = patient
        self._signer = SdkSigner(
            identity.account,
            identity.umbral_public_key(),
            registry.signing_domain(),
        )

    def single(self, capsule: Capsule) -> common_pb2.ReencryptionRequest:
        return self._signer.single(
            self.patient, capsule.record_id, capsule.record_type, capsule.capsule, PURPOSE
        )

    def batch(self, capsules: Sequence[Capsule]) -> common_pb2.ReencryptionBatchRequest:
        refs = [(c.record_id, c.record_type, c.capsule) for c in capsules]
        return self._signer.batch(self.patient, refs, PURPOSE)


@dataclass
class Workload:
    cluster: LocalCluster
    registry: RegistryClient
    patient: PatientClient
    #: granted grantees; requests cycle over them, as many doctors' apps would (a node
    #: rate-limits each requester, and one requester alone would measure the limit)
    doctors: list[Identity]
    records: list[StoredRecord]

    def new_identity(self, name: str, *, provider: bool = False) -> Identity:
        identity = Identity.generate(name)
        set_balance(self.cluster.rpc_url, identity.address, FUNDING_WEI)
        if provider:
            admin = self.cluster.identity("admin")
            self.registry.grant_provider_role(admin.account, identity.address)
        return identity

    def grant(self, grantee: Identity) -> None:
        self.patient.grant(
            grantee.address,
            grantee.umbral_public_key(),
            [RecordType.LAB_RESULT],
            duration_s=3600,
            threshold=self.cluster.threshold,
        )

    def provider(self, identity: Identity) -> ProviderClient:
        return ProviderClient(
            identity,
            registry=self.registry,
            blobs=self.cluster.blob_store(),
            coordinator_address=self.cluster.coordinator_address,
            transport=self.cluster.app_transport,
        )

    def signer(self, identity: Identity) -> RequestSigner:
        return RequestSigner(identity, self.registry, self.patient.identity.address)

    def capsules(self) -> list[Capsule]:
        blobs = self.cluster.blob_store()
        return [
            Capsule(r.record_id, bytes(parse_envelope(blobs.get(r.storage_uri)).capsule))
            for r in self.records
        ]

    def dek_path(
        self, identities: list[Identity] | None = None, *, keep_receipts: bool = False
    ) -> DekPath:
        return DekPath(self, identities or self.doctors, keep_receipts=keep_receipts)

    def node_target(self, node: NodeEntry, *, connections: int = 4) -> NodeTarget:
        return NodeTarget(self, node, connections=connections)


def prepare(cluster: LocalCluster, *, records: int, doctors: int = 4) -> Workload:
    """A registered patient with ``records`` lab results, granted to ``doctors`` fresh
    doctors."""
    registry = cluster.registry()
    blank = Workload(cluster, registry, None, [], [])  # type: ignore[arg-type]
    alice = blank.new_identity("alice")
    # The client (and its channel) lives as long as the benchmark process; grants are
    # made through it.
    patient = PatientClient(
        alice,
        registry=registry,
        blobs=cluster.blob_store(),
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
    )
    patient.register()
    stored = [patient.store_record(lab_result(), RecordType.LAB_RESULT) for _ in range(records)]
    granted = [blank.new_identity(f"dr-{i}", provider=True) for i in range(doctors)]
    workload = Workload(cluster, registry, patient, granted, stored)
    for doctor in granted:
        workload.grant(doctor)
    return workload


@dataclass(frozen=True)
class _OpenRecord:
    ref: Capsule
    capsule: umbral.Capsule
    encrypted_dek: bytes


class DekPath:
    """The DEK part of a read as an app that verifies every fragment would do it (the
    SDK does so on the first read of a kfrag set, ADR 19): a signed request, one
    coordinator RPC, the grantee's cfrag verification and decryption, per call (call
    ``index`` goes to record and grantee ``index``, cycling)."""

    def __init__(
        self, workload: Workload, identities: list[Identity], *, keep_receipts: bool = False
    ) -> None:
        """With ``keep_receipts``, the audit receipt of every fragment of every read
        served is kept in ``receipts`` (for an auditor to check they are all logged)."""
        self.keep_receipts = keep_receipts
        self.receipts: list[Receipt] = []
        self._receipts_lock = threading.Lock()
        self._grantees = [(i, workload.signer(i)) for i in identities]
        self._channel = workload.cluster.coordinator_channel()
        self._stub = CoordinatorStub(self._channel)
        patient: PatientInfo | None = workload.registry.get_patient(
            workload.patient.identity.address
        )
        if patient is None:
            raise PreconditionFailed("the benchmark patient is not registered")
        self._patient = patient
        blobs = workload.cluster.blob_store()
        self._records = []
        for record in workload.records:
            envelope = parse_envelope(blobs.get(record.storage_uri))
            self._records.append(
                _OpenRecord(
                    Capsule(record.record_id, bytes(envelope.capsule)),
                    umbral.Capsule.from_bytes(envelope.capsule),
                    bytes(envelope.encrypted_dek),
                )
            )

    def close(self) -> None:
        self._channel.close()

    def __call__(self, index: int) -> bytes:
        record = self._records[index % len(self._records)]
        identity, signer = self._grantees[index % len(self._grantees)]
        # As the SDK sends a read: waiting for the channel within the timeout, and signed
        # and sent again if the coordinator stopped with the call open.
        _, response = send_read(
            lambda: signer.single(record.ref),
            lambda r, timeout_s: self._stub.Reencrypt(r, timeout=timeout_s, wait_for_ready=True),
            RPC_TIMEOUT_S,
        )
        delegating_key = load_public_key(self._patient.umbral_key(record.ref.record_type))
        verifying_key = load_public_key(self._patient.verifying_key)
        secret_key = identity.umbral_secret_key()
        try:
            verified = [
                load_cfrag(f.cfrag).verify(
                    record.capsule, verifying_key, delegating_key, secret_key.public_key()
                )
                for f in response.fragments
            ]
        except (InvalidRequest, VerificationError):
            raise IntegrityError("the coordinator returned a cfrag that does not verify") from None
        try:
            dek = umbral.decrypt_reencrypted(
                secret_key, delegating_key, record.capsule, verified, record.encrypted_dek
            )
        except ValueError:
            dek = None
        if dek is None:
            raise IntegrityError("the cfrags did not open the DEK")
        if self.keep_receipts:
            with self._receipts_lock:
                self.receipts += [Receipt.from_fields(f.receipt) for f in response.fragments]
        return bytes(dek)


class NodeTarget:
    """One node, called directly over gRPC as the coordinator calls it.

    Requests take ``connections`` channels in turn, each its own TCP connection
    (local subchannel pool), so a node running several server processes on one
    port (SO_REUSEPORT spreads connections) gets work in all of them.
    """

    def __init__(self, workload: Workload, node: NodeEntry, *, connections: int = 4) -> None:
        self.node = node
        # As the coordinator connects: mutual TLS, the node's id pinned.
        transport = workload.cluster.transport
        options = [("grpc.use_local_subchannel_pool", 1)]
        self._channels = [
            transport.channel(node.address, options=options, server_name=node.node_id)
            for _ in range(connections)
        ]
        self._stubs = [NodeStub(channel) for channel in self._channels]
        self._signers = [workload.signer(d) for d in workload.doctors]
        self._capsules = workload.capsules()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _stub(self, index: int) -> NodeStub:
        return self._stubs[index % len(self._stubs)]

    def _signer(self, index: int) -> RequestSigner:
        return self._signers[index % len(self._signers)]

    def single(self, index: int) -> object:
        request = self._signer(index).single(self._capsules[index % len(self._capsules)])
        try:
            return self._stub(index).Reencrypt(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            raise rpc.error_from_rpc(e) from None

    def handler_seconds(self, method: str = "Reencrypt") -> tuple[float, int]:
        """(sum of seconds, count) the node's own metrics report for ``method``:
        time inside the handler, without gRPC transport and queueing."""
        samples = metrics_scrape.scrape(self.node.metrics_url)
        label = f'{{method="{method}"}}'
        total = samples.get(f"{HANDLER_METRIC}_sum{label}", 0.0)
        count = int(samples.get(f"{HANDLER_METRIC}_count{label}", 0.0))
        return total, count

    def batch_unsupported(self) -> str | None:
        """None if the batch RPC can be called, else why not (for the results' notes)."""
        if not hasattr(self._stubs[0], "ReencryptBatch"):
            return (
                "proto.stubs.NodeStub has no ReencryptBatch yet (the node's batch RPC "
                "is being written): node_batch32_ratio is null, not estimated"
            )
        return None

    def batch(self, index: int, size: int) -> int:
        """One batch RPC of ``size`` distinct records; returns how many were served."""
        if size > len(self._capsules):
            raise ValueError(f"a batch of {size} needs {size} records (each at most once)")
        capsules = [self._capsules[(index * size + i) % len(self._capsules)] for i in range(size)]
        try:
            served = _node_batch_call(
                self._stub(index), self._signer(index), capsules, RPC_TIMEOUT_S
            )
        except grpc.RpcError as e:
            raise rpc.error_from_rpc(e) from None
        if served != size:
            raise BatchIncomplete(f"a batch of {size} capsules came back with {served} cfrags")
        return served


def _node_batch_call(
    stub: NodeStub, signer: RequestSigner, capsules: Sequence[Capsule], timeout: float
) -> int:
    """The one place the harness calls the batch RPC: the capsules of one
    patient for one requester in one signed ``ReencryptBatch``; returns how
    many outcomes carry a capsule fragment."""
    response = stub.ReencryptBatch(signer.batch(capsules), timeout=timeout)
    return sum(1 for o in response.outcomes if not o.status and o.fragment.cfrag)
