"""`kmsctl ca sign` given a careless or hostile request: each refusal is a message naming
what is wrong, never a traceback."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cli import kmsctl
from deploy.certificate_authority import MAX_VALIDITY, CertificateAuthority
from deploy.certificate_requests import build_request
from tests.core.test_local_files import refuses_without_waiting


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, "test CA", datetime.datetime.now(datetime.UTC))
    return directory


def sign(ca_dir: Path, csr: Path, *extra: str) -> list[str]:
    out = ca_dir.parent / "node.crt"
    args = ["ca", "sign", "--dir", str(ca_dir), "--csr", str(csr), "--role", "node"]
    return [*args, "--out", str(out), *extra]


def good_csr(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "node.csr"
    path.write_bytes(
        build_request(key, "node-1", ["127.0.0.1"]).public_bytes(serialization.Encoding.PEM)
    )
    return path


def test_a_request_that_is_not_a_csr_is_named(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csr = tmp_path / "node.csr"
    csr.write_text("not a CSR\n")
    assert kmsctl.main(sign(ca_dir, csr)) == 1
    err = capsys.readouterr().err
    assert err == f"kmsctl: CSR {csr}: not a PEM certificate signing request\n"
    assert not (tmp_path / "node.crt").exists()


@pytest.mark.parametrize("days", ["99999999999", "9" * 5000, "0", "-1", "398", "ninety"])
def test_days_out_of_range_is_a_usage_error(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    """``--days 99999999999`` was an OverflowError traceback from timedelta."""
    with pytest.raises(SystemExit) as exited:
        kmsctl.main(sign(ca_dir, good_csr(tmp_path), "--days", days))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --days: must be a whole number from 1 to {MAX_VALIDITY.days}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "node.crt").exists()


@pytest.mark.parametrize("days", ["1", str(MAX_VALIDITY.days)])
def test_days_within_range_sign(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    assert kmsctl.main(sign(ca_dir, good_csr(tmp_path), "--days", days)) == 0, capsys.readouterr()
    assert (tmp_path / "node.crt").exists()


def test_a_fifo_given_as_the_csr_is_refused_at_once(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "node.csr"
    os.mkfifo(fifo)

    def run() -> None:
        raise SystemExit(kmsctl.main(sign(ca_dir, fifo)))

    error = refuses_without_waiting(fifo, run)
    assert isinstance(error, SystemExit) and error.code == 1
    assert capsys.readouterr().err == f"kmsctl: CSR {fifo} is not a regular file\n"
