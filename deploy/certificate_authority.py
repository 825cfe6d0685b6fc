"""The cluster's certificate authority: what whoever runs it keeps, and how it
signs the requests (CSRs) parties send.

Rules this module follows:

- the CA's key is P-256, in ``DIR/ca.key`` with mode 0600, and is refused if
  others can read it; ``DIR/ca.crt`` is its certificate, to hand to everyone;
- a CSR is read with a size bound and refused unless its signature checks, its
  key is P-256, its subject is a common name alone, and it asks for nothing but
  subject alternative names (DNS names without wildcards, IP addresses for
  servers): whatever else a CSR asks for is not granted silently, it is refused;
- the role, not the request, decides what the certificate may do (key usage and
  extended key usage: a node's certificate cannot act as a client's), and the
  validity is bounded and never outlives the CA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.errors import ConfigurationError, InvalidRequest
from deploy.certificate_requests import MAX_NAMES, check_dns_name, write_private_key
from proto.tls_identity import read_pem

#: a CSR larger than this is not one of ours (ours are under 1 KiB)
MAX_CSR_BYTES = 16 * 1024
#: PKCS#9 extensionRequest, the attribute a CSR carries its extensions in
EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")
DEFAULT_VALIDITY = datetime.timedelta(days=90)
#: the longest a leaf certificate may be valid (as for public TLS certificates)
MAX_VALIDITY = datetime.timedelta(days=397)
CA_VALIDITY = datetime.timedelta(days=5 * 365)
#: leeway for clocks that differ a little between hosts
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Role:
    """What a certificate is for."""

    usage: x509.ObjectIdentifier
    #: a server's certificate names its hosts; a client's names only itself
    names_hosts: bool


SERVER = Role(ExtendedKeyUsageOID.SERVER_AUTH, names_hosts=True)
CLIENT = Role(ExtendedKeyUsageOID.CLIENT_AUTH, names_hosts=False)
ROLES: dict[str, Role] = {
    "node": SERVER,
    "coordinator-server": SERVER,
    "coordinator-client": CLIENT,
    # operators' and auditors' tools calling the nodes (mutual TLS)
    "operator-client": CLIENT,
}


class CertificateAuthority:
    """A CA certificate and its key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.cert.subject.rfc4514_string()!r})"

    @classmethod
    def create(
        cls, name: str, now: datetime.datetime, validity: datetime.timedelta = CA_VALIDITY
    ) -> CertificateAuthority:
        """A new CA (in memory; :meth:`write` saves it)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def init(cls, directory: Path, name: str, now: datetime.datetime) -> CertificateAuthority:
        """Create a CA in ``directory``; refuses one that holds a CA key already."""
        if (directory / "ca.key").exists():
            raise ConfigurationError(
                f"{directory / 'ca.key'} exists; a CA is not overwritten (to rotate the CA, "
                "create the new one in another directory)"
            )
        ca = cls.create(name, now)
        ca.write(directory)
        return ca

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        """The CA in ``directory``."""
        key_file, cert_file = directory / "ca.key", directory / "ca.crt"
        try:
            mode = key_file.stat().st_mode
        except OSError as e:
            raise ConfigurationError(f"cannot read CA key {key_file}: {e.strerror}") from None
        if mode & 0o077:
            raise ConfigurationError(
                f"CA key {key_file} is readable by others (mode {mode & 0o777:o}); "
                f"chmod 600 it, and consider the key exposed"
            )
        try:
            cert = x509.load_pem_x509_certificate(read_pem(cert_file, "CA certificate"))
            key = serialization.load_pem_private_key(read_pem(key_file, "CA key"), password=None)
        except (ValueError, TypeError):
            raise ConfigurationError(f"{directory} holds no readable CA (ca.crt, ca.key)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
            raise ConfigurationError(f"CA key {key_file} is not the key of {cert_file}")
        return cls(cert, key)

    def write(self, directory: Path) -> None:
        """Key first (a new file, 0600), then the certificate."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = directory / "ca.key"
        tmp = key_file.with_name("ca.key.tmp")
        tmp.unlink(missing_ok=True)
        write_private_key(tmp, self._key)
        os.replace(tmp, key_file)
        (directory / "ca.crt").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def sign(
        self,
        csr_pem: bytes,
        role: str,
        now: datetime.datetime,
        validity: datetime.timedelta = DEFAULT_VALIDITY,
        *,
        expected_name: str | None = None,
    ) -> x509.Certificate:
        """A certificate for the checked request ``csr_pem``, for ``role``; with
        ``expected_name``, only if the request is for that name."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        if not datetime.timedelta(days=1) <= validity <= MAX_VALIDITY:
            raise InvalidRequest(f"validity must be between 1 and {MAX_VALIDITY.days} days")
        csr = checked_request(csr_pem, ROLES[role])
        name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if expected_name is not None and name != expected_name:
            raise InvalidRequest(f"the request is for {name!r}, not {expected_name!r}")
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked_request
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + validity, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ROLES[role].usage]), critical=False)
            .add_extension(
                csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value,
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )


def checked_request(csr_pem: bytes, role: Role) -> x509.CertificateSigningRequest:
    """Parse ``csr_pem`` and refuse anything but what :func:`build_request
    <deploy.certificate_requests.build_request>` makes for ``role``."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidRequest(f"the request is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        extensions = csr.extensions
        attributes = list(csr.attributes)
    except ValueError:
        raise InvalidRequest("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise InvalidRequest("the request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidRequest("the request's key is not an EC P-256 key")
    subject = list(csr.subject)
    if len(subject) != 1 or subject[0].oid != NameOID.COMMON_NAME:
        raise InvalidRequest("the request's subject must be a common name alone (CN=name)")
    name = str(subject[0].value)
    try:
        check_dns_name(name, "the request's common name")
    except ConfigurationError as e:
        raise InvalidRequest(e.message) from None
    for attribute in attributes:
        if attribute.oid != EXTENSION_REQUEST:
            raise InvalidRequest(
                f"the request carries an unexpected attribute {attribute.oid.dotted_string}"
            )
    for extension in extensions:
        if not isinstance(extension.value, x509.SubjectAlternativeName):
            raise InvalidRequest(
                f"the request asks for an unexpected extension {extension.oid.dotted_string} "
                f"({extension.value.__class__.__name__}); only subject alternative names"
            )
    _check_names(extensions, name, role)
    return csr


def _check_names(extensions: x509.Extensions, name: str, role: Role) -> None:
    try:
        sans = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidRequest("the request names no subject alternative name") from None
    names = list(sans)
    if len(names) > MAX_NAMES:
        raise InvalidRequest(f"the request has more than {MAX_NAMES} names")
    dns = sans.get_values_for_type(x509.DNSName)
    for value in names:
        if not isinstance(value, x509.DNSName | x509.IPAddress):
            raise InvalidRequest(f"the request names an unexpected kind of name: {value}")
    for host in dns:
        try:
            check_dns_name(host, "the request's name")
        except ConfigurationError as e:
            raise InvalidRequest(e.message) from None
    if name not in dns:
        raise InvalidRequest(f"the request's names do not include its common name {name!r}")
    if not role.names_hosts and names != [x509.DNSName(name)]:
        raise InvalidRequest(f"a client certificate names only its holder ({name!r}), not hosts")


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
