"""One web3 connection to a chain, and the one place its failures are translated.

No web3, eth-* or requests exception leaves this module once a request is under way
(:meth:`ChainTransport.translate`): transport trouble and answers of the wrong shape become
``ChainUnavailable``, a revert becomes ``ChainRejected`` whose ``reason`` is the contract's
custom error name (decoded by matching the 4-byte selector against the ABI), and the chain's
own refusal of a transaction (nonce, gas) becomes ``ChainRejected`` too, and a sender that
cannot pay ``InsufficientFunds``, naming the account and how to fund it. Messages name
the endpoint by scheme, host and port only: hosted RPC URLs carry API keys.

Transactions are signed locally by the sender passed to each call (a ``LocalAccount`` or a
``TxSigner``); the transport keeps no key.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import urlsplit

import eth_abi.exceptions
import eth_utils.exceptions
from eth_abi.abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils.abi import collapse_if_tuple
from web3 import Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import (
    BadFunctionCallOutput,
    BadResponseFormat,
    ContractLogicError,
    MethodUnavailable,
    RequestTimedOut,
    TimeExhausted,
    Web3Exception,
    Web3RPCError,
)
from web3.types import BlockIdentifier, RPCEndpoint, TxParams, TxReceipt, Wei

from contracts.json_rpc import BoundedHTTPProvider, MalformedAnswer, data, quantity
from core.bounded_json import JSON_RPC_MAX_BYTES
from core.did import did_of
from core.errors import (
    ChainAnswerTooLarge,
    ChainRejected,
    ChainUnavailable,
    InsufficientFunds,
    InvalidRequest,
    KmsError,
)
from core.registry_interface import Sender
from core.registry_types import BlockRef

# Anything the web3 stack raises once a request is under way; see ChainTransport.translate().
_CHAIN_ERRORS: tuple[type[BaseException], ...] = (
    Web3Exception,
    OSError,
    eth_utils.exceptions.ValidationError,
)
# What web3's formatters and the registry adapter's decoding raise on an answer of the wrong
# shape (a string where a block belongs, a missing field, a list for a log, bad hex, an
# undecodable result): the endpoint answered, but nonsense. RecursionError: defence in depth,
# the answer's nesting is bounded before it is decoded (contracts/json_rpc.py).
_MALFORMED_ANSWER_ERRORS: tuple[type[BaseException], ...] = (
    BadResponseFormat,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    RecursionError,
    eth_abi.exceptions.DecodingError,
)


#: how endpoints refuse an eth_getLogs that asks for too much (too many blocks or
#: results), in their own words (lower case): geth, Besu, Erigon, Nethermind and hosted
#: providers each have theirs
_TOO_LARGE_WORDS: Final = (
    "block range",
    "range limit",
    "exceeds maximum",
    "exceed maximum",
    "more than",
    "too many",
    "too large",
    "response size",
    "limit exceeded",
)


def _redacted_url(url: str) -> str:
    """scheme://host:port only: hosted RPC URLs often carry an API key in the path or userinfo."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(unparsable URL)"


#: wei in one ether: the unit of every balance and amount shown to people
WEI_PER_ETHER: Final = 10**18
#: how a JSON-RPC node words a sender that cannot pay (geth, anvil, Besu, Hardhat)
_INSUFFICIENT_FUNDS: Final = "insufficient funds"

#: how long a sent transaction may wait to be mined: five blocks of a chain that mines
#: every 12 s (anvil's default mines at once; `--block-time` makes it wait)
MINING_TIMEOUT_S: Final = 60.0


class ChainTransport:
    """One web3 connection plus the translation of its failures; shared by deploy and client."""

    def __init__(
        self,
        rpc_url: str,
        timeout_s: float,
        abi: list[dict[str, Any]],
        max_response_bytes: int = JSON_RPC_MAX_BYTES,
    ) -> None:
        if not isinstance(rpc_url, str) or not rpc_url.startswith(("http://", "https://")):
            raise InvalidRequest("rpc_url must be an http(s) URL")
        if timeout_s <= 0:
            raise InvalidRequest("timeout_s must be positive")
        if max_response_bytes < 1:
            raise InvalidRequest("max_response_bytes must be positive")
        self.safe_url = _redacted_url(rpc_url)
        self.timeout_s = timeout_s
        # Every answer is bounded in size, nesting and total time (contracts/json_rpc.py);
        # retries are off: callers own the retry policy (a node refuses when chain state is
        # stale).
        provider = BoundedHTTPProvider(
            rpc_url,
            timeout_s=timeout_s,
            max_response_bytes=max_response_bytes,
            safe_url=self.safe_url,
            # web3 asks eth_chainId before each call unless cached (measured: one extra round
            # trip per read). Only the chain id is cached: caching blocks or calls would serve
            # stale grant state.
            cache_allowed_requests=True,
            cacheable_requests={RPCEndpoint("eth_chainId")},
            request_cache_validation_threshold=None,
        )
        self.w3 = Web3(provider)
        # "validation" re-checks the chain id before every eth_call (one more round trip on
        # each new thread) and rejects the long extraData of PoA blocks (Besu/QBFT); we sign
        # with the chain id the node reports anyway. ENS is never used: addresses only.
        self.w3.middleware_onion.remove("validation")
        self.w3.middleware_onion.remove("ens_name_to_address")
        # Pending nonces are only safe if this client sends one transaction at a time per
        # account; one lock per client keeps it simple (anvil mines each tx immediately).
        self._send_lock = threading.Lock()
        self._errors = _error_table(abi)

    @contextmanager
    def translate(self, op: str, sender: str | None = None) -> Iterator[None]:
        """Translate what the web3 stack raises in the block; ``sender``, the address a
        transaction is sent from, is named when the chain says it cannot pay."""
        try:
            yield
        except ChainUnavailable as e:
            # From the transport or a decoding check: name the operation too.
            same = ChainAnswerTooLarge if isinstance(e, ChainAnswerTooLarge) else ChainUnavailable
            raise same(f"{op}: {e.message}") from e
        except KmsError:
            raise
        except ContractLogicError as e:
            raise self._rejected(op, e) from e
        except TimeExhausted as e:
            raise ChainUnavailable(
                f"{op}: transaction not mined within {MINING_TIMEOUT_S:g}s at {self.safe_url}"
            ) from e
        except BadFunctionCallOutput as e:
            raise ChainUnavailable(
                f"{op}: no registry contract answered at {self.safe_url} (wrong address?)"
            ) from e
        except (MethodUnavailable, RequestTimedOut) as e:
            raise ChainUnavailable(
                f"{op}: chain at {self.safe_url} failed: {_clip(e.message)}"
            ) from e
        except Web3RPCError as e:
            raise self._refused(op, e.message or "", sender) from e
        except MalformedAnswer as e:
            raise ChainUnavailable(
                f"{op}: chain at {self.safe_url} answered malformed data: {e}"
            ) from e
        except _MALFORMED_ANSWER_ERRORS as e:
            kind = type(e).__name__
            if type(e).__module__ != "builtins":
                kind = f"{type(e).__module__}.{kind}"
            raise ChainUnavailable(
                f"{op}: chain at {self.safe_url} answered malformed data ({kind})"
            ) from e
        except _CHAIN_ERRORS as e:
            # The exception text may contain the full URL (and so an API key): name only.
            raise ChainUnavailable(
                f"{op}: chain at {self.safe_url} unavailable ({type(e).__name__})"
            ) from e

    def _refused(self, op: str, message: str, sender: str | None) -> KmsError:
        """The endpoint's JSON-RPC error for ``op``, as the error it stands for."""
        said = message.lower()
        if op == "get_logs" and any(words in said for words in _TOO_LARGE_WORDS):
            return ChainAnswerTooLarge(
                f"{op}: chain at {self.safe_url} refused it as too large: {_clip(message)}"
            )
        # The node refused the request itself (nonce, funds, gas): not a contract revert.
        if sender is not None and _INSUFFICIENT_FUNDS in said:
            return self._insufficient_funds(op, sender)
        return ChainRejected(f"chain refused {op}: {_clip(message)}")

    def request(self, op: str, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call's result as the endpoint's JSON, without web3's result
        formatters (for answers read in bulk, checked by the caller: ``eth_getLogs``). An
        error answer is refused as web3's would be (a range too large for ``get_logs``)."""
        with self.translate(op):
            # A JSON object (contracts/json_rpc.py decodes it so, or raises).
            answer = self.w3.provider.make_request(RPCEndpoint(method), params)
            error = answer.get("error")
            if error is None and "result" not in answer:
                raise BadResponseFormat("a JSON-RPC answer with neither result nor error")
            if error is not None and not isinstance(error.get("message"), str):
                raise BadResponseFormat("a JSON-RPC error without a message")
        if error is not None:
            raise self._refused(op, error["message"], None)
        return answer["result"]

    def _insufficient_funds(self, op: str, sender: str) -> InsufficientFunds:
        """The sender's DID (the chain id is cached by then) and balance, if the chain
        still answers; its address alone otherwise."""
        name, balance = sender, ""
        try:
            name = did_of(int(self.w3.eth.chain_id), sender)
            wei = int(self.w3.eth.get_balance(Web3.to_checksum_address(sender)))
            balance = f" (its balance is {wei / WEI_PER_ETHER:.6g} ether)"
        except _CHAIN_ERRORS + _MALFORMED_ANSWER_ERRORS:
            pass  # the refusal stands; only its detail is lost
        return InsufficientFunds(
            f"chain refused {op}: account {name} cannot pay for the gas{balance}; "
            f"send it ether, e.g. from the registry admin: kmsctl admin fund {name} "
            "--ether AMOUNT",
            account=sender,
        )

    def _rejected(self, op: str, e: ContractLogicError) -> ChainRejected:
        data = e.data if isinstance(e.data, str) else ""
        selector = bytes.fromhex(data[2:10]) if data.startswith("0x") and len(data) >= 10 else b""
        known = self._errors.get(selector)
        if known is not None:
            name, types, names = known
            detail = name
            if types:
                try:
                    values = abi_decode(types, bytes.fromhex(data[10:]))
                    args = ", ".join(
                        f"{n}={_show(t, v)}" for t, n, v in zip(types, names, values, strict=True)
                    )
                    detail = f"{name}({args})"
                except (eth_abi.exceptions.DecodingError, ValueError):
                    pass
            return ChainRejected(f"registry rejected {op}: {detail}", reason=name)
        # Panics and Error(string) are decoded by web3 into its message.
        message = e.message or "execution reverted"
        return ChainRejected(f"registry rejected {op}: {message}")

    def call(self, op: str, fn: ContractFunction, block: BlockIdentifier = "latest") -> Any:
        with self.translate(op):
            return fn.call(block_identifier=block)

    def transact(
        self, sender: Sender, op: str, fn: ContractFunction | ContractConstructor
    ) -> TxReceipt:
        """Build (web3 estimates gas, surfacing reverts), sign, send, wait, check."""
        if not isinstance(sender, LocalAccount) and not callable(
            getattr(sender, "sign_raw_transaction", None)
        ):
            raise InvalidRequest(f"{op}: sender must be a LocalAccount or a TxSigner")
        sender_address = Web3.to_checksum_address(sender.address)
        with self.translate(op, sender_address):
            with self._send_lock:
                params: TxParams = {
                    "from": sender_address,
                    "chainId": self.w3.eth.chain_id,
                    "nonce": self.w3.eth.get_transaction_count(sender_address, "pending"),
                }
                tx = fn.build_transaction(params)
                # eth_estimateGas runs in the latest block's context, the transaction in a
                # later one: a store of block.number that the estimate saw as a no-op SSTORE
                # (100 gas) costs 2900 when mined (an anchor right after the previous one ran
                # out of gas). Unused gas is refunded, so the headroom costs nothing.
                tx["gas"] = tx["gas"] * 5 // 4
                if isinstance(sender, LocalAccount):
                    raw = bytes(sender.sign_transaction(tx).raw_transaction)  # type: ignore[arg-type]
                else:
                    raw = sender.sign_raw_transaction(dict(tx))
                tx_hash = self.w3.eth.send_raw_transaction(raw)
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=MINING_TIMEOUT_S, poll_latency=0.05
            )
        if receipt["status"] != 1:
            # Estimation passed but execution reverted: the state changed in between.
            raise ChainRejected(
                f"registry rejected {op}: transaction {Web3.to_hex(tx_hash)} reverted"
            )
        return receipt

    def transfer(self, sender: LocalAccount, to: str, wei: int) -> TxReceipt:
        """Send ``wei`` from ``sender`` to ``to`` in a plain transaction (no contract call):
        how the registry admin funds a node's account for its checkpoint anchors."""
        if isinstance(wei, bool) or not isinstance(wei, int) or wei <= 0:
            raise InvalidRequest("transfer: the amount must be a positive number of wei")
        sender_address = Web3.to_checksum_address(sender.address)
        with self.translate("transfer", sender_address):
            with self._send_lock:
                tx: TxParams = {
                    "from": sender_address,
                    "to": Web3.to_checksum_address(to),
                    "value": Wei(wei),
                    "chainId": self.w3.eth.chain_id,
                    "nonce": self.w3.eth.get_transaction_count(sender_address, "pending"),
                    "gasPrice": self.w3.eth.gas_price,
                }
                tx["gas"] = self.w3.eth.estimate_gas(tx)
                raw = bytes(sender.sign_transaction(tx).raw_transaction)  # type: ignore[arg-type]
                tx_hash = self.w3.eth.send_raw_transaction(raw)
            # Mined on the chain's time, as every transaction here (a 12 s block may wait).
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=MINING_TIMEOUT_S, poll_latency=0.05
            )
        if receipt["status"] != 1:
            raise ChainRejected(f"transfer {Web3.to_hex(tx_hash)} failed")
        return receipt

    def balance(self, address: str) -> int:
        """The balance of ``address`` in wei, at the latest block."""
        with self.translate("balance"):
            return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))


def _clip(message: str, limit: int = 200) -> str:
    """An endpoint's own words, cut to a length a log line and a caller can take."""
    return message if len(message) <= limit else message[:limit] + "..."


def _show(abi_type: str, value: Any) -> str:
    if abi_type == "address":
        return str(Web3.to_checksum_address(value))
    if isinstance(value, bytes):
        return str(Web3.to_hex(value))
    return str(value)


def _error_table(abi: list[dict[str, Any]]) -> dict[bytes, tuple[str, list[str], list[str]]]:
    """4-byte selector -> (custom error name, argument types, argument names)."""
    table: dict[bytes, tuple[str, list[str], list[str]]] = {}
    for entry in abi:
        if entry.get("type") != "error":
            continue
        types = [collapse_if_tuple(i) for i in entry.get("inputs", [])]
        names = [str(i.get("name", "")) for i in entry.get("inputs", [])]
        signature = f"{entry['name']}({','.join(types)})"
        table[Web3.keccak(text=signature)[:4]] = (entry["name"], types, names)
    return table


def block_ref(block: Any, asked: int | str) -> BlockRef:
    """The block an endpoint answered to ``eth_getBlockByNumber`` for ``asked`` (its JSON),
    checked for shape: a lying endpoint's nonsense is refused here (with what was wrong),
    never judged by."""
    if block is None:  # as web3 reported it: the chain's answer, not a failure
        raise ChainRejected(f"chain refused get_block: block {asked} not found")
    if not isinstance(block, dict):
        raise MalformedAnswer("a block that is not a JSON object")
    number = quantity(block.get("number"))
    if number is None:
        raise MalformedAnswer(f"a block numbered {str(block.get('number'))[:40]!r}")
    block_hash = data(block.get("hash"), 32)
    if block_hash is None:
        raise MalformedAnswer(f"block {number} without a 32-byte hash")
    timestamp = quantity(block.get("timestamp"))
    if timestamp is None:
        raise MalformedAnswer(f"block {number} without a timestamp")
    return BlockRef(number, block_hash, timestamp)
