"""The web3 adapter for the registry contract (``contracts/src/Registry.sol``).

Everything on-chain goes through ``RegistryClient``. No web3, eth-* or requests exception
leaves this module: transport trouble becomes ``ChainUnavailable``, a revert becomes
``ChainRejected`` whose ``reason`` is the contract's custom error name (decoded by matching the
4-byte selector against the ABI), and malformed arguments are refused with ``InvalidRequest``
before anything is sent.

Transactions are signed locally with the ``LocalAccount`` passed to each call; the client keeps
no key and its repr shows only the chain endpoint and the contract address.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import eth_abi.exceptions
import eth_utils.exceptions
from eth_abi.abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.abi import collapse_if_tuple
from eth_utils.address import is_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import Contract, ContractConstructor, ContractFunction
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
from web3.types import BlockIdentifier, RPCEndpoint, TxParams, TxReceipt

from contracts.build import load_artifact
from contracts.json_rpc import BoundedHTTPProvider
from core.bounded_json import JSON_RPC_MAX_BYTES
from core.errors import ChainRejected, ChainUnavailable, InvalidRequest, KmsError
from core.kfrag_delivery import load_delivery_public_key
from core.record_types import ALL_TYPES_MASK, RecordType
from core.registry_interface import Sender
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    AccessState,
    BlockRef,
    CheckpointAnchor,
    EmergencyAccessOpened,
    EmergencyOptIn,
    EmergencyOptInChanged,
    EmergencyRoleChanged,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    PatientRegistered,
    RecordAnchored,
    RecordDeactivated,
    RecordInfo,
    RegistryEvent,
)
from core.request_auth import Domain

# The value types live in core (the policy judges them without importing web3); re-exported
# here because this adapter is what produces them.
__all__ = [
    "AccessState",
    "GrantInfo",
    "NodeInfo",
    "PatientInfo",
    "RecordInfo",
    "RegistryClient",
]

PROVIDER_ROLE = Web3.keccak(text="PROVIDER_ROLE")
NODE_ADMIN_ROLE = Web3.keccak(text="NODE_ADMIN_ROLE")
EMERGENCY_ROLE = Web3.keccak(text="EMERGENCY_ROLE")

# Limits the contract enforces; checked here too so that bad input never costs a round trip.
COMPRESSED_POINT_BYTES = 33
MAX_STORAGE_URI_BYTES = 256
MAX_NODE_ID_BYTES = 32
MAX_ENDPOINT_BYTES = 256
MAX_SIGNING_KEY_BYTES = 256
MAX_CHECKPOINT_SIGNATURE_BYTES = 256
#: the contract's MAX_EMERGENCY_DURATION
MAX_EMERGENCY_DURATION_S = 4 * 3600
_UINT64_MAX = 2**64 - 1
_ZERO_ADDRESS = "0x" + "00" * 20
_ZERO_32 = b"\x00" * 32

# Anything the web3 stack raises once a request is under way; see _Chain.translate().
_CHAIN_ERRORS: tuple[type[BaseException], ...] = (
    Web3Exception,
    OSError,
    eth_utils.exceptions.ValidationError,
)
# What web3's formatters and this adapter's decoding raise on an answer of the wrong shape (a
# string where a block belongs, a missing field, a list for a log, bad hex, an undecodable
# result): the endpoint answered, but nonsense. RecursionError: defence in depth, the
# answer's nesting is bounded before it is decoded (contracts/json_rpc.py).
_MALFORMED_ANSWER_ERRORS: tuple[type[BaseException], ...] = (
    BadResponseFormat,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    RecursionError,
    eth_abi.exceptions.DecodingError,
)


# ---------------------------------------------------------------- input checks


def _address(value: object, what: str) -> ChecksumAddress:
    # is_address also rejects mixed-case addresses whose EIP-55 checksum is wrong.
    if not isinstance(value, str) or not is_address(value):
        raise InvalidRequest(f"{what} is not an Ethereum address: {value!r}")
    return Web3.to_checksum_address(value)


def _bytes32(value: object, what: str, *, nonzero: bool = True) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise InvalidRequest(f"{what} must be 32 bytes")
    if nonzero and value == _ZERO_32:
        raise InvalidRequest(f"{what} must not be all zeros")
    return value


def _compressed_point(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != COMPRESSED_POINT_BYTES:
        raise InvalidRequest(f"{what} must be a {COMPRESSED_POINT_BYTES}-byte compressed point")
    if value[0] not in (2, 3):
        raise InvalidRequest(f"{what} must start with 0x02 or 0x03 (compressed point)")
    return value


def _text(value: object, what: str, max_bytes: int) -> str:
    if not isinstance(value, str) or not 1 <= len(value.encode("utf-8")) <= max_bytes:
        raise InvalidRequest(f"{what} must be 1..{max_bytes} bytes of UTF-8 text")
    return value


def _record_type(value: object) -> RecordType:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"record_type must be a RecordType, not {value!r}")
    try:
        return RecordType(value)
    except ValueError:
        raise InvalidRequest(f"unknown record type {value!r}") from None


def _redacted_url(url: str) -> str:
    """scheme://host:port only: hosted RPC URLs often carry an API key in the path or userinfo."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(unparsable URL)"


# ------------------------------------------------------------------- transport


class _Chain:
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
            # web3 asks eth_chainId before each call unless cached (ARCHITECTURE.md). Only the
            # chain id is cached: caching blocks or calls would serve stale grant state.
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
    def translate(self, op: str) -> Iterator[None]:
        try:
            yield
        except ChainUnavailable as e:
            # From the transport or a decoding check: name the operation too.
            raise ChainUnavailable(f"{op}: {e.message}") from e
        except KmsError:
            raise
        except ContractLogicError as e:
            raise self._rejected(op, e) from e
        except TimeExhausted as e:
            raise ChainUnavailable(
                f"{op}: transaction not mined within {self.timeout_s}s at {self.safe_url}"
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
            # The node refused the request itself (nonce, funds, gas): not a contract revert.
            raise ChainRejected(f"chain refused {op}: {_clip(e.message)}") from e
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
        with self.translate(op):
            with self._send_lock:
                sender_address = Web3.to_checksum_address(sender.address)
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
                tx_hash, timeout=self.timeout_s, poll_latency=0.05
            )
        if receipt["status"] != 1:
            # Estimation passed but execution reverted: the state changed in between.
            raise ChainRejected(
                f"registry rejected {op}: transaction {Web3.to_hex(tx_hash)} reverted"
            )
        return receipt


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


# ---------------------------------------------------------------------- client


class RegistryClient:
    """Typed access to one deployed registry; safe to share between threads."""

    def __init__(
        self,
        rpc_url: str,
        address: str,
        *,
        timeout_s: float = 10.0,
        max_response_bytes: int = JSON_RPC_MAX_BYTES,
    ) -> None:
        """``timeout_s`` bounds each JSON-RPC call in all (not each read), and
        ``max_response_bytes`` each answer, as it is read."""
        self.address: ChecksumAddress = _address(address, "registry address")
        self.rpc_url = rpc_url
        abi = load_artifact()["abi"]
        self._chain = _Chain(rpc_url, timeout_s, abi, max_response_bytes)
        self._contract: Contract = self._chain.w3.eth.contract(
            address=self.address,
            abi=abi,
            decode_tuples=True,  # structs come back as named tuples
        )
        self._anchor_topic = next(
            _event_topic(e) for e in abi if e.get("name") == "CheckpointAnchored"
        )
        # topic0 -> the contract event a grant index follows
        self._events: dict[bytes, Any] = {
            _event_topic(entry): getattr(self._contract.events, entry["name"])
            for entry in abi
            if entry.get("type") == "event" and entry["name"] in _FOLLOWED_EVENTS
        }

    def __repr__(self) -> str:
        return f"RegistryClient(rpc_url={self._chain.safe_url!r}, address={self.address!r})"

    @classmethod
    def deploy(
        cls, rpc_url: str, deployer: LocalAccount, *, timeout_s: float = 10.0
    ) -> RegistryClient:
        """Deploy a fresh registry; the deployer becomes admin and node admin."""
        artifact = load_artifact()
        chain = _Chain(rpc_url, timeout_s, artifact["abi"])
        factory = chain.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        receipt = chain.transact(deployer, "deploy", factory.constructor())
        address = receipt.get("contractAddress")
        if not address:
            raise ChainUnavailable("deploy: the receipt names no contract address")
        return cls(rpc_url, address, timeout_s=timeout_s)

    # ---------------------------------------------------------------- chain

    def chain_id(self) -> int:
        with self._chain.translate("chain_id"):
            return int(self._chain.w3.eth.chain_id)

    def signing_domain(self) -> Domain:
        """The EIP-712 domain of requests and enrollments judged against this registry:
        signatures are valid for this contract on this chain only."""
        return Domain(self.chain_id(), self.address)

    def latest_block(self) -> tuple[int, int]:
        """(number, timestamp) of the latest block."""
        block = self.block("latest")
        return block.number, block.timestamp

    def block(self, identifier: int | str = "latest") -> BlockRef:
        """Number, hash and timestamp of a block ("latest" or a number)."""
        if isinstance(identifier, str) and identifier != "latest":
            raise InvalidRequest("block: identifier must be a block number or 'latest'")
        which: BlockIdentifier = identifier if isinstance(identifier, int) else "latest"
        with self._chain.translate("get_block"):
            return _block_ref(self._chain.w3.eth.get_block(which))

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        """The registry's patient, record and grant events in [from_block, to_block], in
        chain order, each with its block's timestamp; other events are skipped."""
        if not 0 <= from_block <= to_block:
            raise InvalidRequest("events: need 0 <= from_block <= to_block")
        with self._chain.translate("get_logs"):
            logs = self._chain.w3.eth.get_logs(
                {"address": self.address, "fromBlock": from_block, "toBlock": to_block}
            )
            timestamps: dict[int, int] = {}
            decoded: list[RegistryEvent] = []
            for log in logs:
                topics = log.get("topics") or []
                event = self._events.get(bytes(topics[0])) if topics else None
                if event is None:
                    continue
                number = int(log["blockNumber"])
                if number not in timestamps:
                    timestamps[number] = _block_ref(self._chain.w3.eth.get_block(number)).timestamp
                data = event().process_log(log)
                followed = _event(data["event"], data["args"], number, timestamps[number])
                if followed is not None:
                    decoded.append(followed)
            return decoded

    def block_of_transaction(self, tx_hash: str) -> int:
        """The block a mined transaction is in."""
        with self._chain.translate("get_transaction_receipt"):
            mined = self._chain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            return int(mined["blockNumber"])

    # --------------------------------------------------------- transactions

    def _transact(self, sender: Sender, op: str, fn: ContractFunction) -> str:
        receipt = self._chain.transact(sender, op, fn)
        return Web3.to_hex(receipt["transactionHash"])

    def grant_provider_role(self, admin: LocalAccount, provider: str) -> str:
        fn = self._contract.functions.grantRole(PROVIDER_ROLE, _address(provider, "provider"))
        return self._transact(admin, "grantRole", fn)

    def grant_emergency_role(self, admin: LocalAccount, responder: str) -> str:
        fn = self._contract.functions.grantRole(EMERGENCY_ROLE, _address(responder, "responder"))
        return self._transact(admin, "grantRole", fn)

    def revoke_emergency_role(self, admin: LocalAccount, responder: str) -> str:
        """Take EMERGENCY_ROLE away: every emergency window the responder has open ends."""
        fn = self._contract.functions.revokeRole(EMERGENCY_ROLE, _address(responder, "responder"))
        return self._transact(admin, "revokeRole", fn)

    def register_patient(
        self, patient: LocalAccount, umbral_public_keys: Sequence[bytes], verifying_key: bytes
    ) -> str:
        """Register per-record-type Umbral keys (one per ``RecordType``, in order)."""
        if isinstance(umbral_public_keys, bytes | str) or not isinstance(
            umbral_public_keys, Sequence
        ):
            raise InvalidRequest("umbral_public_keys must be a sequence of keys")
        if len(umbral_public_keys) != len(RecordType):
            raise InvalidRequest(
                f"umbral_public_keys: need one key per record type ({len(RecordType)})"
            )
        keys = b"".join(
            _compressed_point(k, f"umbral_public_keys[{i}]")
            for i, k in enumerate(umbral_public_keys)
        )
        fn = self._contract.functions.registerPatient(
            keys, _compressed_point(verifying_key, "verifying_key")
        )
        return self._transact(patient, "registerPatient", fn)

    def anchor_record(
        self,
        sender: LocalAccount,
        *,
        patient: str,
        content_hash: bytes,
        storage_uri: str,
        record_type: RecordType,
        capsule_hash: bytes,
    ) -> str:
        """Anchor a record, sent by the patient or a provider she authorised
        (:meth:`set_record_writer`). Its id is ``record_id_of(patient, capsule_hash)``."""
        fn = self._contract.functions.anchorRecord(
            _address(patient, "patient"),
            _bytes32(content_hash, "content_hash"),
            _text(storage_uri, "storage_uri", MAX_STORAGE_URI_BYTES),
            int(_record_type(record_type)),
            _bytes32(capsule_hash, "capsule_hash"),
        )
        return self._transact(sender, "anchorRecord", fn)

    def set_record_writer(self, patient: LocalAccount, writer: str, *, allowed: bool) -> str:
        """Let a provider anchor records for the patient (or stop it)."""
        fn = self._contract.functions.setRecordWriter(_address(writer, "writer"), bool(allowed))
        return self._transact(patient, "setRecordWriter", fn)

    def deactivate_record(self, patient: LocalAccount, record_id: bytes) -> str:
        fn = self._contract.functions.deactivateRecord(_bytes32(record_id, "record_id"))
        return self._transact(patient, "deactivateRecord", fn)

    def grant_access(
        self,
        patient: LocalAccount,
        *,
        grantee: str,
        grantee_umbral_key: bytes,
        expires_at: int,
        allowed_types_mask: int,
    ) -> str:
        if isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise InvalidRequest("expires_at must be an int (unix seconds)")
        if not 0 < expires_at <= _UINT64_MAX:
            raise InvalidRequest("expires_at out of range")
        fn = self._contract.functions.grantAccess(
            _address(grantee, "grantee"),
            _compressed_point(grantee_umbral_key, "grantee_umbral_key"),
            expires_at,
            _types_mask(allowed_types_mask),
        )
        return self._transact(patient, "grantAccess", fn)

    def revoke_access(self, patient: LocalAccount, grantee: str) -> str:
        fn = self._contract.functions.revokeAccess(_address(grantee, "grantee"))
        return self._transact(patient, "revokeAccess", fn)

    def opt_in_emergency(
        self,
        patient: LocalAccount,
        *,
        responder: str,
        responder_umbral_key: bytes,
        allowed_types_mask: int,
    ) -> str:
        fn = self._contract.functions.optInEmergency(
            _address(responder, "responder"),
            _compressed_point(responder_umbral_key, "responder_umbral_key"),
            _types_mask(allowed_types_mask),
        )
        return self._transact(patient, "optInEmergency", fn)

    def opt_out_emergency(self, patient: LocalAccount, responder: str) -> str:
        fn = self._contract.functions.optOutEmergency(_address(responder, "responder"))
        return self._transact(patient, "optOutEmergency", fn)

    def open_emergency_access(
        self, responder: LocalAccount, *, patient: str, duration_s: int
    ) -> str:
        if isinstance(duration_s, bool) or not isinstance(duration_s, int):
            raise InvalidRequest("duration_s must be an int")
        if not 0 < duration_s <= MAX_EMERGENCY_DURATION_S:
            raise InvalidRequest(
                f"an emergency grant lasts 1 to {MAX_EMERGENCY_DURATION_S} s, got {duration_s}"
            )
        fn = self._contract.functions.openEmergencyAccess(_address(patient, "patient"), duration_s)
        return self._transact(responder, "openEmergencyAccess", fn)

    def register_node(
        self,
        admin: LocalAccount,
        *,
        node_id: str,
        endpoint: str,
        signing_public_key: bytes,
        delivery_public_key: bytes,
        account: str,
    ) -> str:
        key = signing_public_key
        if not isinstance(key, bytes) or not 1 <= len(key) <= MAX_SIGNING_KEY_BYTES:
            raise InvalidRequest(f"signing_public_key must be 1..{MAX_SIGNING_KEY_BYTES} bytes")
        fn = self._contract.functions.registerNode(
            _text(node_id, "node_id", MAX_NODE_ID_BYTES),
            _text(endpoint, "endpoint", MAX_ENDPOINT_BYTES),
            key,
            _delivery_key(delivery_public_key),
            _address(account, "account"),
        )
        return self._transact(admin, "registerNode", fn)

    def anchor_checkpoint(
        self,
        node: Sender,
        *,
        node_id: str,
        tree_size: int,
        root_hash: bytes,
        timestamp: int,
        signature: bytes,
    ) -> str:
        """Anchor a node's signed checkpoint, sent from the node's own account."""
        for name, value in (("tree_size", tree_size), ("timestamp", timestamp)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 < value <= _UINT64_MAX
            ):
                raise InvalidRequest(f"{name} must be a positive uint64")
        if (
            not isinstance(signature, bytes)
            or not 1 <= len(signature) <= MAX_CHECKPOINT_SIGNATURE_BYTES
        ):
            raise InvalidRequest(f"signature must be 1..{MAX_CHECKPOINT_SIGNATURE_BYTES} bytes")
        fn = self._contract.functions.anchorCheckpoint(
            _text(node_id, "node_id", MAX_NODE_ID_BYTES),
            tree_size,
            _bytes32(root_hash, "root_hash", nonzero=False),
            timestamp,
            signature,
        )
        return self._transact(node, "anchorCheckpoint", fn)

    def set_node_active(self, admin: LocalAccount, *, node_id: str, active: bool) -> str:
        fn = self._contract.functions.setNodeActive(
            _text(node_id, "node_id", MAX_NODE_ID_BYTES), bool(active)
        )
        return self._transact(admin, "setNodeActive", fn)

    # ---------------------------------------------------------------- views

    def get_patient(self, address: str) -> PatientInfo | None:
        patient = _address(address, "patient")
        p = self._chain.call("getPatient", self._contract.functions.getPatient(patient))
        if len(p.umbralKeys) == 0:
            return None
        return PatientInfo(patient, _split_keys(bytes(p.umbralKeys)), bytes(p.verifyingKey))

    def get_record(self, record_id: bytes) -> RecordInfo | None:
        rid = _bytes32(record_id, "record_id", nonzero=False)
        r = self._chain.call("getRecord", self._contract.functions.getRecord(rid))
        with self._chain.translate("getRecord"):
            return _record(rid, r)

    def record_of_capsule(self, capsule_hash: bytes) -> bytes | None:
        """The id of the record that carries this capsule, or None if none ever did."""
        digest = _bytes32(capsule_hash, "capsule_hash", nonzero=False)
        fn = self._contract.functions.recordOfCapsule(digest)
        record_id = bytes(self._chain.call("recordOfCapsule", fn))
        return None if record_id == _ZERO_32 else record_id

    def is_record_writer(self, patient: str, writer: str) -> bool:
        fn = self._contract.functions.isRecordWriter(
            _address(patient, "patient"), _address(writer, "writer")
        )
        return bool(self._chain.call("isRecordWriter", fn))

    def get_grant(
        self, patient: str, grantee: str, *, block: int | None = None
    ) -> GrantInfo | None:
        """The grant now, or as it stood at ``block`` (needs an archive-capable chain)."""
        p, g = _address(patient, "patient"), _address(grantee, "grantee")
        at = _at(block)
        grant = self._chain.call("getGrant", self._contract.functions.getGrant(p, g), at)
        return _grant(p, g, grant)

    def get_emergency_opt_in(self, patient: str, responder: str) -> EmergencyOptIn | None:
        p, r = _address(patient, "patient"), _address(responder, "responder")
        o = self._chain.call("getEmergencyOptIn", self._contract.functions.getEmergencyOptIn(p, r))
        if len(o.responderUmbralKey) == 0:
            return None
        return EmergencyOptIn(
            p,
            r,
            bytes(o.responderUmbralKey),
            int(o.allowedTypes),
            bool(o.active),
            int(o.windowsOpened),
        )

    def latest_checkpoint(self, node_id: str) -> tuple[int, bytes, int] | None:
        """(tree size, root hash, timestamp) of the node's latest anchor, or None."""
        c = self._chain.call(
            "latestCheckpoint",
            self._contract.functions.latestCheckpoint(_text(node_id, "node_id", MAX_NODE_ID_BYTES)),
        )
        if int(c.treeSize) == 0:
            return None
        return int(c.treeSize), bytes(c.rootHash), int(c.timestamp)

    def checkpoint_anchors(
        self, node_id: str, from_block: int = 0, to_block: int | None = None
    ) -> list[CheckpointAnchor]:
        """Every checkpoint the node anchored in [from_block, to_block], in chain order."""
        key = Web3.keccak(text=_text(node_id, "node_id", MAX_NODE_ID_BYTES))
        with self._chain.translate("get_logs"):
            last = self._chain.w3.eth.block_number if to_block is None else to_block
            logs = self._chain.w3.eth.get_logs(
                {
                    "address": self.address,
                    "fromBlock": from_block,
                    "toBlock": last,
                    "topics": [HexBytes(self._anchor_topic), key],
                }
            )
            anchors = []
            for log in logs:
                args = self._contract.events.CheckpointAnchored().process_log(log)["args"]
                anchors.append(
                    CheckpointAnchor(
                        node_id=str(args.nodeId),
                        tree_size=int(args.treeSize),
                        root_hash=bytes(args.rootHash),
                        timestamp=int(args.timestamp),
                        signature=bytes(args.signature),
                        block=int(log["blockNumber"]),
                    )
                )
            return anchors

    def list_nodes(self) -> list[NodeInfo]:
        """All registered nodes (active or not), read at one block so the list is consistent."""
        with self._chain.translate("list_nodes"):
            block = self._chain.w3.eth.block_number
        count = self._chain.call("nodeCount", self._contract.functions.nodeCount(), block)
        nodes = []
        for i in range(int(count)):
            n = self._chain.call("getNode", self._contract.functions.getNode(i), block)
            if n.nodeId:
                nodes.append(
                    NodeInfo(
                        node_id=n.nodeId,
                        endpoint=n.endpoint,
                        signing_public_key=bytes(n.signingKey),
                        delivery_public_key=bytes(n.deliveryKey),
                        account=str(Web3.to_checksum_address(n.account)),
                        active=bool(n.active),
                    )
                )
        return nodes

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        """Record, grant (record's patient -> grantee), whether the capsule's record is
        deactivated, and the block judged at: one eth_call. At the latest block, or as of
        ``block`` (an auditor re-judging a past decision)."""
        rid = _bytes32(record_id, "record_id", nonzero=False)
        who = _address(grantee, "grantee")
        capsule = _bytes32(capsule_hash, "capsule_hash", nonzero=False)
        at = _at(block)
        record, grant, retired, number, timestamp = self._chain.call(
            "accessState", self._contract.functions.accessState(rid, who, capsule), at
        )
        with self._chain.translate("accessState"):
            info = _record(rid, record)
            return AccessState(
                record=info,
                grant=_grant(info.patient, who, grant) if info is not None else None,
                block_number=int(number),
                block_timestamp=int(timestamp),
                capsule_retired=bool(retired),
            )


def _block_ref(block: Any) -> BlockRef:
    """The block an endpoint answered, checked for shape: a lying endpoint's nonsense is
    refused here (with what was wrong), never judged by."""
    number, block_hash, timestamp = block["number"], block["hash"], block["timestamp"]
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ChainUnavailable(f"the chain answered a block numbered {str(number)[:40]!r}")
    if not isinstance(block_hash, bytes) or len(block_hash) != 32:
        raise ChainUnavailable(f"the chain answered block {number} without a 32-byte hash")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ChainUnavailable(f"the chain answered block {number} without a timestamp")
    return BlockRef(number, bytes(block_hash), timestamp)


def _record(record_id: bytes, r: Any) -> RecordInfo | None:
    if r.patient == _ZERO_ADDRESS:
        return None
    return RecordInfo(
        record_id=record_id,
        patient=Web3.to_checksum_address(r.patient),
        content_hash=bytes(r.contentHash),
        storage_uri=str(r.storageUri),
        record_type=RecordType(r.recordType),
        capsule_hash=bytes(r.capsuleHash),
        creator=Web3.to_checksum_address(r.creator),
        active=bool(r.active),
        created_at=int(r.createdAt),
    )


def _grant(patient: str, grantee: str, g: Any) -> GrantInfo | None:
    if len(g.granteeUmbralKey) == 0:
        return None
    return GrantInfo(
        patient=patient,
        grantee=grantee,
        grantee_umbral_key=bytes(g.granteeUmbralKey),
        expires_at=int(g.expiresAt),
        allowed_types_mask=int(g.allowedTypes),
        active=bool(g.active),
        granted_at=int(g.grantedAt),
        emergency=bool(g.emergency),
    )


def _delivery_key(key: object) -> bytes:
    point = _compressed_point(key, "delivery_public_key")
    load_delivery_public_key(point)  # on the P-256 curve, or InvalidRequest
    return point


def _at(block: int | None) -> BlockIdentifier:
    """A block to read state at: the latest, or a non-negative block number."""
    if block is None:
        return "latest"
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise InvalidRequest("block must be a non-negative block number")
    return block


def _split_keys(keys: bytes) -> tuple[bytes, ...]:
    n = COMPRESSED_POINT_BYTES
    if len(keys) != n * len(RecordType):
        raise ChainUnavailable("registry returned a patient key list of the wrong length")
    return tuple(keys[i * n : (i + 1) * n] for i in range(len(RecordType)))


def _types_mask(mask: int) -> int:
    if isinstance(mask, bool) or not isinstance(mask, int):
        raise InvalidRequest("allowed_types_mask must be an int")
    if mask == 0 or mask & ~ALL_TYPES_MASK:
        raise InvalidRequest(f"allowed_types_mask must be a nonzero subset of {ALL_TYPES_MASK:#x}")
    return mask


_FOLLOWED_EVENTS = frozenset(
    {
        "PatientRegistered",
        "RecordAnchored",
        "RecordDeactivated",
        "AccessGranted",
        "AccessRevoked",
        "EmergencyAccessOpened",
        "EmergencyOptInChanged",
        "RoleGranted",  # of EMERGENCY_ROLE only: an emergency window lasts while it is held
        "RoleRevoked",
    }
)


def _event_topic(entry: dict[str, Any]) -> bytes:
    types = ",".join(collapse_if_tuple(i) for i in entry.get("inputs", []))
    return bytes(Web3.keccak(text=f"{entry['name']}({types})"))


def _event(name: str, args: Any, block: int, timestamp: int) -> RegistryEvent | None:
    """The followed event ``name`` as its registry type; None for the role events of
    roles other than EMERGENCY_ROLE."""

    def addr(value: str) -> str:
        return str(Web3.to_checksum_address(value))

    if name == "PatientRegistered":
        return PatientRegistered(
            block,
            timestamp,
            addr(args.patient),
            _split_keys(bytes(args.umbralKeys)),
            bytes(args.verifyingKey),
        )
    if name == "RecordAnchored":
        return RecordAnchored(
            block,
            timestamp,
            bytes(args.recordId),
            addr(args.patient),
            RecordType(args.recordType),
            addr(args.creator),
            bytes(args.contentHash),
            bytes(args.capsuleHash),
        )
    if name == "RecordDeactivated":
        return RecordDeactivated(block, timestamp, bytes(args.recordId), addr(args.patient))
    if name == "AccessGranted":
        return AccessGranted(
            block,
            timestamp,
            addr(args.patient),
            addr(args.grantee),
            bytes(args.granteeUmbralKey),
            int(args.expiresAt),
            int(args.allowedTypes),
        )
    if name == "AccessRevoked":
        return AccessRevoked(block, timestamp, addr(args.patient), addr(args.grantee))
    if name == "EmergencyAccessOpened":
        return EmergencyAccessOpened(
            block,
            timestamp,
            addr(args.patient),
            addr(args.responder),
            bytes(args.responderUmbralKey),
            int(args.expiresAt),
            int(args.allowedTypes),
        )
    if name == "EmergencyOptInChanged":
        return EmergencyOptInChanged(
            block,
            timestamp,
            addr(args.patient),
            addr(args.responder),
            bytes(args.responderUmbralKey),
            int(args.allowedTypes),
            bool(args.active),
        )
    if name in ("RoleGranted", "RoleRevoked"):
        if bytes(args.role) != EMERGENCY_ROLE:
            return None
        return EmergencyRoleChanged(block, timestamp, addr(args.account), name == "RoleGranted")
    raise ValueError(f"not a followed event: {name}")
