"""An in-memory twin of the registry: ``contracts/src/Registry.sol`` as its web3 adapter
(``contracts.registry.RegistryClient``) shows it, with no chain.

It implements ``core.registry_interface``'s ``PatientRegistry`` and ``ProviderRegistry`` (so
``RegistryReader`` too), plus the admin's and the nodes' transactions that set a test up, so
the SDK clients and the auditor can be tested without anvil. It keeps the contract's rules
those callers rely on, and refuses a broken one the way the adapter does: ``ChainRejected``
whose ``reason`` is the contract's custom error name. ``tests/contracts/test_registry_twin.py``
runs the same tests against the twin and the real registry on anvil.

Like anvil's automine, each transaction is mined at once in a block of its own, one second
after the one before (:meth:`RegistryTwin.advance_time` mines an empty block later). Every
block's state is kept, so a read at a past block sees the registry as it stood then. Reads
may come from many threads (the auditor's), transactions from the test's one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount

from core.addresses import checksum, is_valid
from core.errors import ChainRejected, InvalidRequest
from core.record_types import ALL_TYPES_MASK, RecordType
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
    record_id_of,
)
from core.request_auth import Domain

#: anvil's chain id
CHAIN_ID = 31337
#: the contract's MAX_EMERGENCY_DURATION and MAX_EMERGENCY_WINDOWS
MAX_EMERGENCY_DURATION_S = 4 * 3600
MAX_EMERGENCY_WINDOWS = 3
MAX_STORAGE_URI_BYTES = 256
GENESIS_TIME = 1_700_000_000

ADMIN = "DEFAULT_ADMIN_ROLE"
NODE_ADMIN = "NODE_ADMIN_ROLE"
PROVIDER = "PROVIDER_ROLE"
EMERGENCY = "EMERGENCY_ROLE"


@dataclass
class _State:
    """The contract's storage after one block. Grants are stored as written; the views
    apply the contract's ``_inForce`` (an emergency window lasts while its responder holds
    EMERGENCY_ROLE)."""

    roles: dict[str, set[str]] = field(default_factory=dict)
    patients: dict[str, PatientInfo] = field(default_factory=dict)
    records: dict[bytes, RecordInfo] = field(default_factory=dict)
    #: capsule hash -> the one record that carries it, for ever
    capsule_records: dict[bytes, bytes] = field(default_factory=dict)
    #: (patient, provider) pairs: who may anchor records for whom
    writers: set[tuple[str, str]] = field(default_factory=set)
    grants: dict[tuple[str, str], GrantInfo] = field(default_factory=dict)
    opt_ins: dict[tuple[str, str], EmergencyOptIn] = field(default_factory=dict)
    #: node id -> node, in registration order
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    #: node id -> tree size of its latest anchored checkpoint
    checkpoints: dict[str, int] = field(default_factory=dict)

    def has_role(self, role: str, account: str) -> bool:
        return account in self.roles.get(role, set())


@dataclass
class _Block:
    ref: BlockRef
    state: _State


def _address(value: object, what: str) -> str:
    if not isinstance(value, str) or not is_valid(value):
        raise InvalidRequest(f"{what} is not an Ethereum address: {value!r}")
    return checksum(value)


def _is_compressed_point(key: bytes) -> bool:
    return isinstance(key, bytes) and len(key) == 33 and key[0] in (2, 3)


def _valid_types(mask: int) -> bool:
    return mask != 0 and not mask & ~ALL_TYPES_MASK


def _rejected(op: str, reason: str) -> ChainRejected:
    return ChainRejected(f"registry rejected {op}: {reason}", reason=reason)


class RegistryTwin:
    """One deployed registry, in memory; ``deployer`` holds the admin and node-admin roles."""

    def __init__(self, deployer: LocalAccount) -> None:
        self.address = checksum(secrets.token_bytes(20))
        self._blocks: list[_Block] = [_Block(self._ref(0, GENESIS_TIME), _State())]
        self._transactions: dict[str, int] = {}
        self._anchors: list[CheckpointAnchor] = []
        self._later_s = 0
        state = self._mine_state()
        state.roles = {ADMIN: {deployer.address}, NODE_ADMIN: {deployer.address}}

    def __repr__(self) -> str:
        return f"RegistryTwin(address={self.address!r})"

    # ------------------------------------------------------------------ blocks

    def _ref(self, number: int, timestamp: int) -> BlockRef:
        digest = hashlib.sha256(f"{self.address} block {number}".encode()).digest()
        return BlockRef(number, digest, timestamp)

    @property
    def _now(self) -> _State:
        return self._blocks[-1].state

    def _next_timestamp(self) -> int:
        return self._blocks[-1].ref.timestamp + 1 + self._later_s

    def _mine_state(self) -> _State:
        """A new block, holding a copy of the latest state: the caller writes the
        transaction's changes to it, once every check has passed."""
        self._blocks.append(
            _Block(
                self._ref(len(self._blocks), self._next_timestamp()),
                copy.deepcopy(self._now),
            )
        )
        self._later_s = 0
        return self._now

    def _mined(self) -> str:
        """The hash of the transaction just mined in the latest block."""
        number = len(self._blocks) - 1
        tx_hash = "0x" + hashlib.sha256(f"{self.address} tx {number}".encode()).hexdigest()
        self._transactions[tx_hash] = number
        return tx_hash

    def advance_time(self, seconds: int) -> None:
        """Mine an empty block ``seconds`` after the latest (anvil: evm_increaseTime and
        evm_mine), so that chain time shows it."""
        self._later_s = seconds - 1
        self._mine_state()

    def _at(self, block: int | None) -> _Block:
        if block is None:
            return self._blocks[-1]
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise InvalidRequest("block must be a non-negative block number")
        if block >= len(self._blocks):
            raise ChainRejected(f"chain refused a read at block {block}: not mined yet")
        return self._blocks[block]

    # ---------------------------------------------------------- RegistryReader

    def signing_domain(self) -> Domain:
        return Domain(CHAIN_ID, self.address)

    def latest_block(self) -> tuple[int, int]:
        ref = self._blocks[-1].ref
        return ref.number, ref.timestamp

    def block(self, identifier: int | str = "latest") -> BlockRef:
        if identifier == "latest":
            return self._blocks[-1].ref
        if isinstance(identifier, bool) or not isinstance(identifier, int):
            raise InvalidRequest("block: identifier must be a block number or 'latest'")
        if not 0 <= identifier < len(self._blocks):
            raise ChainRejected(f"chain refused get_block: block {identifier} not found")
        return self._blocks[identifier].ref

    def block_of_transaction(self, tx_hash: str) -> int:
        if tx_hash not in self._transactions:
            raise ChainRejected(f"chain refused get_transaction_receipt: {tx_hash} not found")
        return self._transactions[tx_hash]

    def get_patient(self, address: str) -> PatientInfo | None:
        return self._now.patients.get(_address(address, "patient"))

    def get_record(self, record_id: bytes) -> RecordInfo | None:
        return self._now.records.get(record_id)

    def get_grant(
        self, patient: str, grantee: str, *, block: int | None = None
    ) -> GrantInfo | None:
        state = self._at(block).state
        return self._in_force(state, _address(patient, "patient"), _address(grantee, "grantee"))

    def get_emergency_opt_in(self, patient: str, responder: str) -> EmergencyOptIn | None:
        key = (_address(patient, "patient"), _address(responder, "responder"))
        return self._now.opt_ins.get(key)

    def list_nodes(self) -> list[NodeInfo]:
        return list(self._now.nodes.values())

    def checkpoint_anchors(
        self, node_id: str, from_block: int = 0, to_block: int | None = None
    ) -> list[CheckpointAnchor]:
        last = len(self._blocks) - 1 if to_block is None else to_block
        return [a for a in self._anchors if a.node_id == node_id and from_block <= a.block <= last]

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        at = self._at(block)
        record = at.state.records.get(record_id)
        carrier = at.state.capsule_records.get(capsule_hash)
        grant = None
        if record is not None:
            grant = self._in_force(at.state, record.patient, _address(grantee, "grantee"))
        return AccessState(
            record=record,
            grant=grant,
            block_number=at.ref.number,
            block_timestamp=at.ref.timestamp,
            capsule_retired=carrier is not None and not at.state.records[carrier].active,
        )

    @staticmethod
    def _in_force(state: _State, patient: str, grantee: str) -> GrantInfo | None:
        grant = state.grants.get((patient, grantee))
        if (
            grant is not None
            and grant.emergency
            and grant.active
            and not state.has_role(EMERGENCY, grantee)
        ):
            return dataclasses.replace(grant, active=False)
        return grant

    # ----------------------------------------------------- PatientTransactions

    def _check_patient_names_another(self, op: str, patient: str, other: str) -> None:
        """The contract's first checks when a patient names another account."""
        if patient not in self._now.patients:
            raise _rejected(op, "PatientNotRegistered")
        if other == patient:
            raise _rejected(op, "GranteeIsPatient")

    def register_patient(
        self, patient: LocalAccount, umbral_public_keys: Sequence[bytes], verifying_key: bytes
    ) -> str:
        op = "registerPatient"
        keys = tuple(umbral_public_keys)
        if len(keys) != len(RecordType) or not all(_is_compressed_point(k) for k in keys):
            raise _rejected(op, "InvalidUmbralKey")
        if not _is_compressed_point(verifying_key):
            raise _rejected(op, "InvalidVerifyingKey")
        if patient.address in self._now.patients:
            raise _rejected(op, "PatientAlreadyRegistered")
        self._mine_state().patients[patient.address] = PatientInfo(
            patient.address, keys, verifying_key
        )
        return self._mined()

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
        op = "anchorRecord"
        patient = _address(patient, "patient")
        now = self._now
        if sender.address != patient and not (
            (patient, sender.address) in now.writers and now.has_role(PROVIDER, sender.address)
        ):
            raise _rejected(op, "NotRecordWriter")
        if patient not in now.patients:
            raise _rejected(op, "PatientNotRegistered")
        if content_hash == bytes(32):
            raise _rejected(op, "InvalidContentHash")
        if capsule_hash == bytes(32):
            raise _rejected(op, "InvalidCapsuleHash")
        if capsule_hash in now.capsule_records:
            raise _rejected(op, "CapsuleAlreadyAnchored")
        if not 1 <= len(storage_uri.encode()) <= MAX_STORAGE_URI_BYTES:
            raise _rejected(op, "InvalidStorageUri")
        record_id = record_id_of(patient, capsule_hash)
        state = self._mine_state()
        state.capsule_records[capsule_hash] = record_id
        state.records[record_id] = RecordInfo(
            record_id=record_id,
            patient=patient,
            content_hash=content_hash,
            storage_uri=storage_uri,
            record_type=RecordType(record_type),
            capsule_hash=capsule_hash,
            creator=sender.address,
            active=True,
            created_at=self._blocks[-1].ref.timestamp,
        )
        return self._mined()

    def set_record_writer(self, patient: LocalAccount, writer: str, *, allowed: bool) -> str:
        op = "setRecordWriter"
        writer = _address(writer, "writer")
        self._check_patient_names_another(op, patient.address, writer)
        if allowed and not self._now.has_role(PROVIDER, writer):
            raise _rejected(op, "WriterNotProvider")
        writers = self._mine_state().writers
        if allowed:
            writers.add((patient.address, writer))
        else:
            writers.discard((patient.address, writer))
        return self._mined()

    def deactivate_record(self, patient: LocalAccount, record_id: bytes) -> str:
        op = "deactivateRecord"
        record = self._now.records.get(record_id)
        if record is None:
            raise _rejected(op, "RecordNotFound")
        if record.patient != patient.address:
            raise _rejected(op, "NotRecordPatient")
        if not record.active:
            raise _rejected(op, "RecordNotActive")
        self._mine_state().records[record_id] = dataclasses.replace(record, active=False)
        return self._mined()

    def grant_access(
        self,
        patient: LocalAccount,
        *,
        grantee: str,
        grantee_umbral_key: bytes,
        expires_at: int,
        allowed_types_mask: int,
    ) -> str:
        op = "grantAccess"
        grantee = _address(grantee, "grantee")
        self._check_patient_names_another(op, patient.address, grantee)
        if not self._now.has_role(PROVIDER, grantee):
            raise _rejected(op, "GranteeNotProvider")
        if not _is_compressed_point(grantee_umbral_key):
            raise _rejected(op, "InvalidUmbralKey")
        if expires_at <= self._next_timestamp():
            raise _rejected(op, "ExpiryInPast")
        if not _valid_types(allowed_types_mask):
            raise _rejected(op, "InvalidRecordTypes")
        state = self._mine_state()
        state.grants[(patient.address, grantee)] = GrantInfo(
            patient=patient.address,
            grantee=grantee,
            grantee_umbral_key=grantee_umbral_key,
            expires_at=expires_at,
            allowed_types_mask=allowed_types_mask,
            active=True,
            granted_at=self._blocks[-1].ref.timestamp,
        )
        return self._mined()

    def revoke_access(self, patient: LocalAccount, grantee: str) -> str:
        key = (patient.address, _address(grantee, "grantee"))
        grant = self._now.grants.get(key)
        if grant is None or not grant.active:
            raise _rejected("revokeAccess", "GrantNotActive")
        state = self._mine_state()
        state.grants[key] = dataclasses.replace(grant, active=False)
        # Revoking an emergency window also withdraws the opt-in that allowed it.
        opt_in = state.opt_ins.get(key)
        if grant.emergency and opt_in is not None and opt_in.active:
            state.opt_ins[key] = dataclasses.replace(opt_in, active=False)
        return self._mined()

    def opt_in_emergency(
        self,
        patient: LocalAccount,
        *,
        responder: str,
        responder_umbral_key: bytes,
        allowed_types_mask: int,
    ) -> str:
        op = "optInEmergency"
        responder = _address(responder, "responder")
        self._check_patient_names_another(op, patient.address, responder)
        if not self._now.has_role(EMERGENCY, responder):
            raise _rejected(op, "ResponderNotEmergencyRole")
        if not _is_compressed_point(responder_umbral_key):
            raise _rejected(op, "InvalidUmbralKey")
        if not _valid_types(allowed_types_mask):
            raise _rejected(op, "InvalidRecordTypes")
        state = self._mine_state()
        key = (patient.address, responder)
        self._close_emergency_grant(state, key)  # new terms apply to the next window only
        state.opt_ins[key] = EmergencyOptIn(
            patient.address, responder, responder_umbral_key, allowed_types_mask, True, 0
        )
        return self._mined()

    def opt_out_emergency(self, patient: LocalAccount, responder: str) -> str:
        key = (patient.address, _address(responder, "responder"))
        opt_in = self._now.opt_ins.get(key)
        if opt_in is None or not opt_in.active:
            raise _rejected("optOutEmergency", "NotOptedIn")
        state = self._mine_state()
        state.opt_ins[key] = dataclasses.replace(opt_in, active=False)
        self._close_emergency_grant(state, key)
        return self._mined()

    @staticmethod
    def _close_emergency_grant(state: _State, key: tuple[str, str]) -> None:
        grant = state.grants.get(key)
        if grant is not None and grant.active and grant.emergency:
            state.grants[key] = dataclasses.replace(grant, active=False)

    # ---------------------------------------------------- ProviderTransactions

    def open_emergency_access(
        self, responder: LocalAccount, *, patient: str, duration_s: int
    ) -> str:
        op = "openEmergencyAccess"
        if not 0 < duration_s <= MAX_EMERGENCY_DURATION_S:
            raise InvalidRequest(
                f"an emergency grant lasts 1 to {MAX_EMERGENCY_DURATION_S} s, got {duration_s}"
            )
        key = (_address(patient, "patient"), responder.address)
        now, when = self._now, self._next_timestamp()
        if not now.has_role(EMERGENCY, responder.address):
            raise _rejected(op, "AccessControlUnauthorizedAccount")
        opt_in = now.opt_ins.get(key)
        if opt_in is None or not opt_in.active:
            raise _rejected(op, "NotOptedIn")
        existing = now.grants.get(key)
        if existing is not None and existing.active and existing.expires_at > when:
            raise _rejected(
                op, "EmergencyAccessAlreadyOpen" if existing.emergency else "GrantAlreadyActive"
            )
        if opt_in.windows_opened >= MAX_EMERGENCY_WINDOWS:
            raise _rejected(op, "EmergencyWindowsExhausted")
        state = self._mine_state()
        state.opt_ins[key] = dataclasses.replace(opt_in, windows_opened=opt_in.windows_opened + 1)
        state.grants[key] = GrantInfo(
            patient=key[0],
            grantee=responder.address,
            grantee_umbral_key=opt_in.responder_umbral_key,
            expires_at=when + duration_s,
            allowed_types_mask=opt_in.allowed_types_mask,
            active=True,
            granted_at=when,
            emergency=True,
        )
        return self._mined()

    # ------------------------------------------------- the admin's and nodes'

    def _grant_role(self, admin: LocalAccount, role: str, account: str, *, held: bool) -> str:
        account = _address(account, "account")
        if not self._now.has_role(ADMIN, admin.address):
            raise _rejected(
                "grantRole" if held else "revokeRole", "AccessControlUnauthorizedAccount"
            )
        holders = self._mine_state().roles.setdefault(role, set())
        if held:
            holders.add(account)
        else:
            holders.discard(account)
        return self._mined()

    def grant_provider_role(self, admin: LocalAccount, provider: str) -> str:
        return self._grant_role(admin, PROVIDER, provider, held=True)

    def grant_emergency_role(self, admin: LocalAccount, responder: str) -> str:
        return self._grant_role(admin, EMERGENCY, responder, held=True)

    def revoke_emergency_role(self, admin: LocalAccount, responder: str) -> str:
        return self._grant_role(admin, EMERGENCY, responder, held=False)

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
        op = "registerNode"
        account = _address(account, "account")
        now = self._now
        if not now.has_role(NODE_ADMIN, admin.address):
            raise _rejected(op, "AccessControlUnauthorizedAccount")
        if node_id in now.nodes:
            raise _rejected(op, "NodeAlreadyRegistered")
        if any(n.account == account for n in now.nodes.values()):
            raise _rejected(op, "NodeAccountInUse")
        self._mine_state().nodes[node_id] = NodeInfo(
            node_id, endpoint, signing_public_key, delivery_public_key, account, True
        )
        return self._mined()

    def set_node_active(self, admin: LocalAccount, *, node_id: str, active: bool) -> str:
        op = "setNodeActive"
        if not self._now.has_role(NODE_ADMIN, admin.address):
            raise _rejected(op, "AccessControlUnauthorizedAccount")
        node = self._now.nodes.get(node_id)
        if node is None:
            raise _rejected(op, "NodeNotRegistered")
        self._mine_state().nodes[node_id] = dataclasses.replace(node, active=active)
        return self._mined()

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
        op = "anchorCheckpoint"
        registered = self._now.nodes.get(node_id)
        if registered is None:
            raise _rejected(op, "NodeNotRegistered")
        if node.address != registered.account:
            raise _rejected(op, "NotNodeAccount")
        if tree_size == 0 or not signature:
            raise _rejected(op, "InvalidCheckpoint")
        if tree_size <= self._now.checkpoints.get(node_id, 0):
            raise _rejected(op, "CheckpointNotNewer")
        self._mine_state().checkpoints[node_id] = tree_size
        block = len(self._blocks) - 1
        self._anchors.append(
            CheckpointAnchor(node_id, tree_size, root_hash, timestamp, signature, block)
        )
        return self._mined()
