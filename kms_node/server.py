"""The node's gRPC server: the KmsNode service, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

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
from kms_node.loop_service import (
    Arrivals,
    LoopCommitter,
    LoopNodeService,
    ReadArrivals,
)
from kms_node.readiness import Readiness, data_dir_writable
from kms_node.replay import NonceMemory, ServedBeforeStart, SharedReplayGuard
from kms_node.service import NodeService
from kms_node.settings import NodeSettings
from kms_node.supervisor import die_with_parent
from proto import rpc
from proto.half_open_calls import (
    FIRST_MESSAGE_TIMEOUT_S,
    HANDSHAKE_OPTION,
    FirstMessageDeadline,
)
from proto.interceptors import WrapperChain
from proto.stubs import AUDIT_SERVICE, NODE_SERVICE

log = structlog.get_logger("medkms.node")

SERVICE_NAME = NODE_SERVICE.full_name


class CountedAudit:
    """The audit log as the service's sink, counting each decision once it is durable
    (``kms_node_decisions_total``), so the counts are exactly what the log holds, and the
    entries of each commit (``kms_node_audit_commit_entries``)."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        receipts = self._log.append_many(entries)
        metrics.AUDIT_COMMIT_ENTRIES.observe(len(entries))
        for entry in entries:
            metrics.count_decision(entry.decision, entry.reason_code)
        return receipts


#: the RPCs whose audit entries a commit may wait for (ADR 17)
READ_METHODS = ("Reencrypt", "ReencryptBatch", "ReencryptMany")


def build_server(
    service: LoopNodeService,
    audit: AuditService,
    kfrags: KfragStore,
    arrivals: ReadArrivals,
) -> grpc.aio.Server:
    """The node's gRPC server (asyncio, ADR 17): reads in the loop, what may block in
    ``service``'s pool. Call inside the running loop."""
    server = grpc.aio.server(
        # The deadline for a call's message first: it hands the message to the read's
        # handler as ReadArrivals wrapped it, which marks the read started.
        interceptors=[
            WrapperChain(
                FirstMessageDeadline(
                    FIRST_MESSAGE_TIMEOUT_S, lambda _method: metrics.CALLS_WITHOUT_REQUEST.inc()
                ),
                arrivals,
            )
        ],
        # Several processes of one node share the port; the kernel spreads
        # connections between them.
        options=[*rpc.CHANNEL_OPTIONS, ("grpc.so_reuseport", 1), HANDSHAKE_OPTION],
    )
    methods = service.rpc_methods(on_enrolled=lambda: metrics.KFRAGS_STORED.set(kfrags.count()))
    audit_methods = service.in_pool_methods(audit.rpc_methods())
    metrics.start_at_zero([m.name for m in [*methods, *audit_methods]], list(AnchorOutcome))
    server.add_generic_rpc_handlers(
        [
            rpc.aio_service_handler(NODE_SERVICE, methods, metrics.observe_request),
            rpc.aio_service_handler(AUDIT_SERVICE, audit_methods, metrics.observe_request),
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
    if worker is None:  # the node's only server process: the serving instance
        data_lock.hold_as_the_serving_instance(settings.data_dir)
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
        kfrags,
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
    # One replay memory on disk: shared by several processes on one port (or a replay
    # sent on another connection would reach a process that has not seen the nonce),
    # and kept across a restart (or every request seen in the last window could be
    # replayed once to a node that restarted). About 10 us of CPU a request.
    replay: NonceMemory = SharedReplayGuard(
        settings.data_dir / "replay.sqlite",
        settings.request_window_s,
        settings.replay_max_entries,
    )
    # The durable record of what was granted covers what the replay memory may have lost.
    served = ServedBeforeStart.from_audit_log(
        audit.newest_first(), settings.request_window_s, time.time()
    )
    log.info("replays_refused_from_audit_log", node_id=settings.node_id, reads=len(served))
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
        served_before_start=served,
        limiter=RateLimiter.share_of(
            settings.rate_limit_per_s, settings.rate_limit_burst, settings.processes
        ),
        audit=CountedAudit(audit),
        request_window_s=settings.request_window_s,
        capsules=CapsuleCache(),
        unwrapped=unwrapped,
        processes=settings.processes,
    )
    opened = _Opened(keystore, kfrags, audit, registry, snapshots, follower, unwrapped, service)
    try:
        asyncio.run(_serve_until_signalled(settings, worker, opened))
    finally:
        follower.stop()
        kfrags.close()
        audit.close()
        keystore.close()
    log.info("node_stopped", node_id=settings.node_id)


@dataclasses.dataclass(frozen=True)
class _Opened:
    """What ``serve`` opened before the event loop starts."""

    keystore: Pkcs11KeyStore
    kfrags: KfragStore
    audit: AuditLog
    registry: RegistryClient
    snapshots: IndexSnapshots
    follower: ChainFollower
    unwrapped: KfragCache
    service: NodeService


async def _serve_until_signalled(
    settings: NodeSettings, worker: int | None, opened: _Opened
) -> None:
    """Serve in this thread's event loop until SIGTERM or SIGINT, then stop gracefully."""
    service, audit, kfrags, follower = opened.service, opened.audit, opened.kfrags, opened.follower
    loop = asyncio.get_running_loop()
    # What may block (chain reads, enrollments, the auditor's pages) runs here, never in
    # the loop: max_workers of them at once.
    pool = ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="blocking")
    arrivals = Arrivals()
    committer = LoopCommitter(CountedAudit(audit), arrivals)
    reads = LoopNodeService(service, committer, pool)
    server = build_server(
        reads,
        AuditService(audit),
        kfrags,
        ReadArrivals([f"/{SERVICE_NAME}/{name}" for name in READ_METHODS], arrivals, committer),
    )
    services = [SERVICE_NAME, AUDIT_SERVICE.full_name]
    health = await rpc.aio_add_health_and_reflection(server, services)
    host, port = parse_host_port(settings.listen, "listen")
    # Mutual TLS: only holders of a certificate from the cluster CA (the
    # coordinator, operators' tools) can connect at all. Bound before the
    # follower starts, so a bad certificate or a taken port fails start-up cleanly.
    settings.transport().add_port(server, f"{host}:{port}", require_client_cert=True)
    follower.on_events = service.shred_revoked
    follower.start()
    # One process per node writes the snapshot (all of them read it at start).
    snapshotter = (
        IndexSnapshotter(follower, opened.snapshots, settings.index_snapshot_interval_s)
        if not worker
        else None
    )
    if snapshotter is not None:
        snapshotter.start()

    def report(serving: bool) -> None:
        # From the readiness thread: the health servicer belongs to the loop.
        asyncio.run_coroutine_threadsafe(rpc.aio_set_health(health, services, serving), loop)

    # NOT_SERVING on health checks while the node cannot serve: a stale grant index, or
    # a data directory (the audit log's) that cannot be written.
    readiness = Readiness([follower.staleness, data_dir_writable(settings.data_dir)], report)
    readiness.start()
    if settings.metrics_listen and worker is None:
        metrics.serve(*parse_host_port(settings.metrics_listen, "metrics_listen"))
    metrics.KFRAGS_STORED.set(kfrags.count())
    anchorer = None
    if anchors_here(settings.anchoring, worker):
        anchorer = Anchorer(
            audit,
            opened.registry,
            HsmTxSigner(opened.keystore),
            every_entries=settings.anchor_every_entries,
            interval_s=settings.anchor_interval_s,
        )
        anchorer.start()
    await server.start()
    log.info(
        "node_started",
        worker=worker,
        node_id=settings.node_id,
        listen=settings.listen,
        tls=not settings.dev_plaintext,
        metrics=settings.metrics_listen,
        registry=opened.registry.address,
    )

    stopping = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        log.info("node_stopping", signal=signum.name)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    # Every half second, the unwrapped kfrags older than kfrag_cache_ttl_s go (ADR 13),
    # requests or not.
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), 0.5)
        except TimeoutError:
            pass
        opened.unwrapped.drop_expired()
    readiness.stop()
    await health.enter_graceful_shutdown()
    await server.stop(grace=2)
    # Off the loop, so that reads the pool finishes for callers who left are committed.
    await loop.run_in_executor(None, lambda: pool.shutdown(wait=True, cancel_futures=True))
    await reads.finish_unanswered()
    opened.unwrapped.clear()
    follower.stop()
    if snapshotter is not None:
        snapshotter.stop()
    if anchorer is not None:
        # After the server, so that its last anchor covers every entry this process
        # wrote. With several processes, worker 0 anchors, and the supervisor stops it
        # after the others, so that this covers theirs too.
        anchorer.stop()
