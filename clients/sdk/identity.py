"""A person's or an app's keys: an Ethereum account and Umbral keys.

Umbral keys are derived from one 32-byte seed with ``SecretKeyFactory`` and a
label per purpose, so a single secret backs them all. Secrets are never
printable: ``repr`` shows the name and address only, and the keys leave the
object only through :meth:`Identity.save`, to a file readable by its owner.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import umbral_pre as umbral
from eth_account import Account
from eth_account.signers.local import LocalAccount

from clients.sdk.input_files import load_json_object
from core.errors import InvalidRequest
from core.record_types import RecordType

_UMBRAL_LABEL = b"medkms/umbral/v1"
_RECORD_KEY_LABEL = b"medkms/umbral/record-type/v1/"
_SIGNING_LABEL = b"medkms/kfrag-signing/v1"
#: an identity file is four short strings (name, address, two hex keys): far below this
MAX_IDENTITY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True, repr=False, eq=False)
class Identity:
    name: str
    account: LocalAccount
    _seed: bytes

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, Account.create(), secrets.token_bytes(umbral.SecretKeyFactory.seed_size()))

    @property
    def address(self) -> str:
        return str(self.account.address)

    def _factory(self) -> umbral.SecretKeyFactory:
        return umbral.SecretKeyFactory.from_secure_randomness(self._seed)

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

    def save(self, path: Path) -> None:
        """Write the identity to ``path``, readable by its owner only."""
        data = {
            "name": self.name,
            "address": self.address,
            "ethereum_key": self.account.key.hex(),
            "umbral_seed": self._seed.hex(),
        }
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
            account = Account.from_key(bytes.fromhex(data["ethereum_key"].removeprefix("0x")))
            seed = bytes.fromhex(data["umbral_seed"])
        except InvalidRequest as e:
            raise InvalidRequest(f"cannot load identity: {e.message}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # The exception's text may quote the file, which holds keys: its kind only.
            raise InvalidRequest(f"cannot load identity from {path}: {type(e).__name__}") from None
        return cls(str(data.get("name", path.stem)), account, seed)
