from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from clients.sdk.identity import Identity, PublicIdentity
from clients.sdk.keystore_file import decrypt_keystore, read_keystore
from core.did import Did
from core.errors import InvalidRequest

PASSWORD = "correct horse battery staple"


def fast_keystore(key: bytes, password: str = PASSWORD) -> dict[str, Any]:
    """A keystore eth-account writes, with a cheap KDF so that the tests stay quick."""
    return dict(Account.encrypt(key, password, kdf="pbkdf2", iterations=1000))


def test_an_identity_survives_a_keystore_with_all_its_keys(tmp_path: Path) -> None:
    alice = Identity.generate("alice")
    path = tmp_path / "alice.json"
    alice.to_keystore(path, PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o600
    # The file is a standard keystore: eth-account opens it alone.
    assert Account.decrypt(json.loads(path.read_text()), PASSWORD) == alice.account.key
    assert alice.account.key.hex() not in path.read_text()
    again = Identity.from_keystore(path, PASSWORD)
    assert again.address == alice.address
    assert again.umbral_public_key() == alice.umbral_public_key()
    assert again.record_public_keys() == alice.record_public_keys()
    assert again.verifying_key() == alice.verifying_key()


def test_a_keystore_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        Identity.generate("a").to_keystore(path, PASSWORD)
    assert path.read_text() == "precious"


def test_the_umbral_keys_follow_from_the_ethereum_key_alone() -> None:
    """One keystore is the whole identity: the same key gives the same Umbral keys."""
    key = Account.create().key
    one, two = Identity("a", Account.from_key(key)), Identity("b", Account.from_key(key))
    assert one.umbral_public_key() == two.umbral_public_key()
    assert one.record_public_keys() == two.record_public_keys()
    assert Identity.generate("c").umbral_public_key() != one.umbral_public_key()


def test_the_address_is_read_without_the_password(tmp_path: Path) -> None:
    account = Account.create()
    path = tmp_path / "k.json"
    path.write_text(json.dumps(fast_keystore(account.key)))
    assert read_keystore(path).address == account.address


def test_a_wrong_password_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps(fast_keystore(Account.create().key)))
    with pytest.raises(InvalidRequest, match="wrong password") as excinfo:
        Identity.from_keystore(path, "hunter2")
    assert "hunter2" not in excinfo.value.message


def test_a_keystore_whose_key_is_not_its_account_is_refused(tmp_path: Path) -> None:
    document = fast_keystore(Account.create().key)
    document["address"] = Account.create().address[2:].lower()
    path = tmp_path / "k.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidRequest, match="not the account it names"):
        decrypt_keystore(read_keystore(path), PASSWORD)


def _mutated(change: str) -> bytes:
    document = fast_keystore(Account.create().key)
    crypto = document["crypto"]
    if change == "version":
        document["version"] = 4
    elif change == "address":
        del document["address"]
    elif change == "cipher":
        crypto["cipher"] = "aes-256-gcm"
    elif change == "iv":
        crypto["cipherparams"]["iv"] = "00"
    elif change == "ciphertext":
        crypto["ciphertext"] = "zz" * 32
    elif change == "kdf":
        crypto["kdf"] = "argon2"
    elif change == "huge-count":
        crypto["kdfparams"]["c"] = 2**40
    elif change == "huge-scrypt":
        crypto["kdf"] = "scrypt"
        crypto["kdfparams"] = {"dklen": 32, "n": 2**30, "r": 8, "p": 1, "salt": "00" * 16}
    elif change == "scrypt-n-not-power":
        crypto["kdf"] = "scrypt"
        crypto["kdfparams"] = {"dklen": 32, "n": 1000, "r": 8, "p": 1, "salt": "00" * 16}
    elif change == "nested":
        crypto["cipherparams"]["iv"] = [[["00"]]]
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[" * 10_000, "nests deeper than 3 levels"),
        (b'{"version": 3, "x": "' + b"a" * 20_000 + b'"}', "larger than 16384 bytes"),
        (b"[]", "not a JSON object"),
        (b"\xff", "not UTF-8"),
        (_mutated("version"), "only version 3"),
        (_mutated("address"), "names no account"),
        (_mutated("cipher"), "aes-128-ctr"),
        (_mutated("iv"), "iv must be 16 bytes"),
        (_mutated("ciphertext"), "ciphertext must be hex"),
        (_mutated("kdf"), "scrypt or pbkdf2"),
        (_mutated("huge-count"), "kdfparams.c must be an integer"),
        (_mutated("huge-scrypt"), "kdfparams.n must be an integer"),
        (_mutated("scrypt-n-not-power"), "power of two"),
        (_mutated("nested"), "nests deeper than 3 levels"),
    ],
    ids=[
        "nested",
        "oversize",
        "a-list",
        "not-utf8",
        "version",
        "no-address",
        "cipher",
        "short-iv",
        "ciphertext-not-hex",
        "unknown-kdf",
        "huge-pbkdf2-count",
        "huge-scrypt",
        "scrypt-n-not-power",
        "nested-field",
    ],
)
def test_a_malformed_keystore_is_refused_before_any_key_derivation(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(content)
    with pytest.raises(InvalidRequest, match=fragment) as excinfo:
        read_keystore(path)
    assert str(path) in excinfo.value.message


def test_a_public_identity_roundtrips(tmp_path: Path) -> None:
    alice = Identity.generate("alice")
    path = tmp_path / "alice.pub.json"
    path.write_text(alice.public(31337).to_json())
    public = PublicIdentity.load(path)
    assert public.did == Did(31337, alice.address)
    assert public.umbral_public_key == alice.umbral_public_key()


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"did": "did:pkh:eip155:1:0x12", "umbral_public_key": "02" * 33}, "40 hex digits"),
        ({"did": None, "umbral_public_key": "02" * 33}, "must be text"),
        ({"umbral_public_key": "02" * 33}, "exactly 'did' and 'umbral_public_key'"),
        ({"did": "{did}", "umbral_public_key": "02" * 32}, "33 bytes of hex"),
        ({"did": "{did}", "umbral_public_key": "zz" * 33}, "33 bytes of hex"),
        ({"did": "{did}", "umbral_public_key": "05" + "11" * 32}, "not a compressed secp256k1"),
    ],
    ids=["bad-did", "did-not-text", "missing-did", "short-key", "key-not-hex", "not-a-point"],
)
def test_a_bad_public_identity_file_is_refused(
    tmp_path: Path, document: dict[str, Any], fragment: str
) -> None:
    if document.get("did") == "{did}":
        document["did"] = Identity.generate("x").did(1)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidRequest, match=fragment):
        PublicIdentity.load(path)
