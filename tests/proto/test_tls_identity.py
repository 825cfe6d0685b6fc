"""The checks a TLS identity passes before a server uses it."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from core.errors import ConfigurationError
from deploy.certificate_authority import CertificateAuthority
from deploy.certificate_requests import build_request, write_private_key
from proto.tls_identity import MAX_PEM_BYTES, load_identity, read_pem
from tests.core.test_local_files import refuses_without_waiting

NOW = datetime.datetime.now(datetime.UTC)
PEM = serialization.Encoding.PEM
SERVER = ExtendedKeyUsageOID.SERVER_AUTH


def identity_files(tmp_path: Path, issued_at: datetime.datetime) -> tuple[Path, Path, Path]:
    ca = CertificateAuthority.create("test CA", NOW - datetime.timedelta(days=400))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_request(key, "node-1", ["127.0.0.1"]).public_bytes(PEM)
    cert = ca.sign(csr, "node", issued_at, datetime.timedelta(days=30))
    files = (tmp_path / "ca.crt", tmp_path / "node.crt", tmp_path / "node.key")
    files[0].write_bytes(ca.cert.public_bytes(PEM))
    files[1].write_bytes(cert.public_bytes(PEM))
    write_private_key(files[2], key)
    return files


def test_a_valid_identity_loads(tmp_path: Path) -> None:
    bundle, cert, key = identity_files(tmp_path, NOW)
    identity = load_identity(bundle, cert, key, usage=SERVER, name="node-1")
    assert identity.key_pem == key.read_bytes()
    assert "PRIVATE" not in repr(identity)


@pytest.mark.parametrize(
    "issued_at",
    [NOW - datetime.timedelta(days=31), NOW + datetime.timedelta(days=1)],
    ids=["expired", "not yet valid"],
)
def test_a_certificate_outside_its_validity_is_refused(
    tmp_path: Path, issued_at: datetime.datetime
) -> None:
    bundle, cert, key = identity_files(tmp_path, issued_at)
    with pytest.raises(ConfigurationError, match="is not valid now"):
        load_identity(bundle, cert, key, usage=SERVER)


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    bundle, cert, key = identity_files(tmp_path, NOW)
    cert.write_bytes(cert.read_bytes() + b"\n" * MAX_PEM_BYTES)
    with pytest.raises(ConfigurationError, match=r"node\.crt is larger than 262144 bytes"):
        load_identity(bundle, cert, key, usage=SERVER)


def test_an_encrypted_key_is_refused_without_its_bytes_in_the_error(tmp_path: Path) -> None:
    bundle, cert, key = identity_files(tmp_path, NOW)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = private.private_bytes(
        PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    key.write_bytes(encrypted)
    with pytest.raises(ConfigurationError, match="not an unencrypted PEM private key") as e:
        load_identity(bundle, cert, key, usage=SERVER)
    assert encrypted.decode().splitlines()[1] not in str(e.value)


def test_a_fifo_named_as_a_key_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO (or a device) where a PEM file belongs would hang the program at start."""
    bundle, cert, key = identity_files(tmp_path, NOW)
    key.unlink()
    os.mkfifo(key)
    error = refuses_without_waiting(key, lambda: load_identity(bundle, cert, key, usage=SERVER))
    assert isinstance(error, ConfigurationError)
    assert error.message == f"TLS key {key} is not a regular file"


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ConfigurationError, match="^cannot read CSR /nonexistent/x.csr: No such"):
        read_pem(Path("/nonexistent/x.csr"), "CSR")
