"""`kms-node`: set up a node's HSM token, then serve.

    kms-node init  --config node.toml [--identity-out FILE]
                                        # token + keys inside it; prints the node's public
                                        # identity as JSON (and writes it to FILE, for the
                                        # registry admin: kmsctl admin register-node)
    kms-node serve --config node.toml   # gRPC + /metrics until SIGTERM
    kms-node rotate-kek --config node.toml   # node stopped: new HSM key-encryption key,
                                             # every kfrag wrapped again, old keys destroyed
    kms-node tls-request --config node.toml --hosts HOST[,HOST...] [--rotate]
                                             # TLS key (tls_key, 0600) + CSR for the CA
    kms-node tls-install --config node.toml --cert SIGNED.crt
                                             # check the CA's answer, put it in place; a
                                             # serving node takes it at the next connection

PINs come from the source the config names for each (a file outside the data and
token directories, or an environment variable read here, at start-up), never from
arguments; all three commands refuse a PIN file inside those directories. `serve`
speaks mutual TLS only (tls_ca_cert, tls_cert, tls_key in the config) and
refuses to start without them unless the config sets dev_plaintext = true.
The TLS key is made on the node's host and never leaves it; see
docs/tls-certificates.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from core import logs
from core.errors import ConfigurationError, KmsError
from core.node_identity import NodeIdentity
from deploy import certificate_requests
from deploy.certificate_requests import parse_hosts
from kms_node import data_lock
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.hsm.softhsm_token import init_softhsm_token
from kms_node.kek_rotation import rotate_kek
from kms_node.kfrag_store import KfragStore
from kms_node.server import serve
from kms_node.settings import NodeSettings
from kms_node.supervisor import supervise
from proto.tls_identity import TlsIdentity


def init(settings: NodeSettings) -> NodeIdentity:
    """Create (or open) the token and the node's keys; return its public identity."""
    if settings.softhsm_conf is not None:
        if settings.softhsm_token_dir is None:
            raise KmsError("softhsm_token_dir is required with softhsm_conf")
        init_softhsm_token(
            softhsm_conf=settings.softhsm_conf,
            token_dir=settings.softhsm_token_dir,
            module_path=settings.hsm_module,
            token_label=settings.hsm_token_label,
            so_pin=settings.so_pin(),
            user_pin=settings.user_pin(),
        )
    keystore = Pkcs11KeyStore.provision(
        settings.hsm_module,
        settings.hsm_token_label,
        settings.user_pin(),
        softhsm_conf=settings.softhsm_conf,
    )
    try:
        public = NodeIdentity(
            node_id=settings.node_id,
            signing_public_key=keystore.signing_public_key(),
            delivery_public_key=keystore.delivery_public_key(),
            account=keystore.eth_address(),
        )
    finally:
        keystore.close()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return public


def rotate(settings: NodeSettings) -> dict[str, object]:
    """Rotate the node's key-encryption key (see kms_node.kek_rotation); the node must
    be stopped."""
    with data_lock.alone(settings.data_dir):
        keystore = Pkcs11KeyStore.open(
            settings.hsm_module,
            settings.hsm_token_label,
            settings.user_pin(),
            softhsm_conf=settings.softhsm_conf,
        )
        kfrags = KfragStore(settings.kfrag_db)
        try:
            rotation = rotate_kek(keystore, kfrags, settings.node_id)
        finally:
            kfrags.close()
            keystore.close()
    return dataclasses.asdict(rotation)


def tls_request(settings: NodeSettings, hosts: list[str], *, rotate: bool) -> dict[str, object]:
    """Make the node's TLS key (at tls_key, or beside it when rotating) and its CSR."""
    key = _tls_file(settings.tls_key, "tls_key")
    csr = key.with_name(f"{settings.node_id}.csr")
    made = certificate_requests.request(key, csr, settings.node_id, hosts, rotate=rotate)
    return {
        "node_id": settings.node_id,
        "hosts": hosts,
        "key": str(made.key),
        "csr": str(made.csr),
        "next": "send the CSR to the cluster's CA (kmsctl ca sign --role node), then "
        "kms-node tls-install --cert THE_CERTIFICATE",
    }


def tls_install(settings: NodeSettings, signed: Path) -> dict[str, object]:
    """Check ``signed`` against the waiting key and the CA bundle; install both."""
    installed = certificate_requests.install(
        signed,
        _tls_file(settings.tls_ca_cert, "tls_ca_cert"),
        _tls_file(settings.tls_cert, "tls_cert"),
        _tls_file(settings.tls_key, "tls_key"),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        name=settings.node_id,
    )
    return _installed(installed, settings.tls_cert)


def _installed(identity: TlsIdentity, cert: Path | None) -> dict[str, object]:
    return {
        "cert": str(cert),
        "serial": f"{identity.serial:x}",
        "not_after": identity.not_after.isoformat(),
    }


def _tls_file(path: Path | None, setting: str) -> Path:
    if path is None:
        raise ConfigurationError(f"the config sets no {setting}: name where the TLS files live")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kms-node", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("init", "create or open the node's token and keys"),
        ("serve", "run the gRPC server"),
        ("rotate-kek", "node stopped: wrap every kfrag under a new HSM key-encryption key"),
        ("tls-request", "make the node's TLS key and a certificate signing request"),
        ("tls-install", "install the certificate the CA signed (node may be serving)"),
    ]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", type=Path, required=True, help="node TOML file")
        if name == "init":
            cmd.add_argument(
                "--identity-out",
                type=Path,
                metavar="FILE",
                help="also write the public identity to FILE (public keys only)",
            )
        if name == "serve":
            # Set by the supervisor when the node runs several processes.
            cmd.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
        elif name == "tls-request":
            cmd.add_argument(
                "--hosts",
                required=True,
                help="comma-separated DNS names and IP addresses the coordinator reaches "
                "the node by (the node id is always named too)",
            )
            cmd.add_argument(
                "--rotate",
                action="store_true",
                help="make a new key beside the one in use (which is never overwritten)",
            )
        elif name == "tls-install":
            cmd.add_argument("--cert", type=Path, required=True, help="the certificate received")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = NodeSettings.from_toml(args.config, os.environ)
        component = f"kms-node/{settings.node_id}"
        if getattr(args, "worker", None) is not None:
            component += f"/{args.worker}"
        logs.configure(component, settings.log_level)
        if args.command == "init":
            identity = json.dumps(init(settings).to_json_object(), indent=2) + "\n"
            if args.identity_out is not None:
                args.identity_out.write_text(identity)
            sys.stdout.write(identity)
        elif args.command == "rotate-kek":
            print(json.dumps(rotate(settings), indent=2))
        elif args.command == "tls-request":
            made = tls_request(settings, parse_hosts(args.hosts), rotate=args.rotate)
            print(json.dumps(made, indent=2))
        elif args.command == "tls-install":
            print(json.dumps(tls_install(settings, args.cert), indent=2))
        elif settings.processes > 1 and args.worker is None:
            worker = [sys.executable, "-m", "cli.node", "serve", "--config", str(args.config)]
            supervise(settings, worker)
        else:
            serve(settings, worker=args.worker)
    except KmsError as e:
        print(f"kms-node: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kms-node: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
