"""The local cluster's CA: what it issues, file modes, and reuse."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy import certificate_authority, certs
from deploy.certs import CertFiles, ClusterCa


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> set[object]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*ext.get_values_for_type(x509.DNSName), *ext.get_values_for_type(x509.IPAddress)}


def usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_a_p256_ca_valid_for_a_year(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path / "tls")
    cert = load(ca.ca_cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == certs.VALIDITY + certificate_authority.BACKDATE
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700


def test_server_cert_names_its_hosts_and_node_id(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    files = ca.server_cert("node-1")
    cert = load(files.cert)
    assert sans(cert) == {ipaddress.ip_address("127.0.0.1"), "localhost", "node-1"}
    assert usages(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(load(ca.ca_cert))


def test_client_cert_is_for_client_auth_only(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    files = ca.client_cert("operator")
    cert = load(files.cert)
    assert usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert sans(cert) == {"operator"}
    assert files.cert.name == "operator-client.crt"
    cert.verify_directly_issued_by(load(ca.ca_cert))


def test_private_keys_are_0600_and_match_their_certs(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    issued = [ca.server_cert("node-1"), ca.server_cert("coordinator"), ca.client_cert("operator")]
    for key in [tmp_path / "ca.key", *(f.key for f in issued)]:
        assert key.stat().st_mode & 0o777 == 0o600, key
    for files in issued:
        private_key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        assert load(files.cert).public_key() == private_key.public_key()


def test_repr_shows_no_key(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    assert repr(ca) == f"ClusterCa({str(tmp_path)!r})"


def test_existing_files_are_reused(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    node = ca.server_cert("node-1")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = ClusterCa.ensure(tmp_path)
    assert again.server_cert("node-1") == node
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_new_ca_reissues_every_certificate(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    old = ca.server_cert("node-1").cert.read_bytes()
    (tmp_path / "ca.key").unlink()
    fresh = ClusterCa.ensure(tmp_path)
    assert fresh.server_cert("node-1").cert.read_bytes() != old
    load(fresh.server_cert("node-1").cert).verify_directly_issued_by(load(fresh.ca_cert))


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda f: f.key.unlink(), id="key missing"),
        pytest.param(lambda f: os.chmod(f.key, 0o644), id="key readable by others"),
        pytest.param(lambda f: f.cert.write_text("not a certificate"), id="cert garbled"),
    ],
)
def test_unusable_leaf_files_are_replaced(
    tmp_path: Path, spoil: Callable[[CertFiles], object]
) -> None:
    ca = ClusterCa.ensure(tmp_path)
    files = ca.server_cert("node-1")
    old = files.cert.read_bytes()
    spoil(files)
    assert ca.server_cert("node-1") == files
    assert files.cert.read_bytes() != old
    assert files.key.stat().st_mode & 0o777 == 0o600


def test_cert_for_other_hosts_is_reissued(tmp_path: Path) -> None:
    ca = ClusterCa.ensure(tmp_path)
    ca.server_cert("node-1")
    files = ca.server_cert("node-1", hosts=["10.0.0.5", "kms1.example"])
    assert sans(load(files.cert)) == {ipaddress.ip_address("10.0.0.5"), "kms1.example", "node-1"}


def test_near_expiry_is_reissued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = ClusterCa.ensure(tmp_path)
    old = ca.server_cert("node-1").cert.read_bytes()
    later = datetime.datetime.now(datetime.UTC) + certs.VALIDITY - certs.RENEW_BEFORE
    monkeypatch.setattr(certs, "_now", lambda: later)
    ca = ClusterCa.ensure(tmp_path)  # the CA too is near its end
    assert ca.server_cert("node-1").cert.read_bytes() != old
    assert load(ca.ca_cert).not_valid_after_utc > later + certs.RENEW_BEFORE
