"""`kms-coordinator serve --config coordinator.toml`: run the coordinator.

    kms-coordinator serve --config coordinator.toml
    kms-coordinator tls-request --config coordinator.toml --hosts HOST[,HOST...] [--rotate]
                          # two keys (tls_key, tls_client_key) and their CSRs, for the CA
    kms-coordinator tls-install --config coordinator.toml [--server-cert F] [--client-cert F]

It serves apps over TLS and reaches the nodes over mutual TLS (the tls_* files
of the config), or in plaintext only if the config sets dev_plaintext = true.
A serving coordinator takes a new server certificate at the next connection; a
new client certificate (to the nodes) at its next start. See
docs/tls-certificates.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from contracts.registry import RegistryClient
from coordinator.node_connections import NodeChannels
from coordinator.server import serve
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from core import logs
from core.errors import ConfigurationError, KmsError
from deploy import certificate_requests
from deploy.certificate_requests import parse_hosts


async def run(settings: CoordinatorSettings) -> None:
    """Compose the coordinator: the registry it reads patients' keys from, channels to
    the nodes, the service over them; serve it until stopped."""
    registry = RegistryClient(settings.chain_rpc_url, settings.registry_address)
    channels = NodeChannels(settings.node_transport())
    try:
        # Inside the running loop: the service opens its node channels as it is made.
        service = CoordinatorService(settings, registry, channels.connect)
        await serve(settings, service)
    finally:
        await channels.close()


#: the coordinator's name in its certificates (common name, DNS name)
NAME = "coordinator"


def _identities(settings: CoordinatorSettings) -> dict[str, tuple[Path, Path, bool]]:
    """Its two TLS identities: name -> (certificate, key, is the server's)."""
    files = {
        "server": (settings.tls_cert, settings.tls_key, True),
        "client": (settings.tls_client_cert, settings.tls_client_key, False),
    }
    identities = {}
    for which, (cert, key, server) in files.items():
        if cert is None or key is None:
            raise ConfigurationError(f"the config names no TLS {which} certificate and key")
        identities[which] = (cert, key, server)
    return identities


def tls_request(
    settings: CoordinatorSettings, hosts: list[str], *, rotate: bool
) -> dict[str, object]:
    """Make both keys and their CSRs: the server's names ``hosts``, the client's only
    the coordinator."""
    made: dict[str, object] = {}
    for which, (_cert, key, server) in _identities(settings).items():
        csr = key.with_name(f"{NAME}-{which}.csr")
        request = certificate_requests.request(
            key, csr, NAME, hosts if server else [], rotate=rotate
        )
        made[which] = {"key": str(request.key), "csr": str(request.csr)}
    made["next"] = (
        "send both CSRs to the cluster's CA (kmsctl ca sign --role coordinator-server / "
        "coordinator-client), then kms-coordinator tls-install"
    )
    return made


def tls_install(settings: CoordinatorSettings, signed: dict[str, Path | None]) -> dict[str, object]:
    """Install the certificates received (``signed``: "server"/"client" -> file)."""
    if settings.tls_ca_cert is None:
        raise ConfigurationError("the config names no tls_ca_cert")
    installed: dict[str, object] = {}
    for which, (cert, key, server) in _identities(settings).items():
        answer = signed[which]
        if answer is None:
            continue
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        identity = certificate_requests.install(
            answer, settings.tls_ca_cert, cert, key, usage=usage, name=NAME
        )
        installed[which] = {
            "cert": str(cert),
            "serial": f"{identity.serial:x}",
            "not_after": identity.not_after.isoformat(),
        }
    if not installed:
        raise ConfigurationError("name --server-cert, --client-cert or both")
    if "client" in installed:
        installed["note"] = "the client certificate is used from the next start"
    return installed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kms-coordinator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, required=True, help="coordinator TOML file")
    sub.add_parser("serve", parents=[config], help="run the gRPC server until SIGTERM")
    request = sub.add_parser(
        "tls-request", parents=[config], help="make the TLS keys and certificate signing requests"
    )
    request.add_argument(
        "--hosts",
        required=True,
        help="comma-separated DNS names and IP addresses apps reach the coordinator by",
    )
    request.add_argument("--rotate", action="store_true", help="new keys beside the ones in use")
    install = sub.add_parser(
        "tls-install", parents=[config], help="install the certificates the CA signed"
    )
    install.add_argument("--server-cert", type=Path, help="the signed server certificate")
    install.add_argument("--client-cert", type=Path, help="the signed client certificate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = CoordinatorSettings.from_toml(args.config)
        logs.configure("kms-coordinator", settings.log_level)
        if args.command == "tls-request":
            made = tls_request(settings, parse_hosts(args.hosts), rotate=args.rotate)
            print(json.dumps(made, indent=2))
        elif args.command == "tls-install":
            signed = {"server": args.server_cert, "client": args.client_cert}
            print(json.dumps(tls_install(settings, signed), indent=2))
        else:
            asyncio.run(run(settings))
    except KmsError as e:
        print(f"kms-coordinator: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kms-coordinator: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
