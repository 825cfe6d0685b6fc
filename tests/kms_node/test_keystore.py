"""KeyStore conformance (in-memory twin and real SoftHSM2), then real-HSM-only properties."""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

import PyKCS11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from medkms.core.errors import HsmUnavailable, IntegrityError, InvalidRequest
from medkms.node import hsm
from medkms.node.keystore import MIN_WRAPPED_LEN, NONCE_LEN, P256_ORDER, TAG_LEN, KeyStore

from .conftest import SOFTHSM_MODULE, SoftHsmDir, SoftHsmToken

KFRAG = bytes(range(256)) + bytes(54)  # 310 bytes, the size of an umbral-pre kfrag
AAD = b"node-1|0xpatient|0xgrantee"


# --- conformance: every KeyStore --------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [KFRAG, b"\x00"])
@pytest.mark.parametrize("aad", [AAD, b""])
def test_wrap_unwrap_roundtrip(keystore: KeyStore, plaintext: bytes, aad: bytes) -> None:
    wrapped = keystore.wrap(plaintext, aad)
    assert len(wrapped) == NONCE_LEN + len(plaintext) + TAG_LEN
    assert keystore.unwrap(wrapped, aad) == plaintext


def test_accepts_any_bytes_like_input(keystore: KeyStore) -> None:
    wrapped = keystore.wrap(bytearray(KFRAG), memoryview(AAD))
    assert keystore.unwrap(bytearray(wrapped), bytearray(AAD)) == KFRAG


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
    keystore.close()
    with pytest.raises(HsmUnavailable):
        keystore.unwrap(wrapped, AAD)
    with pytest.raises(HsmUnavailable):
        keystore.sign(b"m")
    keystore.close()  # idempotent


# --- real SoftHSM2 only -----------------------------------------------------------------------


def _attributes(store: hsm.Pkcs11KeyStore, handle: object, names: list[int]) -> list[object]:
    # Reads through the store's own session: a token is open once per process.
    with store._lock:
        assert store._token is not None
        return list(store._token.session.getAttributeValue(handle, names))


def _find(store: hsm.Pkcs11KeyStore, label: str) -> list[object]:
    with store._lock:
        assert store._token is not None
        return list(store._token.session.findObjects([(PyKCS11.CKA_LABEL, label)]))


@pytest.mark.softhsm
class TestSoftHsm:
    def test_kek_is_sensitive_and_not_extractable(self, hsm_store: hsm.Pkcs11KeyStore) -> None:
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
        values = _attributes(hsm_store, hsm_store._kek, names)
        assert values == [True, True, True, True, False, True, True, True, False, False, False, 32]
        # The token refuses to reveal the key itself (PyKCS11 maps CKR_ATTRIBUTE_SENSITIVE
        # to None).
        assert _attributes(hsm_store, hsm_store._kek, [PyKCS11.CKA_VALUE]) == [None]

    def test_signing_key_is_sensitive_and_sign_only(self, hsm_store: hsm.Pkcs11KeyStore) -> None:
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

    def test_wrong_pin_is_refused_without_echoing_it(self, provisioned_token: SoftHsmToken) -> None:
        wrong_pin = secrets.token_hex(8)
        with pytest.raises(HsmUnavailable, match="wrong user PIN") as caught:
            hsm.Pkcs11KeyStore.open(
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
            hsm.Pkcs11KeyStore.open(
                SOFTHSM_MODULE, "no-such-token", "1234", softhsm_conf=softhsm_dir.conf
            )

    def test_missing_module(self, tmp_path: Path) -> None:
        with pytest.raises(HsmUnavailable, match="not found"):
            hsm.Pkcs11KeyStore.open(str(tmp_path / "libnothing.so"), "node-1", "1234")

    def test_token_without_keys(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token(keys=False)
        with pytest.raises(HsmUnavailable, match=r"key 'medkms-kek' not found.*kms-node init"):
            token.open()

    def test_ensure_keys_is_idempotent(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token()
        store = token.open()
        public_key = store.signing_public_key()
        wrapped = store.wrap(KFRAG, AAD)
        store.close()

        token.ensure_keys()
        store = token.open()
        try:
            assert store.signing_public_key() == public_key
            assert store.unwrap(wrapped, AAD) == KFRAG  # the same KEK
            for label in (hsm.KEK_LABEL, hsm.SIGNING_LABEL):
                expected = 1 if label == hsm.KEK_LABEL else 2  # key pair: private + public
                assert len(_find(store, label)) == expected
        finally:
            store.close()

    def test_provision_returns_an_open_store(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token(keys=False)
        store = hsm.Pkcs11KeyStore.provision(
            token.module, token.label, token.user_pin, softhsm_conf=token.conf
        )
        try:
            assert store.unwrap(store.wrap(KFRAG, AAD), AAD) == KFRAG
        finally:
            store.close()

    def test_init_softhsm_token_is_idempotent(self, softhsm_dir: SoftHsmDir) -> None:
        token = softhsm_dir.new_token()
        public_key = _public_key(token)
        hsm.init_softhsm_token(
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
            hsm.Pkcs11KeyStore.open(SOFTHSM_MODULE, label, "1234", softhsm_conf=softhsm_dir.conf)

    def test_token_opens_once_per_process(
        self, hsm_store: hsm.Pkcs11KeyStore, provisioned_token: SoftHsmToken
    ) -> None:
        # PKCS#11 login state is per process: a second login could not check its PIN.
        with pytest.raises(HsmUnavailable, match="already open"):
            provisioned_token.open()
        assert hsm_store.unwrap(hsm_store.wrap(KFRAG, AAD), AAD) == KFRAG

    def test_one_token_directory_per_process_while_loaded(
        self, hsm_store: hsm.Pkcs11KeyStore, tmp_path: Path
    ) -> None:
        with pytest.raises(HsmUnavailable, match="one token directory per process"):
            hsm.init_softhsm_token(
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

    def test_concurrent_use_from_eight_threads(self, hsm_store: hsm.Pkcs11KeyStore) -> None:
        public_key = serialization.load_der_public_key(hsm_store.signing_public_key())
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def work(n: int) -> None:
            try:
                start.wait()
                for i in range(50):
                    aad = b"%d/%d" % (n, i)
                    plaintext = KFRAG[: 1 + (n * 50 + i) % len(KFRAG)]
                    assert hsm_store.unwrap(hsm_store.wrap(plaintext, aad), aad) == plaintext
                    if i % 10 == 0:
                        public_key.verify(hsm_store.sign(aad), aad, ec.ECDSA(hashes.SHA256()))
            except BaseException as e:  # collected and re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []

    def test_session_recovers_after_a_stuck_operation(self, hsm_store: hsm.Pkcs11KeyStore) -> None:
        wrapped = hsm_store.wrap(KFRAG, AAD)
        # C_Decrypt on empty input fails with CKR_ARGUMENTS_BAD and leaves the decrypt
        # operation active: the session is stuck until it is replaced.
        with hsm_store._lock:
            assert hsm_store._token is not None
            with pytest.raises(PyKCS11.PyKCS11Error):
                hsm_store._token.session.decrypt(
                    hsm_store._kek, b"", PyKCS11.AES_GCM_Mechanism(bytes(12), b"", 128)
                )
        with pytest.raises(HsmUnavailable, match="OPERATION_ACTIVE"):
            hsm_store.unwrap(wrapped, AAD)
        assert hsm_store.unwrap(wrapped, AAD) == KFRAG

    def test_repr_shows_only_the_label(
        self, hsm_store: hsm.Pkcs11KeyStore, provisioned_token: SoftHsmToken
    ) -> None:
        text = repr(hsm_store)
        assert text == f"Pkcs11KeyStore(token={provisioned_token.label!r})"
        assert provisioned_token.user_pin not in text
        assert provisioned_token.user_pin not in repr(provisioned_token)


def _init(softhsm_dir: SoftHsmDir, label: str, *, user_pin: str) -> None:
    hsm.init_softhsm_token(
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
