"""How a process reaches the chain's JSON-RPC endpoint (README "Grant index",
docs/threat-model.md): directly, never through an HTTP proxy named in the environment, and
for an ``https`` URL over TLS whose certificate chains to a trusted certificate authority
and names the URL's host.

The endpoints are real servers on loopback (http.server, wrapped in TLS for ``https``) with
certificates made here in ``tmp_path``; calls go through ``ChainTransport``, the one
connection every chain reader and writer uses (contracts/json_rpc.py underneath). A CA is
"trusted" by naming its file in ``SSL_CERT_FILE``, which OpenSSL reads when the transport
makes its TLS context.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from contracts.chain_transport import ChainTransport
from core.errors import ChainUnavailable

CHAIN_ID = 31337
TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")


# --- certificates -------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert_path, key_path)


def _certificate(
    subject: str,
    names: list[x509.GeneralName],
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer`` (or by ``key`` itself)."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


LOOPBACK_NAMES: list[x509.GeneralName] = [
    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    x509.DNSName("localhost"),
]


def self_signed(directory: Path, names: list[x509.GeneralName]) -> Issued:
    """A self-signed server certificate (in no trust store) for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _write(directory, "self-signed", _certificate("rpc", names, key), key)


@dataclass
class Authority:
    """A CA made for one test: its certificate file, and server certificates it issues."""

    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path

    @classmethod
    def make(cls, directory: Path) -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("test chain CA", [], key, ca=True)
        issued = _write(directory, "ca", cert, key)
        return cls(directory, cert, key, issued.cert)

    def issue(self, stem: str, names: list[x509.GeneralName]) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("rpc", names, key, (self.cert, self.key))
        return _write(self.directory, stem, cert, key)


# --- a JSON-RPC endpoint, a would-be proxy ------------------------------------------------


class RpcServer:
    """A JSON-RPC endpoint on 127.0.0.1 that answers ``eth_chainId``; over TLS with
    ``issued``'s certificate if given. Records each request body it read and each TLS
    handshake that failed."""

    def __init__(self, issued: Issued | None = None) -> None:
        self.bodies: list[bytes] = []
        self.handshake_errors: list[BaseException] = []
        self.handshake_failed = threading.Event()
        tls: ssl.SSLContext | None = None
        if issued is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(issued.cert, issued.key)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.bodies.append(body)
                request = json.loads(body)
                answer = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": "0x7a69"})
                encoded = answer.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(encoded)))
                self.end_headers()
                self.wfile.write(encoded)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The handshake runs in the connection's thread, not the accepting one.
                if tls is not None:
                    try:
                        request = tls.wrap_socket(request, server_side=True)
                    except (ssl.SSLError, OSError) as e:
                        server.handshake_errors.append(e)
                        server.handshake_failed.set()
                        return
                super().finish_request(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class ProxyListener:
    """A TCP listener where the environment's proxy variables point: it accepts, counts and
    closes every connection, so a client that goes through it fails at once."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.02)
            if readable:
                conn, _ = self._sock.accept()
                self.connections += 1
                conn.close()

    def saw_any(self) -> bool:
        """Whether anything connected, counting a connection not yet accepted."""
        pending, _, _ = select.select([self._sock], [], [], 0)
        return self.connections > 0 or bool(pending)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture
def servers() -> Iterator[list[RpcServer]]:
    """Servers a test starts (append them); all shut down afterwards."""
    started: list[RpcServer] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyListener]:
    listener = ProxyListener()
    for variable in PROXY_VARIABLES:
        monkeypatch.setenv(variable, listener.url)
        monkeypatch.setenv(variable.lower(), listener.url)
    # Nothing exempts loopback from the proxy.
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    yield listener
    listener.close()


def chain_id(url: str) -> int:
    """``eth_chainId`` as every chain reader asks it: through ``ChainTransport``."""
    transport = ChainTransport(url, TIMEOUT_S, abi=[])
    answer = transport.request("chain_id", "eth_chainId", [])
    assert isinstance(answer, str)
    return int(answer, 16)


def serve(servers: list[RpcServer], issued: Issued | None = None) -> RpcServer:
    server = RpcServer(issued)
    servers.append(server)
    return server


def refused_by_tls(server: RpcServer, *fragments: str) -> str:
    """The ChainUnavailable message of a call to ``server``, which failed in the TLS
    handshake: the server saw one fail and read no JSON-RPC request."""
    with pytest.raises(ChainUnavailable) as excinfo:
        chain_id(server.url)
    message = excinfo.value.message
    assert message.startswith(f"chain_id: chain at {server.url}: "), message
    lowered = message.lower()
    assert all(fragment.lower() in lowered for fragment in fragments), message
    assert server.bodies == []
    # The endpoint was reached: refused in the handshake, not for want of a connection.
    assert server.handshake_failed.wait(timeout=TIMEOUT_S)
    assert server.bodies == []
    return message


# --- the tests ----------------------------------------------------------------------------


def test_a_self_signed_certificate_is_refused(tmp_path: Path, servers: list[RpcServer]) -> None:
    """A certificate that is in none of the system's certificate authorities (the
    environment's own SSL_CERT_FILE / SSL_CERT_DIR, as a deployed process has them)."""
    server = serve(servers, self_signed(tmp_path, LOOPBACK_NAMES))
    refused_by_tls(server, "TLS certificate refused (self-signed certificate)")


def test_a_certificate_from_a_trusted_ca_for_the_urls_host_is_accepted(
    tmp_path: Path, servers: list[RpcServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = Authority.make(tmp_path)
    server = serve(servers, authority.issue("loopback", LOOPBACK_NAMES))
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.cert_file))
    assert chain_id(server.url) == CHAIN_ID
    assert [json.loads(body)["method"] for body in server.bodies] == ["eth_chainId"]
    assert server.handshake_errors == []


def test_a_trusted_certificate_for_another_host_is_refused(
    tmp_path: Path, servers: list[RpcServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = Authority.make(tmp_path)
    server = serve(servers, authority.issue("other", [x509.DNSName("other.example")]))
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.cert_file))
    refused_by_tls(server, "TLS certificate refused", "mismatch", "not valid for '127.0.0.1'")


def test_a_ca_that_is_not_trusted_is_refused(
    tmp_path: Path, servers: list[RpcServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same chain as the accepted one, but its CA is not in the trust store."""
    trusted, unknown = Authority.make(tmp_path / "trusted"), Authority.make(tmp_path / "unknown")
    server = serve(servers, unknown.issue("loopback", LOOPBACK_NAMES))
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted.cert_file))
    refused_by_tls(server, "TLS certificate refused (unable to get local issuer certificate)")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_environments_proxy_is_not_used(
    tmp_path: Path,
    servers: list[RpcServer],
    monkeypatch: pytest.MonkeyPatch,
    proxy: ProxyListener,
    scheme: str,
) -> None:
    issued = None
    if scheme == "https":
        authority = Authority.make(tmp_path)
        issued = authority.issue("loopback", LOOPBACK_NAMES)
        monkeypatch.setenv("SSL_CERT_FILE", str(authority.cert_file))
    server = serve(servers, issued)
    assert chain_id(server.url) == CHAIN_ID
    assert [json.loads(body)["method"] for body in server.bodies] == ["eth_chainId"]
    assert not proxy.saw_any()
