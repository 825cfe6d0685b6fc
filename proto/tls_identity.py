"""A TLS identity read from files and checked before use: a CA bundle, a
certificate and its private key.

Rules this module follows:

- every file is read as :mod:`core.local_files` reads one (a regular file only, so a
  FIFO cannot hang a program at start; with a size bound), and parsed before anything
  uses it;
- a bundle may hold several CA certificates (so a CA can be rotated: trust the
  old and the new one while certificates move over), and nothing but CAs;
- a certificate is used only with its own key, while it is valid, for the role
  it was issued for (extended key usage), signed directly by a CA of the bundle
  (the cluster's CAs issue leaves themselves; there are no intermediates);
- errors name the file and what is wrong with it, never a key's bytes, and a
  :class:`TlsIdentity` keeps its key out of its repr.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core.errors import ConfigurationError, InvalidRequest
from core.local_files import read_regular_file

#: a PEM file larger than this is not a certificate, key or CA bundle of ours
MAX_PEM_BYTES = 256 * 1024


@dataclass(frozen=True)
class TlsIdentity:
    """A checked certificate (chain), its key and the CA bundle, as PEM for gRPC."""

    bundle_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    #: the certificate's serial number and end of validity, for logs
    serial: int
    not_after: datetime.datetime


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of ``path``, a regular file of at most :data:`MAX_PEM_BYTES`."""
    try:
        return read_regular_file(path, max_bytes=MAX_PEM_BYTES, what=what)
    except InvalidRequest as e:
        # Not a regular file, or too large: a setting names the wrong file.
        raise ConfigurationError(e.message) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path}: {e.strerror}") from None


def load_bundle(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    """The CA bundle at ``path``: its bytes and its certificates, every one a CA."""
    pem = read_pem(path, "CA bundle")
    try:
        cas = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigurationError(f"CA bundle {path} holds no PEM certificate") from None
    for ca in cas:
        if not _is_ca(ca):
            raise ConfigurationError(
                f"CA bundle {path} holds a certificate that is not a CA "
                f"({ca.subject.rfc4514_string()}, serial {ca.serial_number:x})"
            )
    return pem, cas


def load_identity(
    ca_bundle: Path,
    cert: Path,
    key: Path,
    *,
    usage: x509.ObjectIdentifier,
    name: str | None = None,
) -> TlsIdentity:
    """Read and check an identity: ``key`` is the key of ``cert``'s first certificate,
    which a CA of ``ca_bundle`` signed, is valid now, is for ``usage`` and, if
    ``name`` is given, names it as a DNS subject alternative name."""
    bundle_pem, cas = load_bundle(ca_bundle)
    cert_pem = read_pem(cert, "TLS certificate")
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise ConfigurationError(f"TLS certificate {cert} holds no PEM certificate") from None
    key_pem = read_pem(key, "TLS key")
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Not the library's message: it may quote what it could not parse.
        raise ConfigurationError(f"TLS key {key} is not an unencrypted PEM private key") from None
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"TLS key {key} is not an EC key")
    if leaf.public_key() != private_key.public_key():
        raise ConfigurationError(f"TLS key {key} is not the key of certificate {cert}")
    if not any(_issued_by(leaf, ca) for ca in cas):
        raise ConfigurationError(
            f"TLS certificate {cert} (issuer {leaf.issuer.rfc4514_string()}) is not signed "
            f"by a CA of {ca_bundle}"
        )
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        raise ConfigurationError(
            f"TLS certificate {cert} is not valid now "
            f"(valid from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC)"
        )
    if usage not in _usages(leaf):
        raise ConfigurationError(
            f"TLS certificate {cert} is not issued for {usage._name} (extended key usage)"
        )
    if name is not None and name not in _dns_names(leaf):
        raise ConfigurationError(f"TLS certificate {cert} does not name {name!r}")
    return TlsIdentity(
        bundle_pem=bundle_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sans.get_values_for_type(x509.DNSName)
