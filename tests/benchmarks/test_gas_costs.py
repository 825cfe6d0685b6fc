"""`benchmarks.gas_costs` names each transaction on a real anvil by what it did."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from benchmarks.gas_costs import gas_by_operation, table
from contracts.build import load_artifact
from contracts.chain_transport import ChainTransport
from contracts.registry import RegistryClient
from deploy.anvil import AnvilProcess, set_balance
from tests.contracts.conftest import FUNDING_WEI, compressed_point, umbral_keys

pytestmark = pytest.mark.anvil


def test_each_transaction_is_counted_under_its_operation(tmp_path: Path) -> None:
    with AnvilProcess(log_path=tmp_path / "anvil.log") as anvil:
        admin: LocalAccount = Account.create()
        patient: LocalAccount = Account.create()
        set_balance(anvil.rpc_url, admin.address, FUNDING_WEI)
        registry = RegistryClient.deploy(anvil.rpc_url, admin)
        chain = ChainTransport(anvil.rpc_url, 10.0, load_artifact()["abi"])
        chain.transfer(admin, patient.address, 10**17)
        registry.register_patient(patient, umbral_keys(), compressed_point())
        used, price = gas_by_operation(anvil.rpc_url, 1)
    assert set(used) == {"deploy", "transfer", "registerPatient"}
    assert used["transfer"] == [21_000]
    assert len(used["deploy"]) == len(used["registerPatient"]) == 1
    assert used["deploy"][0] > 1_000_000 and price > 0
    assert "| transfer | 1 | 21,000 |" in table(used, price)
