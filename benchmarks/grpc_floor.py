"""What one gRPC call costs a server that does nothing, over the node's transport.

The node answers each ``Reencrypt`` in the event loop of a ``grpc.aio`` server behind
mutual TLS (ADR 17). This module starts that kind of server, with the same options and
a handler that only returns a node-sized answer, in a child process, and calls it from
this one over TLS connections with client certificates from a throwaway CA. The server
process's CPU per call is the framework's floor: what a node would spend per request
if its own work cost nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.process_stats import cpu_seconds

if TYPE_CHECKING:  # at run time, only the server child imports it (see _serve)
    import grpc

#: about a signed single request in, a cfrag with its signed receipt out
REQUEST_BYTES, RESPONSE_BYTES = 400, 450
CALLS = 3000
_METHOD = "/medkms.bench.Floor/Call"
_SERVER_NAME = "floor-node"


def _serve(ca_dir: Path, ready: Any, stop: Any, port_out: Any) -> None:
    import asyncio

    asyncio.run(_serve_async(ca_dir, ready, stop, port_out))


async def _serve_async(ca_dir: Path, ready: Any, stop: Any, port_out: Any) -> None:
    import asyncio

    import grpc

    from deploy.certs import ClusterCa
    from proto import rpc
    from proto.transport import Transport

    ca = ClusterCa.ensure(ca_dir)
    files = ca.server_cert(_SERVER_NAME)
    answer = os.urandom(RESPONSE_BYTES)

    async def call(_raw: bytes, _context: object) -> bytes:
        return answer

    server = grpc.aio.server(options=rpc.CHANNEL_OPTIONS)
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(call)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("medkms.bench.Floor", {"Call": handler})]
    )
    transport = Transport.tls(ca.ca_cert, files.cert, files.key)
    port_out.value = transport.add_port(server, "127.0.0.1:0", require_client_cert=True)
    await server.start()
    ready.set()
    # ``stop`` is a process-shared event: wait for it off the loop.
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    await server.stop(grace=0)


def _phase(calls: list[Any], concurrency: int, pid: int) -> dict[str, float]:
    payload = os.urandom(REQUEST_BYTES)
    each = CALLS // concurrency

    def work(i: int) -> None:
        for _ in range(each):
            calls[i % len(calls)](payload, timeout=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall0, cpu_seconds(pid) - cpu0
    done = each * concurrency
    return {
        "calls_per_s": done / wall,
        "server_cpu_ms_per_call": cpu / done * 1000.0,
        "mean_latency_ms": wall / each * 1000.0,
    }


def measure(connections: int = 4) -> dict[str, Any]:
    """Server CPU per empty call at concurrency 1 and 4, mutual TLS, asyncio server."""
    from deploy.certs import ClusterCa
    from proto.transport import Transport

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="medkms-grpc-floor-") as tmp:
        ca_dir = Path(tmp)
        ca = ClusterCa.ensure(ca_dir)
        client = ca.client_cert("floor-client")
        ready, stop = context.Event(), context.Event()
        port = context.Value("i", 0)
        child = context.Process(target=_serve, args=(ca_dir, ready, stop, port), daemon=True)
        child.start()
        try:
            if not ready.wait(30):
                raise RuntimeError("the gRPC floor server did not start")
            transport = Transport.tls(ca.ca_cert, client.cert, client.key)
            options = [("grpc.use_local_subchannel_pool", 1)]
            channels = [
                transport.channel(
                    f"127.0.0.1:{port.value}", options=options, server_name=_SERVER_NAME
                )
                for _ in range(connections)
            ]
            try:
                calls: list[grpc.UnaryUnaryMultiCallable[bytes, bytes]] = [
                    c.unary_unary(_METHOD) for c in channels
                ]
                for call in calls:
                    call(b"warm-up", timeout=10)
                pid = child.pid
                if pid is None:
                    raise RuntimeError("the gRPC floor server has no pid")
                return {
                    "request_bytes": REQUEST_BYTES,
                    "response_bytes": RESPONSE_BYTES,
                    "c1": _phase(calls, 1, pid),
                    "c4": _phase(calls, 4, pid),
                }
            finally:
                for channel in channels:
                    channel.close()
        finally:
            stop.set()
            child.join(10)
            if child.is_alive():
                child.kill()
