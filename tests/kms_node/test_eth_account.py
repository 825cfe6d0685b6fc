"""The node's Ethereum account on a real chain: an ETH transfer signed inside SoftHSM, on anvil."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account

from core.eth_tx import sign_transaction
from deploy.anvil import AnvilProcess, rpc_call, set_balance
from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore

pytestmark = [pytest.mark.softhsm, pytest.mark.anvil]

FUNDING_WEI = 10**18


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with AnvilProcess(log_path=tmp_path_factory.mktemp("anvil") / "anvil.log") as process:
        yield process


def _receipt(rpc_url: str, tx_hash: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        receipt = rpc_call(rpc_url, "eth_getTransactionReceipt", [tx_hash])
        if receipt is not None:
            assert isinstance(receipt, dict)
            return receipt
        assert time.monotonic() < deadline, "anvil did not mine the transaction"
        time.sleep(0.05)


def _transfer(rpc_url: str, sender: str, to: str, value: int) -> dict[str, Any]:
    base_fee = int(
        rpc_call(rpc_url, "eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16
    )
    return {
        "chainId": int(rpc_call(rpc_url, "eth_chainId", []), 16),
        "nonce": int(rpc_call(rpc_url, "eth_getTransactionCount", [sender, "pending"]), 16),
        "gas": 21_000,
        "maxPriorityFeePerGas": 10**9,
        "maxFeePerGas": 2 * base_fee + 10**9,
        "to": to,
        "value": value,
    }


def test_hsm_signed_transfer_is_mined(anvil: AnvilProcess, hsm_store: Pkcs11KeyStore) -> None:
    sender = hsm_store.eth_address()
    recipient = Account.create().address
    set_balance(anvil.rpc_url, sender, FUNDING_WEI)

    for value in (1234, 5678):  # two, so that the nonce moves on as well
        tx = _transfer(anvil.rpc_url, sender, recipient, value)
        raw = sign_transaction(tx, hsm_store.sign_eth_digest)
        tx_hash = rpc_call(anvil.rpc_url, "eth_sendRawTransaction", ["0x" + raw.hex()])
        receipt = _receipt(anvil.rpc_url, tx_hash)
        assert receipt["status"] == "0x1"
        assert receipt["from"].lower() == sender.lower()

    balance = int(rpc_call(anvil.rpc_url, "eth_getBalance", [recipient, "latest"]), 16)
    assert balance == 1234 + 5678
    nonce = int(rpc_call(anvil.rpc_url, "eth_getTransactionCount", [sender, "latest"]), 16)
    assert nonce == 2
