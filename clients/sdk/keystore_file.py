"""A party's Ethereum key in an encrypted keystore file (Web3 Secret Storage, version 3:
the format geth, clef and eth-account read and write).

Rules this module follows:

- A keystore is input like any other: read bounded in size and nesting, and every field
  the decryption uses is checked for type and size first. The key derivation's cost is
  bounded too (scrypt ``n``, ``r``, ``p``; PBKDF2's count): a file naming a huge work
  factor is refused instead of taking the machine's memory or hours of CPU.
- The password is never an argument of a command, never logged, never in a message;
  a wrong password (or a damaged file: the MAC cannot tell the two apart) says so.
- A keystore is written once: :func:`write_keystore` refuses an existing file, and the
  file is readable by its owner only (0600).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from eth_account import Account

from clients.sdk.input_files import load_json_object
from core import addresses
from core.errors import InvalidRequest

#: a version 3 keystore is about 500 bytes
MAX_KEYSTORE_FILE_BYTES: Final = 16 * 1024
#: {"crypto": {"kdfparams": {...}}}
KEYSTORE_DEPTH: Final = 3
#: eth-account's default scrypt work factor (n = 2^18, r = 8: 256 MiB, about a second)
#: is the most a keystore may ask for
MAX_SCRYPT_N: Final = 2**18
MAX_SCRYPT_R: Final = 8
MAX_SCRYPT_P: Final = 4
MAX_PBKDF2_COUNT: Final = 2**21
MAX_SALT_BYTES: Final = 64
_HEX: Final = re.compile(r"[0-9a-fA-F]*")


@dataclass(frozen=True)
class Keystore:
    """A checked keystore file: where it is, the account it names, its JSON."""

    path: Path
    address: str
    document: dict[str, Any]


def _hex(value: object, what: str, *, size: int | None = None, max_size: int = 64) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) % 2:
        raise InvalidRequest(f"{what} must be hex")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise InvalidRequest(f"{what} must be {size} bytes")
    if not 1 <= len(raw) <= max_size:
        raise InvalidRequest(f"{what} must be 1..{max_size} bytes")
    return raw


def _count(params: dict[str, Any], name: str, maximum: int) -> int:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidRequest(f"kdfparams.{name} must be an integer in 1..{maximum}")
    return value


def _check(document: dict[str, Any]) -> str:
    """The address the keystore names, once every field decryption reads is in bounds."""
    if document.get("version") != 3:
        raise InvalidRequest("only version 3 keystores are supported")
    address = document.get("address")
    if not isinstance(address, str) or not addresses.is_valid("0x" + address.removeprefix("0x")):
        raise InvalidRequest("it names no account (an 'address' of 40 hex digits)")
    crypto = document.get("crypto")
    if not isinstance(crypto, dict):
        raise InvalidRequest("it has no 'crypto' object")
    if crypto.get("cipher") != "aes-128-ctr":
        raise InvalidRequest("its cipher must be aes-128-ctr")
    params = crypto.get("cipherparams")
    if not isinstance(params, dict):
        raise InvalidRequest("it has no 'cipherparams' object")
    _hex(params.get("iv"), "cipherparams.iv", size=16)
    _hex(crypto.get("ciphertext"), "ciphertext", size=32)
    _hex(crypto.get("mac"), "mac", size=32)
    kdf, kdfparams = crypto.get("kdf"), crypto.get("kdfparams")
    if not isinstance(kdfparams, dict):
        raise InvalidRequest("it has no 'kdfparams' object")
    if kdfparams.get("dklen") != 32:
        raise InvalidRequest("kdfparams.dklen must be 32")
    _hex(kdfparams.get("salt"), "kdfparams.salt", max_size=MAX_SALT_BYTES)
    if kdf == "scrypt":
        n = _count(kdfparams, "n", MAX_SCRYPT_N)
        if n < 2 or n & (n - 1):
            raise InvalidRequest("kdfparams.n must be a power of two")
        _count(kdfparams, "r", MAX_SCRYPT_R)
        _count(kdfparams, "p", MAX_SCRYPT_P)
    elif kdf == "pbkdf2":
        if kdfparams.get("prf") != "hmac-sha256":
            raise InvalidRequest("kdfparams.prf must be hmac-sha256")
        _count(kdfparams, "c", MAX_PBKDF2_COUNT)
    else:
        raise InvalidRequest("its kdf must be scrypt or pbkdf2")
    return addresses.checksum("0x" + address.removeprefix("0x"))


def read_keystore(path: Path) -> Keystore:
    """The keystore at ``path``, checked; no password needed (the file names its account)."""
    try:
        document = load_json_object(
            path, max_bytes=MAX_KEYSTORE_FILE_BYTES, max_depth=KEYSTORE_DEPTH, what="keystore"
        )
        return Keystore(path, _check(document), document)
    except InvalidRequest as e:
        message = e.message if e.message.startswith("keystore") else f"keystore {path}: {e.message}"
        raise InvalidRequest(message) from None


def decrypt_keystore(keystore: Keystore, password: str) -> bytes:
    """The private key the keystore holds, or ``InvalidRequest`` if the password is wrong."""
    try:
        key = bytes(Account.decrypt(keystore.document, password))
    except ValueError:
        # eth-keyfile's only check is the MAC, over the derived key and the ciphertext.
        raise InvalidRequest(
            f"keystore {keystore.path}: wrong password (or the file is damaged)"
        ) from None
    if Account.from_key(key).address != keystore.address:
        raise InvalidRequest(f"keystore {keystore.path}: its key is not the account it names")
    return key


def write_keystore(path: Path, key: bytes, password: str) -> str:
    """Encrypt ``key`` into a new keystore file at ``path`` (0600); return its address.
    Refuses to overwrite a file."""
    if not password:
        raise InvalidRequest("a keystore needs a non-empty password")
    document = Account.encrypt(key, password)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f)
        f.write("\n")
    return addresses.checksum("0x" + str(document["address"]).removeprefix("0x"))
