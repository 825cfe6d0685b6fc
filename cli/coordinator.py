"""`kms-coordinator serve --config coordinator.toml`: run the coordinator.

It serves apps over TLS and reaches the nodes over mutual TLS (the tls_* files
of the config), or in plaintext only if the config sets dev_plaintext = true.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from contracts.registry import RegistryClient
from coordinator.node_connections import NodeChannels
from coordinator.server import serve
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from core import logs
from core.errors import KmsError


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kms-coordinator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("serve", help="run the gRPC server until SIGTERM")
    cmd.add_argument("--config", type=Path, required=True, help="coordinator TOML file")
    args = parser.parse_args(argv)
    try:
        settings = CoordinatorSettings.from_toml(args.config)
        logs.configure("kms-coordinator", settings.log_level)
        asyncio.run(run(settings))
    except KmsError as e:
        print(f"kms-coordinator: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
