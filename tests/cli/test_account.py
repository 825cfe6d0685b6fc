"""`kmsctl account` and the password sources, with no chain: a keystore is a local file."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch

import pytest

from cli.admin import ether_to_wei
from cli.kmsctl import main
from cli.parties import read_password
from clients.sdk.identity import Identity, PublicIdentity
from core.did import Did
from core.errors import ConfigurationError, InvalidRequest

PASSWORD = "pw-for-tests"


def kmsctl(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), patch.object(sys, "stdin", io.StringIO()):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def password_file(tmp_path: Path, text: str = PASSWORD + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "password"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_new_show_and_public(tmp_path: Path) -> None:
    keystore = tmp_path / "me.json"
    pw = ["--password-file", str(password_file(tmp_path))]
    code, out, err = kmsctl("account", "new", "--keystore", str(keystore), *pw, "--chain-id", "7")
    assert code == 0, err
    created = json.loads(out)
    assert created["did"] == f"did:pkh:eip155:7:{created['address']}"
    assert keystore.stat().st_mode & 0o777 == 0o600

    code, out, _ = kmsctl("account", "show", "--keystore", str(keystore))
    assert json.loads(out) == {"address": created["address"]}

    public = tmp_path / "me.pub.json"
    args = ["--keystore", str(keystore), *pw, "--chain-id", "7", "--out", str(public)]
    code, _, err = kmsctl("account", "public", *args)
    assert code == 0, err
    identity = Identity.from_keystore(keystore, PASSWORD)
    assert PublicIdentity.load(public) == PublicIdentity(
        Did(7, created["address"]), identity.umbral_public_key()
    )


def test_new_refuses_an_existing_file_and_public_needs_a_chain(tmp_path: Path) -> None:
    keystore = tmp_path / "me.json"
    keystore.write_text("{}")
    pw = ["--password-file", str(password_file(tmp_path))]
    code, _, err = kmsctl("account", "new", "--keystore", str(keystore), *pw)
    assert (code, keystore.read_text()) == (1, "{}")
    assert "never overwritten" in err
    code, _, err = kmsctl("account", "public", "--keystore", str(keystore), *pw)
    assert code == 1 and "names a chain" in err


def _args(**values: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "password_file": None,
        "password_env": None,
        "keystore": Path("k.json"),
    }
    return argparse.Namespace(**{**defaults, **values})


def test_a_password_comes_from_the_first_line_of_a_private_file(tmp_path: Path) -> None:
    path = password_file(tmp_path, PASSWORD + "\nignored\n")
    assert read_password(_args(password_file=path)) == PASSWORD


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_password_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = password_file(tmp_path, mode=mode)
    with pytest.raises(ConfigurationError, match="chmod 600") as excinfo:
        read_password(_args(password_file=path))
    assert PASSWORD not in excinfo.value.message


def test_an_empty_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        read_password(_args(password_file=password_file(tmp_path, "")))


def test_a_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDKMS_TEST_PW", PASSWORD)
    assert read_password(_args(password_env="MEDKMS_TEST_PW")) == PASSWORD
    monkeypatch.delenv("MEDKMS_TEST_PW")
    with pytest.raises(ConfigurationError, match="MEDKMS_TEST_PW is not set"):
        read_password(_args(password_env="MEDKMS_TEST_PW"))
    assert "MEDKMS_TEST_PW" not in os.environ


def test_without_a_terminal_or_a_source_there_is_no_prompt() -> None:
    with patch.object(sys, "stdin", io.StringIO()):
        with pytest.raises(ConfigurationError, match="--password-file FILE or --password-env"):
            read_password(_args())


@pytest.mark.parametrize(
    ("ether", "wei"), [("1", 10**18), ("0.5", 5 * 10**17), ("0.000000000000000001", 1)]
)
def test_ether_amounts_become_wei(ether: str, wei: int) -> None:
    assert ether_to_wei(ether) == wei


@pytest.mark.parametrize(
    ("ether", "fragment"),
    [
        ("0", "more than 0"),
        ("-1", "more than 0"),
        ("NaN", "more than 0"),
        ("1e9", "at most"),
        ("0.0000000000000000001", "18 decimals"),
        ("one", "must be a number"),
    ],
)
def test_bad_ether_amounts_are_refused(ether: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        ether_to_wei(ether)
