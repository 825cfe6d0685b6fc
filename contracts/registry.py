"""The web3 adapter for the registry contract (``contracts/src/Registry.sol``).

Everything on-chain goes through ``RegistryClient``, which implements the interfaces of
``core/registry_interface.py``. It is put together from one module per idea:

- ``contracts/chain_transport.py``: the web3 connection, sending transactions, and the one
  place web3's exceptions become ``ChainUnavailable`` / ``ChainRejected``;
- ``contracts/registry_arguments.py``: the contract's roles and limits, and the checks that
  refuse a malformed argument with ``InvalidRequest`` before anything is sent;
- ``contracts/registry_views.py``: view answers decoded into core values;
- ``contracts/registry_events.py``: event logs decoded into core values.

Transactions are signed locally with the sender passed to each call; the client keeps
no key and its repr shows only the chain endpoint and the contract address.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract.contract import Contract, ContractFunction

from contracts import registry_arguments as arg
from contracts import registry_views as views
from contracts.build import load_artifact
from contracts.chain_transport import ChainTransport, block_ref
from contracts.event_logs import EventDecoder, Log, checked_logs
from contracts.json_rpc import MalformedAnswer
from contracts.registry_events import FollowedEvent, checkpoint_anchor, followed_events
from core.bounded_json import JSON_RPC_MAX_BYTES
from core.errors import ChainUnavailable, InvalidRequest
from core.node_identity import MAX_NODE_ID_BYTES
from core.record_types import RecordType
from core.registry_interface import Sender
from core.registry_types import (
    AccessState,
    BlockRef,
    CheckpointAnchor,
    EmergencyOptIn,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    RecordInfo,
    RegistryEvent,
)
from core.request_auth import Domain


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
        self.address: ChecksumAddress = arg.address(address, "registry address")
        self.rpc_url = rpc_url
        abi = load_artifact()["abi"]
        self._chain = ChainTransport(rpc_url, timeout_s, abi, max_response_bytes)
        self._contract: Contract = self._chain.w3.eth.contract(
            address=self.address,
            abi=abi,
            decode_tuples=True,  # structs come back as named tuples
        )
        self._anchors = EventDecoder(next(e for e in abi if e.get("name") == "CheckpointAnchored"))
        # topic0 -> the decoder of an event a grant index follows
        self._followed: dict[bytes, FollowedEvent] = followed_events(abi)

    def __repr__(self) -> str:
        return f"RegistryClient(rpc_url={self._chain.safe_url!r}, address={self.address!r})"

    @classmethod
    def deploy(
        cls, rpc_url: str, deployer: LocalAccount, *, timeout_s: float = 10.0
    ) -> RegistryClient:
        """Deploy a fresh registry; the deployer becomes admin and node admin."""
        artifact = load_artifact()
        chain = ChainTransport(rpc_url, timeout_s, artifact["abi"])
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
        if isinstance(identifier, int) and identifier < 0:
            raise InvalidRequest("block: a block number is >= 0")
        tag = hex(identifier) if isinstance(identifier, int) else "latest"
        # Its JSON, not web3's formatted block: a block's transaction hashes (thousands in a
        # full one) are not read, only its number, hash and timestamp.
        answer = self._chain.request("get_block", "eth_getBlockByNumber", [tag, False])
        with self._chain.translate("get_block"):
            return block_ref(answer, identifier)

    def events(self, from_block: int, to_block: int) -> list[RegistryEvent]:
        """The registry's patient, record and grant events in [from_block, to_block], in
        chain order, each with its block's timestamp; other events are skipped. Logs are
        checked and decoded by the ABI (``contracts/event_logs.py``): a malformed one is
        ``ChainUnavailable``, never skipped."""
        if not 0 <= from_block <= to_block:
            raise InvalidRequest("events: need 0 <= from_block <= to_block")
        answer = self._logs(from_block, to_block)
        timestamps: dict[int, int] = {}
        decoded: list[RegistryEvent] = []
        with self._chain.translate("get_logs"):
            for log in checked_logs(answer, self.address, from_block, to_block):
                followed = self._followed.get(log.topics[0]) if log.topics else None
                if followed is None:
                    continue
                if log.block not in timestamps:
                    timestamps[log.block] = self.block(log.block).timestamp
                event = followed.decode(log, timestamps[log.block])
                if event is not None:
                    decoded.append(event)
        return decoded

    def _logs(self, from_block: int, to_block: int, *topics: bytes) -> Any:
        """The registry's logs in [from_block, to_block] (with these leading topics), as
        the endpoint's JSON: each is checked where it is read."""
        query: dict[str, Any] = {
            "address": self.address,
            "fromBlock": hex(from_block),
            "toBlock": hex(to_block),
        }
        if topics:
            query["topics"] = ["0x" + topic.hex() for topic in topics]
        return self._chain.request("get_logs", "eth_getLogs", [query])

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
        fn = self._contract.functions.grantRole(
            arg.PROVIDER_ROLE, arg.address(provider, "provider")
        )
        return self._transact(admin, "grantRole", fn)

    def grant_emergency_role(self, admin: LocalAccount, responder: str) -> str:
        fn = self._contract.functions.grantRole(
            arg.EMERGENCY_ROLE, arg.address(responder, "responder")
        )
        return self._transact(admin, "grantRole", fn)

    def revoke_emergency_role(self, admin: LocalAccount, responder: str) -> str:
        """Take arg.EMERGENCY_ROLE away: every emergency window the responder has open ends."""
        fn = self._contract.functions.revokeRole(
            arg.EMERGENCY_ROLE, arg.address(responder, "responder")
        )
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
            arg.compressed_point(k, f"umbral_public_keys[{i}]")
            for i, k in enumerate(umbral_public_keys)
        )
        fn = self._contract.functions.registerPatient(
            keys, arg.compressed_point(verifying_key, "verifying_key")
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
            arg.address(patient, "patient"),
            arg.bytes32(content_hash, "content_hash"),
            arg.text(storage_uri, "storage_uri", arg.MAX_STORAGE_URI_BYTES),
            int(arg.record_type(record_type)),
            arg.bytes32(capsule_hash, "capsule_hash"),
        )
        return self._transact(sender, "anchorRecord", fn)

    def set_record_writer(self, patient: LocalAccount, writer: str, *, allowed: bool) -> str:
        """Let a provider anchor records for the patient (or stop it)."""
        fn = self._contract.functions.setRecordWriter(arg.address(writer, "writer"), bool(allowed))
        return self._transact(patient, "setRecordWriter", fn)

    def deactivate_record(self, patient: LocalAccount, record_id: bytes) -> str:
        fn = self._contract.functions.deactivateRecord(arg.bytes32(record_id, "record_id"))
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
        if not 0 < expires_at <= arg.UINT64_MAX:
            raise InvalidRequest("expires_at out of range")
        fn = self._contract.functions.grantAccess(
            arg.address(grantee, "grantee"),
            arg.compressed_point(grantee_umbral_key, "grantee_umbral_key"),
            expires_at,
            arg.types_mask(allowed_types_mask),
        )
        return self._transact(patient, "grantAccess", fn)

    def revoke_access(self, patient: LocalAccount, grantee: str) -> str:
        fn = self._contract.functions.revokeAccess(arg.address(grantee, "grantee"))
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
            arg.address(responder, "responder"),
            arg.compressed_point(responder_umbral_key, "responder_umbral_key"),
            arg.types_mask(allowed_types_mask),
        )
        return self._transact(patient, "optInEmergency", fn)

    def opt_out_emergency(self, patient: LocalAccount, responder: str) -> str:
        fn = self._contract.functions.optOutEmergency(arg.address(responder, "responder"))
        return self._transact(patient, "optOutEmergency", fn)

    def open_emergency_access(
        self, responder: LocalAccount, *, patient: str, duration_s: int
    ) -> str:
        if isinstance(duration_s, bool) or not isinstance(duration_s, int):
            raise InvalidRequest("duration_s must be an int")
        if not 0 < duration_s <= arg.MAX_EMERGENCY_DURATION_S:
            raise InvalidRequest(
                f"an emergency grant lasts 1 to {arg.MAX_EMERGENCY_DURATION_S} s, got {duration_s}"
            )
        fn = self._contract.functions.openEmergencyAccess(
            arg.address(patient, "patient"), duration_s
        )
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
        if not isinstance(key, bytes) or not 1 <= len(key) <= arg.MAX_SIGNING_KEY_BYTES:
            raise InvalidRequest(f"signing_public_key must be 1..{arg.MAX_SIGNING_KEY_BYTES} bytes")
        fn = self._contract.functions.registerNode(
            arg.text(node_id, "node_id", MAX_NODE_ID_BYTES),
            arg.text(endpoint, "endpoint", arg.MAX_ENDPOINT_BYTES),
            key,
            arg.delivery_key(delivery_public_key),
            arg.address(account, "account"),
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
                or not 0 < value <= arg.UINT64_MAX
            ):
                raise InvalidRequest(f"{name} must be a positive uint64")
        if (
            not isinstance(signature, bytes)
            or not 1 <= len(signature) <= arg.MAX_CHECKPOINT_SIGNATURE_BYTES
        ):
            raise InvalidRequest(f"signature must be 1..{arg.MAX_CHECKPOINT_SIGNATURE_BYTES} bytes")
        fn = self._contract.functions.anchorCheckpoint(
            arg.text(node_id, "node_id", MAX_NODE_ID_BYTES),
            tree_size,
            arg.bytes32(root_hash, "root_hash", nonzero=False),
            timestamp,
            signature,
        )
        return self._transact(node, "anchorCheckpoint", fn)

    def set_node_active(self, admin: LocalAccount, *, node_id: str, active: bool) -> str:
        fn = self._contract.functions.setNodeActive(
            arg.text(node_id, "node_id", MAX_NODE_ID_BYTES), bool(active)
        )
        return self._transact(admin, "setNodeActive", fn)

    # ---------------------------------------------------------------- views

    def get_patient(self, address: str) -> PatientInfo | None:
        patient = arg.address(address, "patient")
        p = self._chain.call("getPatient", self._contract.functions.getPatient(patient))
        return views.patient_info(patient, p)

    def get_record(self, record_id: bytes) -> RecordInfo | None:
        rid = arg.bytes32(record_id, "record_id", nonzero=False)
        r = self._chain.call("getRecord", self._contract.functions.getRecord(rid))
        with self._chain.translate("getRecord"):
            return views.record_info(rid, r)

    def record_of_capsule(self, capsule_hash: bytes) -> bytes | None:
        """The id of the record that carries this capsule, or None if none ever did."""
        digest = arg.bytes32(capsule_hash, "capsule_hash", nonzero=False)
        fn = self._contract.functions.recordOfCapsule(digest)
        return views.record_of_capsule(self._chain.call("recordOfCapsule", fn))

    def is_record_writer(self, patient: str, writer: str) -> bool:
        fn = self._contract.functions.isRecordWriter(
            arg.address(patient, "patient"), arg.address(writer, "writer")
        )
        return bool(self._chain.call("isRecordWriter", fn))

    def get_grant(
        self, patient: str, grantee: str, *, block: int | None = None
    ) -> GrantInfo | None:
        """The grant now, or as it stood at ``block`` (needs an archive-capable chain)."""
        p, g = arg.address(patient, "patient"), arg.address(grantee, "grantee")
        at = arg.block(block)
        grant = self._chain.call("getGrant", self._contract.functions.getGrant(p, g), at)
        return views.grant_info(p, g, grant)

    def get_emergency_opt_in(self, patient: str, responder: str) -> EmergencyOptIn | None:
        p, r = arg.address(patient, "patient"), arg.address(responder, "responder")
        o = self._chain.call("getEmergencyOptIn", self._contract.functions.getEmergencyOptIn(p, r))
        return views.emergency_opt_in(p, r, o)

    def latest_checkpoint(self, node_id: str) -> tuple[int, bytes, int] | None:
        """(tree size, root hash, timestamp) of the node's latest anchor, or None."""
        c = self._chain.call(
            "latestCheckpoint",
            self._contract.functions.latestCheckpoint(
                arg.text(node_id, "node_id", MAX_NODE_ID_BYTES)
            ),
        )
        return views.checkpoint(c)

    def checkpoint_anchors(
        self, node_id: str, from_block: int = 0, to_block: int | None = None
    ) -> list[CheckpointAnchor]:
        """Every checkpoint the node anchored in [from_block, to_block], in chain order."""
        key = bytes(Web3.keccak(text=arg.text(node_id, "node_id", MAX_NODE_ID_BYTES)))
        if to_block is None:
            with self._chain.translate("get_logs"):
                to_block = int(self._chain.w3.eth.block_number)
        if from_block < 0:
            raise InvalidRequest("checkpoint_anchors: from_block must be >= 0")
        if from_block > to_block:
            return []
        answer = self._logs(from_block, to_block, self._anchors.topic, key)
        with self._chain.translate("get_logs"):
            anchors = []
            for log in checked_logs(answer, self.address, from_block, to_block):
                self._only_of(log, key)
                anchors.append(checkpoint_anchor(self._anchors.decode(log), log.block))
            return anchors

    def _only_of(self, log: Log, node_key: bytes) -> None:
        """A log answered for a query by (anchor topic, node key) must be one."""
        if log.topics[:2] != (self._anchors.topic, node_key):
            raise MalformedAnswer(f"a log in block {log.block} is not the node's checkpoint anchor")

    def list_nodes(self) -> list[NodeInfo]:
        """All registered nodes (active or not), read at one block so the list is consistent."""
        with self._chain.translate("list_nodes"):
            block = self._chain.w3.eth.block_number
        count = self._chain.call("nodeCount", self._contract.functions.nodeCount(), block)
        nodes = []
        for i in range(int(count)):
            n = self._chain.call("getNode", self._contract.functions.getNode(i), block)
            node = views.node_info(n)
            if node is not None:
                nodes.append(node)
        return nodes

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        """Record, grant (record's patient -> grantee), whether the capsule's record is
        deactivated, and the block judged at: one eth_call. At the latest block, or as of
        ``block`` (an auditor re-judging a past decision)."""
        rid = arg.bytes32(record_id, "record_id", nonzero=False)
        who = arg.address(grantee, "grantee")
        capsule = arg.bytes32(capsule_hash, "capsule_hash", nonzero=False)
        at = arg.block(block)
        answer = self._chain.call(
            "accessState", self._contract.functions.accessState(rid, who, capsule), at
        )
        with self._chain.translate("accessState"):
            return views.access_state(rid, who, answer)
