"""The node's key store: the small interface the node codes against, and an in-memory twin.

The real implementation is :class:`kms_node.hsm.pkcs11_key_store.Pkcs11KeyStore` (PKCS#11,
SoftHSM2 in development). :class:`MemoryKeyStore` holds its keys in process memory and exists
only so that unit tests run fast; both pass the same conformance suite
(``tests/kms_node/test_keystore.py``).

Wire format of a wrapped value (both implementations): ``nonce(12) || ciphertext || tag(16)``,
AES-256-GCM (NIST SP 800-38D) under the key-encryption key, with the caller's AAD.
Key-encryption keys have generations (1, 2, ...): new values are wrapped under the newest,
older ones stay readable under theirs until an operator rotates them away
(``kms-node rotate-kek``: a new generation, every kfrag wrapped again, the old ones
destroyed).
Signatures: ECDSA P-256 over SHA-256(message), DER-encoded, with ``s <= n/2`` (low-S) so that
each signature has exactly one valid encoding.

Kfrag delivery: a P-256 key agreement key; the sender's sealing scheme, and the KDF + AEAD that
both implementations call after the ECDH, are in :mod:`core.kfrag_delivery`.
Ethereum account: a secp256k1 key that signs 32-byte digests; recovery id and low-S as in
:mod:`core.eth_tx`, which also builds transactions from those signatures.
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core import kfrag_delivery
from core.errors import HsmUnavailable, IntegrityError, InvalidRequest
from core.eth_tx import DIGEST_LEN, address_of, recoverable_signature

NONCE_LEN = 12
TAG_LEN = 16
KEK_LEN = 32
# An empty plaintext is refused: PKCS#11 (SoftHSM through PyKCS11) rejects empty input, so
# the smallest valid wrapped value carries one byte of ciphertext.
MIN_WRAPPED_LEN = NONCE_LEN + 1 + TAG_LEN

# Order of the P-256 group (SEC 2, section 2.4.2).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

UNWRAP_FAILED = "kfrag wrapping failed authentication"


def no_kek(generation: int) -> IntegrityError:
    return IntegrityError(
        f"no key-encryption key of generation {generation}: it was rotated away, or the "
        "kfrag store belongs to another token"
    )


class KeyStore(Protocol):
    """Keys that never leave the store: a key-encryption key, a signing key, a kfrag delivery
    (key agreement) key and an Ethereum account key."""

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM under the newest key-encryption key (:meth:`kek_generation`):
        ``nonce(12) || ciphertext || tag(16)``."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes, generation: int | None = None) -> bytes:
        """Inverse of :meth:`wrap`, under the key-encryption key of ``generation`` (default:
        the newest).

        Raises :class:`IntegrityError` if the tag or AAD do not authenticate or there is no
        key of that generation, and :class:`InvalidRequest` if ``wrapped`` is too short to
        be a wrapped value.
        """
        ...

    def kek_generation(self) -> int:
        """The generation of the newest key-encryption key, the one :meth:`wrap` uses."""
        ...

    def add_kek_generation(self) -> int:
        """Create a key-encryption key of the next generation, which :meth:`wrap` uses from
        now on; its generation."""
        ...

    def destroy_kek_generations(self, keep: int) -> list[int]:
        """Destroy every key-encryption key but generation ``keep``; the generations
        destroyed. Values wrapped under them can no longer be unwrapped."""
        ...

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(message), DER-encoded, low-S."""
        ...

    def signing_public_key(self) -> bytes:
        """DER SubjectPublicKeyInfo of the signing key."""
        ...

    def delivery_public_key(self) -> bytes:
        """The P-256 key kfrags are sealed to: 33-byte compressed SEC 1 point."""
        ...

    def open_delivery(
        self, ephemeral_public_key: bytes, sealed: bytes, *, info: bytes, aad: bytes
    ) -> bytes:
        """Open a value sealed to :meth:`delivery_public_key` (see
        :mod:`core.kfrag_delivery`): ECDH with the delivery key, then HKDF-SHA256 and
        AES-256-GCM.

        Raises :class:`InvalidRequest` if the ephemeral key is not a compressed P-256 point or
        ``sealed`` is too short, and :class:`Unauthenticated` if ``sealed`` does not
        authenticate (tampered, sealed to another key, or another ``info`` / ``aad``).
        """
        ...

    def eth_address(self) -> str:
        """EIP-55 address of the node's Ethereum account (secp256k1) key."""
        ...

    def sign_eth_digest(self, digest32: bytes) -> tuple[int, int, int]:
        """ECDSA secp256k1 over a 32-byte digest the caller computed: (recovery id 0/1, r, s),
        low-S. :class:`InvalidRequest` if the digest is not 32 bytes."""
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


def check_eth_digest(digest32: bytes) -> bytes:
    digest = bytes(digest32)
    if len(digest) != DIGEST_LEN:
        raise InvalidRequest(f"an Ethereum digest is {DIGEST_LEN} bytes, not {len(digest)}")
    return digest


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
        delivery_key: ec.EllipticCurvePrivateKey | None = None,
        eth_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        if kek is None:
            kek = AESGCM.generate_key(bit_length=KEK_LEN * 8)
        if len(kek) != KEK_LEN:
            raise InvalidRequest(f"key-encryption key must be {KEK_LEN} bytes")
        if signing_key is None:
            signing_key = ec.generate_private_key(ec.SECP256R1())
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise InvalidRequest("signing key must be on P-256")
        if delivery_key is None:
            delivery_key = ec.generate_private_key(ec.SECP256R1())
        if not isinstance(delivery_key.curve, ec.SECP256R1):
            raise InvalidRequest("delivery key must be on P-256")
        if eth_key is None:
            eth_key = ec.generate_private_key(ec.SECP256K1())
        if not isinstance(eth_key.curve, ec.SECP256K1):
            raise InvalidRequest("Ethereum key must be on secp256k1")
        #: key-encryption keys by generation; None once closed
        self._keks: dict[int, AESGCM] | None = {1: AESGCM(kek)}
        self._signing_key = signing_key
        self._public_der = signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._delivery_key = delivery_key
        self._delivery_public = kfrag_delivery.compressed(delivery_key.public_key())
        self._eth_key = eth_key
        self._eth_public = eth_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self._eth_address = address_of(self._eth_public)

    def __repr__(self) -> str:
        return "MemoryKeyStore()"

    def _check_open(self) -> dict[int, AESGCM]:
        keks = self._keks
        if keks is None:
            raise HsmUnavailable("key store is closed")
        return keks

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        keks = self._check_open()
        check_plaintext(plaintext)
        nonce = os.urandom(NONCE_LEN)
        return nonce + keks[max(keks)].encrypt(nonce, plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes, generation: int | None = None) -> bytes:
        keks = self._check_open()
        nonce, sealed = split_wrapped(wrapped)
        aead = keks.get(max(keks) if generation is None else generation)
        if aead is None:
            raise no_kek(generation or 0)
        try:
            return aead.decrypt(nonce, sealed, aad)
        except InvalidTag as e:
            raise IntegrityError(UNWRAP_FAILED) from e

    def kek_generation(self) -> int:
        return max(self._check_open())

    def add_kek_generation(self) -> int:
        keks = self._check_open()
        generation = max(keks) + 1
        keks[generation] = AESGCM(AESGCM.generate_key(bit_length=KEK_LEN * 8))
        return generation

    def destroy_kek_generations(self, keep: int) -> list[int]:
        keks = self._check_open()
        if keep not in keks:
            raise no_kek(keep)
        destroyed = sorted(g for g in keks if g != keep)
        for generation in destroyed:
            del keks[generation]
        return destroyed

    def sign(self, message: bytes) -> bytes:
        self._check_open()
        der = self._signing_key.sign(message, ec.ECDSA(hashes.SHA256()))
        return low_s_der_signature(*decode_dss_signature(der))

    def signing_public_key(self) -> bytes:
        self._check_open()
        return self._public_der

    def delivery_public_key(self) -> bytes:
        self._check_open()
        return self._delivery_public

    def open_delivery(
        self, ephemeral_public_key: bytes, sealed: bytes, *, info: bytes, aad: bytes
    ) -> bytes:
        self._check_open()
        ephemeral_public_key = bytes(ephemeral_public_key)
        point = kfrag_delivery.ephemeral_point(ephemeral_public_key)
        kfrag_delivery.check_sealed(sealed)
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        return kfrag_delivery.open_with_shared_secret(
            self._delivery_key.exchange(ec.ECDH(), ephemeral),
            ephemeral_public_key,
            self._delivery_public,
            sealed,
            info=info,
            aad=aad,
        )

    def eth_address(self) -> str:
        self._check_open()
        return self._eth_address

    def sign_eth_digest(self, digest32: bytes) -> tuple[int, int, int]:
        self._check_open()
        digest = check_eth_digest(digest32)
        # Prehashed: the digest is signed as given (keccak256 for Ethereum; SHA256 here only
        # names its 32-byte length). Raw (r, s) then go through the same normalisation and
        # recovery-id search as the HSM's.
        der = self._eth_key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return recoverable_signature(digest, *decode_dss_signature(der), self._eth_public)

    def close(self) -> None:
        self._keks = None
