"""A person's or an app's keys: an Ethereum account, and Umbral keys derived from it.

The account's private key is the identity's only secret. The Umbral keys come from a
32-byte seed derived from it with HKDF-SHA256 (RFC 5869) under a versioned label, then
from that seed with ``SecretKeyFactory`` and a label per purpose (ADR 11). So one standard
Ethereum keystore file is a whole identity (:meth:`Identity.from_keystore`), and the
local cluster's demo files hold the same single key in the clear.

Secrets are never printable: ``repr`` shows the name and address only, and the key leaves
the object only through :meth:`Identity.save` (a demo file readable by its owner) or
:meth:`Identity.to_keystore` (encrypted under a password).

A party's public identity (its DID and Umbral receiving key) is what a patient needs to
grant it access: :class:`PublicIdentity`, a small JSON file the party sends.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import umbral_pre as umbral
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.signers.local import LocalAccount

from clients.sdk.input_files import load_json_object
from clients.sdk.keystore_file import decrypt_keystore, read_keystore, write_keystore
from core.did import Did, did_of, parse_did
from core.errors import InvalidRequest
from core.record_types import RecordType
from core.umbral_codec import load_public_key

#: HKDF info of the Umbral seed: a new derivation gets a new version, never a changed one
_UMBRAL_SEED_INFO = b"medkms/umbral-seed/v1"
_UMBRAL_LABEL = b"medkms/umbral/v1"
_RECORD_KEY_LABEL = b"medkms/umbral/record-type/v1/"
_SIGNING_LABEL = b"medkms/kfrag-signing/v1"
#: an identity file is three short strings (name, address, hex key): far below this
MAX_IDENTITY_FILE_BYTES = 64 * 1024
#: a public identity file is two short strings
MAX_PUBLIC_IDENTITY_FILE_BYTES = 4 * 1024


def umbral_seed(ethereum_key: bytes) -> bytes:
    """The seed of every Umbral key of the account whose private key is ``ethereum_key``."""
    return HKDF(
        algorithm=SHA256(),
        length=umbral.SecretKeyFactory.seed_size(),
        salt=None,
        info=_UMBRAL_SEED_INFO,
    ).derive(ethereum_key)


@dataclass(frozen=True)
class PublicIdentity:
    """What a party shows others: its account (as a DID) and its Umbral receiving key."""

    did: Did
    umbral_public_key: bytes

    def to_json(self) -> str:
        document = {"did": str(self.did), "umbral_public_key": self.umbral_public_key.hex()}
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> PublicIdentity:
        # Its refusals name the file already; the checks after are given its name once.
        data = load_json_object(
            path,
            max_bytes=MAX_PUBLIC_IDENTITY_FILE_BYTES,
            max_depth=1,
            what="public identity file",
        )
        try:
            if set(data) != {"did", "umbral_public_key"}:
                raise InvalidRequest("it must hold exactly 'did' and 'umbral_public_key'")
            did = parse_did(data["did"])
            key = data["umbral_public_key"]
            if not isinstance(key, str) or len(key) != 66:
                raise InvalidRequest("umbral_public_key must be 33 bytes of hex")
            try:
                raw = bytes.fromhex(key)
            except ValueError:
                raise InvalidRequest("umbral_public_key must be 33 bytes of hex") from None
            load_public_key(raw, "umbral_public_key")
        except InvalidRequest as e:
            raise InvalidRequest(f"public identity file {path}: {e.message}") from None
        return cls(did, raw)


@dataclass(frozen=True, repr=False, eq=False)
class Identity:
    name: str
    account: LocalAccount

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, Account.create())

    @property
    def address(self) -> str:
        return str(self.account.address)

    def did(self, chain_id: int) -> str:
        return did_of(chain_id, self.address)

    def public(self, chain_id: int) -> PublicIdentity:
        return PublicIdentity(Did(chain_id, self.address), self.umbral_public_key())

    def _factory(self) -> umbral.SecretKeyFactory:
        seed = umbral_seed(bytes(self.account.key))
        return umbral.SecretKeyFactory.from_secure_randomness(seed)

    def umbral_secret_key(self) -> umbral.SecretKey:
        """Receiving key (as a grantee): cfrags are re-encrypted to it."""
        return self._factory().make_key(_UMBRAL_LABEL)

    def umbral_public_key(self) -> bytes:
        return bytes(self.umbral_secret_key().public_key().to_compressed_bytes())

    def record_secret_key(self, record_type: RecordType) -> umbral.SecretKey:
        """Delegating key (as a patient) for records of one type: a kfrag made from it
        cannot re-encrypt a capsule of another type."""
        return self._factory().make_key(_RECORD_KEY_LABEL + record_type.label.encode())

    def record_public_key(self, record_type: RecordType) -> umbral.PublicKey:
        return self.record_secret_key(record_type).public_key()

    def record_public_keys(self) -> tuple[bytes, ...]:
        """One compressed public key per record type, in ``RecordType`` order (as the
        registry holds them)."""
        return tuple(bytes(self.record_public_key(t).to_compressed_bytes()) for t in RecordType)

    def kfrag_signer(self) -> umbral.Signer:
        return umbral.Signer(self._factory().make_key(_SIGNING_LABEL))

    def verifying_key(self) -> bytes:
        return bytes(self.kfrag_signer().verifying_key().to_compressed_bytes())

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, address={self.address})"

    def __hash__(self) -> int:
        raise TypeError("identities hold secrets and are not hashable")

    # -- the local cluster's demo files (plain, mode 0600) ------------------

    def save(self, path: Path) -> None:
        """Write the identity to ``path`` in the clear, readable by its owner only (the
        local cluster's demo accounts; a party's own key belongs in a keystore)."""
        data = {"name": self.name, "address": self.address, "ethereum_key": self.account.key.hex()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            data = load_json_object(
                path, max_bytes=MAX_IDENTITY_FILE_BYTES, max_depth=1, what="identity file"
            )
            if "umbral_seed" in data:
                raise InvalidRequest(
                    f"{path} is of the format before ADR 11 (a separate Umbral seed); "
                    "start the cluster afresh with `kmsctl cluster up --reset`"
                )
            account = Account.from_key(bytes.fromhex(data["ethereum_key"].removeprefix("0x")))
        except InvalidRequest as e:
            raise InvalidRequest(f"cannot load identity: {e.message}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # The exception's text may quote the file, which holds keys: its kind only.
            raise InvalidRequest(f"cannot load identity from {path}: {type(e).__name__}") from None
        return cls(str(data.get("name", path.stem)), account)

    # -- a party's own keystore (encrypted) ---------------------------------

    def to_keystore(self, path: Path, password: str) -> None:
        """Encrypt the identity into a new keystore file (0600; an existing file is
        never overwritten)."""
        write_keystore(path, bytes(self.account.key), password)

    @classmethod
    def from_keystore(cls, path: Path, password: str) -> Identity:
        key = decrypt_keystore(read_keystore(path), password)
        return cls(path.stem, Account.from_key(key))
