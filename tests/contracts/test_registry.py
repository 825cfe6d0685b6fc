"""The registry contract through its Python adapter, on a real anvil chain."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD

from contracts.build import load_artifact
from contracts.chain_transport import ChainTransport
from contracts.registry import RegistryClient
from contracts.registry_arguments import EMERGENCY_ROLE, MAX_EMERGENCY_DURATION_S, PROVIDER_ROLE
from core.errors import (
    ChainRejected,
    ChainUnavailable,
    InsufficientFunds,
    InvalidRequest,
    PreconditionFailed,
)
from core.record_types import ALL_TYPES_MASK, RecordType, to_mask
from core.registry_types import (
    AccessRevoked,
    AccessState,
    CheckpointAnchor,
    EmergencyAccessOpened,
    EmergencyOptIn,
    EmergencyOptInChanged,
    EmergencyRoleChanged,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    PatientRegistered,
    RecordInfo,
    record_id_of,
)
from deploy import anvil as anvil_module
from deploy.anvil import AnvilProcess, increase_time, rpc_call
from tests.hostile_rpc import HostileRpc

from .conftest import compressed_point, p256_point, umbral_keys

pytestmark = pytest.mark.anvil

HOUR = 3600


def random32() -> bytes:
    return os.urandom(32)


def anchor(
    registry: RegistryClient,
    sender: LocalAccount,
    patient: str,
    *,
    record_type: RecordType = RecordType.LAB_RESULT,
    capsule_hash: bytes | None = None,
) -> bytes:
    """Anchor a record with a fresh (or the given) capsule hash; its id."""
    capsule_hash = capsule_hash or random32()
    registry.anchor_record(
        sender,
        patient=patient,
        content_hash=random32(),
        storage_uri=f"blob://sha2-256/{capsule_hash.hex()}",
        record_type=record_type,
        capsule_hash=capsule_hash,
    )
    return record_id_of(patient, capsule_hash)


def capsule(registry: RegistryClient, record_id: bytes) -> bytes:
    """The capsule hash anchored for a record."""
    record = registry.get_record(record_id)
    assert record is not None
    return record.capsule_hash


def grant(
    registry: RegistryClient,
    patient: LocalAccount,
    grantee: str,
    *,
    mask: int = ALL_TYPES_MASK,
    ttl: int = HOUR,
    key: bytes | None = None,
) -> str:
    _, now = registry.latest_block()
    return registry.grant_access(
        patient,
        grantee=grantee,
        grantee_umbral_key=key or compressed_point(),
        expires_at=now + ttl,
        allowed_types_mask=mask,
    )


def decode_events(anvil: AnvilProcess, registry: RegistryClient, tx_hash: str, event: str) -> Any:
    """The named event's logs in a transaction's receipt, decoded with the artifact's ABI."""
    w3 = Web3(Web3.HTTPProvider(anvil.rpc_url))
    contract = w3.eth.contract(address=registry.address, abi=load_artifact()["abi"])
    receipt = w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    return contract.events[event]().process_receipt(receipt, errors=DISCARD)


def rejected(excinfo: pytest.ExceptionInfo[ChainRejected], reason: str) -> None:
    assert excinfo.value.reason == reason
    assert reason in str(excinfo.value)
    assert str(excinfo.value).startswith("registry rejected ")


# -------------------------------------------------------------------- deploy


def test_deploy_gives_a_usable_client(
    anvil: AnvilProcess, registry: RegistryClient, deployer: LocalAccount
) -> None:
    assert registry.address == Web3.to_checksum_address(registry.address)
    assert registry.rpc_url == anvil.rpc_url
    assert registry.chain_id() == 31337
    number, timestamp = registry.latest_block()
    assert number > 0 and timestamp > 0
    # A second client on the same address sees the same (empty) state.
    other = RegistryClient(anvil.rpc_url, registry.address.lower())
    assert other.address == registry.address
    assert other.list_nodes() == []


def test_repr_shows_no_key_material_nor_url_path(
    registry: RegistryClient, deployer: LocalAccount
) -> None:
    text = repr(registry)
    assert registry.address in text
    assert deployer.key.hex() not in text
    secret_path_client = RegistryClient(registry.rpc_url + "/v3/api-key-123", registry.address)
    assert "api-key-123" not in repr(secret_path_client)


@pytest.mark.parametrize("send", ["deploy", "register_patient", "transfer"])
def test_an_unfunded_sender_is_named_with_how_to_fund_it(
    anvil: AnvilProcess, registry: RegistryClient, send: str
) -> None:
    poor = Account.create()
    did = f"did:pkh:eip155:31337:{poor.address}"
    with pytest.raises(InsufficientFunds) as excinfo:
        if send == "deploy":
            RegistryClient.deploy(anvil.rpc_url, poor)
        elif send == "register_patient":
            registry.register_patient(poor, umbral_keys(), compressed_point())
        else:
            chain = ChainTransport(anvil.rpc_url, 10.0, load_artifact()["abi"])
            chain.transfer(poor, Account.create().address, 1)
    error = excinfo.value
    # The chain refused it, not the contract: no custom error name.
    assert error.account == poor.address and error.reason == ""
    assert f"account {did} cannot pay for the gas (its balance is 0 ether)" in error.message
    assert f"kmsctl admin fund {did} --ether AMOUNT" in error.message
    assert poor.key.hex() not in error.message


# ------------------------------------------------------------------ patients


def test_register_patient_and_read_back(
    anvil: AnvilProcess, registry: RegistryClient, make_account: Callable[[], LocalAccount]
) -> None:
    alice = make_account()
    keys, verifying_key = umbral_keys(), compressed_point()
    assert registry.get_patient(alice.address) is None

    tx_hash = registry.register_patient(alice, list(keys), verifying_key)  # any sequence

    info = registry.get_patient(alice.address)
    assert info == PatientInfo(
        address=alice.address, umbral_public_keys=keys, verifying_key=verifying_key
    )
    assert [info.umbral_key(t) for t in RecordType] == list(keys)
    assert info.umbral_key(RecordType.SURGERY) == keys[5]
    assert registry.get_patient(alice.address.lower()) is not None
    (event,) = decode_events(anvil, registry, tx_hash, "PatientRegistered")
    assert event.args.patient == alice.address
    assert event.args.umbralKeys == b"".join(keys)  # concatenated in type order
    assert event.args.verifyingKey == verifying_key
    block = registry.block_of_transaction(tx_hash)
    assert registry.events(block, block) == [
        PatientRegistered(
            block, registry.block(block).timestamp, alice.address, keys, verifying_key
        )
    ]


def test_register_patient_twice_is_rejected(
    registry: RegistryClient, patient: LocalAccount
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.register_patient(patient, umbral_keys(), compressed_point())
    rejected(excinfo, "PatientAlreadyRegistered")
    assert "registerPatient" in str(excinfo.value)


def _with_key(index: int, key: Any) -> list[Any]:
    keys: list[Any] = list(umbral_keys())
    keys[index] = key
    return keys


@pytest.mark.parametrize(
    ("keys", "verifying_key"),
    [
        (umbral_keys()[:5], compressed_point()),  # one type without a key
        (umbral_keys() + (compressed_point(),), compressed_point()),  # one too many
        (b"".join(umbral_keys()), compressed_point()),  # the contract's packed form
        (_with_key(0, compressed_point()[:32]), compressed_point()),
        (_with_key(5, b"\x04" + os.urandom(32)), compressed_point()),
        (_with_key(3, "not bytes"), compressed_point()),
        (umbral_keys(), compressed_point() + b"\x00"),
        (umbral_keys(), b"\x04" + os.urandom(32)),
    ],
)
def test_bad_patient_keys_are_refused_before_sending(
    registry: RegistryClient,
    make_account: Callable[[], LocalAccount],
    dead_rpc_url: str,
    keys: Any,
    verifying_key: bytes,
) -> None:
    alice = make_account()
    with pytest.raises(InvalidRequest):
        registry.register_patient(alice, keys, verifying_key)
    # Refused without a round trip: a client whose chain is unreachable says the same.
    offline = RegistryClient(dead_rpc_url, registry.address)
    with pytest.raises(InvalidRequest):
        offline.register_patient(alice, keys, verifying_key)
    assert registry.get_patient(alice.address) is None


@pytest.mark.parametrize("keys", [None, 42])
def test_a_non_sequence_of_keys_is_an_invalid_request(
    registry: RegistryClient, make_account: Callable[[], LocalAccount], keys: Any
) -> None:
    with pytest.raises(InvalidRequest):
        registry.register_patient(make_account(), keys, compressed_point())


def test_contract_checks_the_key_encoding_itself(
    registry: RegistryClient, make_account: Callable[[], LocalAccount]
) -> None:
    # Bypass the adapter's checks to prove the contract enforces them on its own.
    alice = make_account()
    f = registry._contract.functions
    good = b"".join(umbral_keys())
    uncompressed_last = good[: 5 * 33] + b"\x04" + os.urandom(32)
    for keys in (good[:33], good[: 5 * 33], good + compressed_point(), uncompressed_last):
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(
                alice, "registerPatient", f.registerPatient(keys, compressed_point())
            )
        rejected(excinfo, "InvalidUmbralKey")
    with pytest.raises(ChainRejected) as excinfo:
        registry._transact(alice, "registerPatient", f.registerPatient(good, b"\x02" * 20))
    rejected(excinfo, "InvalidVerifyingKey")
    assert registry.get_patient(alice.address) is None


# ------------------------------------------------------------------- records


def test_patient_anchors_a_record(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount
) -> None:
    content_hash, capsule_hash = random32(), random32()
    record_id = record_id_of(patient.address, capsule_hash)
    tx_hash = registry.anchor_record(
        patient,
        patient=patient.address,
        content_hash=content_hash,
        storage_uri="blob://sha2-256/abc",
        record_type=RecordType.IMAGING,
        capsule_hash=capsule_hash,
    )
    _, now = registry.latest_block()

    record = registry.get_record(record_id)
    assert record == RecordInfo(
        record_id=record_id,
        patient=patient.address,
        content_hash=content_hash,
        storage_uri="blob://sha2-256/abc",
        record_type=RecordType.IMAGING,
        capsule_hash=capsule_hash,
        creator=patient.address,
        active=True,
        created_at=now,
    )
    (event,) = decode_events(anvil, registry, tx_hash, "RecordAnchored")
    assert event.args.recordId == record_id
    assert event.args.patient == patient.address
    assert event.args.recordType == RecordType.IMAGING
    assert event.args.creator == patient.address
    assert event.args.contentHash == content_hash
    assert event.args.capsuleHash == capsule_hash


def test_provider_anchors_a_record_for_a_patient_who_authorised_it(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    assert registry.is_record_writer(patient.address, provider.address) is False
    tx_hash = registry.set_record_writer(patient, provider.address, allowed=True)
    (event,) = decode_events(anvil, registry, tx_hash, "RecordWriterChanged")
    assert (event.args.patient, event.args.writer, event.args.allowed) == (
        patient.address,
        provider.address,
        True,
    )
    assert registry.is_record_writer(patient.address, provider.address) is True

    record_id = anchor(registry, provider, patient.address, record_type=RecordType.PRESCRIPTION)
    record = registry.get_record(record_id)
    assert record is not None
    assert record.patient == patient.address
    assert record.creator == provider.address
    assert record.record_type is RecordType.PRESCRIPTION

    registry.set_record_writer(patient, provider.address, allowed=False)
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, provider, patient.address)
    rejected(excinfo, "NotRecordWriter")


def test_a_provider_the_patient_did_not_authorise_cannot_anchor_for_her(
    registry: RegistryClient,
    patient: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    # Issue 10: a provider holding PROVIDER_ROLE (or a grant) is not thereby a writer of
    # every patient's records.
    stranger = make_account()
    for sender in (provider, stranger):
        with pytest.raises(ChainRejected) as excinfo:
            anchor(registry, sender, patient.address)
        rejected(excinfo, "NotRecordWriter")
        assert "anchorRecord" in str(excinfo.value)


def test_a_writer_that_loses_the_provider_role_can_no_longer_anchor(
    registry: RegistryClient, deployer: LocalAccount, patient: LocalAccount, provider: LocalAccount
) -> None:
    registry.set_record_writer(patient, provider.address, allowed=True)
    fn = registry._contract.functions.revokeRole(PROVIDER_ROLE, provider.address)
    registry._transact(deployer, "revokeRole", fn)
    assert registry.is_record_writer(patient.address, provider.address) is False
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, provider, patient.address)
    rejected(excinfo, "NotRecordWriter")


def test_only_providers_can_be_authorised_as_writers(
    registry: RegistryClient, patient: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_record_writer(patient, make_account().address, allowed=True)
    rejected(excinfo, "WriterNotProvider")
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_record_writer(patient, patient.address, allowed=True)
    rejected(excinfo, "GranteeIsPatient")
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_record_writer(make_account(), patient.address, allowed=True)
    rejected(excinfo, "PatientNotRegistered")


def test_record_needs_a_registered_patient(
    registry: RegistryClient, make_account: Callable[[], LocalAccount]
) -> None:
    unregistered = make_account()
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, unregistered, unregistered.address)
    rejected(excinfo, "PatientNotRegistered")


def test_record_ids_are_derived_from_patient_and_capsule(
    registry: RegistryClient, patient: LocalAccount
) -> None:
    capsule_hash = random32()
    record_id = anchor(registry, patient, patient.address, capsule_hash=capsule_hash)
    assert registry._contract.functions.recordIdOf(patient.address, capsule_hash).call() == (
        record_id
    )
    assert registry.record_of_capsule(capsule_hash) == record_id
    assert registry.record_of_capsule(random32()) is None


def test_a_capsule_is_anchored_once_for_ever(
    registry: RegistryClient,
    patient: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    # Issue 10: a deactivated record's capsule cannot come back under a new record id,
    # neither for the same patient (by her or her writer) nor for anyone else.
    capsule_hash = random32()
    record_id = anchor(registry, patient, patient.address, capsule_hash=capsule_hash)
    registry.set_record_writer(patient, provider.address, allowed=True)
    other = make_account()
    registry.register_patient(other, umbral_keys(), compressed_point())
    for sender, owner in ((patient, patient), (provider, patient), (other, other)):
        with pytest.raises(ChainRejected) as excinfo:
            anchor(registry, sender, owner.address, capsule_hash=capsule_hash)
        rejected(excinfo, "CapsuleAlreadyAnchored")

    registry.deactivate_record(patient, record_id)
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, provider, patient.address, capsule_hash=capsule_hash)
    rejected(excinfo, "CapsuleAlreadyAnchored")
    assert registry.record_of_capsule(capsule_hash) == record_id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("content_hash", b"\x00" * 32),
        ("capsule_hash", os.urandom(31)),
        ("storage_uri", ""),
        ("storage_uri", "x" * 257),
        ("record_type", 6),
        ("patient", "0x1234"),
    ],
)
def test_bad_record_fields_are_refused_before_sending(
    registry: RegistryClient, patient: LocalAccount, field: str, value: Any
) -> None:
    fields: dict[str, Any] = {
        "patient": patient.address,
        "content_hash": random32(),
        "storage_uri": "blob://x",
        "record_type": RecordType.DIAGNOSIS,
        "capsule_hash": random32(),
    }
    fields[field] = value
    with pytest.raises(InvalidRequest):
        registry.anchor_record(patient, **fields)


def test_contract_checks_record_fields_itself(
    registry: RegistryClient, patient: LocalAccount
) -> None:
    f = registry._contract.functions
    cases = [
        (
            f.anchorRecord(patient.address, b"\x00" * 32, "u", 0, random32()),
            "InvalidContentHash",
        ),
        (
            f.anchorRecord(patient.address, random32(), "u", 0, b"\x00" * 32),
            "InvalidCapsuleHash",
        ),
        (
            f.anchorRecord(patient.address, random32(), "u", 6, random32()),
            "InvalidRecordType",
        ),
        (
            f.anchorRecord(patient.address, random32(), "", 0, random32()),
            "InvalidStorageUri",
        ),
    ]
    for fn, reason in cases:
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(patient, "anchorRecord", fn)
        rejected(excinfo, reason)


def test_only_the_patient_deactivates_a_record(
    anvil: AnvilProcess,
    registry: RegistryClient,
    patient: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    registry.set_record_writer(patient, provider.address, allowed=True)
    record_id = anchor(registry, provider, patient.address)
    for other in (provider, make_account()):  # not even the record's creator
        with pytest.raises(ChainRejected) as excinfo:
            registry.deactivate_record(other, record_id)
        rejected(excinfo, "NotRecordPatient")

    tx_hash = registry.deactivate_record(patient, record_id)

    record = registry.get_record(record_id)
    assert record is not None and record.active is False
    (event,) = decode_events(anvil, registry, tx_hash, "RecordDeactivated")
    assert (event.args.recordId, event.args.patient) == (record_id, patient.address)
    with pytest.raises(ChainRejected) as excinfo:
        registry.deactivate_record(patient, record_id)
    rejected(excinfo, "RecordNotActive")
    with pytest.raises(ChainRejected) as excinfo:
        registry.deactivate_record(patient, random32())
    rejected(excinfo, "RecordNotFound")


def test_unknown_record_reads_as_none(registry: RegistryClient) -> None:
    assert registry.get_record(random32()) is None
    assert registry.get_record(b"\x00" * 32) is None


# -------------------------------------------------------------------- grants


def test_grant_access_to_a_provider(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    key = compressed_point()
    _, now = registry.latest_block()
    mask = to_mask([RecordType.LAB_RESULT, RecordType.IMAGING])
    tx_hash = registry.grant_access(
        patient,
        grantee=provider.address,
        grantee_umbral_key=key,
        expires_at=now + HOUR,
        allowed_types_mask=mask,
    )
    _, granted_at = registry.latest_block()

    assert registry.get_grant(patient.address, provider.address) == GrantInfo(
        patient=patient.address,
        grantee=provider.address,
        grantee_umbral_key=key,
        expires_at=now + HOUR,
        allowed_types_mask=mask,
        active=True,
        granted_at=granted_at,
    )
    (event,) = decode_events(anvil, registry, tx_hash, "AccessGranted")
    assert event.args.patient == patient.address
    assert event.args.grantee == provider.address
    assert event.args.granteeUmbralKey == key
    assert event.args.expiresAt == now + HOUR
    assert event.args.allowedTypes == mask
    # Nothing granted the other way round.
    assert registry.get_grant(provider.address, patient.address) is None


def test_grantee_must_be_a_provider(
    registry: RegistryClient, patient: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        grant(registry, patient, make_account().address)
    rejected(excinfo, "GranteeNotProvider")
    assert str(excinfo.value) == "registry rejected grantAccess: GranteeNotProvider"
    with pytest.raises(ChainRejected) as excinfo:
        grant(registry, patient, patient.address)
    rejected(excinfo, "GranteeIsPatient")


def test_only_registered_patients_grant(
    registry: RegistryClient, provider: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        grant(registry, make_account(), provider.address)
    rejected(excinfo, "PatientNotRegistered")


def test_grant_expiry_must_be_in_the_future(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    for ttl in (0, -HOUR):
        with pytest.raises(ChainRejected) as excinfo:
            grant(registry, patient, provider.address, ttl=ttl)
        rejected(excinfo, "ExpiryInPast")


@pytest.mark.parametrize("mask", [0, ALL_TYPES_MASK + 1, 1 << 6, -1])
def test_grant_types_must_be_valid(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount, mask: int
) -> None:
    with pytest.raises(InvalidRequest):
        grant(registry, patient, provider.address, mask=mask)


def test_contract_checks_grant_types_itself(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    _, now = registry.latest_block()
    for mask in (0, 1 << 6):
        fn = registry._contract.functions.grantAccess(
            provider.address, compressed_point(), now + HOUR, mask
        )
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(patient, "grantAccess", fn)
        rejected(excinfo, "InvalidRecordTypes")


def test_bad_grant_inputs_are_refused_before_sending(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    with pytest.raises(InvalidRequest):
        grant(registry, patient, provider.address, key=b"\x02" * 32)
    with pytest.raises(InvalidRequest):
        grant(registry, patient, "not-an-address")
    with pytest.raises(InvalidRequest):
        registry.grant_access(
            patient,
            grantee=provider.address,
            grantee_umbral_key=compressed_point(),
            expires_at=2**64,
            allowed_types_mask=1,
        )


def test_revoke_access(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.revoke_access(patient, provider.address)  # nothing granted yet
    rejected(excinfo, "GrantNotActive")
    grant(registry, patient, provider.address)

    tx_hash = registry.revoke_access(patient, provider.address)

    revoked = registry.get_grant(patient.address, provider.address)
    assert revoked is not None and revoked.active is False
    (event,) = decode_events(anvil, registry, tx_hash, "AccessRevoked")
    assert (event.args.patient, event.args.grantee) == (patient.address, provider.address)
    with pytest.raises(ChainRejected) as excinfo:
        registry.revoke_access(patient, provider.address)
    rejected(excinfo, "GrantNotActive")


def test_granting_again_replaces_the_grant(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    grant(registry, patient, provider.address, mask=to_mask([RecordType.DIAGNOSIS]))
    registry.revoke_access(patient, provider.address)
    new_key = compressed_point()
    grant(
        registry,
        patient,
        provider.address,
        mask=to_mask([RecordType.SURGERY]),
        key=new_key,
        ttl=2 * HOUR,
    )

    current = registry.get_grant(patient.address, provider.address)
    assert current is not None
    assert current.active is True
    assert current.grantee_umbral_key == new_key
    assert current.allowed_types_mask == to_mask([RecordType.SURGERY])
    # expires_at was set from the latest block's time before the grant was sent; the
    # grant's own block may be a second later.
    assert 0 <= current.granted_at + 2 * HOUR - current.expires_at <= 1


# --------------------------------------------------------------------- nodes


def register_node(
    registry: RegistryClient,
    admin: LocalAccount,
    node_id: str,
    *,
    account: str | None = None,
    endpoint: str | None = None,
    signing_public_key: bytes = b"\x30" * 91,
    delivery_public_key: bytes | None = None,
) -> str:
    return registry.register_node(
        admin,
        node_id=node_id,
        endpoint=endpoint or f"127.0.0.1:{7000 + len(node_id)}",
        signing_public_key=signing_public_key,
        delivery_public_key=delivery_public_key or p256_point(),
        account=account or Account.create().address,
    )


def test_node_registry_requires_the_node_admin_role(
    anvil: AnvilProcess,
    registry: RegistryClient,
    deployer: LocalAccount,
    provider: LocalAccount,
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        register_node(registry, provider, "node-1")
    rejected(excinfo, "AccessControlUnauthorizedAccount")
    assert provider.address in str(excinfo.value)  # the decoded argument names the caller

    delivery_1, delivery_2 = p256_point(), p256_point()
    account_1, account_2 = Account.create().address, Account.create().address
    tx_hash = registry.register_node(
        deployer,
        node_id="node-1",
        endpoint="127.0.0.1:7001",
        signing_public_key=b"\x02" * 33,
        delivery_public_key=delivery_1,
        account=account_1,
    )
    registry.register_node(
        deployer,
        node_id="node-2",
        endpoint="127.0.0.1:7002",
        signing_public_key=b"\x03" * 33,
        delivery_public_key=delivery_2,
        account=account_2.lower(),  # any spelling; read back checksummed
    )
    (event,) = decode_events(anvil, registry, tx_hash, "NodeRegistered")
    assert event.args.nodeKey == Web3.keccak(text="node-1")
    assert event.args.nodeId == "node-1"
    assert event.args.endpoint == "127.0.0.1:7001"
    assert event.args.signingKey == b"\x02" * 33
    assert event.args.deliveryKey == delivery_1
    assert event.args.account == account_1

    with pytest.raises(ChainRejected) as excinfo:
        register_node(registry, deployer, "node-1")
    rejected(excinfo, "NodeAlreadyRegistered")
    # One account anchors for one node only: another node cannot reuse node-1's.
    with pytest.raises(ChainRejected) as excinfo:
        registry.register_node(
            deployer,
            node_id="node-3",
            endpoint="127.0.0.1:7003",
            signing_public_key=b"\x02" * 33,
            delivery_public_key=p256_point(),
            account=account_1,
        )
    rejected(excinfo, "NodeAccountInUse")

    registry.set_node_active(deployer, node_id="node-2", active=False)
    assert registry.list_nodes() == [
        NodeInfo("node-1", "127.0.0.1:7001", b"\x02" * 33, delivery_1, account_1, True),
        NodeInfo("node-2", "127.0.0.1:7002", b"\x03" * 33, delivery_2, account_2, False),
    ]
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_node_active(provider, node_id="node-1", active=False)
    rejected(excinfo, "AccessControlUnauthorizedAccount")
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_node_active(deployer, node_id="node-9", active=False)
    rejected(excinfo, "NodeNotRegistered")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", ""),
        ("node_id", "n" * 33),
        ("endpoint", ""),
        ("endpoint", "e" * 257),
        ("signing_public_key", b""),
        ("signing_public_key", b"k" * 257),
        ("signing_public_key", "not bytes"),
        ("delivery_public_key", b""),
        ("delivery_public_key", p256_point()[:32]),
        ("delivery_public_key", b"\x04" + bytes(range(1, 33))),
        ("delivery_public_key", b"\x04" + bytes(range(1, 65))),  # uncompressed P-256
        ("account", "0x1234"),
        ("account", ""),
        ("account", None),
    ],
    ids=[
        "empty-node-id",
        "long-node-id",
        "empty-endpoint",
        "long-endpoint",
        "empty-signing-key",
        "long-signing-key",
        "text-signing-key",
        "empty-delivery-key",
        "short-delivery-key",
        "bad-prefix-delivery-key",
        "uncompressed-delivery-key",
        "short-account",
        "empty-account",
        "no-account",
    ],
)
def test_bad_node_fields_are_refused_before_sending(
    registry: RegistryClient, deployer: LocalAccount, dead_rpc_url: str, field: str, value: Any
) -> None:
    fields: dict[str, Any] = {
        "node_id": "n",
        "endpoint": "e",
        "signing_public_key": b"k",
        "delivery_public_key": p256_point(),
        "account": Account.create().address,
    }
    fields[field] = value
    with pytest.raises(InvalidRequest):
        registry.register_node(deployer, **fields)
    offline = RegistryClient(dead_rpc_url, registry.address)
    with pytest.raises(InvalidRequest):
        offline.register_node(deployer, **fields)
    assert registry.list_nodes() == []


def test_contract_checks_the_delivery_key_and_account_itself(
    registry: RegistryClient, deployer: LocalAccount
) -> None:
    f = registry._contract.functions
    account = Account.create().address
    for bad_key in (b"", p256_point()[:32], p256_point() + b"\x00", b"\x04" + os.urandom(32)):
        fn = f.registerNode("node-1", "127.0.0.1:7001", b"k", bad_key, account)
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(deployer, "registerNode", fn)
        rejected(excinfo, "InvalidDeliveryKey")
        assert "registerNode" in str(excinfo.value)

    # The zero address is a well-formed address: the adapter sends it, the contract refuses.
    with pytest.raises(ChainRejected) as excinfo:
        register_node(registry, deployer, "node-1", account="0x" + "00" * 20)
    rejected(excinfo, "InvalidNodeAccount")
    assert registry.list_nodes() == []


def test_only_the_admin_grants_the_provider_role(
    registry: RegistryClient, patient: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.grant_provider_role(patient, make_account().address)
    rejected(excinfo, "AccessControlUnauthorizedAccount")


# -------------------------------------------------------------- access state


def test_access_state_is_one_call_with_record_grant_and_block(
    anvil: AnvilProcess,
    registry: RegistryClient,
    patient: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
    rpc_recorder: HostileRpc,
) -> None:
    record_id = anchor(registry, patient, patient.address, record_type=RecordType.VACCINATION)
    grant(registry, patient, provider.address, mask=to_mask([RecordType.VACCINATION]))
    number, timestamp = registry.latest_block()

    # A node's client, seen through a recording proxy: one request, and it is an eth_call.
    capsule_hash = capsule(registry, record_id)
    node_view = RegistryClient(rpc_recorder.url, registry.address)
    state = node_view.access_state(record_id, provider.address, capsule_hash)
    assert rpc_recorder.methods == ["eth_call"]
    with ThreadPoolExecutor(max_workers=1) as pool:  # a fresh thread costs nothing extra
        pool.submit(node_view.access_state, record_id, provider.address, capsule_hash).result()
    assert rpc_recorder.methods == ["eth_call", "eth_call"]

    assert state.record == registry.get_record(record_id)
    assert state.grant == registry.get_grant(patient.address, provider.address)
    assert state.grant is not None and state.grant.allowed_types_mask == 1 << 4
    assert (state.block_number, state.block_timestamp) == (number, timestamp)

    increase_time(anvil.rpc_url, 2 * HOUR)
    later = registry.access_state(record_id, provider.address, capsule(registry, record_id))
    assert later.block_number == number + 1
    assert later.block_timestamp >= timestamp + 2 * HOUR
    assert later.grant is not None and later.grant.expires_at < later.block_timestamp

    # Unknown record: nothing. Known record, grantee without a grant: record only.
    assert registry.access_state(random32(), provider.address, random32()) == AccessState(
        record=None,
        grant=None,
        block_number=later.block_number,
        block_timestamp=later.block_timestamp,
    )
    stranger_view = registry.access_state(
        record_id, make_account().address, capsule(registry, record_id)
    )
    assert stranger_view.record is not None and stranger_view.grant is None


def test_access_state_after_revocation_and_deactivation(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    record_id = anchor(registry, patient, patient.address)
    grant(registry, patient, provider.address)
    registry.revoke_access(patient, provider.address)
    registry.deactivate_record(patient, record_id)
    state = registry.access_state(record_id, provider.address, capsule(registry, record_id))
    assert state.record is not None and state.record.active is False
    assert state.grant is not None and state.grant.active is False
    assert state.capsule_retired is True


def test_access_state_says_when_the_capsule_belongs_to_a_deactivated_record(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    # Whichever record a request names: the capsule's own record decides.
    retired = anchor(registry, patient, patient.address)
    live = anchor(registry, patient, patient.address)
    grant(registry, patient, provider.address)
    old_capsule = capsule(registry, retired)
    assert registry.access_state(live, provider.address, old_capsule).capsule_retired is False
    registry.deactivate_record(patient, retired)
    assert registry.access_state(live, provider.address, old_capsule).capsule_retired is True
    assert registry.access_state(random32(), provider.address, old_capsule).capsule_retired
    fresh = registry.access_state(live, provider.address, capsule(registry, live))
    assert fresh.capsule_retired is False and fresh.record is not None and fresh.record.active
    assert registry.access_state(live, provider.address, random32()).capsule_retired is False


# ----------------------------------------------------------------- emergency


def opt_in(
    registry: RegistryClient,
    patient: LocalAccount,
    responder: str,
    *,
    mask: int = to_mask([RecordType.DIAGNOSIS, RecordType.PRESCRIPTION]),
    key: bytes | None = None,
) -> bytes:
    """Opt the patient in to `responder`; returns the responder's Umbral key."""
    key = key or compressed_point()
    registry.opt_in_emergency(
        patient, responder=responder, responder_umbral_key=key, allowed_types_mask=mask
    )
    return key


def block_time(registry: RegistryClient, tx_hash: str) -> tuple[int, int]:
    """(number, timestamp) of the block a transaction was mined in."""
    block = registry.block(registry.block_of_transaction(tx_hash))
    return block.number, block.timestamp


def test_only_the_admin_grants_the_emergency_role(
    registry: RegistryClient,
    deployer: LocalAccount,
    patient: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    someone = make_account()
    with pytest.raises(ChainRejected) as excinfo:
        registry.grant_emergency_role(patient, someone.address)
    rejected(excinfo, "AccessControlUnauthorizedAccount")
    assert EMERGENCY_ROLE == registry._contract.functions.EMERGENCY_ROLE().call()
    assert not registry._contract.functions.hasRole(EMERGENCY_ROLE, someone.address).call()
    registry.grant_emergency_role(deployer, someone.address)
    assert registry._contract.functions.hasRole(EMERGENCY_ROLE, someone.address).call()
    with pytest.raises(InvalidRequest):
        registry.grant_emergency_role(deployer, "0x1234")


def test_opt_in_emergency_and_read_back(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    assert registry.get_emergency_opt_in(patient.address, responder.address) is None
    key, mask = compressed_point(), to_mask([RecordType.DIAGNOSIS, RecordType.SURGERY])

    tx_hash = registry.opt_in_emergency(
        patient, responder=responder.address, responder_umbral_key=key, allowed_types_mask=mask
    )

    assert registry.get_emergency_opt_in(patient.address, responder.address) == EmergencyOptIn(
        patient=patient.address,
        responder=responder.address,
        responder_umbral_key=key,
        allowed_types_mask=mask,
        active=True,
    )
    (event,) = decode_events(anvil, registry, tx_hash, "EmergencyOptInChanged")
    assert (event.args.patient, event.args.responder) == (patient.address, responder.address)
    assert (event.args.responderUmbralKey, event.args.allowedTypes) == (key, mask)
    assert event.args.active is True
    # An opt-in is not a grant: nothing is open until the responder asks.
    assert registry.get_grant(patient.address, responder.address) is None
    # Nor does it work the other way round.
    assert registry.get_emergency_opt_in(responder.address, patient.address) is None

    # Opting in again replaces the terms.
    new_key = opt_in(registry, patient, responder.address, mask=ALL_TYPES_MASK)
    current = registry.get_emergency_opt_in(patient.address, responder.address)
    assert current is not None
    assert (current.responder_umbral_key, current.allowed_types_mask) == (new_key, ALL_TYPES_MASK)


def test_opt_in_refusals(
    registry: RegistryClient,
    patient: LocalAccount,
    responder: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    # A provider without EMERGENCY_ROLE, or anyone else, cannot be named a responder.
    for not_a_responder in (provider.address, make_account().address):
        with pytest.raises(ChainRejected) as excinfo:
            opt_in(registry, patient, not_a_responder)
        rejected(excinfo, "ResponderNotEmergencyRole")
        assert registry.get_emergency_opt_in(patient.address, not_a_responder) is None
    with pytest.raises(ChainRejected) as excinfo:
        opt_in(registry, make_account(), responder.address)
    rejected(excinfo, "PatientNotRegistered")
    with pytest.raises(ChainRejected) as excinfo:
        opt_in(registry, patient, patient.address)
    rejected(excinfo, "GranteeIsPatient")

    # Malformed terms: refused by the adapter, and by the contract on its own.
    for mask in (0, 1 << 6, -1):
        with pytest.raises(InvalidRequest):
            opt_in(registry, patient, responder.address, mask=mask)
    with pytest.raises(InvalidRequest):
        opt_in(registry, patient, responder.address, key=b"\x04" + os.urandom(32))
    f = registry._contract.functions
    for fn, reason in [
        (f.optInEmergency(responder.address, compressed_point(), 0), "InvalidRecordTypes"),
        (f.optInEmergency(responder.address, compressed_point(), 1 << 6), "InvalidRecordTypes"),
        (f.optInEmergency(responder.address, b"\x04" + os.urandom(32), 1), "InvalidUmbralKey"),
        (f.optInEmergency(responder.address, compressed_point()[:32], 1), "InvalidUmbralKey"),
    ]:
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(patient, "optInEmergency", fn)
        rejected(excinfo, reason)
    assert registry.get_emergency_opt_in(patient.address, responder.address) is None


def test_responder_opens_emergency_access(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    mask = to_mask([RecordType.DIAGNOSIS, RecordType.PRESCRIPTION])
    key = opt_in(registry, patient, responder.address, mask=mask)
    record_id = anchor(registry, patient, patient.address, record_type=RecordType.DIAGNOSIS)

    tx_hash = registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)

    number, opened_at = block_time(registry, tx_hash)
    expected = GrantInfo(
        patient=patient.address,
        grantee=responder.address,
        grantee_umbral_key=key,
        expires_at=opened_at + HOUR,
        allowed_types_mask=mask,
        active=True,
        granted_at=opened_at,
        emergency=True,
    )
    assert registry.get_grant(patient.address, responder.address) == expected
    state = registry.access_state(record_id, responder.address, capsule(registry, record_id))
    assert state.grant == expected
    assert state.block_timestamp < expected.expires_at
    (event,) = decode_events(anvil, registry, tx_hash, "EmergencyAccessOpened")
    assert (event.args.patient, event.args.responder) == (patient.address, responder.address)
    assert event.args.responderUmbralKey == key
    assert event.args.expiresAt == opened_at + HOUR
    assert event.args.allowedTypes == mask
    # Emergency access is announced by its own event, never as an ordinary grant.
    assert decode_events(anvil, registry, tx_hash, "AccessGranted") == ()
    assert registry.events(number, number) == [
        EmergencyAccessOpened(
            number, opened_at, patient.address, responder.address, key, opened_at + HOUR, mask
        )
    ]


def test_emergency_access_needs_the_role_and_an_opt_in(
    registry: RegistryClient,
    deployer: LocalAccount,
    patient: LocalAccount,
    responder: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    # Not opted in to anyone yet.
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "NotOptedIn")
    assert "openEmergencyAccess" in str(excinfo.value)

    opt_in(registry, patient, responder.address)
    # Another responder with the role, whom this patient did not opt in to.
    other = make_account()
    registry.grant_emergency_role(deployer, other.address)
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(other, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "NotOptedIn")
    # Accounts without the role: refused by the role check whoever they are.
    for stranger in (provider, make_account(), patient):
        with pytest.raises(ChainRejected) as excinfo:
            registry.open_emergency_access(stranger, patient=patient.address, duration_s=HOUR)
        rejected(excinfo, "AccessControlUnauthorizedAccount")
        assert stranger.address in str(excinfo.value)
    # An unregistered "patient" cannot have opted in.
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=make_account().address, duration_s=HOUR)
    rejected(excinfo, "NotOptedIn")
    assert registry.get_grant(patient.address, other.address) is None
    with pytest.raises(InvalidRequest):
        registry.open_emergency_access(responder, patient="0x1234", duration_s=HOUR)


def test_emergency_duration_bounds(
    registry: RegistryClient, patient: LocalAccount, responder: LocalAccount, dead_rpc_url: str
) -> None:
    opt_in(registry, patient, responder.address)
    assert registry._contract.functions.MAX_EMERGENCY_DURATION().call() == (
        MAX_EMERGENCY_DURATION_S
    )
    assert MAX_EMERGENCY_DURATION_S == 4 * HOUR

    # 0 and max+1: the adapter refuses without a round trip ...
    offline = RegistryClient(dead_rpc_url, registry.address)
    for duration in (0, MAX_EMERGENCY_DURATION_S + 1, -1, True, 60.0):
        for client in (registry, offline):
            with pytest.raises(InvalidRequest):
                client.open_emergency_access(
                    responder,
                    patient=patient.address,
                    duration_s=duration,  # type: ignore[arg-type]
                )
    # ... and the contract refuses on its own.
    f = registry._contract.functions
    for duration in (0, MAX_EMERGENCY_DURATION_S + 1, 2**64 - 1):
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(
                responder, "openEmergencyAccess", f.openEmergencyAccess(patient.address, duration)
            )
        rejected(excinfo, "InvalidEmergencyDuration")
    assert registry.get_grant(patient.address, responder.address) is None

    # Exactly the maximum, and the shortest, are accepted.
    for duration in (MAX_EMERGENCY_DURATION_S, 1):
        tx_hash = registry.open_emergency_access(
            responder, patient=patient.address, duration_s=duration
        )
        _, opened_at = block_time(registry, tx_hash)
        opened = registry.get_grant(patient.address, responder.address)
        assert opened is not None and opened.emergency and opened.active
        assert (opened.granted_at, opened.expires_at) == (opened_at, opened_at + duration)
        registry.revoke_access(patient, responder.address)  # a window cannot be extended
        opt_in(registry, patient, responder.address)  # the revoke withdrew the opt-in


def test_a_patients_revoke_ends_emergency_access_until_she_opts_in_again(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    # Issue 10: the responder could re-open a window at once after the patient revoked one.
    key = opt_in(registry, patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=600)
    tx_hash = registry.revoke_access(patient, responder.address)

    (withdrawn,) = decode_events(anvil, registry, tx_hash, "EmergencyOptInChanged")
    assert (withdrawn.args.responder, withdrawn.args.active) == (responder.address, False)
    assert registry.get_emergency_opt_in(patient.address, responder.address) == EmergencyOptIn(
        patient.address,
        responder.address,
        key,
        to_mask([RecordType.DIAGNOSIS, RecordType.PRESCRIPTION]),
        False,
        1,
    )
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=600)
    rejected(excinfo, "NotOptedIn")

    opt_in(registry, patient, responder.address, key=key)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=600)
    reopened = registry.get_grant(patient.address, responder.address)
    assert reopened is not None and reopened.emergency and reopened.active


def test_revoking_an_ordinary_grant_leaves_an_emergency_opt_in_alone(
    registry: RegistryClient, deployer: LocalAccount, patient: LocalAccount, responder: LocalAccount
) -> None:
    opt_in(registry, patient, responder.address)
    registry.grant_provider_role(deployer, responder.address)
    grant(registry, patient, responder.address)
    registry.revoke_access(patient, responder.address)
    opted = registry.get_emergency_opt_in(patient.address, responder.address)
    assert opted is not None and opted.active


def test_emergency_windows_without_the_patient_are_bounded(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    # Issue 10: windows could be chained for ever while the opt-in stood.
    limit = registry._contract.functions.MAX_EMERGENCY_WINDOWS().call()
    assert limit == 3
    key = opt_in(registry, patient, responder.address)
    for opened in range(1, limit + 1):
        registry.open_emergency_access(responder, patient=patient.address, duration_s=60)
        opted = registry.get_emergency_opt_in(patient.address, responder.address)
        assert opted is not None and opted.windows_opened == opened
        increase_time(anvil.rpc_url, 61)  # the window ends by itself
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=60)
    rejected(excinfo, "EmergencyWindowsExhausted")

    # The patient's own action (opting in again) allows the next windows.
    opt_in(registry, patient, responder.address, key=key)
    opted = registry.get_emergency_opt_in(patient.address, responder.address)
    assert opted is not None and opted.windows_opened == 0
    registry.open_emergency_access(responder, patient=patient.address, duration_s=60)


def test_emergency_grant_expires_by_time(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    opt_in(registry, patient, responder.address, mask=ALL_TYPES_MASK)
    record_id = anchor(registry, patient, patient.address, record_type=RecordType.SURGERY)
    tx_hash = registry.open_emergency_access(responder, patient=patient.address, duration_s=600)
    _, opened_at = block_time(registry, tx_hash)

    before = registry.access_state(record_id, responder.address, capsule(registry, record_id))
    assert before.grant is not None and before.grant.expires_at == opened_at + 600
    assert before.block_timestamp < before.grant.expires_at

    increase_time(anvil.rpc_url, 601)

    after = registry.access_state(record_id, responder.address, capsule(registry, record_id))
    assert after.grant is not None
    # Still "active" on-chain (nobody closed it), but its window has passed: nodes judge
    # `block_timestamp >= expires_at` as expired (core/policy.py).
    assert after.grant.active and after.grant.emergency
    assert after.block_timestamp >= after.grant.expires_at

    # A new window may be opened once the old one has lapsed.
    tx_hash = registry.open_emergency_access(responder, patient=patient.address, duration_s=60)
    _, reopened_at = block_time(registry, tx_hash)
    reopened = registry.get_grant(patient.address, responder.address)
    assert reopened is not None and reopened.expires_at == reopened_at + 60
    assert reopened_at >= opened_at + 601


def test_an_open_emergency_window_cannot_be_extended(
    registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    opt_in(registry, patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "EmergencyAccessAlreadyOpen")
    # Revoked by the patient, the window is over; the next opens once she opts in again.
    registry.revoke_access(patient, responder.address)
    opt_in(registry, patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=60)


def test_new_opt_in_terms_close_an_open_window(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    opt_in(registry, patient, responder.address, mask=ALL_TYPES_MASK)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    narrower = to_mask([RecordType.LAB_RESULT])
    tx_hash = registry.opt_in_emergency(
        patient,
        responder=responder.address,
        responder_umbral_key=compressed_point(),
        allowed_types_mask=narrower,
    )
    closed = registry.get_grant(patient.address, responder.address)
    assert closed is not None and not closed.active
    assert len(decode_events(anvil, registry, tx_hash, "AccessRevoked")) == 1
    registry.open_emergency_access(responder, patient=patient.address, duration_s=60)
    reopened = registry.get_grant(patient.address, responder.address)
    assert reopened is not None and reopened.allowed_types_mask == narrower


def test_an_off_curve_delivery_key_is_refused_before_sending(
    registry: RegistryClient, deployer: LocalAccount
) -> None:
    with pytest.raises(InvalidRequest, match="not a point on P-256"):
        registry.register_node(
            deployer,
            node_id="node-off-curve",
            endpoint="127.0.0.1:1",
            signing_public_key=b"\x30" * 91,
            delivery_public_key=b"\x02" + b"\xff" * 32,
            account=deployer.address,
        )


def test_opt_out_closes_an_open_emergency_grant(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    mask = to_mask([RecordType.LAB_RESULT])
    key = opt_in(registry, patient, responder.address, mask=mask)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)

    tx_hash = registry.opt_out_emergency(patient, responder.address)

    closed = registry.get_grant(patient.address, responder.address)
    assert closed is not None and closed.active is False and closed.emergency is True
    (revoked,) = decode_events(anvil, registry, tx_hash, "AccessRevoked")
    assert (revoked.args.patient, revoked.args.grantee) == (patient.address, responder.address)
    (changed,) = decode_events(anvil, registry, tx_hash, "EmergencyOptInChanged")
    assert changed.args.active is False
    assert (changed.args.responderUmbralKey, changed.args.allowedTypes) == (key, mask)
    # The opt-in stays readable, inactive, with the terms it had.
    assert registry.get_emergency_opt_in(patient.address, responder.address) == EmergencyOptIn(
        patient.address, responder.address, key, mask, False, windows_opened=1
    )

    # Opted out: no more windows, and nothing left to opt out of.
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "NotOptedIn")
    with pytest.raises(ChainRejected) as excinfo:
        registry.opt_out_emergency(patient, responder.address)
    rejected(excinfo, "NotOptedIn")
    assert "optOutEmergency" in str(excinfo.value)


def test_revoking_the_emergency_role_ends_open_windows(
    anvil: AnvilProcess,
    registry: RegistryClient,
    deployer: LocalAccount,
    patient: LocalAccount,
    responder: LocalAccount,
) -> None:
    opt_in(registry, patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    record_id = anchor(registry, patient, patient.address)
    open_grant = registry.get_grant(patient.address, responder.address)
    assert open_grant is not None and open_grant.active and open_grant.emergency

    revoked_block = registry.block_of_transaction(
        registry.revoke_emergency_role(deployer, responder.address)
    )

    # Both views the nodes judge by report the window inactive, and so do reads at the
    # revocation's block; before it, the window was open.
    ended = registry.get_grant(patient.address, responder.address)
    assert ended is not None and (ended.active, ended.emergency) == (False, True)
    state = registry.access_state(record_id, responder.address, capsule(registry, record_id))
    assert state.grant is not None and state.grant.active is False
    before = registry.get_grant(patient.address, responder.address, block=revoked_block - 1)
    assert before is not None and before.active
    # The role change is followed, as an event of its own; other roles' changes are not.
    assert registry.events(revoked_block, revoked_block) == [
        EmergencyRoleChanged(
            revoked_block, registry.block(revoked_block).timestamp, responder.address, False
        )
    ]
    provider_block = registry.block_of_transaction(
        registry.grant_provider_role(deployer, Account.create().address)
    )
    assert registry.events(provider_block, provider_block) == []
    # No new window without the role.
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "AccessControlUnauthorizedAccount")

    # Given back before the window's expiry, the role revives the window.
    registry.grant_emergency_role(deployer, responder.address)
    revived = registry.get_grant(patient.address, responder.address)
    assert revived is not None and revived.active


def test_opt_out_without_an_open_grant_revokes_nothing(
    anvil: AnvilProcess,
    registry: RegistryClient,
    patient: LocalAccount,
    responder: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.opt_out_emergency(patient, responder.address)  # never opted in
    rejected(excinfo, "NotOptedIn")
    with pytest.raises(ChainRejected) as excinfo:
        registry.opt_out_emergency(make_account(), responder.address)
    rejected(excinfo, "NotOptedIn")

    opt_in(registry, patient, responder.address)
    tx_hash = registry.opt_out_emergency(patient, responder.address)
    assert decode_events(anvil, registry, tx_hash, "AccessRevoked") == ()
    assert len(decode_events(anvil, registry, tx_hash, "EmergencyOptInChanged")) == 1
    assert registry.get_grant(patient.address, responder.address) is None


def test_ordinary_grant_blocks_emergency_access_until_it_ends(
    anvil: AnvilProcess,
    registry: RegistryClient,
    deployer: LocalAccount,
    patient: LocalAccount,
    responder: LocalAccount,
) -> None:
    # The responder is also a provider the patient has granted ordinary access.
    registry.grant_provider_role(deployer, responder.address)
    opt_in(registry, patient, responder.address, mask=ALL_TYPES_MASK)
    ordinary_key = compressed_point()
    grant(registry, patient, responder.address, key=ordinary_key, ttl=600)

    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "GrantAlreadyActive")

    # Opting out leaves the ordinary grant alone.
    tx_hash = registry.opt_out_emergency(patient, responder.address)
    assert decode_events(anvil, registry, tx_hash, "AccessRevoked") == ()
    ordinary = registry.get_grant(patient.address, responder.address)
    assert ordinary is not None and ordinary.active and not ordinary.emergency
    assert ordinary.grantee_umbral_key == ordinary_key

    # Once the ordinary grant has expired, an emergency window may replace it.
    opt_in(registry, patient, responder.address, mask=ALL_TYPES_MASK)
    increase_time(anvil.rpc_url, 601)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    replaced = registry.get_grant(patient.address, responder.address)
    assert replaced is not None and replaced.active and replaced.emergency

    # And likewise once it has been revoked (the patient's revoke of the window withdrew
    # the opt-in, so she opts in again first).
    registry.revoke_access(patient, responder.address)  # the patient may close it this way too
    opt_in(registry, patient, responder.address, mask=ALL_TYPES_MASK)
    grant(registry, patient, responder.address)
    with pytest.raises(ChainRejected) as excinfo:
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    rejected(excinfo, "GrantAlreadyActive")
    registry.revoke_access(patient, responder.address)
    registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    reopened = registry.get_grant(patient.address, responder.address)
    assert reopened is not None and reopened.active and reopened.emergency


def test_emergency_events_decode_in_chain_order(
    registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    mask = to_mask([RecordType.IMAGING])
    key = compressed_point()
    first = registry.block_of_transaction(
        registry.opt_in_emergency(
            patient, responder=responder.address, responder_umbral_key=key, allowed_types_mask=mask
        )
    )
    opened_block, opened_at = block_time(
        registry,
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR),
    )
    last = registry.block_of_transaction(registry.opt_out_emergency(patient, responder.address))
    p, r = patient.address, responder.address

    assert registry.events(first, last) == [
        EmergencyOptInChanged(first, registry.block(first).timestamp, p, r, key, mask, True),
        EmergencyAccessOpened(opened_block, opened_at, p, r, key, opened_at + HOUR, mask),
        # Opting out closes the open window first, then records the change of consent.
        AccessRevoked(last, registry.block(last).timestamp, p, r),
        EmergencyOptInChanged(last, registry.block(last).timestamp, p, r, key, mask, False),
    ]


# --------------------------------------------------------------- checkpoints


class ForeignSigner:
    """A TxSigner whose key is "elsewhere" (as a node's HSM): only signs raw transactions."""

    def __init__(self, account: LocalAccount) -> None:
        self._account = account
        self.signed = 0

    @property
    def address(self) -> str:
        return str(self._account.address)

    def sign_raw_transaction(self, tx: dict[str, Any]) -> bytes:
        self.signed += 1
        return bytes(self._account.sign_transaction(tx).raw_transaction)


def checkpoint(
    registry: RegistryClient,
    sender: Any,
    node_id: str,
    tree_size: int,
    *,
    root_hash: bytes | None = None,
    timestamp: int = 1_700_000_000,
    signature: bytes = b"\x30" * 70,
) -> str:
    return registry.anchor_checkpoint(
        sender,
        node_id=node_id,
        tree_size=tree_size,
        root_hash=root_hash or random32(),
        timestamp=timestamp,
        signature=signature,
    )


def test_node_anchors_checkpoints_from_its_own_account(
    anvil: AnvilProcess,
    registry: RegistryClient,
    deployer: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    node = make_account()
    register_node(registry, deployer, "node-1", account=node.address)
    assert registry.latest_checkpoint("node-1") is None
    assert registry.checkpoint_anchors("node-1") == []

    root, signature = random32(), os.urandom(71)
    tx_hash = checkpoint(
        registry, node, "node-1", 3, root_hash=root, timestamp=1_700_000_123, signature=signature
    )

    assert registry.latest_checkpoint("node-1") == (3, root, 1_700_000_123)
    (event,) = decode_events(anvil, registry, tx_hash, "CheckpointAnchored")
    assert event.args.nodeKey == Web3.keccak(text="node-1")
    assert (event.args.nodeId, event.args.treeSize, event.args.rootHash) == ("node-1", 3, root)
    assert (event.args.timestamp, event.args.signature) == (1_700_000_123, signature)
    # A zero root hash is a legal value (the adapter does not insist on nonzero).
    checkpoint(registry, node, "node-1", 4, root_hash=b"\x00" * 32)
    assert registry.latest_checkpoint("node-1") == (4, b"\x00" * 32, 1_700_000_000)
    # Checkpoint events are not grant-index events.
    block = registry.block_of_transaction(tx_hash)
    assert registry.events(block, block) == []


def test_a_node_key_held_elsewhere_anchors_through_a_tx_signer(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    signer = ForeignSigner(make_account())
    register_node(registry, deployer, "node-hsm", account=signer.address)
    checkpoint(registry, signer, "node-hsm", 1)
    assert signer.signed == 1
    latest = registry.latest_checkpoint("node-hsm")
    assert latest is not None and latest[0] == 1
    with pytest.raises(InvalidRequest):
        checkpoint(registry, object(), "node-hsm", 2)


def test_only_the_nodes_account_anchors_its_checkpoints(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    node_1, node_2 = make_account(), make_account()
    register_node(registry, deployer, "node-1", account=node_1.address)
    register_node(registry, deployer, "node-2", account=node_2.address)
    # Not the admin who registered it, not another node, not a stranger.
    for wrong in (deployer, node_2, make_account()):
        with pytest.raises(ChainRejected) as excinfo:
            checkpoint(registry, wrong, "node-1", 5)
        rejected(excinfo, "NotNodeAccount")
        assert "anchorCheckpoint" in str(excinfo.value)
    with pytest.raises(ChainRejected) as excinfo:
        checkpoint(registry, node_1, "node-9", 5)
    rejected(excinfo, "NodeNotRegistered")
    assert registry.latest_checkpoint("node-1") is None
    assert registry.latest_checkpoint("node-9") is None


def test_checkpoint_tree_sizes_only_grow(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    node = make_account()
    register_node(registry, deployer, "node-1", account=node.address)
    root = random32()
    checkpoint(registry, node, "node-1", 10, root_hash=root)
    for size in (10, 9, 1):
        with pytest.raises(ChainRejected) as excinfo:
            checkpoint(registry, node, "node-1", size)
        rejected(excinfo, "CheckpointNotNewer")
    latest = registry.latest_checkpoint("node-1")
    assert latest is not None and latest[:2] == (10, root)
    checkpoint(registry, node, "node-1", 11)
    assert [a.tree_size for a in registry.checkpoint_anchors("node-1")] == [10, 11]


def test_back_to_back_anchors_are_mined(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    # The second anchor's gas is estimated in the block of the first, where storing the same
    # block.number and checkpoint timestamp looks free; it is mined one block later, where it
    # is not. Without headroom on the estimate it runs out of gas (status 0, no reason).
    node = make_account()
    register_node(registry, deployer, "node-1", account=node.address)
    checkpoint(registry, node, "node-1", 1, timestamp=1_700_000_000)
    checkpoint(registry, node, "node-1", 2, timestamp=1_700_000_000)
    assert [a.tree_size for a in registry.checkpoint_anchors("node-1")] == [1, 2]


def test_malformed_checkpoints_are_refused(
    registry: RegistryClient,
    deployer: LocalAccount,
    make_account: Callable[[], LocalAccount],
    dead_rpc_url: str,
) -> None:
    node = make_account()
    register_node(registry, deployer, "node-1", account=node.address)
    offline = RegistryClient(dead_rpc_url, registry.address)
    good: dict[str, Any] = {
        "node_id": "node-1",
        "tree_size": 1,
        "root_hash": random32(),
        "timestamp": 1,
        "signature": b"s",
    }
    for field, value in [
        ("node_id", ""),
        ("node_id", "n" * 33),
        ("tree_size", 0),
        ("tree_size", 2**64),
        ("tree_size", True),
        ("timestamp", 0),
        ("root_hash", b"short"),
        ("signature", b""),
        ("signature", b"s" * 257),
        ("signature", "not bytes"),
    ]:
        for client in (registry, offline):
            with pytest.raises(InvalidRequest):
                client.anchor_checkpoint(node, **{**good, field: value})
    f = registry._contract.functions
    for tree_size, signature in [(0, b"s"), (1, b""), (1, b"s" * 257)]:
        fn = f.anchorCheckpoint("node-1", tree_size, random32(), 1, signature)
        with pytest.raises(ChainRejected) as excinfo:
            registry._transact(node, "anchorCheckpoint", fn)
        rejected(excinfo, "InvalidCheckpoint")
    assert registry.latest_checkpoint("node-1") is None


def test_checkpoint_anchors_are_listed_in_chain_order(
    registry: RegistryClient, deployer: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    node_1, node_2 = make_account(), make_account()
    register_node(registry, deployer, "node-1", account=node_1.address)
    register_node(registry, deployer, "node-2", account=node_2.address)
    sent = []
    for size in (2, 5, 9):
        root, signature = random32(), os.urandom(64)
        tx_hash = checkpoint(
            registry,
            node_1,
            "node-1",
            size,
            root_hash=root,
            timestamp=1000 + size,
            signature=signature,
        )
        checkpoint(registry, node_2, "node-2", size * 100)  # interleaved: must not show up
        sent.append(
            CheckpointAnchor(
                node_id="node-1",
                tree_size=size,
                root_hash=root,
                timestamp=1000 + size,
                signature=signature,
                block=registry.block_of_transaction(tx_hash),
            )
        )

    anchors = registry.checkpoint_anchors("node-1")
    assert anchors == sent
    assert [a.block for a in anchors] == sorted(a.block for a in anchors)
    assert registry.latest_checkpoint("node-1") == (9, sent[-1].root_hash, 1009)
    assert [a.tree_size for a in registry.checkpoint_anchors("node-2")] == [200, 500, 900]
    # A block window selects the anchors mined inside it, bounds included.
    assert registry.checkpoint_anchors("node-1", sent[1].block) == sent[1:]
    assert registry.checkpoint_anchors("node-1", sent[0].block, sent[1].block) == sent[:2]
    assert registry.checkpoint_anchors("node-1", sent[1].block, sent[1].block) == [sent[1]]
    assert registry.checkpoint_anchors("node-1", sent[2].block + 1) == []
    assert registry.checkpoint_anchors("node-3") == []


# ------------------------------------------------------------- past blocks


def test_a_grant_read_at_a_past_block_shows_the_old_state(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    record_id = anchor(registry, patient, patient.address)
    before_grant = registry.latest_block()[0]
    granted_block = registry.block_of_transaction(grant(registry, patient, provider.address))
    revoked_block = registry.block_of_transaction(registry.revoke_access(patient, provider.address))
    assert before_grant < granted_block < revoked_block

    now = registry.get_grant(patient.address, provider.address)
    assert now is not None and now.active is False
    then = registry.get_grant(patient.address, provider.address, block=granted_block)
    assert then is not None and then.active is True
    assert then == dataclasses.replace(now, active=True)
    assert registry.get_grant(patient.address, provider.address, block=revoked_block - 1) == then
    assert registry.get_grant(patient.address, provider.address, block=revoked_block) == now
    assert registry.get_grant(patient.address, provider.address, block=before_grant) is None

    # accessState too: the record, the grant and the block as they were.
    past = registry.access_state(
        record_id, provider.address, capsule(registry, record_id), block=granted_block
    )
    assert past.grant == then
    assert past.record == registry.get_record(record_id)
    assert past.block_number == granted_block
    assert past.block_timestamp == registry.block(granted_block).timestamp
    assert (
        registry.access_state(record_id, provider.address, capsule(registry, record_id)).grant
        == now
    )
    assert (
        registry.access_state(
            record_id, provider.address, capsule(registry, record_id), block=before_grant
        ).grant
        is None
    )
    # Before the record existed, there was nothing to judge.
    assert (
        registry.access_state(
            record_id, provider.address, capsule(registry, record_id), block=before_grant - 1
        ).record
        is None
    )


def test_an_emergency_grant_read_at_a_past_block_after_opt_out(
    registry: RegistryClient, patient: LocalAccount, responder: LocalAccount
) -> None:
    opt_in(registry, patient, responder.address)
    opened_block = registry.block_of_transaction(
        registry.open_emergency_access(responder, patient=patient.address, duration_s=HOUR)
    )
    registry.opt_out_emergency(patient, responder.address)
    then = registry.get_grant(patient.address, responder.address, block=opened_block)
    assert then is not None and then.active and then.emergency
    now = registry.get_grant(patient.address, responder.address)
    assert now is not None and not now.active and now == dataclasses.replace(then, active=False)


def test_reading_a_future_block_is_an_error_not_a_wrong_answer(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    future = registry.latest_block()[0] + 1000
    with pytest.raises(ChainRejected) as excinfo:
        registry.get_grant(patient.address, provider.address, block=future)
    assert excinfo.value.reason == ""  # the chain refused the read: not a contract revert


@pytest.mark.parametrize("block", [-1, -2, True])
def test_a_malformed_block_is_refused_before_sending(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount, block: Any
) -> None:
    with pytest.raises(InvalidRequest):
        registry.get_grant(patient.address, provider.address, block=block)
    with pytest.raises(InvalidRequest):
        registry.access_state(random32(), provider.address, random32(), block=block)


# ------------------------------------------------------- concurrency, transport


def test_one_account_sends_from_many_threads(
    registry: RegistryClient, patient: LocalAccount
) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        record_ids = list(pool.map(lambda _: anchor(registry, patient, patient.address), range(16)))
    assert len(set(record_ids)) == 16
    assert all(registry.get_record(r) is not None for r in record_ids)


def test_unreachable_chain_is_chain_unavailable(
    registry: RegistryClient, patient: LocalAccount, dead_rpc_url: str
) -> None:
    offline = RegistryClient(dead_rpc_url, registry.address, timeout_s=2.0)
    calls: list[Callable[[], object]] = [
        offline.chain_id,
        offline.latest_block,
        offline.list_nodes,
        lambda: offline.get_patient(patient.address),
        lambda: offline.access_state(random32(), patient.address, random32()),
        lambda: offline.revoke_access(patient, registry.address),
        lambda: RegistryClient.deploy(dead_rpc_url, patient),
    ]
    for call in calls:
        with pytest.raises(ChainUnavailable) as excinfo:
            call()
        assert "some-api-key" not in str(excinfo.value)  # the URL's path never leaks


def test_wrong_contract_address_is_chain_unavailable(
    registry: RegistryClient, patient: LocalAccount
) -> None:
    nowhere = RegistryClient(registry.rpc_url, patient.address)  # an account, not a contract
    with pytest.raises(ChainUnavailable):
        nowhere.get_record(random32())


def test_bad_constructor_arguments_are_invalid_requests(registry: RegistryClient) -> None:
    with pytest.raises(InvalidRequest):
        RegistryClient(registry.rpc_url, "0xnot-an-address")
    with pytest.raises(InvalidRequest):
        RegistryClient("ftp://example.invalid", registry.address)
    with pytest.raises(InvalidRequest):
        RegistryClient(registry.rpc_url, registry.address, timeout_s=0)


# ------------------------------------------------------------ the anvil launcher


def test_anvil_startup_failure_shows_the_log_tail(tmp_path: Path) -> None:
    process = AnvilProcess(log_path=tmp_path / "anvil.log", extra_args=("--no-such-flag",))
    with pytest.raises(ChainUnavailable) as excinfo:
        process.start()
    assert "no-such-flag" in str(excinfo.value)  # anvil's own complaint, from the log
    assert not process.running
    process.stop()  # idempotent


def test_anvil_refuses_a_port_in_use(anvil: AnvilProcess, tmp_path: Path) -> None:
    with pytest.raises(ChainUnavailable, match="in use"):
        AnvilProcess(log_path=tmp_path / "anvil.log", port=anvil.port).start()


def test_missing_anvil_says_to_run_make_setup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(anvil_module, "LOCAL_ANVIL", tmp_path / "missing" / "anvil")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PreconditionFailed, match="make setup"):
        AnvilProcess(log_path=tmp_path / "anvil.log").start()


def test_anvil_context_manager_stops_the_process(tmp_path: Path) -> None:
    with AnvilProcess(log_path=tmp_path / "anvil.log", chain_id=4242) as process:
        assert process.running
        assert rpc_call(process.rpc_url, "eth_chainId", []) == hex(4242)
    assert not process.running
    with pytest.raises(ChainUnavailable):
        rpc_call(process.rpc_url, "eth_chainId", [], timeout_s=1.0)
