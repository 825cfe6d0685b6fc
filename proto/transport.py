"""How every gRPC connection is secured: the one place that makes channels and
listening ports.

A :class:`Transport` is either TLS, built from a CA certificate (and, for mutual
TLS or a server, a certificate and key), or plaintext, for development only.
Servers call :meth:`Transport.add_port`; clients call :meth:`Transport.channel`
or :meth:`Transport.aio_channel`. Nothing else in medkms calls
``grpc.insecure_channel``, ``grpc.secure_channel`` or ``add_*_port``.

The private key is read from its file each time credentials are built and is
handed straight to gRPC; a Transport holds paths only, so printing one shows
no secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from core.errors import ConfigurationError, KmsError
from proto import rpc

log = structlog.get_logger("medkms.transport")

Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Transport:
    """TLS (``ca_cert`` set) or plaintext (all None); build with :meth:`tls` or
    :meth:`plaintext`."""

    #: PEM CA certificate(s) that peers' certificates must chain to
    ca_cert: Path | None
    #: PEM certificate (chain) and PKCS#8 key of this side: the server's identity
    #: on a server, the client identity (mutual TLS) on a channel
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigurationError("a TLS certificate needs its key, and a key its certificate")
        if self.ca_cert is None and self.cert is not None:
            raise ConfigurationError("a TLS certificate needs the CA certificate to check peers")

    @classmethod
    def plaintext(cls) -> Transport:
        """No encryption and no authentication: development only."""
        return cls(ca_cert=None)

    @classmethod
    def tls(cls, ca_cert: Path, cert: Path | None = None, key: Path | None = None) -> Transport:
        """Peers are checked against ``ca_cert``; ``cert``/``key`` are this side's
        identity (required to serve, and for a client of a mutual-TLS server)."""
        return cls(ca_cert=ca_cert, cert=cert, key=key)

    @property
    def is_plaintext(self) -> bool:
        return self.ca_cert is None

    # -- clients -------------------------------------------------------------

    def channel(
        self, target: str, *, options: Options = (), server_name: str | None = None
    ) -> grpc.Channel:
        """A channel to ``target`` (HOST:PORT); ``options`` are added to
        :data:`proto.rpc.CHANNEL_OPTIONS` and the bounded reconnect backoff
        (:data:`proto.rpc.RECONNECT_OPTIONS`). See :meth:`_options` for
        ``server_name``."""
        opts = self._options(options, server_name)
        if self.is_plaintext:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, self._channel_credentials(), options=opts)

    def aio_channel(
        self, target: str, *, options: Options = (), server_name: str | None = None
    ) -> grpc.aio.Channel:
        """The same as :meth:`channel`, for asyncio."""
        opts = self._options(options, server_name)
        if self.is_plaintext:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, self._channel_credentials(), options=opts)

    def _options(self, extra: Options, server_name: str | None) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [*rpc.CHANNEL_OPTIONS, *rpc.RECONNECT_OPTIONS, *extra]
        if server_name is not None and not self.is_plaintext:
            # Check the server's certificate names ``server_name`` (a node id)
            # instead of the host in ``target``. Nodes on one machine all share
            # the SAN 127.0.0.1, so by address alone any node's certificate
            # would pass for any other's; a caller that knows which node it means
            # to reach pins that node's id (a DNS SAN of its certificate). It also
            # becomes the SNI name. The chain is still checked against ca_cert.
            options.append(("grpc.ssl_target_name_override", server_name))
        return options

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        assert self.ca_cert is not None
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_cert, "CA cert"))
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert, "CA cert"),
            private_key=_read(self.key, "TLS key"),
            certificate_chain=_read(self.cert, "TLS cert"),
        )

    # -- servers -------------------------------------------------------------

    def add_port(
        self, server: grpc.Server | grpc.aio.Server, address: str, *, require_client_cert: bool
    ) -> int:
        """Listen on ``address``; return the port. With ``require_client_cert`` the
        handshake fails unless the client presents a certificate chaining to
        ``ca_cert`` (mutual TLS); without, any client may connect (server
        authentication only). Plaintext listens with neither, loudly."""
        if self.is_plaintext:
            log.warning(
                "plaintext_listener",
                address=address,
                warning="DEVELOPMENT MODE: no TLS and no client authentication on this port",
            )
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self._server_credentials(require_client_cert))
        if port == 0:
            raise KmsError(f"cannot listen on {address}")
        return port

    def _server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        assert self.ca_cert is not None
        if self.cert is None or self.key is None:
            raise ConfigurationError("a TLS server needs its certificate and key")
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS cert"))],
            root_certificates=_read(self.ca_cert, "CA cert"),
            require_client_auth=require_client_cert,
        )


def require_tls_settings(config: str, files: dict[str, Path | None], dev_plaintext: bool) -> None:
    """Refuse a configuration that sets neither every TLS file nor development
    mode, or sets both; ``files`` maps setting names to their values."""
    missing = [name for name, path in files.items() if path is None]
    if dev_plaintext:
        if len(missing) < len(files):
            given = ", ".join(n for n in files if n not in missing)
            raise ConfigurationError(f"{config} sets dev_plaintext = true and {given}; choose one")
        return
    if missing:
        raise ConfigurationError(
            f"{config} is missing TLS settings {', '.join(missing)}; plaintext is refused "
            "unless dev_plaintext = true (development only)"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path}: {e.strerror}") from None
