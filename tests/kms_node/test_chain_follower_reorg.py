"""A confirmation depth against a real reorganisation (anvil's ``anvil_reorg``): a grant
that a reorganisation shallower than ``k`` removes is never in a node's index, while a node
that judges at the head saw it and has to rebuild."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts.registry import RegistryClient
from core.record_types import RecordType
from core.registry_types import record_id_of
from deploy.anvil import AnvilProcess, mine, rpc_call, set_balance
from kms_node.chain_follower import ChainFollower
from tests.contracts.conftest import FUNDING_WEI, compressed_point, umbral_keys

pytestmark = pytest.mark.anvil


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[AnvilProcess]:
    with AnvilProcess(log_path=tmp_path / "anvil.log") as process:
        yield process


def _account(anvil: AnvilProcess) -> LocalAccount:
    account: LocalAccount = Account.create()
    set_balance(anvil.rpc_url, account.address, FUNDING_WEI)
    return account


def test_a_grant_a_shallower_reorganisation_removes_is_never_indexed(
    anvil: AnvilProcess,
) -> None:
    admin = _account(anvil)
    registry = RegistryClient.deploy(anvil.rpc_url, admin)
    patient, doctor = _account(anvil), _account(anvil)
    registry.grant_provider_role(admin, doctor.address)
    registry.register_patient(patient, umbral_keys(), compressed_point())
    capsule = os.urandom(32)
    registry.anchor_record(
        patient,
        patient=patient.address,
        content_hash=os.urandom(32),
        storage_uri="blob:test",
        record_type=RecordType.LAB_RESULT,
        capsule_hash=capsule,
    )
    record = record_id_of(patient.address, capsule)
    mine(anvil.rpc_url, 5)
    at_head = ChainFollower(registry)
    deep = ChainFollower(registry, confirmations=3)

    registry.grant_access(
        patient,
        grantee=doctor.address,
        grantee_umbral_key=compressed_point(),
        expires_at=registry.latest_block()[1] + 3600,
        allowed_types_mask=1 << RecordType.LAB_RESULT,
    )
    mine(anvil.rpc_url, 2)  # the grant is 2 blocks below the head
    for follower in (at_head, deep):
        follower.sync_once()
    assert at_head.access_state(record, doctor.address, capsule).grant is not None
    assert deep.access_state(record, doctor.address, capsule).grant is None

    # The last 3 blocks, the grant's among them, are replaced by empty ones.
    rpc_call(anvil.rpc_url, "anvil_reorg", [3, []])
    mine(anvil.rpc_url, 5)
    for follower in (at_head, deep):
        follower.sync_once()
    assert at_head.access_state(record, doctor.address, capsule).grant is None
    assert deep.access_state(record, doctor.address, capsule).grant is None
    assert deep.index_block() == registry.latest_block()[0] - 3
