"""Transport: channels and ports for each mode, against an in-process server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.errors import ConfigurationError
from deploy.certs import ClusterCa
from proto.transport import Transport, require_tls_settings

#: grpc.health.v1's Check, called by path: HealthStub's type stubs declare no methods.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCa:
    return ClusterCa.ensure(tmp_path_factory.mktemp("tls"))


def serve(transport: Transport, *, require_client_cert: bool) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = transport.add_port(server, "127.0.0.1:0", require_client_cert=require_client_cert)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def mtls_server(ca: ClusterCa) -> Iterator[str]:
    files = ca.server_cert("node-1")
    yield from serve(Transport.tls(ca.ca_cert, files.cert, files.key), require_client_cert=True)


def check(transport: Transport, address: str, server_name: str | None = None) -> str:
    with transport.channel(address, server_name=server_name) as channel:
        health_check = channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = health_check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_mutual_tls_with_a_client_certificate_from_the_ca(ca: ClusterCa, mtls_server: str) -> None:
    operator = ca.client_cert("operator")
    transport = Transport.tls(ca.ca_cert, operator.cert, operator.key)
    assert check(transport, mtls_server) == "SERVING"
    assert check(transport, mtls_server, server_name="node-1") == "SERVING"
    assert check(transport, mtls_server, server_name="node-2") == "UNAVAILABLE"


def test_mutual_tls_refuses_plaintext_and_anonymous_clients(
    ca: ClusterCa, mtls_server: str
) -> None:
    assert check(Transport.plaintext(), mtls_server) == "UNAVAILABLE"
    assert check(Transport.tls(ca.ca_cert), mtls_server) == "UNAVAILABLE"


def test_aio_channel_speaks_mutual_tls(ca: ClusterCa, mtls_server: str) -> None:
    operator = ca.client_cert("operator")
    transport = Transport.tls(ca.ca_cert, operator.cert, operator.key)

    async def call() -> int:
        async with transport.aio_channel(mtls_server, server_name="node-1") as channel:
            health_check = channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = await health_check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)

    assert asyncio.run(call()) == health_pb2.HealthCheckResponse.SERVING


def test_server_authentication_only_lets_anonymous_tls_clients_in(ca: ClusterCa) -> None:
    files = ca.server_cert("coordinator")
    server = Transport.tls(ca.ca_cert, files.cert, files.key)
    for address in serve(server, require_client_cert=False):
        assert check(Transport.tls(ca.ca_cert), address) == "SERVING"
        assert check(Transport.plaintext(), address) == "UNAVAILABLE"


def test_plaintext_to_plaintext_works() -> None:
    for address in serve(Transport.plaintext(), require_client_cert=True):
        assert check(Transport.plaintext(), address) == "SERVING"


def test_repr_names_files_not_key_bytes(ca: ClusterCa) -> None:
    operator = ca.client_cert("operator")
    transport = Transport.tls(ca.ca_cert, operator.cert, operator.key)
    pem = operator.key.read_bytes()
    assert str(operator.key) in repr(transport)
    for line in pem.splitlines()[1:-1]:
        assert line.decode() not in repr(transport)


def test_half_an_identity_is_refused(ca: ClusterCa, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="needs its key"):
        Transport.tls(ca.ca_cert, cert=tmp_path / "a.crt")
    with pytest.raises(ConfigurationError, match="certificate and key"):
        Transport.tls(ca.ca_cert).add_port(
            grpc.server(futures.ThreadPoolExecutor(1)), "127.0.0.1:0", require_client_cert=True
        )


def test_an_unreadable_key_is_named_in_the_error(ca: ClusterCa, tmp_path: Path) -> None:
    files = ca.server_cert("node-1")
    missing = Transport.tls(ca.ca_cert, files.cert, tmp_path / "gone.key")
    with pytest.raises(ConfigurationError, match=r"cannot read TLS key .*gone\.key"):
        missing.channel("127.0.0.1:1")


def test_settings_need_every_tls_file_or_the_development_mode() -> None:
    files = {"tls_ca_cert": Path("ca.crt"), "tls_cert": None, "tls_key": None}
    with pytest.raises(ConfigurationError, match="missing TLS settings tls_cert, tls_key"):
        require_tls_settings("node config", files, dev_plaintext=False)
    with pytest.raises(ConfigurationError, match="sets dev_plaintext = true and tls_ca_cert"):
        require_tls_settings("node config", files, dev_plaintext=True)
    require_tls_settings("node config", dict.fromkeys(files), dev_plaintext=True)
    require_tls_settings("node config", dict.fromkeys(files, Path("x")), dev_plaintext=False)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "holds no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "holds no"),
    ],
    ids=["empty", "garbled"],
)
def test_a_client_refuses_a_ca_bundle_it_cannot_use(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    """gRPC would take empty roots to mean every CA the system trusts."""
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(content)
    with pytest.raises(ConfigurationError, match=problem):
        Transport.tls(bundle).channel("127.0.0.1:1")


def test_a_ca_bundle_may_hold_only_cas(ca: ClusterCa, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(ca.ca_cert.read_bytes() + ca.server_cert("node-1").cert.read_bytes())
    with pytest.raises(ConfigurationError, match="holds a certificate that is not a CA"):
        Transport.tls(bundle).channel("127.0.0.1:1")
