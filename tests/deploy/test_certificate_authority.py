"""The cluster's CA: what it keeps, which requests it signs, and what it puts in
the certificates (the role decides, not the request)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.errors import ConfigurationError, InvalidRequest
from deploy.certificate_authority import (
    MAX_CSR_BYTES,
    MAX_VALIDITY,
    ROLES,
    CertificateAuthority,
)
from deploy.certificate_requests import build_request

NOW = datetime.datetime.now(datetime.UTC)
PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("test CA", NOW)


def csr_pem(name: str = "node-1", hosts: tuple[str, ...] = ("10.0.0.5", "kms1.example")) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return build_request(key, name, hosts).public_bytes(PEM)


def custom_csr(
    build: Callable[[x509.CertificateSigningRequestBuilder], x509.CertificateSigningRequestBuilder],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    subject: x509.Name | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-1")])
    )
    return build(builder).sign(key, hashes.SHA256()).public_bytes(PEM)


def with_sans(
    *names: x509.GeneralName,
) -> Callable[[x509.CertificateSigningRequestBuilder], x509.CertificateSigningRequestBuilder]:
    return lambda b: b.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)


def test_init_writes_a_private_key_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "test CA", NOW)
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    assert CertificateAuthority.open(tmp_path / "ca").cert == ca.cert
    key_before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(ConfigurationError, match="a CA is not overwritten"):
        CertificateAuthority.init(tmp_path / "ca", "another CA", NOW)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key_before
    assert "PRIVATE" not in repr(ca)


def test_a_ca_key_others_can_read_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path, "test CA", NOW)
    os.chmod(tmp_path / "ca.key", 0o640)
    with pytest.raises(ConfigurationError, match="readable by others"):
        CertificateAuthority.open(tmp_path)


@pytest.mark.parametrize(
    ("role", "usage"),
    [
        ("node", ExtendedKeyUsageOID.SERVER_AUTH),
        ("coordinator-server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("coordinator-client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("operator-client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_the_role_decides_the_usage(
    ca: CertificateAuthority, role: str, usage: x509.ObjectIdentifier
) -> None:
    hosts = ("10.0.0.5",) if ROLES[role].names_hosts else ()
    cert = ca.sign(csr_pem("node-1", hosts), role, NOW)
    cert.verify_directly_issued_by(ca.cert)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_node_certificate_names_the_node_and_its_hosts(ca: CertificateAuthority) -> None:
    cert = ca.sign(csr_pem(), "node", NOW)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-1", "kms1.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert cert.subject.rfc4514_string() == "CN=node-1"


def test_validity_is_bounded_and_never_outlives_the_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("short CA", NOW, validity=datetime.timedelta(days=30))
    cert = ca.sign(csr_pem(), "node", NOW, datetime.timedelta(days=90))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    for days in (0, MAX_VALIDITY.days + 1):
        with pytest.raises(InvalidRequest, match="validity must be between 1 and 397 days"):
            ca.sign(csr_pem(), "node", NOW, datetime.timedelta(days=days))


def test_the_expected_name_is_enforced(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidRequest, match="is for 'node-1', not 'node-2'"):
        ca.sign(csr_pem(), "node", NOW, expected_name="node-2")
    ca.sign(csr_pem(), "node", NOW, expected_name="node-1")


def tampered_signature() -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(PEM)


@pytest.mark.parametrize(
    ("make", "role", "problem"),
    [
        (lambda: b"x" * (MAX_CSR_BYTES + 1), "node", "larger than 16384 bytes"),
        (lambda: b"not a csr", "node", "not a PEM certificate signing request"),
        (tampered_signature, "node", "signature does not verify"),
        (
            lambda: custom_csr(
                with_sans(x509.DNSName("node-1")), key=rsa.generate_private_key(65537, 2048)
            ),
            "node",
            "not an EC P-256 key",
        ),
        (
            lambda: custom_csr(
                with_sans(x509.DNSName("node-1")), key=ec.generate_private_key(ec.SECP384R1())
            ),
            "node",
            "not an EC P-256 key",
        ),
        (
            lambda: custom_csr(
                with_sans(x509.DNSName("node-1")),
                subject=x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hospital"),
                        x509.NameAttribute(NameOID.COMMON_NAME, "node-1"),
                    ]
                ),
            ),
            "node",
            "a common name alone",
        ),
        (
            lambda: custom_csr(
                lambda b: with_sans(x509.DNSName("node-1"))(b).add_extension(
                    x509.BasicConstraints(ca=True, path_length=None), critical=True
                )
            ),
            "node",
            "unexpected extension 2.5.29.19",
        ),
        (
            lambda: custom_csr(
                lambda b: with_sans(x509.DNSName("node-1"))(b).add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                )
            ),
            "node",
            "unexpected extension",
        ),
        (
            lambda: custom_csr(
                lambda b: with_sans(x509.DNSName("node-1"))(b).add_attribute(
                    x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"secret"
                )
            ),
            "node",
            "unexpected attribute 1.2.840.113549.1.9.7",
        ),
        (lambda: custom_csr(lambda b: b), "node", "names no subject alternative name"),
        (
            lambda: custom_csr(with_sans(x509.DNSName("node-1"), x509.DNSName("*.example"))),
            "node",
            "is not a DNS name",
        ),
        (
            lambda: custom_csr(with_sans(x509.DNSName("node-2"))),
            "node",
            "do not include its common name 'node-1'",
        ),
        (
            lambda: custom_csr(
                with_sans(x509.DNSName("node-1"), x509.RFC822Name("ops@example.org"))
            ),
            "node",
            "unexpected kind of name",
        ),
        (
            lambda: custom_csr(
                with_sans(
                    *(x509.DNSName(f"h{i}.example") for i in range(16)), x509.DNSName("node-1")
                )
            ),
            "node",
            "more than 16 names",
        ),
        (lambda: csr_pem("coordinator", ("10.0.0.9",)), "coordinator-client", "not hosts"),
        (lambda: csr_pem(), "admin", "unknown role 'admin'"),
    ],
    ids=[
        "oversized",
        "garbage",
        "bad signature",
        "rsa key",
        "p-384 key",
        "subject with more than a name",
        "asks to be a CA",
        "asks for a usage",
        "challenge password",
        "no names",
        "wildcard",
        "names without the common name",
        "email name",
        "too many names",
        "client naming hosts",
        "unknown role",
    ],
)
def test_a_bad_request_is_refused(
    ca: CertificateAuthority, make: Callable[[], bytes], role: str, problem: str
) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        ca.sign(make(), role, NOW)
