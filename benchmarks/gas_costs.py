"""Gas per operation, from the receipts of every transaction a chain holds (issue 12).

``python -m benchmarks.gas_costs --rpc-url URL [--from-block N]`` reads each block's
transactions and receipts and prints, per registry function (a contract creation is
``deploy``, a call without data a ``transfer``), how many were mined and the least and most
gas they used, as a Markdown table. Run it against a chain after a run of the README's
"Running across hosts" steps (or ``kmsctl cluster up`` and ``kmsctl demo``) to see what
each role pays; the README's funding table came from it.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any

from web3 import Web3

from contracts.build import load_artifact
from contracts.chain_transport import WEI_PER_ETHER


def operation(registry: Any, tx: Any) -> str:
    """What a transaction did: the registry function it called, by its selector."""
    if tx["to"] is None:
        return "deploy"
    data = bytes(tx["input"])
    if not data:
        return "transfer"
    try:
        function, _ = registry.decode_function_input(data)
    except ValueError:
        return "other 0x" + data[:4].hex()
    return str(function.fn_name)


def gas_by_operation(rpc_url: str, from_block: int) -> tuple[dict[str, list[int]], int]:
    """Gas used per operation, and the last effective gas price seen (wei)."""
    w3 = Web3(Web3.HTTPProvider(rpc_url))
    registry = w3.eth.contract(abi=load_artifact()["abi"])
    used: dict[str, list[int]] = defaultdict(list)
    price = 0
    for number in range(from_block, w3.eth.block_number + 1):
        block: Any = w3.eth.get_block(number, full_transactions=True)
        for tx in block["transactions"]:
            receipt = w3.eth.get_transaction_receipt(tx["hash"])
            used[operation(registry, tx)].append(int(receipt["gasUsed"]))
            price = int(receipt["effectiveGasPrice"])
    return used, price


def table(used: dict[str, list[int]], price_wei: int) -> str:
    lines = [
        "| operation | transactions | gas (least-most) | ether at the last gas price |",
        "| --- | --- | --- | --- |",
    ]
    for name, gas in sorted(used.items()):
        span = f"{min(gas):,}" if min(gas) == max(gas) else f"{min(gas):,}-{max(gas):,}"
        ether = max(gas) * price_wei / WEI_PER_ETHER
        lines.append(f"| {name} | {len(gas)} | {span} | {ether:.6f} |")
    lines.append(f"\nlast effective gas price: {price_wei / 10**9:.3f} gwei")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc-url", required=True, help="the chain's JSON-RPC URL")
    parser.add_argument("--from-block", type=int, default=1, help="first block to read")
    args = parser.parse_args(argv)
    used, price = gas_by_operation(args.rpc_url, args.from_block)
    print(table(used, price))
    return 0


if __name__ == "__main__":
    sys.exit(main())
