"""The local cluster's certificate authority and the certificates it issues.

One CA (EC P-256) per cluster signs a server certificate for each node and for
the coordinator, and client certificates for the coordinator (to reach nodes,
mutual TLS) and for operators' tools. Server certificates name their hosts as
subject alternative names: ``127.0.0.1``, ``localhost`` and the service's own
name (a node id), which callers that know which node they mean pin (see
``proto.transport``). Extended key usage keeps the roles apart: a
node's server certificate cannot be used as a client certificate.

Certificates are made the one way parties on separate hosts make them: a key
and a CSR (``deploy.certificate_requests``), signed by the CA for a role
(``deploy.certificate_authority``); here all three happen in one process.

Everything is idempotent: a file that exists, is signed by the CA, names what
it should, has its matching key (mode 0600) and is not near expiry is reused;
anything else is issued afresh.

Layout of the directory::

    ca.crt, ca.key                  the CA
    NAME.crt, NAME.key              server certificates (a node id, "coordinator")
    NAME-client.crt, NAME-client.key  client certificates ("coordinator", "operator")
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.errors import ConfigurationError
from deploy.certificate_authority import ROLES, CertificateAuthority
from deploy.certificate_requests import build_request, subject_alt_names

VALIDITY = datetime.timedelta(days=365)
#: a certificate with less time left than this is issued again
RENEW_BEFORE = datetime.timedelta(days=30)
LOCAL_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
CA_NAME = "medkms local cluster CA"


@dataclass(frozen=True)
class CertFiles:
    """A PEM certificate and its PKCS#8 PEM private key (mode 0600)."""

    cert: Path
    key: Path


class ClusterCa:
    """A CA whose key lives in ``directory``; issues (or reuses) certificates there."""

    def __init__(self, directory: Path, authority: CertificateAuthority) -> None:
        self.directory = directory
        self._authority = authority

    def __repr__(self) -> str:
        return f"ClusterCa({str(self.directory)!r})"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @classmethod
    def ensure(cls, directory: Path) -> ClusterCa:
        """The CA in ``directory``, created if absent, unusable or near expiry."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            authority = CertificateAuthority.open(directory)
        except ConfigurationError:
            pass
        else:
            cert = authority.cert
            if _is_ca(cert) and _fresh(cert) and cert.issuer == cert.subject:
                return cls(directory, authority)
        authority = CertificateAuthority.create(CA_NAME, _now(), VALIDITY)
        authority.write(directory)
        return cls(directory, authority)

    def server_cert(self, name: str, hosts: Sequence[str] = LOCAL_HOSTS) -> CertFiles:
        """A TLS server certificate for ``name``, valid for ``hosts`` and ``name``."""
        role = "coordinator-server" if name == "coordinator" else "node"
        return self._leaf(name, name, hosts, role)

    def client_cert(self, name: str) -> CertFiles:
        """A TLS client certificate identifying ``name``."""
        role = "coordinator-client" if name == "coordinator" else "operator-client"
        return self._leaf(f"{name}-client", name, (), role)

    def _leaf(self, file_stem: str, name: str, hosts: Sequence[str], role: str) -> CertFiles:
        files = CertFiles(self.directory / f"{file_stem}.crt", self.directory / f"{file_stem}.key")
        sans = subject_alt_names(name, hosts)
        usage = ROLES[role].usage
        loaded = _load(files)
        if loaded is not None and self._reusable(loaded[0], name, sans, usage):
            return files
        # The CSR path every party's host takes, in one process.
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_request(key, name, hosts).public_bytes(serialization.Encoding.PEM)
        cert = self._authority.sign(csr, role, _now(), VALIDITY)
        _write(files, cert, key)
        return files

    def _reusable(
        self,
        cert: x509.Certificate,
        name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> bool:
        try:
            cert.verify_directly_issued_by(self._authority.cert)
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return False
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return (
            _fresh(cert)
            and [c.value for c in common_names] == [name]
            and set(names) == set(sans)
            and list(usages) == [usage]
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _fresh(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _load(files: CertFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its key, or None if either is missing, unreadable,
    mismatched, not P-256, or the key file is readable by others."""
    try:
        if files.key.stat().st_mode & 0o077:
            return None
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        return None
    if cert.public_key() != key.public_key():
        return None
    return cert, key


def _write(files: CertFiles, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Key first (created 0600, then renamed into place), then the certificate."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = files.key.with_suffix(".key.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, files.key)
    cert_tmp = files.cert.with_suffix(".crt.tmp")
    cert_tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(cert_tmp, files.cert)
