"""The registry's in-memory twin (tests/registry_twin.py) keeps the contract's rules: each
test here runs against the twin and against the real registry on anvil, which it must
match. The twin stands in for the chain in the SDK's and the auditor's tests
(tests/clients), so what those tests take from it is checked here."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts.registry import RegistryClient
from core.errors import ChainRejected
from core.record_types import RecordType, to_mask
from core.registry_types import record_id_of
from deploy.anvil import AnvilProcess, increase_time
from tests.registry_twin import CHAIN_ID, RegistryTwin

from .conftest import compressed_point, p256_point, umbral_keys

LAB = RecordType.LAB_RESULT
HOUR = 3600


@dataclass
class Backend:
    registry: RegistryTwin | RegistryClient
    admin: LocalAccount
    #: a fresh account (funded, on anvil)
    account: Callable[[], LocalAccount]
    #: move chain time forward by that many seconds, in a newly mined block
    advance: Callable[[int], None]

    def patient(self) -> LocalAccount:
        account = self.account()
        self.registry.register_patient(account, umbral_keys(), compressed_point())
        return account

    def provider(self) -> LocalAccount:
        account = self.account()
        self.registry.grant_provider_role(self.admin, account.address)
        return account

    def responder(self) -> LocalAccount:
        account = self.account()
        self.registry.grant_emergency_role(self.admin, account.address)
        return account

    def anchor(self, patient: LocalAccount, sender: LocalAccount | None = None) -> bytes:
        capsule = os.urandom(32)
        self.registry.anchor_record(
            sender or patient,
            patient=patient.address,
            content_hash=os.urandom(32),
            storage_uri="blob:" + capsule.hex(),
            record_type=LAB,
            capsule_hash=capsule,
        )
        return record_id_of(patient.address, capsule)

    def grant(self, patient: LocalAccount, grantee: str, ttl: int = HOUR) -> str:
        return self.registry.grant_access(
            patient,
            grantee=grantee,
            grantee_umbral_key=compressed_point(),
            expires_at=self.registry.latest_block()[1] + ttl,
            allowed_types_mask=to_mask([LAB]),
        )

    def opt_in(self, patient: LocalAccount, responder: str) -> str:
        return self.registry.opt_in_emergency(
            patient,
            responder=responder,
            responder_umbral_key=compressed_point(),
            allowed_types_mask=to_mask([LAB]),
        )

    def register_node(self, node_id: str, account: str) -> str:
        return self.registry.register_node(
            self.admin,
            node_id=node_id,
            endpoint="127.0.0.1:1",
            signing_public_key=b"signing key",
            delivery_public_key=p256_point(),
            account=account,
        )


def _twin_account() -> LocalAccount:
    """An account the twin accepts: it keeps no balances."""
    account: LocalAccount = Account.create()
    return account


@pytest.fixture(params=["twin", pytest.param("anvil", marks=pytest.mark.anvil)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "twin":
        admin = _twin_account()
        twin = RegistryTwin(admin)
        return Backend(twin, admin, _twin_account, twin.advance_time)
    anvil: AnvilProcess = request.getfixturevalue("anvil")
    make_account: Callable[[], LocalAccount] = request.getfixturevalue("make_account")
    admin = make_account()
    registry = RegistryClient.deploy(anvil.rpc_url, admin)
    return Backend(registry, admin, make_account, lambda s: increase_time(anvil.rpc_url, s))


def refused(reason: str, action: Callable[[], object]) -> None:
    with pytest.raises(ChainRejected) as raised:
        action()
    assert raised.value.reason == reason


def test_blocks_and_transactions(backend: Backend) -> None:
    registry = backend.registry
    assert registry.signing_domain().chain_id == CHAIN_ID
    assert registry.signing_domain().registry_address == registry.address
    before = registry.latest_block()
    patient = backend.patient()
    number, timestamp = registry.latest_block()
    assert number > before[0] and timestamp >= before[1]
    latest = registry.block("latest")
    assert (latest.number, latest.timestamp) == (number, timestamp)
    assert registry.block(number) == latest
    tx = backend.grant(patient, backend.provider().address)
    assert registry.block_of_transaction(tx) == registry.latest_block()[0]
    refused("", lambda: registry.block(registry.latest_block()[0] + 1000))
    refused("", lambda: registry.block_of_transaction("0x" + "ab" * 32))
    backend.advance(100)
    assert registry.latest_block()[1] >= timestamp + 100


def test_a_patient_registers_once(backend: Backend) -> None:
    registry, account = backend.registry, backend.account()
    assert registry.get_patient(account.address) is None
    keys, verifying = umbral_keys(), compressed_point()
    registry.register_patient(account, keys, verifying)
    info = registry.get_patient(account.address)
    assert info is not None
    assert (info.address, info.umbral_public_keys, info.verifying_key) == (
        account.address,
        keys,
        verifying,
    )
    refused(
        "PatientAlreadyRegistered",
        lambda: registry.register_patient(account, umbral_keys(), compressed_point()),
    )


def test_a_record_is_anchored_once_under_its_derived_id(backend: Backend) -> None:
    registry, patient = backend.registry, backend.patient()
    capsule, content = os.urandom(32), os.urandom(32)

    def anchor(sender: LocalAccount, patient: str = patient.address) -> str:
        return registry.anchor_record(
            sender,
            patient=patient,
            content_hash=content,
            storage_uri="blob:x",
            record_type=LAB,
            capsule_hash=capsule,
        )

    stranger = backend.account()
    refused("NotRecordWriter", lambda: anchor(stranger))
    refused("PatientNotRegistered", lambda: anchor(stranger, stranger.address))
    block = registry.block_of_transaction(anchor(patient))
    record_id = record_id_of(patient.address, capsule)
    record = registry.get_record(record_id)
    assert record is not None
    assert (record.record_id, record.patient, record.creator) == (
        record_id,
        patient.address,
        patient.address,
    )
    assert (record.content_hash, record.capsule_hash, record.storage_uri) == (
        content,
        capsule,
        "blob:x",
    )
    assert record.record_type == LAB and record.active
    assert record.created_at == registry.block(block).timestamp
    refused("CapsuleAlreadyAnchored", lambda: anchor(patient))
    other = backend.patient()
    refused("CapsuleAlreadyAnchored", lambda: anchor(other, other.address))
    assert registry.get_record(os.urandom(32)) is None


def test_a_provider_anchors_for_a_patient_while_she_allows_it(backend: Backend) -> None:
    registry, patient, provider = backend.registry, backend.patient(), backend.provider()
    refused(
        "WriterNotProvider",
        lambda: registry.set_record_writer(patient, backend.account().address, allowed=True),
    )
    refused("NotRecordWriter", lambda: backend.anchor(patient, provider))
    registry.set_record_writer(patient, provider.address, allowed=True)
    record = registry.get_record(backend.anchor(patient, provider))
    assert record is not None and record.creator == provider.address
    registry.set_record_writer(patient, provider.address, allowed=False)
    refused("NotRecordWriter", lambda: backend.anchor(patient, provider))


def test_only_the_patient_deactivates_a_record_once(backend: Backend) -> None:
    registry, patient = backend.registry, backend.patient()
    record_id = backend.anchor(patient)
    refused("RecordNotFound", lambda: registry.deactivate_record(patient, os.urandom(32)))
    refused("NotRecordPatient", lambda: registry.deactivate_record(backend.patient(), record_id))
    registry.deactivate_record(patient, record_id)
    record = registry.get_record(record_id)
    assert record is not None and not record.active
    refused("RecordNotActive", lambda: registry.deactivate_record(patient, record_id))
    # Its capsule is retired whichever record a request names.
    state = registry.access_state(backend.anchor(patient), patient.address, record.capsule_hash)
    assert state.capsule_retired


def test_a_grant_to_a_provider_until_it_is_revoked(backend: Backend) -> None:
    registry, patient, provider = backend.registry, backend.patient(), backend.provider()
    refused("GranteeNotProvider", lambda: backend.grant(patient, backend.account().address))
    refused("ExpiryInPast", lambda: backend.grant(patient, provider.address, ttl=0))
    refused("PatientNotRegistered", lambda: backend.grant(backend.account(), provider.address))
    refused("GrantNotActive", lambda: registry.revoke_access(patient, provider.address))
    assert registry.get_grant(patient.address, provider.address) is None
    block = registry.block_of_transaction(backend.grant(patient, provider.address))
    grant = registry.get_grant(patient.address, provider.address)
    assert grant is not None and grant.active and not grant.emergency
    assert (grant.patient, grant.grantee) == (patient.address, provider.address)
    assert grant.granted_at == registry.block(block).timestamp
    assert grant.expires_at > grant.granted_at
    assert grant.allowed_types_mask == to_mask([LAB])
    registry.revoke_access(patient, provider.address)
    revoked = registry.get_grant(patient.address, provider.address)
    assert revoked is not None and not revoked.active
    refused("GrantNotActive", lambda: registry.revoke_access(patient, provider.address))


def test_reads_at_a_past_block_show_the_registry_as_it_stood(backend: Backend) -> None:
    registry, patient, provider = backend.registry, backend.patient(), backend.provider()
    record_id = backend.anchor(patient)
    record = registry.get_record(record_id)
    assert record is not None
    before = registry.latest_block()[0]
    granted = registry.block_of_transaction(backend.grant(patient, provider.address))
    revoked = registry.block_of_transaction(registry.revoke_access(patient, provider.address))

    def grant_at(block: int) -> object:
        return registry.get_grant(patient.address, provider.address, block=block)

    assert grant_at(before) is None
    then = registry.get_grant(patient.address, provider.address, block=granted)
    assert then is not None and then.active
    assert grant_at(revoked - 1) == then
    now = registry.get_grant(patient.address, provider.address)
    assert grant_at(revoked) == now and now is not None and not now.active
    state = registry.access_state(record_id, provider.address, record.capsule_hash, block=granted)
    assert (state.record, state.grant) == (record, then)
    assert state.block_number == granted
    assert state.block_timestamp == registry.block(granted).timestamp
    assert not state.capsule_retired
    refused("", lambda: grant_at(registry.latest_block()[0] + 1000))


def test_a_responder_opens_emergency_access_on_the_patients_opt_in(backend: Backend) -> None:
    registry, patient, responder = backend.registry, backend.patient(), backend.responder()

    def open_(duration_s: int = HOUR) -> str:
        return registry.open_emergency_access(
            responder, patient=patient.address, duration_s=duration_s
        )

    refused("ResponderNotEmergencyRole", lambda: backend.opt_in(patient, backend.account().address))
    refused("NotOptedIn", open_)
    backend.opt_in(patient, responder.address)
    opt_in = registry.get_emergency_opt_in(patient.address, responder.address)
    assert opt_in is not None and opt_in.active and opt_in.windows_opened == 0
    block = registry.block_of_transaction(open_())
    grant = registry.get_grant(patient.address, responder.address)
    assert grant is not None and grant.active and grant.emergency
    assert grant.granted_at == registry.block(block).timestamp
    assert grant.expires_at == grant.granted_at + HOUR
    assert grant.grantee_umbral_key == opt_in.responder_umbral_key
    refused("EmergencyAccessAlreadyOpen", open_)
    # The window lasts while the responder holds the role.
    registry.revoke_emergency_role(backend.admin, responder.address)
    closed = registry.get_grant(patient.address, responder.address)
    assert closed is not None and not closed.active
    refused("AccessControlUnauthorizedAccount", open_)


def test_emergency_windows_without_the_patient_are_bounded(backend: Backend) -> None:
    registry, patient, responder = backend.registry, backend.patient(), backend.responder()
    backend.opt_in(patient, responder.address)
    for _ in range(3):
        registry.open_emergency_access(responder, patient=patient.address, duration_s=1)
        backend.advance(2)
    refused(
        "EmergencyWindowsExhausted",
        lambda: registry.open_emergency_access(responder, patient=patient.address, duration_s=1),
    )
    backend.opt_in(patient, responder.address)  # her own action: three more
    registry.open_emergency_access(responder, patient=patient.address, duration_s=1)


def test_a_patient_ends_emergency_access(backend: Backend) -> None:
    registry, patient, responder = backend.registry, backend.patient(), backend.responder()
    backend.opt_in(patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    # Revoking the window withdraws the opt-in too.
    registry.revoke_access(patient, responder.address)
    opt_in = registry.get_emergency_opt_in(patient.address, responder.address)
    assert opt_in is not None and not opt_in.active
    refused(
        "NotOptedIn",
        lambda: registry.open_emergency_access(responder, patient=patient.address, duration_s=9),
    )
    # Opting out closes an open window.
    backend.opt_in(patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    registry.opt_out_emergency(patient, responder.address)
    grant = registry.get_grant(patient.address, responder.address)
    assert grant is not None and not grant.active
    refused("NotOptedIn", lambda: registry.opt_out_emergency(patient, responder.address))


def test_an_ordinary_grant_blocks_an_emergency_window(backend: Backend) -> None:
    registry, patient, responder = backend.registry, backend.patient(), backend.responder()
    registry.grant_provider_role(backend.admin, responder.address)
    backend.grant(patient, responder.address)
    backend.opt_in(patient, responder.address)
    refused(
        "GrantAlreadyActive",
        lambda: registry.open_emergency_access(responder, patient=patient.address, duration_s=9),
    )


def test_nodes_are_listed_in_registration_order(backend: Backend) -> None:
    registry = backend.registry
    accounts = [backend.account().address for _ in range(2)]
    backend.register_node("node-1", accounts[0])
    backend.register_node("node-2", accounts[1])
    refused(
        "NodeAlreadyRegistered", lambda: backend.register_node("node-1", _twin_account().address)
    )
    refused("NodeAccountInUse", lambda: backend.register_node("node-3", accounts[0]))
    registry.set_node_active(backend.admin, node_id="node-1", active=False)
    nodes = registry.list_nodes()
    assert [(n.node_id, n.account, n.active) for n in nodes] == [
        ("node-1", accounts[0], False),
        ("node-2", accounts[1], True),
    ]
    assert nodes[1].endpoint == "127.0.0.1:1" and nodes[1].signing_public_key == b"signing key"
    stranger = backend.account()
    refused(
        "AccessControlUnauthorizedAccount",
        lambda: registry.set_node_active(stranger, node_id="node-2", active=False),
    )


def test_a_node_anchors_growing_checkpoints_from_its_own_account(backend: Backend) -> None:
    registry, node = backend.registry, backend.account()
    backend.register_node("node-1", node.address)

    def anchor(sender: LocalAccount, size: int) -> str:
        return registry.anchor_checkpoint(
            sender,
            node_id="node-1",
            tree_size=size,
            root_hash=bytes([size]) * 32,
            timestamp=1_700_000_000 + size,
            signature=b"signature %d" % size,
        )

    refused("NotNodeAccount", lambda: anchor(backend.account(), 1))
    first = registry.block_of_transaction(anchor(node, 4))
    refused("CheckpointNotNewer", lambda: anchor(node, 4))
    second = registry.block_of_transaction(anchor(node, 9))
    anchors = registry.checkpoint_anchors("node-1")
    assert [(a.tree_size, a.block) for a in anchors] == [(4, first), (9, second)]
    assert (anchors[1].root_hash, anchors[1].timestamp, anchors[1].signature) == (
        bytes([9]) * 32,
        1_700_000_009,
        b"signature 9",
    )
    assert registry.checkpoint_anchors("node-1", from_block=first + 1) == anchors[1:]
    assert registry.checkpoint_anchors("node-2") == []
