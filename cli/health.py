"""`kms-health`: ask a node or the coordinator on this host whether it serves.

    kms-health node --config node.toml --client-cert probe.crt --client-key probe.key
    kms-health coordinator --config coordinator.toml --server-name NAME

It calls the standard gRPC health service (``grpc.health.v1.Health/Check``) on the port
the config serves, over the same TLS. It is the command a container orchestrator's probe
runs: Kubernetes' own ``grpc:`` probe speaks plaintext only, and a node accepts nothing but
mutual TLS, so the node's probe presents a client certificate of its own, from the
cluster's CA (never the coordinator's). The coordinator needs none: it authenticates apps
by their signed requests, not by certificate.

Exit status, with the reason on stderr in one line:

- 0: the service answered SERVING;
- 1: it answered anything else, or nothing (not listening, refused the handshake, timed out);
- 2: the probe could not be set up, so nothing was asked: a bad command line, or a config,
  CA bundle, certificate or key that cannot be read or does not check out. The probe's
  own certificate and key are checked before dialling, because gRPC reports a key it
  cannot use as a connection that failed, which would read as "the node is down".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.settings import CoordinatorSettings
from core.endpoints import parse_host_port
from core.errors import ConfigurationError, KmsError
from kms_node.settings import NodeSettings
from proto.tls_identity import load_bundle, load_identity
from proto.transport import Transport

#: listen hosts that mean "every interface": the probe reaches them on loopback
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "[::1]"}  # noqa: S104

#: exit statuses, as the module's docstring states them
EXIT_SERVING = 0
EXIT_NOT_SERVING = 1
EXIT_MISCONFIGURED = 2  # argparse's own status for a bad command line


def local_target(listen: str) -> str:
    """The address a probe on this host dials for a server listening on ``listen``."""
    host, port = parse_host_port(listen, "listen")
    return f"{_WILDCARD_HOSTS.get(host, host)}:{port}"


def check(target: str, transport: Transport, server_name: str | None, timeout_s: float) -> str:
    """Ask the health service at ``target``: "" when it answers SERVING, else why not."""
    with transport.channel(target, server_name=server_name) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its stubs leave methods untyped
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return ""


def _node_probe(args: argparse.Namespace) -> tuple[str, Transport, str | None]:
    settings = NodeSettings.from_toml(args.config, os.environ)
    if settings.dev_plaintext:
        return local_target(settings.listen), Transport.plaintext(), None
    if args.client_cert is None or args.client_key is None:
        raise ConfigurationError(
            "the node serves mutual TLS only: pass --client-cert and --client-key, a client "
            "certificate from the cluster's CA for this probe"
        )
    assert settings.tls_ca_cert is not None  # validate() requires it without dev_plaintext
    # The node checks the probe's certificate against this bundle: one it would refuse, or
    # a key gRPC cannot use, is the probe's configuration, named here before any dialling.
    load_identity(
        settings.tls_ca_cert,
        args.client_cert,
        args.client_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    transport = Transport.tls(settings.tls_ca_cert, args.client_cert, args.client_key)
    # The node's certificate names its id (the coordinator checks the same).
    return local_target(settings.listen), transport, settings.node_id


def _coordinator_probe(args: argparse.Namespace) -> tuple[str, Transport, str | None]:
    settings = CoordinatorSettings.from_toml(args.config)
    if settings.dev_plaintext:
        return local_target(settings.listen), Transport.plaintext(), None
    if args.server_name is None:
        raise ConfigurationError(
            "pass --server-name: a DNS name the coordinator's certificate carries"
        )
    assert settings.tls_ca_cert is not None  # validate() requires it without dev_plaintext
    load_bundle(settings.tls_ca_cert)
    return local_target(settings.listen), Transport.tls(settings.tls_ca_cert), args.server_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kms-health",
        description=__doc__.splitlines()[0],
        epilog=f"exit status: {EXIT_SERVING} serving; {EXIT_NOT_SERVING} any other answer or "
        f"none; {EXIT_MISCONFIGURED} the probe could not be set up (nothing was asked)",
    )
    sub = parser.add_subparsers(dest="role", required=True)
    node = sub.add_parser("node", help="check the node this config describes")
    node.add_argument("--config", type=Path, required=True, help="node TOML file")
    node.add_argument("--client-cert", type=Path, help="the probe's client certificate (PEM)")
    node.add_argument("--client-key", type=Path, help="its private key (PEM)")
    coordinator = sub.add_parser("coordinator", help="check the coordinator this config describes")
    coordinator.add_argument("--config", type=Path, required=True, help="coordinator TOML file")
    coordinator.add_argument("--server-name", help="a DNS name its certificate carries")
    for cmd in (node, coordinator):
        cmd.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= 60:
        parser.error("--timeout must be between 0 and 60 seconds")
    probe = _node_probe if args.role == "node" else _coordinator_probe
    try:
        target, transport, server_name = probe(args)
    except (KmsError, OSError) as e:
        return _misconfigured(str(e))
    except Exception as e:  # noqa: BLE001 - a probe that cannot start says nothing of the service
        # The type only: the message of an error met reading a file may quote the file.
        what = type(e).__name__
        return _misconfigured(f"cannot set up the {args.role} probe from {args.config} ({what})")
    try:
        problem = check(target, transport, server_name, args.timeout)
    except (KmsError, OSError) as e:  # a TLS file read again for the channel, gone since
        return _misconfigured(str(e))
    if problem:
        print(f"kms-health: {args.role} at {target} is not serving: {problem}", file=sys.stderr)
        return EXIT_NOT_SERVING
    return EXIT_SERVING


def _misconfigured(reason: str) -> int:
    print(f"kms-health: {' '.join(reason.split())}", file=sys.stderr)  # one line, for the probe log
    return EXIT_MISCONFIGURED


if __name__ == "__main__":
    sys.exit(main())
