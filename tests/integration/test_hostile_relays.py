"""A lying node and a lying coordinator, on the real cluster: neither can make an app
accept a wrong key, and honest answers still get through.

- A compromised node (its machine and TLS identity) returns corrupted capsule
  fragments: the coordinator verifies every fragment, drops that node's and asks
  another, so reads keep working.
- A compromised coordinator returns one corrupted fragment among good ones: the app
  verifies every fragment itself and decrypts with the others. Returning garbage only
  gets it a clear IntegrityError at the app, never wrong plaintext.
"""

from __future__ import annotations

import secrets
import sys
import tomllib
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from medkms.clients.provider import ProviderClient
from medkms.core.errors import IntegrityError
from medkms.deploy import processes
from medkms.deploy.certs import ClusterCa
from medkms.deploy.demo import lab_result
from medkms.deploy.local_cluster import HOST, LocalCluster
from medkms.proto.kms.v1 import common_pb2, coordinator_pb2, node_pb2
from medkms.proto.stubs import COORDINATOR_SERVICE, NODE_SERVICE, NodeStub
from medkms.proto.transport import Transport
from tests.integration.conftest import People

pytestmark = pytest.mark.cluster


def _corrupt(cfrag: bytes) -> bytes:
    """Flip one bit in the middle: still parses as often as not, never verifies."""
    middle = len(cfrag) // 2
    return cfrag[:middle] + bytes([cfrag[middle] ^ 0x01]) + cfrag[middle + 1 :]


def _serve(
    service: Any, handlers: dict[str, grpc.RpcMethodHandler], transport: Transport, *, mtls: bool
) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = processes.free_port()
    transport.add_port(server, f"{HOST}:{port}", require_client_cert=mtls)
    server.start()
    return server, f"{HOST}:{port}"


def _unary(
    request: type[Any], response: type[Any], handler: Callable[[Any, Any], Any]
) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


# --- a compromised node -------------------------------------------------------------------


class LyingNode:
    """Stands in for node-1 with node-1's own TLS identity; asks the real node-1 and
    corrupts every fragment it returns."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.node = cluster.nodes[0]
        self.corrupted = 0
        self._upstream = cluster.transport.channel(self.node.address, server_name=self.node.node_id)
        self._stub = NodeStub(self._upstream)
        ca = ClusterCa.ensure(cluster.state_dir / "tls")
        identity = ca.server_cert(self.node.node_id)
        self.transport = Transport.tls(ca.ca_cert, identity.cert, identity.key)

    def reencrypt(
        self, request: common_pb2.ReencryptionRequest, _ctx: object
    ) -> node_pb2.ReencryptResponse:
        response = self._stub.Reencrypt(request, timeout=5)
        response.fragment.cfrag = _corrupt(response.fragment.cfrag)
        self.corrupted += 1
        return response

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Reencrypt": _unary(
                common_pb2.ReencryptionRequest, node_pb2.ReencryptResponse, self.reencrypt
            )
        }

    def close(self) -> None:
        self._upstream.close()


@pytest.fixture
def coordinator_with_a_lying_node(cluster: LocalCluster) -> Iterator[tuple[str, LyingNode]]:
    """A second, real coordinator process whose node-1 is the liar."""
    liar = LyingNode(cluster)
    server, liar_address = _serve(
        NODE_SERVICE.full_name, liar.handlers(), liar.transport, mtls=True
    )
    config_path = Path(cluster.data["coordinator"]["config"])
    config = tomllib.loads(config_path.read_text())
    address = f"{HOST}:{processes.free_port()}"
    lines = []
    for key, value in config.items():
        if key == "listen":
            value = address
        if key != "nodes":
            lines.append(f"{key} = {_toml(value)}")
    for node in config["nodes"]:
        target = liar_address if node["node_id"] == liar.node.node_id else node["address"]
        lines += ["[[nodes]]", f'node_id = "{node["node_id"]}"', f'address = "{target}"']
    second = config_path.with_name("coordinator-with-liar.toml")
    second.write_text("\n".join(lines) + "\n")
    log = cluster.state_dir / "logs" / "coordinator-with-liar.log"
    process = processes.spawn(
        [sys.executable, "-m", "medkms.coordinator.cli", "serve", "--config", str(second)], log
    )
    try:
        processes.wait_until(
            "coordinator-with-liar",
            lambda: processes.grpc_serving(address, cluster.app_transport),
            process,
            log,
        )
        yield address, liar
    finally:
        process.terminate()
        process.wait(timeout=10)
        server.stop(grace=None)
        liar.close()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_a_node_returning_corrupted_fragments_is_outvoted(
    people: People, coordinator_with_a_lying_node: tuple[str, LyingNode]
) -> None:
    address, liar = coordinator_with_a_lying_node
    people.grant_doctor()
    with ProviderClient(
        people.doctor,
        people.registry,
        people.cluster.blob_store(),
        address,
        people.cluster.app_transport,
    ) as doctor:
        for _ in range(6):
            assert doctor.read_record(people.lab.record_id) == lab_result()
    # The liar was asked (it is among the first three the coordinator tries) and every
    # fragment it sent was dropped; the reads were served by the honest nodes.
    assert liar.corrupted >= 1


# --- a compromised coordinator ------------------------------------------------------------


class LyingCoordinator:
    """Answers apps with the cluster's coordinator identity, but asks every node itself
    and corrupts (or replaces with garbage) what it returns."""

    def __init__(self, cluster: LocalCluster, mode: str) -> None:
        self.mode = mode
        self._channels = [
            cluster.transport.channel(n.address, server_name=n.node_id) for n in cluster.nodes
        ]
        self._stubs = [NodeStub(c) for c in self._channels]
        self._threshold = cluster.threshold
        ca = ClusterCa.ensure(cluster.state_dir / "tls")
        identity = ca.server_cert("coordinator")
        self.transport = Transport.tls(ca.ca_cert, identity.cert, identity.key)

    def reencrypt(
        self, request: common_pb2.ReencryptionRequest, _ctx: object
    ) -> coordinator_pb2.CoordinatorReencryptResponse:
        if self.mode == "garbage":
            fragments = [
                common_pb2.CapsuleFragment(node_id=f"node-{i}", cfrag=secrets.token_bytes(381))
                for i in range(self._threshold)
            ]
        else:
            fragments = [stub.Reencrypt(request, timeout=5).fragment for stub in self._stubs]
            fragments[0].cfrag = _corrupt(fragments[0].cfrag)
        return coordinator_pb2.CoordinatorReencryptResponse(
            fragments=fragments, threshold=self._threshold
        )

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Reencrypt": _unary(
                common_pb2.ReencryptionRequest,
                coordinator_pb2.CoordinatorReencryptResponse,
                self.reencrypt,
            )
        }

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@pytest.fixture(params=["corrupt_one", "garbage"])
def lying_coordinator(
    request: pytest.FixtureRequest, cluster: LocalCluster
) -> Iterator[tuple[str, str]]:
    liar = LyingCoordinator(cluster, request.param)
    server, address = _serve(
        COORDINATOR_SERVICE.full_name, liar.handlers(), liar.transport, mtls=False
    )
    try:
        yield address, liar.mode
    finally:
        server.stop(grace=None)
        liar.close()


def test_the_app_verifies_what_a_coordinator_returns(
    people: People, lying_coordinator: tuple[str, str]
) -> None:
    address, mode = lying_coordinator
    people.grant_doctor()
    with ProviderClient(
        people.doctor,
        people.registry,
        people.cluster.blob_store(),
        address,
        people.cluster.app_transport,
    ) as doctor:
        if mode == "garbage":
            with pytest.raises(IntegrityError, match="0 valid capsule fragments"):
                doctor.read_record(people.lab.record_id)
        else:
            # One bad fragment among five: dropped, the other four suffice.
            assert doctor.read_record(people.lab.record_id) == lab_result()
    # The real cluster keeps serving.
    with people.provider() as honest:
        assert honest.read_record(people.lab.record_id) == lab_result()
