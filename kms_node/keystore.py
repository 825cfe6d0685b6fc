"""The node's key store: the small interface the node codes against, and an in-memory twin.

The real implementation is :class:`medkms.node.hsm.Pkcs11KeyStore` (PKCS#11, SoftHSM2 in
development). :class:`MemoryKeyStore` holds its keys in process memory and exists only so
that unit tests run fast; both pass the same conformance suite
(``tests/kms_node/test_keystore.py``).

Wire format of a wrapped value (both implementations): ``nonce(12) || ciphertext || tag(16)``,
AES-256-GCM (NIST SP 800-38D) under the key-encryption key, with the caller's AAD.
Signatures: ECDSA P-256 over SHA-256(message), DER-encoded, with ``s <= n/2`` (low-S) so that
each signature has exactly one valid encoding.
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medkms.core.errors import HsmUnavailable, IntegrityError, InvalidRequest

NONCE_LEN = 12
TAG_LEN = 16
KEK_LEN = 32
# An empty plaintext is refused: PKCS#11 (SoftHSM through PyKCS11) rejects empty input, so
# the smallest valid wrapped value carries one byte of ciphertext.
MIN_WRAPPED_LEN = NONCE_LEN + 1 + TAG_LEN

# Order of the P-256 group (SEC 2, section 2.4.2).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

UNWRAP_FAILED = "kfrag wrapping failed authentication"


class KeyStore(Protocol):
    """Keys that never leave the store: a key-encryption key and a signing key."""

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM under the key-encryption key: ``nonce(12) || ciphertext || tag(16)``."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`wrap`.

        Raises :class:`IntegrityError` if the tag or AAD do not authenticate and
        :class:`InvalidRequest` if ``wrapped`` is too short to be a wrapped value.
        """
        ...

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(message), DER-encoded, low-S."""
        ...

    def signing_public_key(self) -> bytes:
        """DER SubjectPublicKeyInfo of the signing key."""
        ...

    def close(self) -> None:
        """Release the store; later calls raise :class:`HsmUnavailable`."""
        ...


def check_plaintext(plaintext: bytes) -> None:
    if not plaintext:
        raise InvalidRequest("nothing to wrap: plaintext is empty")


def split_wrapped(wrapped: bytes) -> tuple[bytes, bytes]:
    """Split a wrapped value into (nonce, ciphertext || tag), checking only its length."""
    if len(wrapped) < MIN_WRAPPED_LEN:
        raise InvalidRequest(
            f"wrapped kfrag is {len(wrapped)} bytes; at least {MIN_WRAPPED_LEN} expected"
        )
    return wrapped[:NONCE_LEN], wrapped[NONCE_LEN:]


def low_s_der_signature(r: int, s: int) -> bytes:
    """DER-encode (r, s), replacing s by n - s when s > n/2 (both verify; one is canonical)."""
    if s > P256_ORDER // 2:
        s = P256_ORDER - s
    return encode_dss_signature(r, s)


class MemoryKeyStore:
    """In-memory twin of the HSM key store, for unit tests only: keys live in process memory."""

    def __init__(
        self,
        *,
        kek: bytes | None = None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        if kek is None:
            kek = AESGCM.generate_key(bit_length=KEK_LEN * 8)
        if len(kek) != KEK_LEN:
            raise InvalidRequest(f"key-encryption key must be {KEK_LEN} bytes")
        if signing_key is None:
            signing_key = ec.generate_private_key(ec.SECP256R1())
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise InvalidRequest("signing key must be on P-256")
        self._aead: AESGCM | None = AESGCM(kek)
        self._signing_key = signing_key
        self._public_der = signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def __repr__(self) -> str:
        return "MemoryKeyStore()"

    def _check_open(self) -> AESGCM:
        aead = self._aead
        if aead is None:
            raise HsmUnavailable("key store is closed")
        return aead

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        aead = self._check_open()
        check_plaintext(plaintext)
        nonce = os.urandom(NONCE_LEN)
        return nonce + aead.encrypt(nonce, plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        aead = self._check_open()
        nonce, sealed = split_wrapped(wrapped)
        try:
            return aead.decrypt(nonce, sealed, aad)
        except InvalidTag as e:
            raise IntegrityError(UNWRAP_FAILED) from e

    def sign(self, message: bytes) -> bytes:
        self._check_open()
        der = self._signing_key.sign(message, ec.ECDSA(hashes.SHA256()))
        return low_s_der_signature(*decode_dss_signature(der))

    def signing_public_key(self) -> bytes:
        self._check_open()
        return self._public_der

    def close(self) -> None:
        self._aead = None
