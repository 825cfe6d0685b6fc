"""`kmsctl ca ...`: for whoever runs the cluster's certificate authority.

    kmsctl ca init --dir DIR                 # DIR/ca.key (0600) and DIR/ca.crt
    kmsctl ca sign --dir DIR --csr FILE --role node --out FILE [--name NODE_ID]

Parties make their own keys and send a CSR (`kms-node tls-request`,
`kms-coordinator tls-request`); the CA checks it (deploy.certificate_authority)
and signs it for a role; the role, not the request, decides what the
certificate may be used for. Give everyone ``ca.crt`` (or a bundle of CA
certificates, one after the other, while a CA is being replaced).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from core.errors import ConfigurationError, InvalidRequest
from deploy.certificate_authority import (
    DEFAULT_VALIDITY,
    MAX_CSR_BYTES,
    MAX_VALIDITY,
    ROLES,
    CertificateAuthority,
)
from proto.tls_identity import read_pem

DEFAULT_CA_NAME = "medkms cluster CA"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ca init`` and ``ca sign`` to kmsctl's subcommands."""
    ca = sub.add_parser("ca", help="the cluster's certificate authority").add_subparsers(
        dest="action", required=True
    )
    init = ca.add_parser("init", help="create the CA's key and certificate in a directory")
    init.add_argument("--dir", type=Path, required=True, help="the CA's directory (kept private)")
    init.add_argument("--name", default=DEFAULT_CA_NAME, help="the CA's common name")
    init.set_defaults(func=cmd_ca_init)

    sign = ca.add_parser("sign", help="check a party's CSR and sign it for a role")
    sign.add_argument("--dir", type=Path, required=True, help="the CA's directory")
    sign.add_argument("--csr", type=Path, required=True, help="the PEM CSR the party sent")
    sign.add_argument("--role", choices=sorted(ROLES), required=True)
    sign.add_argument("--out", type=Path, required=True, help="where to write the certificate")
    sign.add_argument(
        "--name",
        help="refuse unless the CSR is for this name (the node id you expect from the sender)",
    )
    sign.add_argument(
        "--days",
        type=_days,
        default=DEFAULT_VALIDITY.days,
        help=f"validity in days, 1 to {MAX_VALIDITY.days} (default {DEFAULT_VALIDITY.days})",
    )
    sign.set_defaults(func=cmd_ca_sign)


def cmd_ca_init(args: argparse.Namespace) -> None:
    ca = CertificateAuthority.init(args.dir, args.name, _now())
    print(f"CA {args.name!r} created in {args.dir}")
    fingerprint = ca.cert.fingerprint(hashes.SHA256()).hex()
    print("  ca.key   the CA's private key (mode 0600): keep it offline, back it up apart")
    print("  ca.crt   give it to every party (their tls_ca_cert)")
    print(f"  sha256   {fingerprint} (parties compare it before trusting ca.crt)")


def cmd_ca_sign(args: argparse.Namespace) -> None:
    if args.out.exists() and args.out.is_dir():
        raise ConfigurationError(f"--out {args.out} is a directory")
    ca = CertificateAuthority.open(args.dir)
    csr_pem = read_pem(args.csr, "CSR")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise ConfigurationError(f"CSR {args.csr} is larger than {MAX_CSR_BYTES} bytes")
    try:
        cert = ca.sign(
            csr_pem,
            args.role,
            _now(),
            datetime.timedelta(days=args.days),
            expected_name=args.name,
        )
    except InvalidRequest as e:
        # The CA's refusals speak of "the request": name the file it came from.
        raise InvalidRequest(f"CSR {args.csr}: {e.message}") from None
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(args.out)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    print(f"signed {cert.subject.rfc4514_string()} as {args.role}, written to {args.out}")
    print(f"  names      {', '.join(str(n.value) for n in names)}")
    print(f"  serial     {cert.serial_number:x}")
    print(f"  valid to   {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _days(text: str) -> int:
    """``--days``, checked while parsing: a number beyond ``timedelta``'s range would
    otherwise end in a traceback, not a usage message."""
    try:
        days = int(text)
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_VALIDITY.days:
        # Not the value: it may be thousands of digits.
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_VALIDITY.days}")
    return days


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
