"""An endpoint that refuses eth_getLogs over too many blocks (geth's range limit, on a real
anvil behind tests/hostile_rpc.py): the follower halves its range and catches up. One that
alters the logs it forwards: the follower refuses them, and its index stays as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts.registry import RegistryClient
from core.errors import ChainAnswerTooLarge, ChainUnavailable
from deploy.anvil import AnvilProcess, mine, set_balance
from kms_node.chain_follower import ChainFollower
from tests.contracts.conftest import (
    FUNDING_WEI,
    compressed_point,
    registry_with_spread_patients,
    umbral_keys,
)
from tests.hostile_rpc import HostileRpc, assert_halved_down_to, block_range_limit, tampered

pytestmark = pytest.mark.anvil


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[AnvilProcess]:
    with AnvilProcess(log_path=tmp_path / "anvil.log") as process:
        yield process


def test_a_range_the_endpoint_refuses_is_halved_until_it_answers(
    anvil: AnvilProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, patients = registry_with_spread_patients(anvil.rpc_url)
    rpc = HostileRpc(upstream=anvil.rpc_url)
    try:
        rpc.misbehave(block_range_limit(rpc, 5), "eth_getLogs")
        limited = RegistryClient(rpc.url, registry.address)
        monkeypatch.setattr("core.event_ranges.FIRST_RANGE_BLOCKS", 40)
        follower = ChainFollower(limited)
        follower.sync_once()
        assert all(follower.index.is_registered(p) for p in patients)
        assert follower.index_block() == registry.latest_block()[0]
        # The whole chain refused, then half of it, and so on until at most 5 blocks; every
        # later call asks for no more.
        assert_halved_down_to(rpc, registry.latest_block()[0] + 1, 5)

        # One block's events refused: nothing smaller to ask for, so the sync fails.
        rpc.misbehave(block_range_limit(rpc, 0), "eth_getLogs")
        mine(anvil.rpc_url, 1)
        with pytest.raises(ChainAnswerTooLarge, match="exceed maximum block range"):
            follower.sync_once()
    finally:
        rpc.close()


def _first_log(edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Any], Any]:
    return lambda logs: [edit(logs[0]), *logs[1:]]


TAMPERED: dict[str, tuple[Callable[[Any], Any], str]] = {
    "a-topic-dropped": (
        _first_log(lambda log: {**log, "topics": log["topics"][:1]}),
        "PatientRegistered log in block",
    ),
    "data-cut-short": (
        _first_log(lambda log: {**log, "data": log["data"][:100]}),
        "does not decode by the ABI",
    ),
    "another-contract": (
        _first_log(lambda log: {**log, "address": "0x" + "77" * 20}),
        "not from the contract asked about",
    ),
    "a-block-outside-the-range": (
        _first_log(lambda log: {**log, "blockNumber": hex(10**6)}),
        "outside the blocks asked for",
    ),
}


@pytest.mark.parametrize(("edit", "reason"), TAMPERED.values(), ids=TAMPERED.keys())
def test_a_malformed_log_is_refused_and_the_index_left_as_it_was(
    anvil: AnvilProcess, edit: Callable[[Any], Any], reason: str
) -> None:
    admin: LocalAccount = Account.create()
    set_balance(anvil.rpc_url, admin.address, FUNDING_WEI)
    registry = RegistryClient.deploy(anvil.rpc_url, admin)
    patient: LocalAccount = Account.create()
    set_balance(anvil.rpc_url, patient.address, FUNDING_WEI)
    rpc = HostileRpc(upstream=anvil.rpc_url)
    try:
        follower = ChainFollower(RegistryClient(rpc.url, registry.address))
        follower.sync_once()
        synced = follower.index_block()
        registry.register_patient(patient, umbral_keys(), compressed_point())
        rpc.misbehave(tampered(rpc, edit), "eth_getLogs")
        with pytest.raises(ChainUnavailable, match=f"malformed data: .*{reason}"):
            follower.sync_once()
        assert follower.index_block() == synced
        assert not follower.index.is_registered(patient.address)
        # The endpoint honest again: the registration is read.
        rpc.behave()
        follower.sync_once()
        assert follower.index.is_registered(patient.address)
    finally:
        rpc.close()
