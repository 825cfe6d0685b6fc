"""A serving node's TLS certificate is rotated without a restart, over real gRPC
on sockets: new connections get the new certificate, no call fails meanwhile, a
bad new pair is refused while the old one goes on serving, and the coordinator's
channels reconnect to the rotated node."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from coordinator.node_connections import NodeChannels
from coordinator.settings import NodeAddress
from deploy import certificate_requests
from deploy.certificate_authority import CertificateAuthority
from proto import rpc
from proto.kms.v1 import node_pb2
from proto.stubs import NODE_SERVICE, NodeStub
from proto.transport import ServerIdentityReloader, Transport

NODE = "node-1"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Party:
    """One party's TLS files, made the way an operator makes them."""

    bundle: Path
    cert: Path
    key: Path

    def enrol(self, ca: CertificateAuthority, name: str, role: str, *, rotate: bool = False) -> int:
        """Key + CSR on the party's side, signed by ``ca``, installed; the serial."""
        csr = self.key.with_name(self.key.name + ".csr")
        hosts = ["127.0.0.1"] if role == "node" else []
        certificate_requests.request(self.key, csr, name, hosts, rotate=rotate)
        signed = ca.sign(csr.read_bytes(), role, now())
        answer = self.cert.with_name("answer.crt")
        answer.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH if role == "node" else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        certificate_requests.install(
            answer, self.bundle, self.cert, self.key, usage=usage, name=name
        )
        return signed.serial_number

    @property
    def transport(self) -> Transport:
        return Transport.tls(self.bundle, self.cert, self.key)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", "test CA", now())


def party(tmp_path: Path, ca: CertificateAuthority, name: str) -> Party:
    directory = tmp_path / name
    directory.mkdir()
    bundle = directory / "bundle.crt"
    bundle.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return Party(bundle, directory / f"{name}.crt", directory / f"{name}.key")


@dataclass
class Node:
    address: str
    files: Party
    #: the peer address of every call served, in order
    peers: list[str]


@contextlib.contextmanager
def serve_node(files: Party, **options: int) -> Iterator[Node]:
    """A gRPC server answering GetNodeInfo over mutual TLS, like a node's."""
    peers: list[str] = []

    def info(_request: node_pb2.GetNodeInfoRequest, context: grpc.ServicerContext) -> object:
        peers.append(context.peer())
        return node_pb2.NodeInfo(node_id=NODE)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=list(options.items()))
    server.add_generic_rpc_handlers(
        [
            rpc.service_handler(
                NODE_SERVICE, [rpc.Method("GetNodeInfo", node_pb2.GetNodeInfoRequest, info)]
            )
        ]
    )
    transport = Transport.tls(files.bundle, files.cert, files.key, identity_name=NODE)
    port = transport.add_port(server, "127.0.0.1:0", require_client_cert=True)
    server.start()
    try:
        yield Node(f"127.0.0.1:{port}", files, peers)
    finally:
        server.stop(grace=None)


@pytest.fixture
def operator(tmp_path: Path, ca: CertificateAuthority) -> Party:
    files = party(tmp_path, ca, "operator")
    files.enrol(ca, "operator", "operator-client")
    return files


def replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as an operator should: a new file, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def served_serial(node: Node, client: Party, name: str = NODE) -> int:
    """The serial of the certificate a new TLS connection to ``node`` is shown."""
    return served_serial_at(node.address, name, client.bundle, client.cert, client.key)


def served_serial_at(address: str, name: str, bundle: Path, cert: Path, key: Path) -> int:
    """The serial of the certificate a new TLS connection to ``address`` is shown,
    checked to name ``name``; ``cert`` and ``key`` are the client's (mutual TLS)."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def node_info(channel: grpc.Channel) -> str:
    reply = NodeStub(channel).GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
    return reply.node_id


class Load:
    """Calls to the node from a thread until stopped: each on a new connection (a new
    handshake) and, in turn, on one long-lived connection."""

    def __init__(self, node: Node, client: Party) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._node, self._client = node, client
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        transport = self._client.transport
        with transport.channel(self._node.address, server_name=NODE) as kept:
            while not self._stop.is_set():
                for channel in (None, kept):
                    try:
                        if channel is None:
                            with transport.channel(self._node.address, server_name=NODE) as new:
                                node_info(new)
                        else:
                            node_info(channel)
                    except grpc.RpcError as e:
                        self.failures.append(str(e))
                    else:
                        self.ok += 1


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_serving_node_takes_a_renewed_certificate_and_no_call_fails(
    tmp_path: Path, ca: CertificateAuthority, operator: Party
) -> None:
    files = party(tmp_path, ca, NODE)
    serial_a = files.enrol(ca, NODE, "node")
    with serve_node(files) as node:
        assert served_serial(node, operator) == serial_a
        with Load(node, operator) as load:
            wait_for(lambda: load.ok >= 20)
            serial_b = files.enrol(ca, NODE, "node", rotate=True)
            wait_for(lambda: served_serial(node, operator) == serial_b)
            served_before = load.ok
            wait_for(lambda: load.ok >= served_before + 20)
        assert serial_b != serial_a
        assert load.failures == []
        assert not certificate_requests.pending_key(files.key).exists()


def spoil_with_mismatched_key(files: Party) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    files.key.unlink()
    certificate_requests.write_private_key(files.key, other)


def spoil_with(
    files: Party, ca: CertificateAuthority, name: str = NODE, role: str = "node"
) -> None:
    """Put in place a matching pair that is not this node's server identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    hosts = ["127.0.0.1"] if role == "node" else []
    csr = certificate_requests.build_request(key, name, hosts)
    cert = ca.sign(csr.public_bytes(serialization.Encoding.PEM), role, now())
    files.key.unlink()
    certificate_requests.write_private_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda f, _ca: f.cert.write_text("not a certificate"), "holds no PEM certificate"),
        (lambda f, _ca: f.key.write_text("garbage"), "is not an unencrypted PEM private key"),
        (lambda f, _ca: spoil_with_mismatched_key(f), "is not the key of certificate"),
        (
            lambda f, _ca: spoil_with(f, CertificateAuthority.create("stranger CA", now())),
            "is not signed by a CA of",
        ),
        (lambda f, ca: spoil_with(f, ca, name="node-2"), "does not name 'node-1'"),
        (lambda f, ca: spoil_with(f, ca, role="operator-client"), "is not issued for serverAuth"),
        (lambda f, _ca: f.bundle.write_text(""), "holds no PEM certificate"),
    ],
    ids=[
        "garbled cert",
        "garbled key",
        "key of another cert",
        "other CA",
        "other node",
        "client cert",
        "empty bundle",
    ],
)
def test_a_bad_new_pair_is_refused_and_the_old_one_serves_on(
    tmp_path: Path,
    ca: CertificateAuthority,
    operator: Party,
    spoil: object,
    reason: str,
) -> None:
    assert callable(spoil)
    files = party(tmp_path, ca, NODE)
    serial_a = files.enrol(ca, NODE, "node")
    key_pem = files.key.read_bytes()
    with serve_node(files) as node:
        with structlog.testing.capture_logs() as logs:
            spoil(files, ca)
            with Load(node, operator) as load:
                wait_for(lambda: load.ok >= 20)
            assert served_serial(node, operator) == serial_a
        assert load.failures == []
        refusals = [e for e in logs if e["event"] == "tls_identity_refused"]
        assert len(refusals) == 1, logs  # once per change, not once per handshake
        assert refusals[0]["log_level"] == "error"
        assert reason in refusals[0]["reason"]
        for line in key_pem.splitlines()[1:-1]:
            assert line.decode() not in repr(logs)
        # Mended, the set is taken at the next handshake.
        files.bundle.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        serial_b = files.enrol(ca, NODE, "node", rotate=True)
        wait_for(lambda: served_serial(node, operator) == serial_b)


def test_a_ca_is_rotated_through_a_bundle_of_both(
    tmp_path: Path, ca: CertificateAuthority, operator: Party
) -> None:
    """Every party trusts the old and the new CA (clients from their next start, a
    node at once); then the node moves to a certificate of the new CA."""
    files = party(tmp_path, ca, NODE)
    files.enrol(ca, NODE, "node")
    new_ca = CertificateAuthority.create("new CA", now())
    pem = serialization.Encoding.PEM
    with serve_node(files) as node:
        both = ca.cert.public_bytes(pem) + new_ca.cert.public_bytes(pem)
        for bundle in (files.bundle, operator.bundle):
            replace(bundle, both)
        with Load(node, operator) as load:
            wait_for(lambda: load.ok >= 10)
            serial = files.enrol(new_ca, NODE, "node", rotate=True)
            wait_for(lambda: served_serial(node, operator) == serial)
            served_before = load.ok
            wait_for(lambda: load.ok >= served_before + 10)
        assert load.failures == []
        # A client that trusts only the old CA no longer gets in.
        old_only = party(tmp_path, ca, "old-client")
        old_only.enrol(ca, "old-client", "operator-client")
        with old_only.transport.channel(node.address, server_name=NODE) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                node_info(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_coordinators_channel_reconnects_to_a_rotated_node(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """The coordinator keeps its channels; when a connection to a node ends (here:
    the node's maximum connection age), the next one is checked against the new
    certificate, still pinned to the node's id, with no restart."""
    coordinator = party(tmp_path, ca, "coordinator")
    coordinator.enrol(ca, "coordinator", "coordinator-client")
    files = party(tmp_path, ca, NODE)
    files.enrol(ca, NODE, "node")
    with serve_node(
        files, **{"grpc.max_connection_age_ms": 500, "grpc.max_connection_age_grace_ms": 5000}
    ) as node:

        async def calls() -> list[str]:
            channels = NodeChannels(coordinator.transport)
            client = channels.connect(NodeAddress(NODE, node.address))
            answers = [(await client.GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)).node_id]
            serials.append(files.enrol(ca, NODE, "node", rotate=True))
            rotated_at = len(node.peers)
            deadline = time.monotonic() + 10
            # Until a call arrives over a connection made after the rotation.
            while node.peers[-1] in node.peers[:rotated_at] and time.monotonic() < deadline:
                reply = await client.GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=5)
                answers.append(reply.node_id)
                await asyncio.sleep(0.05)
            await channels.close()
            return answers

        serials: list[int] = []
        answers = asyncio.run(calls())
        assert node.peers[-1] not in node.peers[:1], "the channel never reconnected"
        assert served_serial(node, coordinator) == serials[0]
        assert set(answers) == {NODE}
        assert len(answers) > 2


def test_the_reloader_checks_files_only_when_they_change(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    files = party(tmp_path, ca, NODE)
    serial_a = files.enrol(ca, NODE, "node")
    reloader = ServerIdentityReloader(files.bundle, files.cert, files.key, NODE)
    reloader.credentials(require_client_cert=True)
    assert reloader.current is not None and reloader.current.serial == serial_a
    assert reloader.fetch() is None
    serial_b = files.enrol(ca, NODE, "node", rotate=True)
    assert reloader.fetch() is not None
    assert reloader.current.serial == serial_b
    assert reloader.fetch() is None
    key_pem = files.key.read_bytes().decode()
    assert "PRIVATE KEY" in key_pem
    for shown in (repr(reloader), repr(reloader.current)):
        assert "PRIVATE KEY" not in shown and key_pem.splitlines()[1] not in shown


def test_an_asyncio_server_reloads_too(
    tmp_path: Path, ca: CertificateAuthority, operator: Party
) -> None:
    """The coordinator serves apps from a grpc.aio server; its certificate rotates
    the same way."""
    files = party(tmp_path, ca, NODE)
    serial_a = files.enrol(ca, NODE, "node")

    async def rotate() -> tuple[int, int]:
        server = grpc.aio.server()
        transport = Transport.tls(files.bundle, files.cert, files.key, identity_name=NODE)
        port = transport.add_port(server, "127.0.0.1:0", require_client_cert=False)
        await server.start()
        node = Node(f"127.0.0.1:{port}", files, [])
        try:
            before = await asyncio.to_thread(served_serial, node, operator)
            serial_b = files.enrol(ca, NODE, "node", rotate=True)
            after = await asyncio.to_thread(served_serial, node, operator)
        finally:
            await server.stop(grace=None)
        assert after == serial_b
        return before, after

    before, after = asyncio.run(rotate())
    assert before == serial_a != after
