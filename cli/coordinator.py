"""`kms-coordinator serve --config coordinator.toml`: run the coordinator.

It serves apps over TLS and reaches the nodes over mutual TLS (the tls_* files
of the config), or in plaintext only if the config sets dev_plaintext = true.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from coordinator.server import serve
from coordinator.settings import CoordinatorSettings
from core import logs
from core.errors import KmsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kms-coordinator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("serve", help="run the gRPC server until SIGTERM")
    cmd.add_argument("--config", type=Path, required=True, help="coordinator TOML file")
    args = parser.parse_args(argv)
    try:
        settings = CoordinatorSettings.from_toml(args.config)
        logs.configure("kms-coordinator", settings.log_level)
        asyncio.run(serve(settings))
    except KmsError as e:
        print(f"kms-coordinator: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
