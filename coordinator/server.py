"""The coordinator's gRPC server (asyncio): Coordinator service, health, reflection,
metrics."""

from __future__ import annotations

import asyncio
import signal

import grpc
import structlog

from coordinator import metrics
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from core.endpoints import parse_host_port
from proto import rpc
from proto.half_open_calls import (
    FIRST_MESSAGE_TIMEOUT_S,
    HANDSHAKE_OPTION,
    FirstMessageDeadline,
)
from proto.kms.v1 import common_pb2, coordinator_pb2
from proto.stubs import COORDINATOR_SERVICE

log = structlog.get_logger("medkms.coordinator")

SERVICE_NAME = COORDINATOR_SERVICE.full_name
#: calls one connection may have in flight: bounds what one client holds open (a throttled
#: call is answered after THROTTLED_ANSWER_DELAY_S); one more is refused (UNAVAILABLE)
MAX_STREAMS_PER_CONNECTION = rpc.MAX_CALLS_PER_CONNECTION


async def serve(settings: CoordinatorSettings, service: CoordinatorService) -> None:
    """Serve ``service`` until SIGTERM or SIGINT, then stop gracefully."""
    if settings.dev_plaintext:
        log.warning(
            "coordinator_plaintext",
            warning="DEVELOPMENT MODE (dev_plaintext): no TLS to apps or to nodes",
        )
    server = grpc.aio.server(
        interceptors=[
            FirstMessageDeadline(
                FIRST_MESSAGE_TIMEOUT_S, lambda _method: metrics.CALLS_WITHOUT_REQUEST.inc()
            )
        ],
        options=[
            *rpc.coordinator_server_options(settings.threshold),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            HANDSHAKE_OPTION,
        ],
    )
    methods = [
        rpc.Method("GetClusterInfo", coordinator_pb2.GetClusterInfoRequest, service.cluster_info),
        rpc.Method(
            "GetClusterStatus", coordinator_pb2.GetClusterStatusRequest, service.cluster_status
        ),
        rpc.Method("Reencrypt", common_pb2.ReencryptionRequest, service.reencrypt),
        rpc.Method("ReencryptBatch", common_pb2.ReencryptionBatchRequest, service.reencrypt_batch),
        rpc.Method("RetryReencrypt", coordinator_pb2.RetryReadRequest, service.retry_reencrypt),
        rpc.Method(
            "RetryReencryptBatch", coordinator_pb2.RetryReadRequest, service.retry_reencrypt_batch
        ),
        rpc.Method(
            "EnrollKeyFragments",
            coordinator_pb2.RelayEnrollmentsRequest,
            service.enroll_key_fragments,
        ),
    ]
    metrics.start_at_zero([n.node_id for n in settings.nodes])
    server.add_generic_rpc_handlers(
        [rpc.aio_service_handler(COORDINATOR_SERVICE, methods, metrics.observe_request)]
    )
    if settings.metrics_listen:
        metrics.serve(*parse_host_port(settings.metrics_listen, "metrics_listen"))
    health = await rpc.aio_add_health_and_reflection(server, [SERVICE_NAME])
    host, port = parse_host_port(settings.listen, "listen")
    # Server authentication only: apps check the coordinator against the CA and
    # prove who they are by signing each request, not with a certificate.
    settings.server_transport().add_port(server, f"{host}:{port}", require_client_cert=False)
    await server.start()
    log.info(
        "coordinator_started",
        listen=settings.listen,
        tls=not settings.dev_plaintext,
        threshold=settings.threshold,
        nodes=[n.node_id for n in settings.nodes],
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await health.enter_graceful_shutdown()
    await server.stop(grace=2)
    log.info("coordinator_stopped")
