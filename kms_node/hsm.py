"""The node's key store on a PKCS#11 token (PyKCS11; SoftHSM2 in development), and provisioning.

Keys on the token (created by :func:`ensure_keys`, used by :class:`Pkcs11KeyStore`):

- ``medkms-kek``: AES-256 key-encryption key; sensitive, non-extractable, encrypt/decrypt only.
  Wraps kfrags with AES-256-GCM (:mod:`kms_node.keystore` describes the format). Later
  generations (``kms-node rotate-kek``) are ``medkms-kek-2``, ``medkms-kek-3``, ...; the
  newest wraps, each unwraps what it wrapped until it is destroyed.
- ``medkms-signing``: EC P-256 key pair; the private half is sensitive, non-extractable, sign
  only. Signs with ``CKM_ECDSA`` over a SHA-256 digest computed here.
- ``medkms-delivery``: EC P-256 key pair kfrags are sealed to; the private half is sensitive,
  non-extractable, derive only (``CKM_ECDH1_DERIVE``, :mod:`core.kfrag_delivery`).
- ``medkms-eth``: secp256k1 key pair, the node's Ethereum account; the private half is
  sensitive, non-extractable, sign only (``CKM_ECDSA`` over a digest the caller computed).

A token made before a key existed is brought up to date by :func:`ensure_keys` (``kms-node
init``), which creates only what is missing; :meth:`Pkcs11KeyStore.open` refuses a token that
lacks any key and says to run it.

Rules this module follows, learnt from SoftHSM 2.6 through PyKCS11 1.5:

- Every PKCS#11 call into one loaded module is made under that module's lock: PyKCS11 calls
  ``C_Initialize`` without locking callbacks, and concurrent calls crash the process.
- PyKCS11 loads a module (and calls ``C_Initialize``) once per process and shares it between
  all users; SoftHSM reads ``SOFTHSM2_CONF`` only then. So, in one process, every token must
  live in the token directory of the configuration the module was loaded with; several tokens
  in that one directory are fine. This module counts its users of each module and unloads it
  (``C_Finalize``) when the last one closes; after that, loading with another
  ``SOFTHSM2_CONF`` works (verified: switching directories sequentially in one process).
  Asking for a different configuration while the module is loaded raises
  :class:`HsmUnavailable` rather than silently looking in the wrong directory. This only holds
  if nothing else in the process loads the module through PyKCS11.
- PKCS#11 login state belongs to the process, not the session, so a second login to a token
  already logged in cannot check the PIN. A token is therefore opened at most once per process
  at a time (opening it again raises :class:`HsmUnavailable`).
- Do not fork a process after opening a store: SoftHSM state is not fork-safe
  (``library.reset_on_fork`` is off). Open the store in each worker process instead.
- ``CKM_ECDH1_DERIVE``: SoftHSM supports only ``CKD_NULL``, which yields the bare
  x-coordinate as a generic secret object. It is made a session object (``CKA_TOKEN`` false),
  read back and destroyed at once, under the lock; if anything fails in between, the session
  is replaced, and closing it destroys its session objects. The KDF runs in software.
- SoftHSM reports a failed GCM tag as ``CKR_GENERAL_ERROR``; ``C_Decrypt`` on empty input
  fails with ``CKR_ARGUMENTS_BAD`` and leaves the operation active (the session is stuck), so
  lengths are checked before calling, and a session is replaced after any unexpected error.

PINs are passed straight to ``C_Login``; they are never stored, logged or put in messages.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import PyKCS11
import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core import kfrag_delivery
from core.errors import HsmUnavailable, IntegrityError, InvalidRequest
from core.eth_tx import address_of, recoverable_signature
from kms_node.keystore import (
    KEK_LEN,
    NONCE_LEN,
    TAG_LEN,
    UNWRAP_FAILED,
    check_eth_digest,
    check_plaintext,
    low_s_der_signature,
    no_kek,
    split_wrapped,
)

log = structlog.get_logger("medkms.node.hsm")

KEK_LABEL = "medkms-kek"
#: key-encryption keys of later generations are labelled medkms-kek-2, medkms-kek-3, ...
_KEK_GENERATION = re.compile(r"medkms-kek(?:-([2-9]|[1-9][0-9]+))?")


def kek_label(generation: int) -> str:
    """The token label of the key-encryption key of ``generation`` (1 is the first)."""
    return KEK_LABEL if generation == 1 else f"{KEK_LABEL}-{generation}"


SIGNING_LABEL = "medkms-signing"
DELIVERY_LABEL = "medkms-delivery"
ETH_LABEL = "medkms-eth"

# CKA_EC_PARAMS: DER of the curve OIDs 1.2.840.10045.3.1.7 (prime256v1) and 1.3.132.0.10
# (secp256k1).
_P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_SECP256K1_EC_PARAMS = bytes.fromhex("06052b8104000a")
_EC_POINT_LEN = 65  # uncompressed: 0x04 || x(32) || y(32), for both curves
_ECDH_SECRET_LEN = kfrag_delivery.SHARED_SECRET_LEN
_TOKEN_LABEL_LEN = 32  # CK_TOKEN_INFO.label is 32 bytes, blank-padded

# SoftHSM answers a GCM tag mismatch with CKR_GENERAL_ERROR; other tokens use the codes the
# PKCS#11 spec suggests. On C_Decrypt all of them mean "does not authenticate".
_DECRYPT_INTEGRITY_CODES = frozenset(
    {
        PyKCS11.CKR_GENERAL_ERROR,
        PyKCS11.CKR_ENCRYPTED_DATA_INVALID,
        PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE,
    }
)

_LOGIN_FAILURES = {
    PyKCS11.CKR_PIN_INCORRECT: "wrong user PIN",
    PyKCS11.CKR_PIN_LEN_RANGE: "wrong user PIN",
    PyKCS11.CKR_PIN_INVALID: "wrong user PIN",
    PyKCS11.CKR_PIN_LOCKED: "the user PIN is locked",
    PyKCS11.CKR_USER_PIN_NOT_INITIALIZED: "the user PIN is not set; run `kms-node init`",
    PyKCS11.CKR_USER_ALREADY_LOGGED_IN: "already logged in by other code in this process",
}

# PyKCS11 is untyped; these names say what a value is.
_Session = Any
_Handle = Any


# --- loaded modules -------------------------------------------------------------------------


@dataclass(eq=False)
class _Module:
    """One loaded PKCS#11 module: the lock for all its calls and the tokens open through it."""

    path: str
    conf: str | None  # SOFTHSM2_CONF when the module was initialised
    pkcs11: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    open_tokens: set[str] = field(default_factory=set)

    def where(self) -> str:
        return self.conf if self.conf else self.path


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()  # guards _MODULES; taken before any _Module.lock


def _resolve_conf(conf: Path | str | None) -> str | None:
    return str(Path(conf).resolve()) if conf else None


def _acquire_module(module_path: str, softhsm_conf: Path | None) -> _Module:
    """Load (or share) the module, initialised with ``softhsm_conf`` if one is given."""
    path = os.path.realpath(module_path)  # one entry however the module is spelt
    conf = _resolve_conf(softhsm_conf)
    with _MODULES_LOCK:
        module = _MODULES.get(path)
        if module is not None:
            if conf is not None and conf != module.conf:
                raise HsmUnavailable(
                    f"PKCS#11 module {module_path} is already in use in this process with "
                    f"SOFTHSM2_CONF={module.conf}; it cannot also read {conf} "
                    "(one token directory per process)"
                )
            module.users += 1
            return module
        if not os.path.isfile(path):
            raise HsmUnavailable(f"PKCS#11 module {module_path} not found")
        if conf is not None:
            # SoftHSM reads the variable in C_Initialize, which PyKCS11 calls in load().
            os.environ["SOFTHSM2_CONF"] = conf
        conf_used = _resolve_conf(os.environ.get("SOFTHSM2_CONF"))
        try:
            pkcs11 = PyKCS11.PyKCS11Lib().load(path)
        except PyKCS11.PyKCS11Error as e:
            raise HsmUnavailable(
                f"cannot initialise PKCS#11 module {module_path} (SOFTHSM2_CONF={conf_used}): {e}"
            ) from e
        module = _Module(path=path, conf=conf_used, pkcs11=pkcs11, users=1)
        _MODULES[path] = module
        return module


def _release_module(module: _Module) -> None:
    with _MODULES_LOCK:
        module.users -= 1
        if module.users > 0:
            return
        del _MODULES[module.path]
        with module.lock:
            try:
                # C_Finalize: lets a later load read another SOFTHSM2_CONF.
                module.pkcs11.unload()
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(f"cannot unload PKCS#11 module {module.path}: {e}") from e


def _check_token_label(label: str) -> None:
    if not (
        0 < len(label) <= _TOKEN_LABEL_LEN
        and label.isascii()
        and label.isprintable()
        and label == label.strip()
    ):
        raise InvalidRequest(
            "token label must be 1-32 printable ASCII characters without surrounding spaces"
        )


def _find_slot(module: _Module, token_label: str) -> tuple[int, Any] | None:
    """The slot and token info of the initialised token with this label. Caller holds the lock."""
    found = []
    for slot in module.pkcs11.getSlotList(tokenPresent=True):
        info = module.pkcs11.getTokenInfo(slot)
        if info.flags & PyKCS11.CKF_TOKEN_INITIALIZED and (
            info.label.rstrip(" \x00") == token_label
        ):
            found.append((slot, info))
    if len(found) > 1:
        raise HsmUnavailable(
            f"{len(found)} tokens are labelled {token_label!r} in {module.where()}; "
            "refusing to guess"
        )
    return found[0] if found else None


def _close_quietly(session: _Session) -> None:
    try:
        session.closeSession()
    except PyKCS11.PyKCS11Error:
        pass  # closing is best effort: the session is being abandoned anyway


# --- a logged-in session --------------------------------------------------------------------


class _Token:
    """A logged-in R/W user session on one token, which it holds open for this process."""

    def __init__(
        self, module_path: str, token_label: str, user_pin: str, softhsm_conf: Path | None
    ) -> None:
        _check_token_label(token_label)
        self.label = token_label
        self.module = _acquire_module(module_path, softhsm_conf)
        try:
            with self.module.lock:
                self.slot, self.session = self._login(user_pin)
                self.module.open_tokens.add(token_label)
        except BaseException:
            _release_module(self.module)
            raise
        self._open = True

    def _login(self, user_pin: str) -> tuple[int, _Session]:
        module = self.module
        if self.label in module.open_tokens:
            raise HsmUnavailable(f"token {self.label!r} is already open in this process")
        try:
            found = _find_slot(module, self.label)
            if found is None:
                raise HsmUnavailable(
                    f"token {self.label!r} not found in {module.where()}; run `kms-node init`"
                )
            slot = found[0]
            session = module.pkcs11.openSession(slot, PyKCS11.CKF_RW_SESSION)
        except PyKCS11.PyKCS11Error as e:
            raise HsmUnavailable(f"cannot open token {self.label!r}: {e}") from e
        try:
            session.login(user_pin, PyKCS11.CKU_USER)
        except PyKCS11.PyKCS11Error as e:
            _close_quietly(session)
            reason = _LOGIN_FAILURES.get(e.value, str(e))
            raise HsmUnavailable(f"cannot log in to token {self.label!r}: {reason}") from e
        return slot, session

    def replace_session(self) -> None:
        """Swap in a fresh session after an error that may have left an operation active.

        Caller holds the lock. Login state is per token and process, and the new session is
        opened before the old one closes, so the token stays logged in.
        """
        try:
            fresh = self.module.pkcs11.openSession(self.slot, PyKCS11.CKF_RW_SESSION)
        except PyKCS11.PyKCS11Error:
            return  # keep the old one; the next call reports whatever is wrong
        _close_quietly(self.session)
        self.session = fresh

    def close(self) -> None:
        with self.module.lock:
            if not self._open:
                return
            self._open = False
            self.module.open_tokens.discard(self.label)
            # Closing the last session of the token also logs the user out (PKCS#11 5.6).
            _close_quietly(self.session)
        _release_module(self.module)


# --- the key store --------------------------------------------------------------------------


def _find_one(session: _Session, token_label: str, label: str, cls: int) -> _Handle | None:
    handles = session.findObjects([(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_LABEL, label)])
    if len(handles) > 1:
        raise HsmUnavailable(
            f"{len(handles)} objects labelled {label!r} on token {token_label!r}; refusing to guess"
        )
    return handles[0] if handles else None


def _require(session: _Session, token_label: str, label: str, cls: int) -> _Handle:
    handle = _find_one(session, token_label, label, cls)
    if handle is None:
        raise HsmUnavailable(
            f"key {label!r} not found on token {token_label!r}; run `kms-node init`"
        )
    return handle


def _check_attributes(
    session: _Session, token_label: str, label: str, handle: _Handle, expected: dict[int, Any]
) -> None:
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


def _ec_public_key(
    ec_point: bytes, curve: ec.EllipticCurve, token_label: str, label: str
) -> ec.EllipticCurvePublicKey:
    # CKA_EC_POINT is the DER OCTET STRING around the point (PKCS#11 2.40, 2.3.3); some
    # tokens return the bare point. Both are accepted; their lengths cannot be confused.
    if len(ec_point) == _EC_POINT_LEN + 2 and ec_point[:2] == bytes([0x04, _EC_POINT_LEN]):
        ec_point = ec_point[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, ec_point)
    except ValueError as e:
        raise HsmUnavailable(
            f"the public key {label!r} on token {token_label!r} is not a {curve.name} point"
        ) from e


_KEK_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_AES,
    PyKCS11.CKA_VALUE_LEN: KEK_LEN,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_ENCRYPT: True,
    PyKCS11.CKA_DECRYPT: True,
}

_SIGNING_PRIVATE_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_SIGN: True,
}

# One purpose per key: the delivery key only agrees keys, the account key only signs.
_DELIVERY_PRIVATE_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_DERIVE: True,
    PyKCS11.CKA_SIGN: False,
}

_ETH_PRIVATE_ATTRIBUTES: dict[int, Any] = {
    PyKCS11.CKA_KEY_TYPE: PyKCS11.CKK_EC,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_SIGN: True,
    PyKCS11.CKA_DERIVE: False,
}

# The ECDH result: a short-lived session object whose value is read back (CKD_NULL).
_ECDH_SECRET_TEMPLATE: list[tuple[int, Any]] = [
    (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
    (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET),
    (PyKCS11.CKA_VALUE_LEN, _ECDH_SECRET_LEN),
    (PyKCS11.CKA_TOKEN, False),
    (PyKCS11.CKA_PRIVATE, True),
    (PyKCS11.CKA_SENSITIVE, False),
    (PyKCS11.CKA_EXTRACTABLE, True),
    (PyKCS11.CKA_ENCRYPT, False),
    (PyKCS11.CKA_DECRYPT, False),
    (PyKCS11.CKA_SIGN, False),
    (PyKCS11.CKA_VERIFY, False),
    (PyKCS11.CKA_WRAP, False),
    (PyKCS11.CKA_UNWRAP, False),
    (PyKCS11.CKA_DERIVE, False),
]


@dataclass(frozen=True, repr=False)
class _Keys:
    """Handles of the node's keys on one token, and their public halves."""

    #: key-encryption keys by generation
    keks: dict[int, _Handle]
    signing: _Handle
    signing_public: ec.EllipticCurvePublicKey
    delivery: _Handle
    delivery_public: ec.EllipticCurvePublicKey
    eth: _Handle
    eth_public: ec.EllipticCurvePublicKey


def _ecdh_x(session: _Session, private_key: _Handle, peer_point: bytes) -> bytes:
    """The ECDH x-coordinate (CKM_ECDH1_DERIVE, CKD_NULL). Caller holds the module lock.

    The derived session object lives only for these three calls.
    """
    mechanism = PyKCS11.ECDH1_DERIVE_Mechanism(peer_point, PyKCS11.CKD_NULL)
    secret = session.deriveKey(private_key, _ECDH_SECRET_TEMPLATE, mechanism)
    try:
        (value,) = session.getAttributeValue(secret, [PyKCS11.CKA_VALUE], allAsBinary=True)
    finally:
        session.destroyObject(secret)
    return bytes(value)


class Pkcs11KeyStore:
    """:class:`~kms_node.keystore.KeyStore` on a PKCS#11 token. Thread-safe.

    Built by :meth:`open` (or :meth:`provision`). Object handles are looked up once and
    cached: a lookup by label is a full C_FindObjects pass (≈ 55 µs here with three objects on
    the token, more as the token fills), most of the cost of a P-256 signature.
    """

    def __init__(self, token: _Token, keys: _Keys) -> None:
        self._token: _Token | None = token
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
        token = _Token(module_path, token_label, user_pin, softhsm_conf)
        try:
            with token.module.lock:
                keys = _load_keys(token.session, token_label)
            store = cls(token, keys)
            store._self_test(keys)
        except BaseException:
            token.close()
            raise
        return store

    def _self_test(self, keys: _Keys) -> None:
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
            "delivery key agreement", lambda s: _ecdh_x(s, self._delivery_key, point)
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
        _create_missing_keys(module_path, token_label, user_pin, softhsm_conf)
        return cls.open(module_path, token_label, user_pin, softhsm_conf=softhsm_conf)

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore(token={self._label!r})"

    def _call(
        self,
        operation: str,
        call: Callable[[_Session], Any],
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
            label = kek_label(generation)
            try:
                _generate_kek(token.session, label)
                handle = _require(token.session, self._label, label, PyKCS11.CKO_SECRET_KEY)
                _check_attributes(token.session, self._label, label, handle, _KEK_ATTRIBUTES)
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(
                    f"cannot create {label!r} on token {self._label!r}: {e}"
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
        mechanism = PyKCS11.Mechanism(PyKCS11.CKM_ECDSA)
        raw = self._call("sign", lambda s: s.sign(self._signing_key, digest, mechanism))
        if len(raw) != 64:  # CKM_ECDSA returns r || s, each as long as the group order
            raise HsmUnavailable(f"token {self._label!r} returned a malformed ECDSA signature")
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        return low_s_der_signature(r, s)

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
            "delivery key agreement", lambda s: _ecdh_x(s, self._delivery_key, point)
        )
        if len(shared_x) != _ECDH_SECRET_LEN:
            raise HsmUnavailable(f"token {self._label!r} returned a malformed ECDH secret")
        return kfrag_delivery.open_with_shared_secret(
            shared_x, ephemeral_public_key, self._delivery_public, sealed, info=info, aad=aad
        )

    def eth_address(self) -> str:
        self._check_open()
        return self._eth_address

    def sign_eth_digest(self, digest32: bytes) -> tuple[int, int, int]:
        digest = check_eth_digest(digest32)
        mechanism = PyKCS11.Mechanism(PyKCS11.CKM_ECDSA)
        raw = self._call("Ethereum sign", lambda s: s.sign(self._eth_key, digest, mechanism))
        if len(raw) != 64:  # r || s, 32 bytes each
            raise HsmUnavailable(f"token {self._label!r} returned a malformed ECDSA signature")
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        try:
            return recoverable_signature(digest, r, s, self._eth_public)
        except IntegrityError as e:
            raise HsmUnavailable(
                f"the Ethereum key pair on token {self._label!r} does not match: {e}"
            ) from e

    def _check_open(self) -> None:
        if self._token is None:
            raise HsmUnavailable("key store is closed")

    def close(self) -> None:
        with self._lock:
            token, self._token = self._token, None
        if token is not None:
            token.close()


def _load_key_pair(
    session: _Session,
    token_label: str,
    label: str,
    curve: ec.EllipticCurve,
    ec_params: bytes,
    private_attributes: dict[int, Any],
) -> tuple[_Handle, ec.EllipticCurvePublicKey]:
    """Find one EC key pair and check it. Caller holds the lock, translates PKCS#11 errors."""
    private = _require(session, token_label, label, PyKCS11.CKO_PRIVATE_KEY)
    _check_attributes(session, token_label, label, private, private_attributes)
    public = _require(session, token_label, label, PyKCS11.CKO_PUBLIC_KEY)
    params, point = session.getAttributeValue(
        public, [PyKCS11.CKA_EC_PARAMS, PyKCS11.CKA_EC_POINT], allAsBinary=True
    )
    if bytes(params) != ec_params:
        raise HsmUnavailable(f"key {label!r} on token {token_label!r} is not {curve.name}")
    return private, _ec_public_key(bytes(point), curve, token_label, label)


def _load_keys(session: _Session, token_label: str) -> _Keys:
    """Find the node's keys and check their attributes. Caller holds the module lock."""
    try:
        keks = _find_keks(session, token_label)
        if not keks:
            raise HsmUnavailable(
                f"key {KEK_LABEL!r} not found on token {token_label!r}; run `kms-node init`"
            )
        for generation, kek in keks.items():
            label = kek_label(generation)
            _check_attributes(session, token_label, label, kek, _KEK_ATTRIBUTES)
        signing, signing_public = _load_key_pair(
            session,
            token_label,
            SIGNING_LABEL,
            ec.SECP256R1(),
            _P256_EC_PARAMS,
            _SIGNING_PRIVATE_ATTRIBUTES,
        )
        delivery, delivery_public = _load_key_pair(
            session,
            token_label,
            DELIVERY_LABEL,
            ec.SECP256R1(),
            _P256_EC_PARAMS,
            _DELIVERY_PRIVATE_ATTRIBUTES,
        )
        eth, eth_public = _load_key_pair(
            session,
            token_label,
            ETH_LABEL,
            ec.SECP256K1(),
            _SECP256K1_EC_PARAMS,
            _ETH_PRIVATE_ATTRIBUTES,
        )
    except PyKCS11.PyKCS11Error as e:
        raise HsmUnavailable(f"cannot read the keys on token {token_label!r}: {e}") from e
    return _Keys(keks, signing, signing_public, delivery, delivery_public, eth, eth_public)


def _find_keks(session: _Session, token_label: str) -> dict[int, _Handle]:
    """The node's key-encryption keys on the token, by generation (one label each)."""
    found: dict[int, _Handle] = {}
    for handle in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
        (label,) = session.getAttributeValue(handle, [PyKCS11.CKA_LABEL])
        match = _KEK_GENERATION.fullmatch(str(label))
        if match is None:
            continue
        generation = int(match.group(1) or 1)
        if generation in found:
            raise HsmUnavailable(
                f"two objects labelled {kek_label(generation)!r} on token {token_label!r}; "
                "refusing to guess"
            )
        found[generation] = handle
    return found


# --- provisioning (`kms-node init`) ----------------------------------------------------------


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


def _create_missing_keys(
    module_path: str, token_label: str, user_pin: str, softhsm_conf: Path | None
) -> None:
    token = _Token(module_path, token_label, user_pin, softhsm_conf)
    try:
        with token.module.lock:
            try:
                _ensure_kek(token.session, token_label)
                _ensure_ec_key_pair(
                    token.session, token_label, SIGNING_LABEL, _P256_EC_PARAMS, usage="sign"
                )
                _ensure_ec_key_pair(
                    token.session, token_label, DELIVERY_LABEL, _P256_EC_PARAMS, usage="derive"
                )
                _ensure_ec_key_pair(
                    token.session, token_label, ETH_LABEL, _SECP256K1_EC_PARAMS, usage="sign"
                )
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(f"cannot create the keys on token {token_label!r}: {e}") from e
    finally:
        token.close()


def _ensure_kek(session: _Session, token_label: str) -> None:
    """The first key-encryption key, unless the token holds one (of any generation)."""
    if not _find_keks(session, token_label):
        _generate_kek(session, KEK_LABEL)


def _generate_kek(session: _Session, label: str) -> None:
    # Every usage flag is spelt out: SoftHSM's defaults allow wrap/unwrap and sign (CMAC).
    session.generateKey(
        [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
            (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
            (PyKCS11.CKA_VALUE_LEN, KEK_LEN),
            (PyKCS11.CKA_LABEL, label),
            (PyKCS11.CKA_TOKEN, True),
            (PyKCS11.CKA_PRIVATE, True),
            (PyKCS11.CKA_SENSITIVE, True),
            (PyKCS11.CKA_EXTRACTABLE, False),
            (PyKCS11.CKA_MODIFIABLE, False),
            (PyKCS11.CKA_ENCRYPT, True),
            (PyKCS11.CKA_DECRYPT, True),
            (PyKCS11.CKA_WRAP, False),
            (PyKCS11.CKA_UNWRAP, False),
            (PyKCS11.CKA_SIGN, False),
            (PyKCS11.CKA_VERIFY, False),
            (PyKCS11.CKA_DERIVE, False),
        ],
        PyKCS11.MechanismAESGENERATEKEY,
    )


def _ensure_ec_key_pair(
    session: _Session,
    token_label: str,
    label: str,
    ec_params: bytes,
    *,
    usage: Literal["sign", "derive"],
) -> None:
    """Generate the EC key pair ``label`` unless it exists; ``usage`` is "sign" or "derive",
    the one thing its private half may do."""
    private = _find_one(session, token_label, label, PyKCS11.CKO_PRIVATE_KEY)
    public = _find_one(session, token_label, label, PyKCS11.CKO_PUBLIC_KEY)
    if private is not None and public is not None:
        return
    if private is not None or public is not None:
        raise HsmUnavailable(
            f"token {token_label!r} holds only half of the key pair {label!r}; "
            "refusing to replace it (inspect the token)"
        )
    sign = usage == "sign"
    key_id = label.encode()  # CKA_ID ties the two halves together
    session.generateKeyPair(
        [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
            (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
            (PyKCS11.CKA_EC_PARAMS, ec_params),
            (PyKCS11.CKA_LABEL, label),
            (PyKCS11.CKA_ID, key_id),
            (PyKCS11.CKA_TOKEN, True),
            (PyKCS11.CKA_PRIVATE, False),
            (PyKCS11.CKA_MODIFIABLE, False),
            (PyKCS11.CKA_VERIFY, sign),
            (PyKCS11.CKA_ENCRYPT, False),
            (PyKCS11.CKA_WRAP, False),
            (PyKCS11.CKA_DERIVE, False),
        ],
        [
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
            (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
            (PyKCS11.CKA_LABEL, label),
            (PyKCS11.CKA_ID, key_id),
            (PyKCS11.CKA_TOKEN, True),
            (PyKCS11.CKA_PRIVATE, True),
            (PyKCS11.CKA_SENSITIVE, True),
            (PyKCS11.CKA_EXTRACTABLE, False),
            (PyKCS11.CKA_MODIFIABLE, False),
            (PyKCS11.CKA_SIGN, sign),
            (PyKCS11.CKA_DECRYPT, False),
            (PyKCS11.CKA_UNWRAP, False),
            (PyKCS11.CKA_DERIVE, not sign),
        ],
        PyKCS11.MechanismECGENERATEKEYPAIR,
    )


#: the key of a SoftHSM2 configuration that names its token directory
_TOKENDIR_KEY = "directories.tokendir"


def softhsm_token_dir(softhsm_conf: Path) -> Path | None:
    """The token directory a SoftHSM2 configuration names; None if the file cannot be read
    or names none. (SoftHSM's format: ``key = value`` lines, ``#`` comments.)"""
    try:
        lines = softhsm_conf.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == _TOKENDIR_KEY and value.strip():
            return Path(value.strip())
    return None


def init_softhsm_token(
    *,
    softhsm_conf: Path,
    token_dir: Path,
    module_path: str,
    token_label: str,
    so_pin: str,
    user_pin: str,
) -> None:
    """Write a private softhsm2.conf and initialise a token in it; idempotent.

    The configuration points SoftHSM at ``token_dir`` (created with mode 0700). If a token
    with this label already exists it is kept (its PINs are not checked); if its user PIN was
    never set (an earlier run stopped half way), it is set now. Otherwise a token is
    initialised in a free slot and its user PIN set by the security officer.

    The module must not be in use in this process with another configuration (see the
    module docstring); tokens in the same ``token_dir`` can be created and opened freely.
    """
    _check_token_label(token_label)
    token_dir = token_dir.resolve()
    token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_dir.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored if it exists
    conf_text = (
        "# medkms: private SoftHSM2 configuration for one node\n"
        f"{_TOKENDIR_KEY} = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    if not softhsm_conf.exists() or softhsm_conf.read_text() != conf_text:
        softhsm_conf.parent.mkdir(parents=True, exist_ok=True)
        partial = softhsm_conf.with_name(softhsm_conf.name + ".tmp")
        partial.write_text(conf_text)
        partial.replace(softhsm_conf)
    module = _acquire_module(module_path, softhsm_conf)
    try:
        with module.lock:
            try:
                _init_token(module, token_label, so_pin, user_pin)
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(f"cannot initialise token {token_label!r}: {e}") from e
    finally:
        _release_module(module)


def _init_token(module: _Module, token_label: str, so_pin: str, user_pin: str) -> None:
    """Caller holds the module lock."""
    pkcs11 = module.pkcs11
    found = _find_slot(module, token_label)
    if found is not None:
        slot, info = found
        if info.flags & PyKCS11.CKF_USER_PIN_INITIALIZED:
            return
    else:
        free = [
            s
            for s in pkcs11.getSlotList(tokenPresent=True)
            if not pkcs11.getTokenInfo(s).flags & PyKCS11.CKF_TOKEN_INITIALIZED
        ]
        if not free:
            raise HsmUnavailable(f"no free slot for token {token_label!r} in {module.where()}")
        slot, info = free[0], pkcs11.getTokenInfo(free[0])
    for name, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        if not info.ulMinPinLen <= len(pin) <= info.ulMaxPinLen:
            raise InvalidRequest(
                f"{name} must be {info.ulMinPinLen}-{info.ulMaxPinLen} characters long"
            )
    if found is None:
        pkcs11.initToken(slot, so_pin, token_label.ljust(_TOKEN_LABEL_LEN))
    session = pkcs11.openSession(slot, PyKCS11.CKF_RW_SESSION)
    try:
        try:
            session.login(so_pin, PyKCS11.CKU_SO)
        except PyKCS11.PyKCS11Error as e:
            reason = "wrong SO PIN" if e.value == PyKCS11.CKR_PIN_INCORRECT else str(e)
            raise HsmUnavailable(f"cannot log in to token {token_label!r}: {reason}") from e
        session.initPin(user_pin)
        session.logout()
    finally:
        _close_quietly(session)
