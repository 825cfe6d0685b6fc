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

A TLS server reloads its identity without a restart (:class:`ServerIdentityReloader`):
at each new connection's handshake it looks at the CA bundle, certificate and key
files, and when one has changed it checks the new set (see
:func:`proto.tls_identity.load_identity`) and serves it from then on; a set that
does not check out is logged and the identity in use is kept. Established
connections keep the identity they were made with.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography.x509.oid import ExtendedKeyUsageOID

from core.errors import ConfigurationError, KmsError
from proto import rpc
from proto.tls_identity import TlsIdentity, load_bundle, load_identity, read_pem

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
    #: a DNS name a server's certificate must carry (a node's id), checked each time
    #: the server loads it, so that another node's certificate is never served
    identity_name: str | None = None

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
    def tls(
        cls,
        ca_cert: Path,
        cert: Path | None = None,
        key: Path | None = None,
        *,
        identity_name: str | None = None,
    ) -> Transport:
        """Peers are checked against ``ca_cert`` (one or more CA certificates);
        ``cert``/``key`` are this side's identity (required to serve, and for a
        client of a mutual-TLS server)."""
        return cls(ca_cert=ca_cert, cert=cert, key=key, identity_name=identity_name)

    @property
    def is_plaintext(self) -> bool:
        return self.ca_cert is None

    # -- clients -------------------------------------------------------------

    def channel(
        self, target: str, *, options: Options = (), server_name: str | None = None
    ) -> grpc.Channel:
        """A channel to ``target`` (HOST:PORT); ``options`` are added to
        :data:`proto.rpc.CHANNEL_OPTIONS` and the bounded reconnect backoff
        (:data:`proto.rpc.RECONNECT_OPTIONS`), replacing any of the same name. See
        :meth:`_options` for ``server_name``."""
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
        # gRPC takes the first of two values given for one option: ``extra`` replaces a
        # default instead of following it.
        given = {name for name, _ in extra}
        defaults = [*rpc.CHANNEL_OPTIONS, *rpc.RECONNECT_OPTIONS]
        options: list[tuple[str, Any]] = [o for o in defaults if o[0] not in given]
        options += extra
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
        # Checked, not just read: gRPC takes empty roots to mean the system's CAs.
        roots, _cas = load_bundle(self.ca_cert)
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=read_pem(self.key, "TLS key"),
            certificate_chain=read_pem(self.cert, "TLS certificate"),
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
        if self.ca_cert is None or self.cert is None or self.key is None:
            raise ConfigurationError("a TLS server needs its certificate and key")
        reloader = ServerIdentityReloader(self.ca_cert, self.cert, self.key, self.identity_name)
        return reloader.credentials(require_client_cert)


class ServerIdentityReloader:
    """A TLS server's identity, read again from its files when they change.

    gRPC calls :meth:`fetch` at each new connection's handshake; it costs three
    ``stat`` calls unless a file changed. A changed set of files is checked once:
    served if it checks out, else logged (``tls_identity_refused``, with the reason
    and no key material) and ignored until a file changes again. To install a new
    certificate and key, write each to a temporary file and rename it into place;
    between the two renames the pair does not match and is not taken.
    """

    def __init__(self, ca_bundle: Path, cert: Path, key: Path, name: str | None) -> None:
        self._files = (ca_bundle, cert, key)
        self._name = name
        self._lock = threading.Lock()
        self._seen: tuple[object, ...] = ()
        self.current: TlsIdentity | None = None

    def __repr__(self) -> str:
        return f"ServerIdentityReloader(cert={str(self._files[1])!r})"

    def credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        """Credentials that start with the identity in the files now; raises
        :class:`ConfigurationError` if it does not check out."""
        with self._lock:
            self._seen = self._stamp()
            self.current = self._load()
            initial = _configuration(self.current)
        log.info("tls_identity_loaded", serial=f"{self.current.serial:x}", cert=str(self._files[1]))
        return grpc.dynamic_ssl_server_credentials(
            initial,
            # gRPC documents None as "keep the configuration in use"; its stubs omit it.
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=require_client_cert,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new identity if the files changed and check out, else None (keep the
        one in use). Never raises: an exception here would fail the handshake."""
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            self._seen = stamp
            try:
                identity = self._load()
            except ConfigurationError as e:
                log.error(
                    "tls_identity_refused",
                    reason=e.message,
                    serving_serial=f"{self.current.serial:x}" if self.current else None,
                )
                return None
            except Exception as e:  # noqa: BLE001 - a handshake must not fail for it
                log.error("tls_identity_refused", reason=type(e).__name__)
                return None
            self.current = identity
        log.info(
            "tls_identity_reloaded",
            serial=f"{identity.serial:x}",
            not_after=identity.not_after.isoformat(),
            cert=str(self._files[1]),
        )
        return _configuration(identity)

    def _load(self) -> TlsIdentity:
        bundle, cert, key = self._files
        return load_identity(
            bundle, cert, key, usage=ExtendedKeyUsageOID.SERVER_AUTH, name=self._name
        )

    def _stamp(self) -> tuple[object, ...]:
        """What changes when a file is rewritten or replaced."""
        stamp: list[object] = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError as e:
                stamp.append(e.errno)
            else:
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamp)


def _configuration(identity: TlsIdentity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(identity.key_pem, identity.cert_pem)], root_certificates=identity.bundle_pem
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
