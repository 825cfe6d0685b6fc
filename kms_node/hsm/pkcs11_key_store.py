"""The node's key store on a PKCS#11 token: :class:`Pkcs11KeyStore`, the
:class:`~kms_node.keystore.KeyStore` the node runs on (its in-memory twin is
:class:`~kms_node.keystore.MemoryKeyStore`).

It wraps kfrags with AES-256-GCM under the newest key-encryption key
(:mod:`kms_node.hsm.kek_generations`), signs (:mod:`kms_node.hsm.signing`) and opens sealed
kfrags (:mod:`kms_node.hsm.delivery_ecdh`) with keys that never leave the token; they are
found and checked when it opens (:mod:`kms_node.hsm.token_keys`), through one logged-in
session (:mod:`kms_node.hsm.pkcs11_session`, which states the rules every PKCS#11 call
follows).

SoftHSM reports a failed GCM tag as ``CKR_GENERAL_ERROR``; ``C_Decrypt`` on empty input
fails with ``CKR_ARGUMENTS_BAD`` and leaves the operation active (the session is stuck), so
lengths are checked before calling, and a session is replaced after any unexpected error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PyKCS11
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core import kfrag_delivery
from core.errors import HsmUnavailable, IntegrityError
from core.eth_tx import address_of
from kms_node.hsm.delivery_ecdh import ECDH_SECRET_LEN, ecdh_x
from kms_node.hsm.kek_generations import add_kek, kek_label
from kms_node.hsm.pkcs11_session import Session, Token
from kms_node.hsm.signing import der_signature, ecdsa, eth_signature
from kms_node.hsm.token_keys import TokenKeys, create_missing_keys, load_keys
from kms_node.keystore import (
    NONCE_LEN,
    TAG_LEN,
    UNWRAP_FAILED,
    check_eth_digest,
    check_plaintext,
    no_kek,
    split_wrapped,
)

log = structlog.get_logger("medkms.node.hsm")

# SoftHSM answers a GCM tag mismatch with CKR_GENERAL_ERROR; other tokens use the codes the
# PKCS#11 spec suggests. On C_Decrypt all of them mean "does not authenticate".
_DECRYPT_INTEGRITY_CODES = frozenset(
    {
        PyKCS11.CKR_GENERAL_ERROR,
        PyKCS11.CKR_ENCRYPTED_DATA_INVALID,
        PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE,
    }
)


def ensure_keys(
    module_path: str,
    token_label: str,
    user_pin: str,
    *,
    softhsm_conf: Path | None = None,
) -> None:
    """Create the node's keys on the token unless they exist; idempotent.

    Existing keys are kept as they are, so a token made before a key existed gains just the
    missing ones. Half a key pair (one of its halves missing) is refused rather than
    replaced. Ends by opening the store once, which checks every key.
    """
    Pkcs11KeyStore.provision(module_path, token_label, user_pin, softhsm_conf=softhsm_conf).close()


class Pkcs11KeyStore:
    """:class:`~kms_node.keystore.KeyStore` on a PKCS#11 token. Thread-safe.

    Built by :meth:`open` (or :meth:`provision`). Object handles are looked up once and
    cached: a lookup by label is a full C_FindObjects pass (≈ 55 µs here with three objects on
    the token, more as the token fills), most of the cost of a P-256 signature.
    """

    def __init__(self, token: Token, keys: TokenKeys) -> None:
        self._token: Token | None = token
        self._label = token.label
        self._lock = token.module.lock
        self._keks = dict(keys.keks)
        self._signing_key = keys.signing
        self._public_der = keys.signing_public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._delivery_key = keys.delivery
        self._delivery_public = kfrag_delivery.compressed(keys.delivery_public)
        self._eth_key = keys.eth
        self._eth_public = keys.eth_public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self._eth_address = address_of(self._eth_public)

    @classmethod
    def open(
        cls,
        module_path: str,
        token_label: str,
        user_pin: str,
        *,
        softhsm_conf: Path | None = None,
    ) -> Pkcs11KeyStore:
        """Open the token, log in and find the node's keys; :class:`HsmUnavailable` if not."""
        token = Token(module_path, token_label, user_pin, softhsm_conf)
        try:
            with token.module.lock:
                keys = load_keys(token.session, token_label)
            store = cls(token, keys)
            store._self_test(keys)
        except BaseException:
            token.close()
            raise
        return store

    def _self_test(self, keys: TokenKeys) -> None:
        """Use each private key once: catches a private half that does not match its public
        half (≈ 1 ms, once per open)."""
        label = self._label
        probe = b"medkms key store self-test"
        try:
            keys.signing_public.verify(self.sign(probe), probe, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as e:
            raise HsmUnavailable(f"the signing key pair on token {label!r} does not match") from e
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        in_hsm = self._call(
            "delivery key agreement", lambda s: ecdh_x(s, self._delivery_key, point)
        )
        if not hmac.compare_digest(in_hsm, ephemeral.exchange(ec.ECDH(), keys.delivery_public)):
            raise HsmUnavailable(f"the delivery key pair on token {label!r} does not match")
        self.sign_eth_digest(hashlib.sha256(probe).digest())  # checks recovery to eth_public

    @classmethod
    def provision(
        cls,
        module_path: str,
        token_label: str,
        user_pin: str,
        *,
        softhsm_conf: Path | None = None,
    ) -> Pkcs11KeyStore:
        """Create the node's keys unless they exist (see :func:`ensure_keys`), then open."""
        create_missing_keys(module_path, token_label, user_pin, softhsm_conf)
        return cls.open(module_path, token_label, user_pin, softhsm_conf=softhsm_conf)

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore(token={self._label!r})"

    def _call(
        self,
        operation: str,
        call: Callable[[Session], Any],
        integrity_codes: frozenset[int] = frozenset(),
    ) -> bytes:
        """Run one PKCS#11 operation under the module lock, translating its errors."""
        with self._lock:
            token = self._token
            if token is None:
                raise HsmUnavailable("key store is closed")
            try:
                return bytes(call(token.session))
            except PyKCS11.PyKCS11Error as e:
                if e.value in integrity_codes:
                    raise IntegrityError(UNWRAP_FAILED) from e
                token.replace_session()
                raise HsmUnavailable(f"HSM {operation} failed on token {self._label!r}: {e}") from e

    # PyKCS11 takes only bytes (not bytearray or memoryview), hence the bytes() calls below.

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        plaintext, aad = bytes(plaintext), bytes(aad)
        check_plaintext(plaintext)
        # A random 96-bit nonce per wrap (SP 800-38D 8.2.2): far below 2^32 wraps per key.
        nonce = os.urandom(NONCE_LEN)
        mechanism = PyKCS11.AES_GCM_Mechanism(nonce, aad, TAG_LEN * 8)
        kek = self._keks[max(self._keks)]
        sealed = self._call("wrap", lambda s: s.encrypt(kek, plaintext, mechanism))
        return nonce + sealed

    def unwrap(self, wrapped: bytes, aad: bytes, generation: int | None = None) -> bytes:
        nonce, sealed = split_wrapped(bytes(wrapped))
        mechanism = PyKCS11.AES_GCM_Mechanism(nonce, bytes(aad), TAG_LEN * 8)
        kek = self._keks.get(max(self._keks) if generation is None else generation)
        if kek is None:
            raise no_kek(generation or 0)
        return self._call(
            "unwrap",
            lambda s: s.decrypt(kek, sealed, mechanism),
            integrity_codes=_DECRYPT_INTEGRITY_CODES,
        )

    def kek_generation(self) -> int:
        self._check_open()
        return max(self._keks)

    def add_kek_generation(self) -> int:
        with self._lock:
            token = self._token
            if token is None:
                raise HsmUnavailable("key store is closed")
            generation = max(self._keks) + 1
            try:
                handle = add_kek(token.session, self._label, generation)
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(
                    f"cannot create {kek_label(generation)!r} on token {self._label!r}: {e}"
                ) from e
            self._keks[generation] = handle
        log.info("kek_generation_added", token=self._label, generation=generation)
        return generation

    def destroy_kek_generations(self, keep: int) -> list[int]:
        if keep not in self._keks:
            raise no_kek(keep)
        destroyed = []
        with self._lock:
            token = self._token
            if token is None:
                raise HsmUnavailable("key store is closed")
            for generation in sorted(g for g in self._keks if g != keep):
                try:
                    token.session.destroyObject(self._keks[generation])
                except PyKCS11.PyKCS11Error as e:
                    raise HsmUnavailable(
                        f"cannot destroy {kek_label(generation)!r} on token {self._label!r}: {e}"
                    ) from e
                del self._keks[generation]
                destroyed.append(generation)
        log.info("kek_generations_destroyed", token=self._label, generations=destroyed)
        return destroyed

    def sign(self, message: bytes) -> bytes:
        digest = hashlib.sha256(message).digest()
        raw = self._call("sign", lambda s: ecdsa(s, self._signing_key, digest))
        return der_signature(raw, self._label)

    def signing_public_key(self) -> bytes:
        self._check_open()
        return self._public_der

    def delivery_public_key(self) -> bytes:
        self._check_open()
        return self._delivery_public

    def open_delivery(
        self, ephemeral_public_key: bytes, sealed: bytes, *, info: bytes, aad: bytes
    ) -> bytes:
        ephemeral_public_key, sealed = bytes(ephemeral_public_key), bytes(sealed)
        # Checked here, before the HSM sees anything: a point off the curve is refused as
        # malformed input rather than reaching the token (SoftHSM: CKR_GENERAL_ERROR).
        point = kfrag_delivery.ephemeral_point(ephemeral_public_key)
        kfrag_delivery.check_sealed(sealed)
        shared_x = self._call(
            "delivery key agreement", lambda s: ecdh_x(s, self._delivery_key, point)
        )
        if len(shared_x) != ECDH_SECRET_LEN:
            raise HsmUnavailable(f"token {self._label!r} returned a malformed ECDH secret")
        return kfrag_delivery.open_with_shared_secret(
            shared_x, ephemeral_public_key, self._delivery_public, sealed, info=info, aad=aad
        )

    def eth_address(self) -> str:
        self._check_open()
        return self._eth_address

    def sign_eth_digest(self, digest32: bytes) -> tuple[int, int, int]:
        digest = check_eth_digest(digest32)
        raw = self._call("Ethereum sign", lambda s: ecdsa(s, self._eth_key, digest))
        return eth_signature(raw, digest, self._eth_public, self._label)

    def _check_open(self) -> None:
        if self._token is None:
            raise HsmUnavailable("key store is closed")

    def close(self) -> None:
        with self._lock:
            token, self._token = self._token, None
        if token is not None:
            token.close()
