"""Fixtures for the registry tests: one real anvil per session, a fresh registry per test."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys.datatypes import PrivateKey

from contracts.registry import RegistryClient
from core.record_types import RecordType
from deploy.anvil import AnvilProcess, mine, set_balance
from tests.hostile_rpc import HostileRpc

FUNDING_WEI = 10**21  # 1000 ether: far more than any test spends on gas


def compressed_point() -> bytes:
    """A valid 33-byte compressed secp256k1 public key."""
    return PrivateKey(os.urandom(32)).public_key.to_compressed_bytes()


def umbral_keys() -> tuple[bytes, ...]:
    """A patient's Umbral public keys: one fresh compressed point per record type."""
    return tuple(compressed_point() for _ in RecordType)


def registry_with_spread_patients(
    rpc_url: str, patients: int = 4, blocks_between: int = 3
) -> tuple[RegistryClient, list[str]]:
    """A fresh registry whose ``patients`` registered ``blocks_between`` blocks apart, so
    that their events span many blocks (for readers in ranges); their addresses."""
    admin: LocalAccount = Account.create()
    set_balance(rpc_url, admin.address, FUNDING_WEI)
    registry = RegistryClient.deploy(rpc_url, admin)
    addresses: list[str] = []
    for _ in range(patients):
        patient: LocalAccount = Account.create()
        set_balance(rpc_url, patient.address, FUNDING_WEI)
        registry.register_patient(patient, umbral_keys(), compressed_point())
        mine(rpc_url, blocks_between)
        addresses.append(patient.address)
    return registry, addresses


def p256_point() -> bytes:
    """A valid 33-byte compressed P-256 point, as a node's HSM delivery key."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    log_path = tmp_path_factory.mktemp("anvil") / "anvil.log"
    with AnvilProcess(log_path=log_path) as process:
        yield process


@pytest.fixture(scope="session")
def make_account(anvil: AnvilProcess) -> Callable[[], LocalAccount]:
    """Fresh, funded accounts: anvil's well-known default keys are never used."""

    def make() -> LocalAccount:
        account: LocalAccount = Account.create()
        set_balance(anvil.rpc_url, account.address, FUNDING_WEI)
        return account

    return make


@pytest.fixture
def deployer(make_account: Callable[[], LocalAccount]) -> LocalAccount:
    return make_account()


@pytest.fixture
def registry(anvil: AnvilProcess, deployer: LocalAccount) -> RegistryClient:
    return RegistryClient.deploy(anvil.rpc_url, deployer)


@pytest.fixture
def patient(registry: RegistryClient, make_account: Callable[[], LocalAccount]) -> LocalAccount:
    """A registered patient."""
    account = make_account()
    registry.register_patient(account, umbral_keys(), compressed_point())
    return account


@pytest.fixture
def provider(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> LocalAccount:
    """An account holding PROVIDER_ROLE."""
    account = make_account()
    registry.grant_provider_role(deployer, account.address)
    return account


@pytest.fixture
def responder(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> LocalAccount:
    """An account holding EMERGENCY_ROLE."""
    account = make_account()
    registry.grant_emergency_role(deployer, account.address)
    return account


@pytest.fixture
def rpc_recorder(anvil: AnvilProcess) -> Iterator[HostileRpc]:
    """A JSON-RPC pass-through in front of anvil that records the methods it forwards."""
    recorder = HostileRpc(upstream=anvil.rpc_url)
    yield recorder
    recorder.close()


@pytest.fixture
def dead_rpc_url() -> str:
    """An http URL where nothing listens; its path stands in for a hosted RPC's API key."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/some-api-key"
