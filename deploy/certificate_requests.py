"""A party's own TLS key and certificate signing request (CSR), made on its host,
and the installation of the certificate the CA sends back.

The flow (docs/tls-certificates.md): the party makes a P-256 key (mode 0600,
never copied anywhere) and a CSR naming it and its hosts; sends the CSR to
whoever runs the cluster's CA; receives a certificate; installs it. Rotation is
the same with ``rotate``: the new key waits beside the one in use, as
``KEY.next``, until its certificate is installed, so the serving pair is never
broken and a restart meanwhile still finds a matching pair.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.errors import ConfigurationError
from proto.tls_identity import TlsIdentity, load_identity, read_pem

#: how many subject alternative names a certificate of ours may carry
MAX_NAMES = 16
#: a DNS name of labels of letters, digits and hyphens (RFC 1123); no wildcards
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class TlsRequest:
    """Where a request's key and CSR were written."""

    key: Path
    csr: Path


def pending_key(key: Path) -> Path:
    """Where ``rotate`` puts the new key until its certificate is installed."""
    return key.with_name(key.name + ".next")


def check_dns_name(name: str, what: str) -> str:
    if not _DNS_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{what} {name!r} is not a DNS name (letters, digits, hyphens and dots; no wildcards)"
        )
    return name


def parse_hosts(value: str) -> list[str]:
    """``HOST[,HOST...]`` as given on a command line, each host checked."""
    hosts = [h.strip() for h in value.split(",") if h.strip()]
    if not hosts:
        raise ConfigurationError("name at least one host (a DNS name or an IP address)")
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            check_dns_name(host, "host")
    return hosts


def subject_alt_names(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """``name`` (a DNS name) and each host (an IP address or a DNS name), once each."""
    sans: list[x509.GeneralName] = [x509.DNSName(check_dns_name(name, "name"))]
    for host in dict.fromkeys(h for h in hosts if h != name):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(check_dns_name(host, "host")))
    if len(sans) > MAX_NAMES:
        raise ConfigurationError(f"at most {MAX_NAMES} names and hosts fit in a certificate")
    return sans


def build_request(
    key: ec.EllipticCurvePrivateKey, name: str, hosts: Sequence[str] = ()
) -> x509.CertificateSigningRequest:
    """A CSR for ``key``: common name ``name``; subject alternative names ``name``
    and ``hosts`` (a server's; a client has none)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(name, hosts)), critical=False)
        .sign(key, hashes.SHA256())
    )


def request(key: Path, csr: Path, name: str, hosts: Sequence[str], *, rotate: bool) -> TlsRequest:
    """Make a new key and write its CSR. The key goes to ``key``, which must not
    exist; with ``rotate``, to :func:`pending_key` of it, leaving ``key`` alone."""
    target = pending_key(key) if rotate else key
    if target.exists():
        if rotate:
            raise ConfigurationError(
                f"{target} exists: a rotation is under way. Install its certificate, or "
                "delete that file to start the rotation again"
            )
        raise ConfigurationError(
            f"TLS key {target} exists and is not overwritten; to replace it, make the "
            "request with --rotate (the new key waits beside it until its certificate "
            "is installed)"
        )
    private_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = build_request(private_key, name, hosts).public_bytes(serialization.Encoding.PEM)
    write_private_key(target, private_key)
    _replace(csr, csr_pem, 0o644)
    return TlsRequest(key=target, csr=csr)


def install(
    signed: Path,
    ca_bundle: Path,
    cert: Path,
    key: Path,
    *,
    usage: x509.ObjectIdentifier,
    name: str,
) -> TlsIdentity:
    """Check ``signed`` (the CA's answer) against the key waiting for it, then put
    both in place: the key first, then the certificate, each by rename, so that a
    server reloading them sees the old pair, then a mismatch it refuses, then the
    new pair. Returns what was installed."""
    waiting = pending_key(key)
    new_key = waiting if waiting.exists() else key
    identity = load_identity(ca_bundle, signed, new_key, usage=usage, name=name)
    if new_key == waiting:
        os.replace(waiting, key)
    _replace(cert, read_pem(signed, "certificate"), 0o644)
    return identity


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """``key`` as PKCS#8 PEM in a new file ``path``, created with mode 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists and is not overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
