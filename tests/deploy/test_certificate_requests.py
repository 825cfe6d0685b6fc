"""A party's own key and CSR, and installing the certificate the CA sends back."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from core.errors import ConfigurationError
from deploy import certificate_requests
from deploy.certificate_authority import CertificateAuthority
from deploy.certificate_requests import install, parse_hosts, pending_key, request
from proto.tls_identity import TlsIdentity

NOW = datetime.datetime.now(datetime.UTC)
SERVER = ExtendedKeyUsageOID.SERVER_AUTH


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path / "ca", "test CA", NOW)
    return ca


def sign(ca: CertificateAuthority, csr: Path, out: Path) -> Path:
    cert = ca.sign(csr.read_bytes(), "node", NOW)
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def enrol(ca: CertificateAuthority, directory: Path, stem: str, *, rotate: bool) -> TlsIdentity:
    """Request (as node-1, key ``node.key``), sign and install."""
    csr = directory / f"{stem}.csr"
    request(directory / "node.key", csr, "node-1", [], rotate=rotate)
    return install(
        sign(ca, csr, directory / f"{stem}.crt"),
        directory / "ca" / "ca.crt",
        directory / "node.crt",
        directory / "node.key",
        usage=SERVER,
        name="node-1",
    )


def test_request_writes_a_private_key_and_a_csr_naming_the_node(tmp_path: Path) -> None:
    made = request(
        tmp_path / "tls" / "node.key", tmp_path / "node.csr", "node-1", ["10.0.0.5"], rotate=False
    )
    assert made.key.stat().st_mode & 0o777 == 0o600
    assert made.key.parent.stat().st_mode & 0o777 == 0o700
    csr = x509.load_pem_x509_csr(made.csr.read_bytes())
    assert csr.is_signature_valid
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-1"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    key = serialization.load_pem_private_key(made.key.read_bytes(), password=None)
    assert csr.public_key() == key.public_key()
    assert b"PRIVATE" not in made.csr.read_bytes()


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    request(key, tmp_path / "a.csr", "node-1", [], rotate=False)
    before = key.read_bytes()
    with pytest.raises(ConfigurationError, match="exists and is not overwritten.*--rotate"):
        request(key, tmp_path / "b.csr", "node-1", [], rotate=False)
    rotation = request(key, tmp_path / "c.csr", "node-1", [], rotate=True)
    assert rotation.key == pending_key(key) and rotation.key.name == "node.key.next"
    assert rotation.key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigurationError, match="a rotation is under way"):
        request(key, tmp_path / "d.csr", "node-1", [], rotate=True)
    assert key.read_bytes() == before


def test_install_puts_the_waiting_key_and_its_certificate_in_place(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    first = enrol(ca, tmp_path, "a", rotate=False)
    old_key = key.read_bytes()
    second = enrol(ca, tmp_path, "b", rotate=True)
    assert second.serial != first.serial
    assert key.read_bytes() != old_key
    assert not pending_key(key).exists()
    assert x509.load_pem_x509_certificate(cert.read_bytes()).serial_number == second.serial
    assert key.stat().st_mode & 0o777 == 0o600


def test_install_refuses_a_certificate_for_another_key_and_changes_nothing(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    key, cert, bundle = tmp_path / "node.key", tmp_path / "node.crt", tmp_path / "ca" / "ca.crt"
    enrol(ca, tmp_path, "a", rotate=False)
    request(key, tmp_path / "b.csr", "node-1", [], rotate=True)
    request(tmp_path / "other.key", tmp_path / "other.csr", "node-1", [], rotate=False)
    wrong = sign(ca, tmp_path / "other.csr", tmp_path / "other.crt")
    files = {p: p.read_bytes() for p in (key, cert, pending_key(key))}
    with pytest.raises(ConfigurationError, match="is not the key of certificate"):
        install(wrong, bundle, cert, key, usage=SERVER, name="node-1")
    assert {p: p.read_bytes() for p in files} == files


@pytest.mark.parametrize(
    ("value", "problem"),
    [("", "at least one host"), ("a,,b_c", "'b_c' is not a DNS name"), ("*.x", "not a DNS")],
)
def test_hosts_are_checked(value: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        parse_hosts(value)


def test_hosts_are_ip_addresses_or_dns_names() -> None:
    assert parse_hosts(" 10.0.0.5, ::1,kms1.example ") == ["10.0.0.5", "::1", "kms1.example"]
    with pytest.raises(ConfigurationError, match="at most 16"):
        certificate_requests.subject_alt_names("n", [f"h{i}" for i in range(16)])
