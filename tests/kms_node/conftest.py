"""Fixtures for the node's key store and kfrag store: real SoftHSM2 tokens in temporary dirs.

All tokens of a test session live in one token directory: the PKCS#11 module reads its
SOFTHSM2_CONF once per load, so one directory per process is the simple, reliable setup
(see ``kms_node.hsm.pkcs11_session``). Each token gets its own label and test-generated PINs.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore, ensure_keys
from kms_node.hsm.softhsm_token import init_softhsm_token
from kms_node.keystore import KeyStore, MemoryKeyStore

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class SoftHsmToken:
    conf: Path
    token_dir: Path
    label: str
    so_pin: str = field(repr=False)
    user_pin: str = field(repr=False)
    module: str = SOFTHSM_MODULE

    def open(self) -> Pkcs11KeyStore:
        return Pkcs11KeyStore.open(self.module, self.label, self.user_pin, softhsm_conf=self.conf)

    def ensure_keys(self) -> None:
        ensure_keys(self.module, self.label, self.user_pin, softhsm_conf=self.conf)


@dataclass(frozen=True)
class SoftHsmDir:
    conf: Path
    token_dir: Path

    def new_token(self, *, keys: bool = True) -> SoftHsmToken:
        token = SoftHsmToken(
            conf=self.conf,
            token_dir=self.token_dir,
            label=f"test-{secrets.token_hex(6)}",
            so_pin=secrets.token_hex(8),
            user_pin=secrets.token_hex(8),
        )
        init_softhsm_token(
            softhsm_conf=token.conf,
            token_dir=token.token_dir,
            module_path=token.module,
            token_label=token.label,
            so_pin=token.so_pin,
            user_pin=token.user_pin,
        )
        if keys:
            token.ensure_keys()
        return token


@pytest.fixture(scope="session")
def softhsm_dir(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmDir:
    root = tmp_path_factory.mktemp("softhsm")
    return SoftHsmDir(conf=root / "softhsm2.conf", token_dir=root / "tokens")


@pytest.fixture(scope="session")
def provisioned_token(softhsm_dir: SoftHsmDir) -> SoftHsmToken:
    """One token with the node's keys, shared by tests that do not change it."""
    return softhsm_dir.new_token()


@pytest.fixture
def hsm_store(provisioned_token: SoftHsmToken) -> Iterator[Pkcs11KeyStore]:
    store = provisioned_token.open()
    yield store
    store.close()


def _open(request: pytest.FixtureRequest, *, own_token: bool) -> KeyStore:
    if request.param == "memory":
        return MemoryKeyStore()
    token: SoftHsmToken = (
        request.getfixturevalue("softhsm_dir").new_token()
        if own_token
        else request.getfixturevalue("provisioned_token")
    )
    return token.open()


@pytest.fixture(params=["memory", pytest.param("softhsm", marks=pytest.mark.softhsm)])
def keystore(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    """Every KeyStore implementation: the conformance suite runs once per backend."""
    store = _open(request, own_token=False)
    yield store
    store.close()


@pytest.fixture(params=["memory", pytest.param("softhsm", marks=pytest.mark.softhsm)])
def fresh_keystore(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    """The same, on a token of its own: what a test does to the key-encryption keys (their
    generations) stays on the token."""
    store = _open(request, own_token=True)
    yield store
    store.close()
