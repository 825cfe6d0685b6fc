"""KeyStore conformance (in-memory twin and real SoftHSM2), then real-HSM-only properties."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Any

import PyKCS11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from eth_account import Account
from eth_keys.datatypes import Signature
from eth_utils.address import is_checksum_address

from core.errors import HsmUnavailable, IntegrityError, InvalidRequest, Unauthenticated
from core.eth_tx import SECP256K1_ORDER, sign_transaction
from core.kfrag_delivery import (
    SEALED_KFRAG_UNAUTHENTICATED,
    compressed,
    delivery_binding,
    seal_for_node,
)
from kms_node.hsm.kek_generations import KEK_LABEL
from kms_node.hsm.key_specs import DELIVERY_KEY, ETH_KEY, KEK, SIGNING_KEY, KeyPairSpec
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore
from kms_node.hsm.softhsm_token import init_softhsm_token
from kms_node.keystore import (
    MIN_WRAPPED_LEN,
    NONCE_LEN,
    P256_ORDER,
    TAG_LEN,
    KeyStore,
    MemoryKeyStore,
)

from .conftest import SOFTHSM_MODULE, SoftHsmDir, SoftHsmToken

KFRAG = bytes(range(256)) + bytes(54)  # 310 bytes, the size of an umbral-pre kfrag
AAD = b"node-1|0xpatient|0xgrantee"
BINDING = delivery_binding(
    "node-1",
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    bytes([0x02]) + bytes(range(32)),
    1,
)


# --- conformance: every KeyStore --------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [KFRAG, b"\x00"])
@pytest.mark.parametrize("aad", [AAD, b""])
def test_wrap_unwrap_roundtrip(keystore: KeyStore, plaintext: bytes, aad: bytes) -> None:
    wrapped = keystore.wrap(plaintext, aad)
    assert len(wrapped) == NONCE_LEN + len(plaintext) + TAG_LEN
    assert keystore.unwrap(wrapped, aad) == plaintext


def test_accepts_any_bytes_like_input(keystore: KeyStore) -> None:
    # The interface says bytes; buffers are passed on purpose: every key store copes.
    wrapped = keystore.wrap(bytearray(KFRAG), memoryview(AAD))  # type: ignore[arg-type]
    assert keystore.unwrap(bytearray(wrapped), bytearray(AAD)) == KFRAG  # type: ignore[arg-type]


def test_two_wraps_of_the_same_plaintext_differ(keystore: KeyStore) -> None:
    first, second = keystore.wrap(KFRAG, AAD), keystore.wrap(KFRAG, AAD)
    assert first != second
    assert first[:NONCE_LEN] != second[:NONCE_LEN]


def test_wrong_aad_fails_authentication(keystore: KeyStore) -> None:
    wrapped = keystore.wrap(KFRAG, AAD)
    with pytest.raises(IntegrityError, match="failed authentication"):
        keystore.unwrap(wrapped, AAD + b"x")


@pytest.mark.parametrize("where", [0, NONCE_LEN, NONCE_LEN + 100, -1])
def test_tampered_byte_fails_authentication(keystore: KeyStore, where: int) -> None:
    wrapped = bytearray(keystore.wrap(KFRAG, AAD))
    wrapped[where] ^= 0x01
    with pytest.raises(IntegrityError):
        keystore.unwrap(bytes(wrapped), AAD)


def test_truncated_by_one_byte_fails_authentication(keystore: KeyStore) -> None:
    wrapped = keystore.wrap(KFRAG, AAD)
    with pytest.raises(IntegrityError):
        keystore.unwrap(wrapped[:-1], AAD)


@pytest.mark.parametrize("length", [0, NONCE_LEN, NONCE_LEN + TAG_LEN, MIN_WRAPPED_LEN - 1])
def test_too_short_is_an_invalid_request(keystore: KeyStore, length: int) -> None:
    wrapped = keystore.wrap(KFRAG, AAD)
    with pytest.raises(InvalidRequest):
        keystore.unwrap(wrapped[:length], AAD)
    # The store is still usable afterwards.
    assert keystore.unwrap(wrapped, AAD) == KFRAG


def test_empty_plaintext_is_refused(keystore: KeyStore) -> None:
    with pytest.raises(InvalidRequest):
        keystore.wrap(b"", AAD)


def test_signature_verifies_and_is_low_s(keystore: KeyStore) -> None:
    public_key = serialization.load_der_public_key(keystore.signing_public_key())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    # 32 signatures: half of raw ECDSA signatures are high-S, so normalisation is exercised.
    for i in range(32):
        message = b"checkpoint %d" % i
        signature = keystore.sign(message)
        public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        _, s = decode_dss_signature(signature)
        assert 0 < s <= P256_ORDER // 2


def test_signing_public_key_is_stable(keystore: KeyStore) -> None:
    assert keystore.signing_public_key() == keystore.signing_public_key()


def test_closed_store_refuses(keystore: KeyStore) -> None:
    wrapped = keystore.wrap(KFRAG, AAD)
    ephemeral, sealed = seal(keystore)
    keystore.close()
    with pytest.raises(HsmUnavailable):
        keystore.unwrap(wrapped, AAD)
    with pytest.raises(HsmUnavailable):
        keystore.sign(b"m")
    with pytest.raises(HsmUnavailable):
        keystore.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING)
    with pytest.raises(HsmUnavailable):
        keystore.sign_eth_digest(bytes(32))
    for getter in (
        keystore.signing_public_key,
        keystore.delivery_public_key,
        keystore.eth_address,
    ):
        with pytest.raises(HsmUnavailable):
            getter()
    keystore.close()  # idempotent


# --- conformance: kfrag delivery key ----------------------------------------------------------


def seal(keystore: KeyStore, plaintext: bytes = KFRAG) -> tuple[bytes, bytes]:
    return seal_for_node(keystore.delivery_public_key(), plaintext, info=BINDING, aad=BINDING)


def test_delivery_public_key_is_a_stable_compressed_p256_point(keystore: KeyStore) -> None:
    public = keystore.delivery_public_key()
    assert len(public) == 33 and public[0] in (2, 3)
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
    assert keystore.delivery_public_key() == public
    signing = serialization.load_der_public_key(keystore.signing_public_key())
    assert isinstance(signing, ec.EllipticCurvePublicKey)
    assert compressed(signing) != public  # its own key, not the signing key


@pytest.mark.parametrize("plaintext", [KFRAG, b"\x00"])
def test_open_delivery_opens_what_was_sealed_to_it(keystore: KeyStore, plaintext: bytes) -> None:
    ephemeral, sealed = seal(keystore, plaintext)
    assert keystore.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING) == plaintext
    # bytes-like input, as from protobuf or a buffer (the interface says bytes: on purpose)
    ephemeral_buffer, sealed_buffer = bytearray(ephemeral), memoryview(sealed)
    info, aad = bytearray(BINDING), memoryview(BINDING)
    opened = keystore.open_delivery(ephemeral_buffer, sealed_buffer, info=info, aad=aad)  # type: ignore[arg-type]
    assert opened == plaintext


def test_open_delivery_refuses_another_binding(keystore: KeyStore) -> None:
    ephemeral, sealed = seal(keystore)
    other = delivery_binding(
        "node-2",
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        bytes([0x02]) + bytes(range(32)),
        1,
    )
    for info, aad in ((other, BINDING), (BINDING, other), (other, other)):
        with pytest.raises(Unauthenticated, match=SEALED_KFRAG_UNAUTHENTICATED):
            keystore.open_delivery(ephemeral, sealed, info=info, aad=aad)


def test_open_delivery_refuses_a_kfrag_sealed_to_another_node(keystore: KeyStore) -> None:
    ephemeral, sealed = seal(MemoryKeyStore())
    with pytest.raises(Unauthenticated, match=SEALED_KFRAG_UNAUTHENTICATED):
        keystore.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING)


@pytest.mark.parametrize("where", [0, NONCE_LEN, NONCE_LEN + 100, -1])
def test_open_delivery_refuses_a_tampered_kfrag(keystore: KeyStore, where: int) -> None:
    ephemeral, sealed = seal(keystore)
    tampered = bytearray(sealed)
    tampered[where] ^= 0x01
    with pytest.raises(Unauthenticated, match=SEALED_KFRAG_UNAUTHENTICATED):
        keystore.open_delivery(ephemeral, bytes(tampered), info=BINDING, aad=BINDING)
    with pytest.raises(Unauthenticated):
        keystore.open_delivery(ephemeral, sealed[:-1], info=BINDING, aad=BINDING)
    other_ephemeral, _ = seal(keystore)  # a valid point, but not the one it was sealed with
    with pytest.raises(Unauthenticated):
        keystore.open_delivery(other_ephemeral, sealed, info=BINDING, aad=BINDING)
    assert keystore.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING) == KFRAG


def _off_curve_point() -> bytes:
    for x in range(1, 1000):
        candidate = bytes([0x02]) + x.to_bytes(32, "big")
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), candidate)
        except ValueError:
            return candidate
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "bad",
    [
        lambda e: _off_curve_point(),
        lambda e: e[:-1],
        lambda e: b"",
        lambda e: bytes(33),
        lambda e: bytes([0x04]) + e[1:],
    ],
)
def test_open_delivery_refuses_a_bad_ephemeral_point(keystore: KeyStore, bad: object) -> None:
    ephemeral, sealed = seal(keystore)
    assert callable(bad)
    with pytest.raises(InvalidRequest, match="ephemeral public key"):
        keystore.open_delivery(bad(ephemeral), sealed, info=BINDING, aad=BINDING)
    assert keystore.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING) == KFRAG


@pytest.mark.parametrize("length", [0, NONCE_LEN, NONCE_LEN + TAG_LEN])
def test_open_delivery_refuses_a_too_short_kfrag(keystore: KeyStore, length: int) -> None:
    ephemeral, sealed = seal(keystore)
    with pytest.raises(InvalidRequest, match="at least"):
        keystore.open_delivery(ephemeral, sealed[:length], info=BINDING, aad=BINDING)


# --- conformance: Ethereum account key --------------------------------------------------------


def test_eth_address_is_a_stable_checksum_address(keystore: KeyStore) -> None:
    address = keystore.eth_address()
    assert is_checksum_address(address)
    assert keystore.eth_address() == address


def test_eth_signatures_recover_to_the_address_and_are_low_s(keystore: KeyStore) -> None:
    recovery_ids = set()
    # 32 signatures: raw ECDSA is high-S half the time, so normalisation (and the flipped
    # recovery id that comes with it) is exercised.
    for i in range(32):
        digest = hashlib.sha256(b"checkpoint %d" % i).digest()
        v, r, s = keystore.sign_eth_digest(digest)
        assert v in (0, 1) and 0 < r < SECP256K1_ORDER and 0 < s <= SECP256K1_ORDER // 2
        public_key = Signature(vrs=(v, r, s)).recover_public_key_from_msg_hash(digest)
        assert public_key.to_checksum_address() == keystore.eth_address()
        recovery_ids.add(v)
    assert recovery_ids == {0, 1}


@pytest.mark.parametrize("length", [0, 20, 31, 33, 64])
def test_sign_eth_digest_wants_32_bytes(keystore: KeyStore, length: int) -> None:
    with pytest.raises(InvalidRequest, match="32 bytes"):
        keystore.sign_eth_digest(bytes(length))


def test_signed_transaction_comes_from_eth_address(keystore: KeyStore) -> None:
    tx = {
        "chainId": 31337,
        "nonce": 0,
        "gas": 21_000,
        "maxFeePerGas": 2 * 10**9,
        "maxPriorityFeePerGas": 10**9,
        "to": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "value": 1,
    }
    raw = sign_transaction(tx, keystore.sign_eth_digest)
    assert Account.recover_transaction(raw) == keystore.eth_address()


# --- in-memory twin only ----------------------------------------------------------------------


def test_memory_repr_and_errors_show_no_key_material() -> None:
    kek = os.urandom(32)
    signing = ec.generate_private_key(ec.SECP256R1())
    delivery = ec.generate_private_key(ec.SECP256R1())
    eth = ec.generate_private_key(ec.SECP256K1())
    store = MemoryKeyStore(kek=kek, signing_key=signing, delivery_key=delivery, eth_key=eth)
    secrets_ = [kek.hex()]
    for key in (signing, delivery, eth):
        scalar = key.private_numbers().private_value
        secrets_ += [str(scalar), f"{scalar:x}", f"{scalar:064x}"]
    text = repr(store)
    assert text == "MemoryKeyStore()"
    assert not any(secret in text for secret in secrets_)

    ephemeral, sealed = seal(store)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
    shared_x = delivery.exchange(ec.ECDH(), peer)
    with pytest.raises(Unauthenticated) as caught:
        store.open_delivery(ephemeral, sealed, info=BINDING, aad=b"other")
    chain = [caught.value, caught.value.__cause__, caught.value.__context__]
    for error in chain:
        assert shared_x.hex() not in repr(error) and shared_x.hex() not in str(error)


def test_memory_refuses_keys_on_the_wrong_curve() -> None:
    with pytest.raises(InvalidRequest, match="delivery key must be on P-256"):
        MemoryKeyStore(delivery_key=ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(InvalidRequest, match="Ethereum key must be on secp256k1"):
        MemoryKeyStore(eth_key=ec.generate_private_key(ec.SECP256R1()))


# --- real SoftHSM2 only -----------------------------------------------------------------------


def _attributes(store: Pkcs11KeyStore, handle: object, names: list[int]) -> list[object]:
    # Reads through the store's own session: a token is open once per process.
    with store._lock:
        assert store._token is not None
        return list(store._token.session.getAttributeValue(handle, names))


def _binary_attributes(
    store: Pkcs11KeyStore, private_handle: object, names: list[int]
) -> list[bytes]:
    """Attributes of the public half of the key pair whose private half is given."""
    (label,) = _attributes(store, private_handle, [PyKCS11.CKA_LABEL])
    with store._lock:
        assert store._token is not None
        session = store._token.session
        (public,) = session.findObjects(
            [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_LABEL, label)]
        )
        return [bytes(v) for v in session.getAttributeValue(public, names, allAsBinary=True)]


def _destroy(store: Pkcs11KeyStore, label: str, cls: int | None = None) -> None:
    """Remove objects from the token, to stand for a token of an older release."""
    template: list[tuple[int, object]] = [(PyKCS11.CKA_LABEL, label)]
    if cls is not None:
        template.append((PyKCS11.CKA_CLASS, cls))
    with store._lock:
        assert store._token is not None
        session = store._token.session
        handles = session.findObjects(template)
        assert handles
        for handle in handles:
            session.destroyObject(handle)


def test_kek_generations_wrap_new_values_and_unwrap_old_ones(fresh_keystore: KeyStore) -> None:
    store = fresh_keystore
    assert store.kek_generation() == 1
    old = store.wrap(b"kfrag", b"aad")
    assert store.add_kek_generation() == 2
    assert store.kek_generation() == 2
    new = store.wrap(b"kfrag", b"aad")
    assert store.unwrap(old, b"aad", 1) == b"kfrag"
    assert store.unwrap(new, b"aad", 2) == store.unwrap(new, b"aad") == b"kfrag"
    with pytest.raises(IntegrityError, match="failed authentication"):
        store.unwrap(old, b"aad", 2)  # under another generation's key
    assert store.destroy_kek_generations(keep=2) == [1]
    with pytest.raises(IntegrityError, match="no key-encryption key of generation 1"):
        store.unwrap(old, b"aad", 1)
    assert store.unwrap(new, b"aad", 2) == b"kfrag"
    with pytest.raises(IntegrityError, match="generation 7"):
        store.destroy_kek_generations(keep=7)


@pytest.mark.softhsm
def test_a_rotated_token_reopens_with_its_generations(softhsm_dir: SoftHsmDir) -> None:
    token = softhsm_dir.new_token()
    store = token.open()
    store.add_kek_generation()
    store.add_kek_generation()
    wrapped = store.wrap(b"kfrag", b"aad")
    store.destroy_kek_generations(keep=3)
    store.close()
    token.ensure_keys()  # `kms-node init` again: no new first-generation key
    store = token.open()
    try:
        assert store.kek_generation() == 3
        assert store.unwrap(wrapped, b"aad", 3) == b"kfrag"
        assert _find(store, "medkms-kek") == [] and _find(store, "medkms-kek-2") == []
        assert len(_find(store, "medkms-kek-3")) == 1
    finally:
        store.close()


_KEY_PAIRS = {spec.label: spec for spec in (SIGNING_KEY, DELIVERY_KEY, ETH_KEY)}


def _flip(template: list[tuple[int, Any]], attribute: int) -> list[tuple[int, Any]]:
    """``template`` with the boolean ``attribute`` the other way round."""
    assert attribute in dict(template)
    return [(name, not value if name == attribute else value) for name, value in template]


def _find(store: Pkcs11KeyStore, label: str) -> list[object]:
    with store._lock:
        assert store._token is not None
        return list(store._token.session.findObjects([(PyKCS11.CKA_LABEL, label)]))


@pytest.mark.softhsm
class TestSoftHsm:
    def test_kek_is_sensitive_and_not_extractable(self, hsm_store: Pkcs11KeyStore) -> None:
        names = [
            PyKCS11.CKA_TOKEN,
            PyKCS11.CKA_PRIVATE,
            PyKCS11.CKA_SENSITIVE,
            PyKCS11.CKA_ALWAYS_SENSITIVE,
            PyKCS11.CKA_EXTRACTABLE,
            PyKCS11.CKA_NEVER_EXTRACTABLE,
            PyKCS11.CKA_ENCRYPT,
            PyKCS11.CKA_DECRYPT,
            PyKCS11.CKA_WRAP,
            PyKCS11.CKA_UNWRAP,
            PyKCS11.CKA_SIGN,
            PyKCS11.CKA_VALUE_LEN,
        ]
        values = _attributes(hsm_store, hsm_store._keks[1], names)
        assert values == [True, True, True, True, False, True, True, True, False, False, False, 32]
        # The token refuses to reveal the key itself (PyKCS11 maps CKR_ATTRIBUTE_SENSITIVE
        # to None).
        assert _attributes(hsm_store, hsm_store._keks[1], [PyKCS11.CKA_VALUE]) == [None]

    def test_signing_key_is_sensitive_and_sign_only(self, hsm_store: Pkcs11KeyStore) -> None:
        names = [
            PyKCS11.CKA_SENSITIVE,
            PyKCS11.CKA_EXTRACTABLE,
            PyKCS11.CKA_NEVER_EXTRACTABLE,
            PyKCS11.CKA_SIGN,
            PyKCS11.CKA_DECRYPT,
            PyKCS11.CKA_DERIVE,
            PyKCS11.CKA_UNWRAP,
        ]
        values = _attributes(hsm_store, hsm_store._signing_key, names)
        assert values == [True, False, True, True, False, False, False]
        assert _attributes(hsm_store, hsm_store._signing_key, [PyKCS11.CKA_VALUE]) == [None]

    def test_delivery_key_is_sensitive_and_derive_only(self, hsm_store: Pkcs11KeyStore) -> None:
        names = [
            PyKCS11.CKA_TOKEN,
            PyKCS11.CKA_PRIVATE,
            PyKCS11.CKA_SENSITIVE,
            PyKCS11.CKA_EXTRACTABLE,
            PyKCS11.CKA_NEVER_EXTRACTABLE,
            PyKCS11.CKA_DERIVE,
            PyKCS11.CKA_SIGN,
            PyKCS11.CKA_DECRYPT,
            PyKCS11.CKA_UNWRAP,
        ]
        values = _attributes(hsm_store, hsm_store._delivery_key, names)
        assert values == [True, True, True, False, True, True, False, False, False]
        assert _attributes(hsm_store, hsm_store._delivery_key, [PyKCS11.CKA_VALUE]) == [None]
        (params,) = _binary_attributes(hsm_store, hsm_store._delivery_key, [PyKCS11.CKA_EC_PARAMS])
        assert params == bytes.fromhex("06082a8648ce3d030107")  # prime256v1

    def test_eth_key_is_sensitive_and_sign_only(self, hsm_store: Pkcs11KeyStore) -> None:
        names = [
            PyKCS11.CKA_TOKEN,
            PyKCS11.CKA_PRIVATE,
            PyKCS11.CKA_SENSITIVE,
            PyKCS11.CKA_EXTRACTABLE,
            PyKCS11.CKA_NEVER_EXTRACTABLE,
            PyKCS11.CKA_SIGN,
            PyKCS11.CKA_DERIVE,
            PyKCS11.CKA_DECRYPT,
            PyKCS11.CKA_UNWRAP,
        ]
        values = _attributes(hsm_store, hsm_store._eth_key, names)
        assert values == [True, True, True, False, True, True, False, False, False]
        assert _attributes(hsm_store, hsm_store._eth_key, [PyKCS11.CKA_VALUE]) == [None]
        (params,) = _binary_attributes(hsm_store, hsm_store._eth_key, [PyKCS11.CKA_EC_PARAMS])
        assert params == bytes.fromhex("06052b8104000a")  # secp256k1

    def test_the_ecdh_secret_does_not_outlive_open_delivery(
        self, hsm_store: Pkcs11KeyStore
    ) -> None:
        def secret_objects() -> list[int]:
            """Handles of every secret key object this session can see, session objects too."""
            with hsm_store._lock:
                assert hsm_store._token is not None
                session = hsm_store._token.session
                found = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)])
                return sorted(handle.value() for handle in found)

        before = secret_objects()
        assert len(before) == 1  # the KEK
        ephemeral, sealed = seal(hsm_store)
        assert hsm_store.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING) == KFRAG
        assert secret_objects() == before
        with pytest.raises(Unauthenticated):
            hsm_store.open_delivery(ephemeral, sealed, info=BINDING, aad=b"other")
        assert secret_objects() == before

    def test_wrong_pin_is_refused_without_echoing_it(self, provisioned_token: SoftHsmToken) -> None:
        wrong_pin = secrets.token_hex(8)
        with pytest.raises(HsmUnavailable, match="wrong user PIN") as caught:
            Pkcs11KeyStore.open(
                SOFTHSM_MODULE,
                provisioned_token.label,
                wrong_pin,
                softhsm_conf=provisioned_token.conf,
            )
        chain = [caught.value, caught.value.__cause__]
        for error in chain:
            assert wrong_pin not in str(error)
            assert wrong_pin not in repr(error)
            assert provisioned_token.user_pin not in str(error)
        # The failed attempt left nothing behind: the right PIN opens the token.
        provisioned_token.open().close()

    def test_missing_token(self, softhsm_dir: SoftHsmDir) -> None:
        with pytest.raises(HsmUnavailable, match=r"not found.*kms-node init"):
            Pkcs11KeyStore.open(
                SOFTHSM_MODULE, "no-such-token", "1234", softhsm_conf=softhsm_dir.conf
            )

    def test_missing_module(self, tmp_path: Path) -> None:
        with pytest.raises(HsmUnavailable, match="not found"):
            Pkcs11KeyStore.open(str(tmp_path / "libnothing.so"), "node-1", "1234")

    def test_a_token_made_before_the_new_keys_is_upgraded_by_ensure_keys(
        self, softhsm_dir: SoftHsmDir
    ) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        public_key = store.signing_public_key()
        wrapped = store.wrap(KFRAG, AAD)
        old_delivery, old_address = store.delivery_public_key(), store.eth_address()
        # What a token provisioned by the previous release holds: KEK and signing key only.
        for label in (DELIVERY_KEY.label, ETH_KEY.label):
            _destroy(store, label)
        store.close()
        with pytest.raises(
            HsmUnavailable, match=r"key 'medkms-delivery' not found on token .*run `kms-node init`"
        ):
            token.open()

        token.ensure_keys()
        store = token.open()
        try:
            assert store.signing_public_key() == public_key  # kept
            assert store.unwrap(wrapped, AAD) == KFRAG  # the same KEK
            assert store.delivery_public_key() != old_delivery  # new
            assert store.eth_address() != old_address  # new
            ephemeral, sealed = seal(store)
            assert store.open_delivery(ephemeral, sealed, info=BINDING, aad=BINDING) == KFRAG
        finally:
            store.close()

    def test_a_missing_eth_key_is_named(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        _destroy(store, ETH_KEY.label)
        store.close()
        with pytest.raises(HsmUnavailable, match=r"key 'medkms-eth' not found.*kms-node init"):
            token.open()

    def test_half_a_key_pair_is_not_replaced(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        _destroy(store, DELIVERY_KEY.label, PyKCS11.CKO_PUBLIC_KEY)
        store.close()
        with pytest.raises(HsmUnavailable, match="only half of the key pair 'medkms-delivery'"):
            token.ensure_keys()

    @pytest.mark.parametrize(
        ("spec", "message"),
        [(DELIVERY_KEY, "delivery key pair"), (ETH_KEY, "Ethereum key pair")],
        ids=["delivery", "eth"],
    )
    def test_a_public_half_of_another_key_is_caught_at_open(
        self, softhsm_dir: SoftHsmDir, spec: KeyPairSpec, message: str
    ) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        _destroy(store, spec.label, PyKCS11.CKO_PUBLIC_KEY)
        point = (
            ec.generate_private_key(spec.curve)
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        # Made to the spec of the public half, so that every attribute check passes.
        public_template, _ = spec.templates()
        with store._lock:
            assert store._token is not None
            store._token.session.createObject(
                [*public_template, (PyKCS11.CKA_EC_POINT, bytes([0x04, len(point)]) + point)]
            )
        store.close()
        with pytest.raises(HsmUnavailable, match=message + ".*does not match"):
            token.open()

    @pytest.mark.parametrize(
        ("label", "half", "attribute"),
        [
            pytest.param(KEK_LABEL, None, PyKCS11.CKA_WRAP, id="kek-may-wrap"),
            pytest.param(KEK_LABEL, None, PyKCS11.CKA_EXTRACTABLE, id="kek-extractable"),
            pytest.param(SIGNING_KEY.label, "private", PyKCS11.CKA_DERIVE, id="signing-may-derive"),
            pytest.param(DELIVERY_KEY.label, "private", PyKCS11.CKA_SIGN, id="delivery-may-sign"),
            pytest.param(ETH_KEY.label, "private", PyKCS11.CKA_SENSITIVE, id="eth-not-sensitive"),
            pytest.param(
                ETH_KEY.label, "public", PyKCS11.CKA_MODIFIABLE, id="eth-public-modifiable"
            ),
        ],
    )
    def test_a_key_that_differs_from_its_spec_is_refused(
        self, softhsm_dir: SoftHsmDir, label: str, half: str | None, attribute: int
    ) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        _destroy(store, label)
        with store._lock:  # made again to its spec but for one attribute
            assert store._token is not None
            session = store._token.session
            if half is None:
                template = _flip(KEK.template((PyKCS11.CKA_LABEL, label)), attribute)
                session.generateKey(template, PyKCS11.MechanismAESGENERATEKEY)
            else:
                public, private = _KEY_PAIRS[label].templates()
                if half == "private":
                    private = _flip(private, attribute)
                else:
                    public = _flip(public, attribute)
                session.generateKeyPair(public, private, PyKCS11.MechanismECGENERATEKEYPAIR)
        store.close()
        name = PyKCS11.CKA[attribute]
        with pytest.raises(
            HsmUnavailable,
            match=rf"key '{label}' on token .* has unsafe or unexpected attributes \({name}\)",
        ):
            token.open()

    def test_token_without_keys(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token(keys=False)
        with pytest.raises(HsmUnavailable, match=r"key 'medkms-kek' not found.*kms-node init"):
            token.open()

    def test_ensure_keys_is_idempotent(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        public_key = store.signing_public_key()
        delivery_public_key, eth_address = store.delivery_public_key(), store.eth_address()
        wrapped = store.wrap(KFRAG, AAD)
        store.close()

        token.ensure_keys()
        store = token.open()
        try:
            assert store.signing_public_key() == public_key
            assert store.unwrap(wrapped, AAD) == KFRAG  # the same KEK
            assert store.delivery_public_key() == delivery_public_key
            assert store.eth_address() == eth_address
            for label in (KEK_LABEL, SIGNING_KEY.label, DELIVERY_KEY.label, ETH_KEY.label):
                expected = 1 if label == KEK_LABEL else 2  # key pair: private + public
                assert len(_find(store, label)) == expected
        finally:
            store.close()

    def test_provision_returns_an_open_store(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token(keys=False)
        store = Pkcs11KeyStore.provision(
            token.module, token.label, token.user_pin, softhsm_conf=token.conf
        )
        try:
            assert store.unwrap(store.wrap(KFRAG, AAD), AAD) == KFRAG
        finally:
            store.close()

    def test_init_softhsm_token_is_idempotent(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token()
        public_key = _public_key(token)
        init_softhsm_token(
            softhsm_conf=token.conf,
            token_dir=token.token_dir,
            module_path=token.module,
            token_label=token.label,
            so_pin=token.so_pin,
            user_pin=token.user_pin,
        )
        assert _public_key(token) == public_key
        assert stat.S_IMODE(token.token_dir.stat().st_mode) == 0o700
        conf = token.conf.read_text()
        assert f"directories.tokendir = {token.token_dir.resolve()}" in conf
        assert "objectstore.backend = file" in conf
        assert token.so_pin not in conf and token.user_pin not in conf

    @pytest.mark.parametrize("label", ["x" * 33, " padded", "", "caf\u00e9"])
    def test_init_refuses_a_bad_label(self, softhsm_dir: SoftHsmDir, label: str) -> None:
        with pytest.raises(InvalidRequest, match="token label"):
            _init(softhsm_dir, label, user_pin=secrets.token_hex(8))

    def test_init_refuses_a_short_pin(self, softhsm_dir: SoftHsmDir) -> None:
        label = f"short-{secrets.token_hex(4)}"
        with pytest.raises(InvalidRequest, match="user PIN must be 4-255 characters"):
            _init(softhsm_dir, label, user_pin="123")
        # Checked before C_InitToken: no half-made token is left behind.
        with pytest.raises(HsmUnavailable, match="not found"):
            Pkcs11KeyStore.open(SOFTHSM_MODULE, label, "1234", softhsm_conf=softhsm_dir.conf)

    def test_token_opens_once_per_process(
        self, hsm_store: Pkcs11KeyStore, provisioned_token: SoftHsmToken
    ) -> None:
        # PKCS#11 login state is per process: a second login could not check its PIN.
        with pytest.raises(HsmUnavailable, match="already open"):
            provisioned_token.open()
        assert hsm_store.unwrap(hsm_store.wrap(KFRAG, AAD), AAD) == KFRAG

    def test_one_token_directory_per_process_while_loaded(
        self, hsm_store: Pkcs11KeyStore, tmp_path: Path
    ) -> None:
        with pytest.raises(HsmUnavailable, match="one token directory per process"):
            init_softhsm_token(
                softhsm_conf=tmp_path / "softhsm2.conf",
                token_dir=tmp_path / "tokens",
                module_path=SOFTHSM_MODULE,
                token_label="elsewhere",
                so_pin=secrets.token_hex(8),
                user_pin=secrets.token_hex(8),
            )

    def test_another_token_directory_once_the_module_is_released(self, tmp_path: Path) -> None:
        # Nothing holds the module here, so it is unloaded (C_Finalize) and re-initialised
        # with the other SOFTHSM2_CONF: switching directories sequentially works in-process.
        other = SoftHsmDir(conf=tmp_path / "softhsm2.conf", token_dir=tmp_path / "tokens")
        token = other.new_token()
        store = token.open()
        try:
            assert store.unwrap(store.wrap(KFRAG, AAD), AAD) == KFRAG
        finally:
            store.close()
        assert os.environ["SOFTHSM2_CONF"] == str(other.conf.resolve())

    def test_concurrent_use_from_eight_threads(self, hsm_store: Pkcs11KeyStore) -> None:
        public_key = serialization.load_der_public_key(hsm_store.signing_public_key())
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        errors: list[BaseException] = []
        start = threading.Barrier(8)
        sealed = seal(hsm_store)

        def work(n: int) -> None:
            try:
                start.wait()
                for i in range(50):
                    aad = b"%d/%d" % (n, i)
                    plaintext = KFRAG[: 1 + (n * 50 + i) % len(KFRAG)]
                    assert hsm_store.unwrap(hsm_store.wrap(plaintext, aad), aad) == plaintext
                    if i % 10 == 0:
                        public_key.verify(hsm_store.sign(aad), aad, ec.ECDSA(hashes.SHA256()))
                    if i % 10 == 5:
                        assert hsm_store.open_delivery(*sealed, info=BINDING, aad=BINDING) == KFRAG
                        v, r, s = hsm_store.sign_eth_digest(hashlib.sha256(aad).digest())
                        assert v in (0, 1) and s <= SECP256K1_ORDER // 2
            except BaseException as e:  # collected and re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []

    def test_session_recovers_after_a_stuck_operation(self, hsm_store: Pkcs11KeyStore) -> None:
        wrapped = hsm_store.wrap(KFRAG, AAD)
        # C_Decrypt on empty input fails with CKR_ARGUMENTS_BAD and leaves the decrypt
        # operation active: the session is stuck until it is replaced.
        with hsm_store._lock:
            assert hsm_store._token is not None
            with pytest.raises(PyKCS11.PyKCS11Error):
                hsm_store._token.session.decrypt(
                    hsm_store._keks[1], b"", PyKCS11.AES_GCM_Mechanism(bytes(12), b"", 128)
                )
        with pytest.raises(HsmUnavailable, match="OPERATION_ACTIVE"):
            hsm_store.unwrap(wrapped, AAD)
        assert hsm_store.unwrap(wrapped, AAD) == KFRAG

    def test_repr_shows_only_the_label(
        self, hsm_store: Pkcs11KeyStore, provisioned_token: SoftHsmToken
    ) -> None:
        text = repr(hsm_store)
        assert text == f"Pkcs11KeyStore(token={provisioned_token.label!r})"
        # Not even the public keys: a repr is for telling stores apart, not for key material.
        for public in (hsm_store.delivery_public_key(), hsm_store.signing_public_key()):
            assert public.hex() not in text
        assert hsm_store.eth_address()[2:].lower() not in text.lower()
        assert provisioned_token.user_pin not in text
        assert provisioned_token.user_pin not in repr(provisioned_token)


def _init(softhsm_dir: SoftHsmDir, label: str, *, user_pin: str) -> None:
    init_softhsm_token(
        softhsm_conf=softhsm_dir.conf,
        token_dir=softhsm_dir.token_dir,
        module_path=SOFTHSM_MODULE,
        token_label=label,
        so_pin=secrets.token_hex(8),
        user_pin=user_pin,
    )


def _public_key(token: SoftHsmToken) -> bytes:
    store = token.open()
    try:
        return store.signing_public_key()
    finally:
        store.close()
