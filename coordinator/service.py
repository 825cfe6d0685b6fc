"""The coordinator's work: fan a request out, verify what comes back, return
as soon as ``threshold`` valid capsule fragments are in.

It holds no keys and cannot open anything: it relays the grantee's request and
checks each cfrag against the patient's registered keys, so a broken or lying
node cannot make the grantee's decryption fail.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import grpc
import structlog

from medkms.coordinator.settings import CoordinatorSettings
from medkms.coordinator.threshold import FragmentCollector
from medkms.core.errors import InvalidRequest, PreconditionFailed
from medkms.core.registry_types import PatientInfo
from medkms.core.requests import ReencryptionQuery
from medkms.core.umbral_codec import VerificationError, load_cfrag, load_public_key
from medkms.proto import rpc
from medkms.proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2
from medkms.proto.stubs import AioNodeStub

log = structlog.get_logger("medkms.coordinator")

# A node that comes back must be used again quickly: gRPC's default reconnect
# backoff grows to two minutes, during which calls to that node fail at once.
MAX_RECONNECT_BACKOFF_MS = 1000
NODE_CHANNEL_OPTIONS = [
    *rpc.CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]


class PatientReader(Protocol):
    def get_patient(self, address: str) -> PatientInfo | None: ...


class PatientKeyCache:
    """Patients' registered keys, read from the chain at most once per TTL."""

    def __init__(self, registry: PatientReader, ttl_s: float) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, PatientInfo]] = {}

    async def get(self, address: str) -> PatientInfo:
        now = time.monotonic()
        hit = self._entries.get(address)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        info = await asyncio.to_thread(self._registry.get_patient, address)
        if info is None:
            raise PreconditionFailed("patient is not registered in the registry")
        self._entries[address] = (now, info)
        return info


class CoordinatorService:
    def __init__(self, settings: CoordinatorSettings, registry: PatientReader) -> None:
        self._settings = settings
        self._patients = PatientKeyCache(registry, settings.patient_cache_s)
        self._stubs: dict[str, AioNodeStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def open_channels(self) -> None:
        """Create one reusable channel per node; call inside the running loop."""
        for node in self._settings.nodes:
            channel = grpc.aio.insecure_channel(node.address, options=NODE_CHANNEL_OPTIONS)
            self._channels.append(channel)
            self._stubs[node.node_id] = AioNodeStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def cluster_info(
        self, _msg: coordinator_pb2.GetClusterInfoRequest, _ctx: Any
    ) -> coordinator_pb2.ClusterInfo:
        return coordinator_pb2.ClusterInfo(
            threshold=self._settings.threshold,
            nodes=[
                coordinator_pb2.NodeEndpoint(node_id=n.node_id, address=n.address)
                for n in self._settings.nodes
            ],
        )

    async def reencrypt(
        self, msg: common_pb2.ReencryptionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        query = ReencryptionQuery.parse(msg)
        outgoing = common_pb2.ReencryptionRequest()
        outgoing.CopyFrom(msg)
        outgoing.request_id = query.request_id
        patient = await self._patients.get(query.patient)
        verifying_key = load_public_key(patient.verifying_key, "patient verifying key")
        delegating_key = load_public_key(patient.umbral_public_key, "patient umbral key")

        timeout = self._settings.node_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        collector = FragmentCollector(self._settings.threshold, list(self._stubs))
        tasks = {
            asyncio.ensure_future(stub.Reencrypt(outgoing, timeout=timeout)): node_id
            for node_id, stub in self._stubs.items()
        }
        pending = set(tasks)
        try:
            while pending and not collector.complete and not collector.hopeless:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node_id = tasks[task]
                    try:
                        response: node_pb2.ReencryptResponse = task.result()
                    except grpc.RpcError as e:
                        error = rpc.error_from_rpc(e)
                        collector.reject(node_id, error.grpc_status, error.message)
                        continue
                    try:
                        cfrag = load_cfrag(response.fragment.cfrag)
                        cfrag.verify(
                            query.capsule, verifying_key, delegating_key, query.receiving_key
                        )
                    except (InvalidRequest, VerificationError):
                        collector.reject(
                            node_id, "DATA_LOSS", "returned a capsule fragment that does not verify"
                        )
                        continue
                    collector.accept(node_id, bytes(response.fragment.cfrag))
        finally:
            for task in pending:
                task.cancel()
        bound = log.bind(request_id=query.request_id, record_id=query.record_id.hex())
        for failure in collector.failures:
            bound.info("node_failed", node_id=failure.node_id, status=failure.status)
        if not collector.complete:
            refusal = collector.error()
            bound.info("reencrypt_failed", status=refusal.grpc_status, valid=len(collector.valid))
            raise refusal
        bound.info("reencrypt_served", nodes=[n for n, _ in collector.fragments()])
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=[
                common_pb2.CapsuleFragment(node_id=n, cfrag=c) for n, c in collector.fragments()
            ],
            threshold=self._settings.threshold,
        )
