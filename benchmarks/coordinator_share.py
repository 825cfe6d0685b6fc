"""The coordinator's own work per read (issue 14): its service's ``Reencrypt`` handler,
run in this process against nodes that answer at once with fragments computed
beforehand, so that what is measured is the coordinator's Python per read (request
parsing, the signature, admission, the fan-out and its bookkeeping, the kept read, its
log line and metrics), without gRPC and without any node's work.

``python -m benchmarks.coordinator_share [--reads N] [--rounds R] [--out FILE]`` signs N
reads of one record (fresh nonces, as an app sends them), then in each round serves them
one at a time and reports the CPU per read; the median over rounds is the figure. The
coordinator's gRPC (one call in, m calls out) comes on top: about 1 ms at concurrency 4
on this machine for a relay that does nothing else (``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import umbral_pre as umbral

from benchmarks.json_results import add_out_option, emit
from clients.sdk.identity import Identity
from clients.sdk.signed_requests import RequestSigner
from coordinator.node_pool import NodePool
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings, NodeAddress
from core import logs
from core.record_types import RecordType
from core.registry_types import PatientInfo
from core.request_auth import Domain
from proto.kms.v1 import common_pb2, node_pb2

NODES, THRESHOLD = 5, 3
DOMAIN = Domain(31337, "0x" + "00" * 19 + "01")
WARMUP = 50


class _InstantNode:
    """A node that answers every single request at once with the same fragment."""

    def __init__(self, answer: node_pb2.ReencryptResponse) -> None:
        self._answer = answer

    async def Reencrypt(
        self, _request: common_pb2.ReencryptionRequest, *, timeout: float
    ) -> node_pb2.ReencryptResponse:
        return self._answer


class _Registry:
    def __init__(self, patient: PatientInfo) -> None:
        self._patient = patient

    def get_patient(self, _address: str) -> PatientInfo | None:
        return self._patient

    def signing_domain(self) -> Domain:
        return DOMAIN


class _Context:
    """What the handler asks of a gRPC call's context."""

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"


def _service() -> tuple[CoordinatorService, RequestSigner, str, bytes]:
    """A coordinator with instant nodes; the signer of a granted app; the patient; a capsule."""
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    capsule, _ = umbral.encrypt(alice.record_public_key(RecordType.LAB_RESULT), b"k" * 32)
    kfrags = umbral.generate_kfrags(
        delegating_sk=alice.record_secret_key(RecordType.LAB_RESULT),
        receiving_pk=umbral.PublicKey.from_compressed_bytes(bob.umbral_public_key()),
        signer=alice.kfrag_signer(),
        threshold=THRESHOLD,
        shares=NODES,
        sign_delegating_key=True,
        sign_receiving_key=True,
    )
    node_ids = [f"node-{i}" for i in range(1, NODES + 1)]
    nodes = {
        node_id: _InstantNode(
            node_pb2.ReencryptResponse(
                fragment=common_pb2.CapsuleFragment(
                    node_id=node_id,
                    cfrag=bytes(umbral.reencrypt(capsule, kfrag)),
                    receipt=common_pb2.AuditReceipt(node_id=node_id, signature=bytes(64)),
                )
            )
        )
        for node_id, kfrag in zip(node_ids, kfrags, strict=True)
    }
    settings = CoordinatorSettings(
        listen="127.0.0.1:1",
        threshold=THRESHOLD,
        nodes=tuple(NodeAddress(n, "127.0.0.1:1") for n in node_ids),
        chain_rpc_url="http://127.0.0.1:1",
        registry_address=DOMAIN.registry_address,
        requester_rate_per_s=1e9,  # one app drives the load, as in the harness
        requester_burst=10**9,
    )
    patient = PatientInfo(alice.address, alice.record_public_keys(), alice.verifying_key())
    service = CoordinatorService(
        settings,
        _Registry(patient),
        lambda node: nodes[node.node_id],  # type: ignore[arg-type, return-value]
        pool=NodePool(node_ids, max_hedge_s=settings.node_timeout_s / 4),
    )
    return (
        service,
        RequestSigner(bob.account, bob.umbral_public_key(), DOMAIN),
        alice.address,
        bytes(capsule),
    )


async def _serve(service: CoordinatorService, requests: list[bytes]) -> float:
    """CPU seconds per read, each parsed from its bytes and its answer serialised, as the
    gRPC layer does."""
    context: Any = _Context()
    start = time.process_time()
    for raw in requests:
        answer = await service.reencrypt(common_pb2.ReencryptionRequest.FromString(raw), context)
        answer.SerializeToString()
    return (time.process_time() - start) / len(requests)


def run(reads: int, rounds: int) -> dict[str, Any]:
    # JSON logs as the coordinator writes them, to a sink that costs no disk.
    stderr = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            logs.configure("coordinator")
        finally:
            sys.stderr = stderr
        service, signer, patient, capsule = _service()

        def signed() -> bytes:
            request = signer.single(patient, b"\x01" * 32, RecordType.LAB_RESULT, capsule)
            return request.SerializeToString()

        asyncio.run(_serve(service, [signed() for _ in range(WARMUP)]))
        per_read = []
        for _ in range(rounds):
            batch = [signed() for _ in range(reads)]
            per_read.append(asyncio.run(_serve(service, batch)) * 1000.0)
    return {
        "command": f"python -m benchmarks.coordinator_share --reads {reads} --rounds {rounds}",
        "threshold": THRESHOLD,
        "nodes": NODES,
        "handler_cpu_ms_per_read": statistics.median(per_read),
        "rounds_ms": per_read,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000, help="reads per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the report gives the median")
    add_out_option(parser)
    args = parser.parse_args(argv)
    emit(run(args.reads, args.rounds), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
