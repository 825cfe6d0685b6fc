"""The node's gRPC server: the KmsNode service, health, reflection, metrics."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc
import structlog

from contracts.registry import RegistryClient
from core.audit import AuditEntry, Receipt
from core.capsule_cache import CapsuleCache
from core.endpoints import parse_host_port
from core.rate_limit import RateLimiter
from kms_node import data_lock, metrics
from kms_node.anchoring import Anchorer, AnchorOutcome, HsmTxSigner, anchors_here
from kms_node.audit_log import AuditLog
from kms_node.audit_service import AuditService
from kms_node.chain_follower import ChainFollower, ConfirmedRegistry
from kms_node.hardening import forbid_core_dumps
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.index_snapshot import SNAPSHOT_FILE, IndexSnapshots, IndexSnapshotter
from kms_node.kfrag_cache import KfragCache
from kms_node.kfrag_store import KfragStore
from kms_node.readiness import Readiness, data_dir_writable
from kms_node.replay import NonceMemory, ReplayGuard, SharedReplayGuard
from kms_node.service import NodeService
from kms_node.settings import NodeSettings
from kms_node.supervisor import die_with_parent
from proto import rpc
from proto.kms.v1 import common_pb2, node_pb2
from proto.stubs import AUDIT_SERVICE, NODE_SERVICE

log = structlog.get_logger("medkms.node")

SERVICE_NAME = NODE_SERVICE.full_name


class CountedAudit:
    """The audit log as the service's sink, counting each decision once it is durable
    (``kms_node_decisions_total``), so the counts are exactly what the log holds."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        receipts = self._log.append_many(entries)
        for entry in entries:
            metrics.count_decision(entry.decision, entry.reason_code)
        return receipts


def build_server(
    service: NodeService, audit: AuditService, kfrags: KfragStore, max_workers: int
) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        # Several processes of one node share the port; the kernel spreads
        # connections between them.
        options=[*rpc.CHANNEL_OPTIONS, ("grpc.so_reuseport", 1)],
    )

    def node_info(_msg: node_pb2.GetNodeInfoRequest, _ctx: object) -> node_pb2.NodeInfo:
        return service.node_info()

    def enroll(
        msg: common_pb2.EnrollKeyFragmentRequest, _ctx: object
    ) -> common_pb2.EnrollKeyFragmentResponse:
        response = service.enroll(msg)
        metrics.KFRAGS_STORED.set(kfrags.count())
        return response

    def reencrypt(msg: common_pb2.ReencryptionRequest, _ctx: object) -> node_pb2.ReencryptResponse:
        return service.reencrypt(msg)

    def reencrypt_batch(
        msg: common_pb2.ReencryptionBatchRequest, _ctx: object
    ) -> node_pb2.ReencryptBatchResponse:
        return service.reencrypt_batch(msg)

    def reencrypt_many(
        msg: node_pb2.ReencryptManyRequest, _ctx: object
    ) -> node_pb2.ReencryptManyResponse:
        return service.reencrypt_many(msg)

    methods = [
        rpc.Method("GetNodeInfo", node_pb2.GetNodeInfoRequest, node_info),
        rpc.Method("EnrollKeyFragment", common_pb2.EnrollKeyFragmentRequest, enroll),
        rpc.Method("Reencrypt", common_pb2.ReencryptionRequest, reencrypt),
        rpc.Method("ReencryptBatch", common_pb2.ReencryptionBatchRequest, reencrypt_batch),
        rpc.Method("ReencryptMany", node_pb2.ReencryptManyRequest, reencrypt_many),
    ]
    audit_methods = audit.rpc_methods()
    metrics.start_at_zero([m.name for m in [*methods, *audit_methods]], list(AnchorOutcome))
    server.add_generic_rpc_handlers(
        [
            rpc.service_handler(NODE_SERVICE, methods, metrics.observe_request),
            rpc.service_handler(AUDIT_SERVICE, audit_methods, metrics.observe_request),
        ]
    )
    return server


def serve(settings: NodeSettings, *, worker: int | None = None) -> None:
    """Open the HSM and stores, start the servers, block until SIGTERM/SIGINT.

    ``worker`` is set when this process is one of several sharing the port; the
    supervisor then serves the metrics."""
    if worker is not None:
        die_with_parent()
    # Before the HSM is opened: nothing the process holds may reach a core dump.
    forbid_core_dumps()
    if settings.dev_plaintext:
        log.warning(
            "node_plaintext",
            node_id=settings.node_id,
            warning="DEVELOPMENT MODE (dev_plaintext): gRPC without TLS or client "
            "certificates; anyone who can reach the port can call the node",
        )
    keystore = Pkcs11KeyStore.open(
        settings.hsm_module,
        settings.hsm_token_label,
        settings.user_pin(),
        softhsm_conf=settings.softhsm_conf,
    )
    # Creates the data directory if need be. Shared with the node's other server
    # processes: refuses maintenance meanwhile.
    data_lock.hold_while_serving(settings.data_dir)
    kfrags = KfragStore(settings.kfrag_db)
    audit = AuditLog(settings.audit_db, keystore, settings.node_id)
    registry = RegistryClient(settings.chain_rpc_url, settings.registry_address)
    chain_id = registry.chain_id()
    snapshots = IndexSnapshots(
        settings.data_dir / SNAPSHOT_FILE,
        keystore,
        chain_id=chain_id,
        registry_address=registry.address,
    )
    follower = ChainFollower(
        registry,
        start_block=settings.registry_start_block,
        poll_interval_s=settings.chain_poll_interval_s,
        max_age_s=settings.chain_max_age_s,
        max_lag_blocks=settings.chain_max_lag_blocks,
        confirmations=settings.chain_confirmations,
        index=snapshots.load(registry),
    )
    # Several processes on one port must share one replay memory, or a replay sent
    # on another connection would reach a process that has not seen the nonce.
    replay: NonceMemory = (
        SharedReplayGuard(
            settings.data_dir / "replay.sqlite",
            settings.request_window_s,
            settings.replay_max_entries,
        )
        if settings.processes > 1
        else ReplayGuard(settings.request_window_s, settings.replay_max_entries)
    )
    unwrapped = KfragCache(settings.kfrag_cache_ttl_s)
    service = NodeService(
        node_id=settings.node_id,
        keystore=keystore,
        kfrags=kfrags,
        registry=(
            ConfirmedRegistry(registry, settings.chain_confirmations)
            if settings.chain_confirmations
            else registry
        ),
        index=follower,
        registry_address=registry.address,
        chain_id=chain_id,
        replay=replay,
        limiter=RateLimiter.share_of(
            settings.rate_limit_per_s, settings.rate_limit_burst, settings.processes
        ),
        audit=CountedAudit(audit),
        request_window_s=settings.request_window_s,
        capsules=CapsuleCache(),
        unwrapped=unwrapped,
    )
    server = build_server(service, AuditService(audit), kfrags, settings.max_workers)
    health = rpc.add_health_and_reflection(server, [SERVICE_NAME, AUDIT_SERVICE.full_name])
    host, port = parse_host_port(settings.listen, "listen")
    # Mutual TLS: only holders of a certificate from the cluster CA (the
    # coordinator, operators' tools) can connect at all. Bound before the
    # follower starts, so a bad certificate or a taken port fails start-up cleanly.
    settings.transport().add_port(server, f"{host}:{port}", require_client_cert=True)
    follower.on_events = service.shred_revoked
    follower.start()
    # One process per node writes the snapshot (all of them read it at start).
    snapshotter = (
        IndexSnapshotter(follower, snapshots, settings.index_snapshot_interval_s)
        if not worker
        else None
    )
    if snapshotter is not None:
        snapshotter.start()
    # NOT_SERVING on health checks while the node cannot serve: a stale grant index, or
    # a data directory (the audit log's) that cannot be written.
    readiness = Readiness(
        [follower.staleness, data_dir_writable(settings.data_dir)],
        lambda serving: rpc.set_health(health, [SERVICE_NAME, AUDIT_SERVICE.full_name], serving),
    )
    readiness.start()
    if settings.metrics_listen and worker is None:
        metrics.serve(*parse_host_port(settings.metrics_listen, "metrics_listen"))
    metrics.KFRAGS_STORED.set(kfrags.count())
    anchorer = None
    if anchors_here(settings.anchoring, worker):
        anchorer = Anchorer(
            audit,
            registry,
            HsmTxSigner(keystore),
            every_entries=settings.anchor_every_entries,
            interval_s=settings.anchor_interval_s,
        )
        anchorer.start()
    server.start()
    log.info(
        "node_started",
        worker=worker,
        node_id=settings.node_id,
        listen=settings.listen,
        tls=not settings.dev_plaintext,
        metrics=settings.metrics_listen,
        registry=registry.address,
    )

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("node_stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Python runs signal handlers in the main thread, but the kernel may deliver the
    # signal to one of gRPC's threads, which does not wake a main thread blocked in an
    # untimed wait: poll, so that SIGTERM is acted on within half a second. Each poll
    # drops the unwrapped kfrags older than kfrag_cache_ttl_s (ADR 13), requests or not.
    while not stopping.wait(0.5):
        unwrapped.drop_expired()
    readiness.stop()
    health.enter_graceful_shutdown()
    server.stop(grace=2).wait()
    unwrapped.clear()
    follower.stop()
    if snapshotter is not None:
        snapshotter.stop()
    if anchorer is not None:
        # After the server, so that its last anchor covers every entry this process
        # wrote. With several processes, worker 0 anchors, and the supervisor stops it
        # after the others, so that this covers theirs too.
        anchorer.stop()
    kfrags.close()
    audit.close()
    keystore.close()
    log.info("node_stopped", node_id=settings.node_id)
