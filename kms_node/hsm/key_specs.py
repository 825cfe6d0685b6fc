"""What each of the node's keys on the token must be, and the check of a key found there.

The keys (labels in :mod:`kms_node.hsm.token_keys` and :mod:`kms_node.hsm.kek_generations`):

- key-encryption keys: AES-256; sensitive, non-extractable, encrypt/decrypt only.
- ``medkms-signing``: EC P-256 key pair; the private half is sensitive, non-extractable,
  sign only.
- ``medkms-delivery``: EC P-256 key pair kfrags are sealed to; the private half is
  sensitive, non-extractable, derive only.
- ``medkms-eth``: secp256k1 key pair, the node's Ethereum account; the private half is
  sensitive, non-extractable, sign only.
"""

from __future__ import annotations

from typing import Any

import PyKCS11

from core.errors import HsmUnavailable
from kms_node.hsm.pkcs11_session import Handle, Session
from kms_node.keystore import KEK_LEN

# CKA_EC_PARAMS: DER of the curve OIDs 1.2.840.10045.3.1.7 (prime256v1) and 1.3.132.0.10
# (secp256k1).
P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")
SECP256K1_EC_PARAMS = bytes.fromhex("06052b8104000a")

KEK_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_AES,
    PyKCS11.CKA_VALUE_LEN: KEK_LEN,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_ENCRYPT: True,
    PyKCS11.CKA_DECRYPT: True,
}

SIGNING_PRIVATE_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_SIGN: True,
}

# One purpose per key: the delivery key only agrees keys, the account key only signs.
DELIVERY_PRIVATE_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_DERIVE: True,
    PyKCS11.CKA_SIGN: False,
}

ETH_PRIVATE_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_SIGN: True,
    PyKCS11.CKA_DERIVE: False,
}


def check_attributes(
    session: Session, token_label: str, label: str, handle: Handle, expected: dict[int, Any]
) -> None:
    """Refuse the key unless its attributes have the expected values. Caller holds the lock."""
    names = list(expected)
    values = session.getAttributeValue(handle, names)
    wrong = [
        PyKCS11.CKA[name]
        for name, value in zip(names, values, strict=True)
        if value != expected[name]
    ]
    if wrong:
        raise HsmUnavailable(
            f"key {label!r} on token {token_label!r} has unsafe or unexpected attributes "
            f"({', '.join(wrong)}); refusing to use it"
        )
