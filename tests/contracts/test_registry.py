"""The registry contract through its Python adapter, on a real anvil chain."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from medkms.contracts.build import load_artifact
from medkms.contracts.registry import (
    AccessState,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    RecordInfo,
    RegistryClient,
)
from medkms.core.errors import (
    ChainRejected,
    ChainUnavailable,
    InvalidRequest,
    PreconditionFailed,
)
from medkms.core.record_types import ALL_TYPES_MASK, RecordType, to_mask
from medkms.deploy import anvil as anvil_module
from medkms.deploy.anvil import AnvilProcess, increase_time, rpc_call

from .conftest import RpcRecorder, compressed_point

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
    record_id: bytes | None = None,
) -> bytes:
    record_id = record_id or random32()
    registry.anchor_record(
        sender,
        record_id=record_id,
        patient=patient,
        content_hash=random32(),
        storage_uri=f"blob://sha2-256/{record_id.hex()}",
        record_type=record_type,
        capsule_hash=random32(),
    )
    return record_id


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
    return contract.events[event]().process_receipt(receipt)


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


# ------------------------------------------------------------------ patients


def test_register_patient_and_read_back(
    anvil: AnvilProcess, registry: RegistryClient, make_account: Callable[[], LocalAccount]
) -> None:
    alice = make_account()
    umbral_key, verifying_key = compressed_point(), compressed_point()
    assert registry.get_patient(alice.address) is None

    tx_hash = registry.register_patient(alice, umbral_key, verifying_key)

    assert registry.get_patient(alice.address) == PatientInfo(
        address=alice.address, umbral_public_key=umbral_key, verifying_key=verifying_key
    )
    assert registry.get_patient(alice.address.lower()) is not None
    (event,) = decode_events(anvil, registry, tx_hash, "PatientRegistered")
    assert event.args.patient == alice.address
    assert event.args.umbralKey == umbral_key
    assert event.args.verifyingKey == verifying_key


def test_register_patient_twice_is_rejected(
    registry: RegistryClient, patient: LocalAccount
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.register_patient(patient, compressed_point(), compressed_point())
    rejected(excinfo, "PatientAlreadyRegistered")
    assert "registerPatient" in str(excinfo.value)


@pytest.mark.parametrize(
    ("umbral_key", "verifying_key"),
    [
        (compressed_point()[:32], compressed_point()),
        (compressed_point(), compressed_point() + b"\x00"),
        (b"\x04" + os.urandom(32), compressed_point()),
        ("not bytes", compressed_point()),
    ],
)
def test_bad_patient_keys_are_refused_before_sending(
    registry: RegistryClient,
    make_account: Callable[[], LocalAccount],
    dead_rpc_url: str,
    umbral_key: Any,
    verifying_key: bytes,
) -> None:
    alice = make_account()
    with pytest.raises(InvalidRequest):
        registry.register_patient(alice, umbral_key, verifying_key)
    # Refused without a round trip: a client whose chain is unreachable says the same.
    offline = RegistryClient(dead_rpc_url, registry.address)
    with pytest.raises(InvalidRequest):
        offline.register_patient(alice, umbral_key, verifying_key)
    assert registry.get_patient(alice.address) is None


def test_contract_checks_the_key_encoding_itself(
    registry: RegistryClient, make_account: Callable[[], LocalAccount]
) -> None:
    # Bypass the adapter's checks to prove the contract enforces them on its own.
    alice = make_account()
    uncompressed_prefix = b"\x04" + os.urandom(32)
    fn = registry._contract.functions.registerPatient(uncompressed_prefix, compressed_point())
    with pytest.raises(ChainRejected) as excinfo:
        registry._transact(alice, "registerPatient", fn)
    rejected(excinfo, "InvalidUmbralKey")
    fn = registry._contract.functions.registerPatient(compressed_point(), b"\x02" * 20)
    with pytest.raises(ChainRejected) as excinfo:
        registry._transact(alice, "registerPatient", fn)
    rejected(excinfo, "InvalidVerifyingKey")


# ------------------------------------------------------------------- records


def test_patient_anchors_a_record(
    anvil: AnvilProcess, registry: RegistryClient, patient: LocalAccount
) -> None:
    record_id, content_hash, capsule_hash = random32(), random32(), random32()
    tx_hash = registry.anchor_record(
        patient,
        record_id=record_id,
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


def test_provider_anchors_a_record_for_a_patient(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    record_id = anchor(registry, provider, patient.address, record_type=RecordType.PRESCRIPTION)
    record = registry.get_record(record_id)
    assert record is not None
    assert record.patient == patient.address
    assert record.creator == provider.address
    assert record.record_type is RecordType.PRESCRIPTION


def test_stranger_cannot_anchor_a_record(
    registry: RegistryClient, patient: LocalAccount, make_account: Callable[[], LocalAccount]
) -> None:
    stranger = make_account()
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, stranger, patient.address)
    rejected(excinfo, "NotPatientOrProvider")
    assert "anchorRecord" in str(excinfo.value)


def test_record_needs_a_registered_patient_and_a_fresh_id(
    registry: RegistryClient,
    patient: LocalAccount,
    provider: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    unregistered = make_account()
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, provider, unregistered.address)
    rejected(excinfo, "PatientNotRegistered")

    record_id = anchor(registry, patient, patient.address)
    with pytest.raises(ChainRejected) as excinfo:
        anchor(registry, provider, patient.address, record_id=record_id)
    rejected(excinfo, "RecordAlreadyExists")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("record_id", b"\x00" * 32),
        ("record_id", b"short"),
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
        "record_id": random32(),
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
            f.anchorRecord(b"\x00" * 32, patient.address, random32(), "u", 0, random32()),
            "InvalidRecordId",
        ),
        (
            f.anchorRecord(random32(), patient.address, b"\x00" * 32, "u", 0, random32()),
            "InvalidContentHash",
        ),
        (
            f.anchorRecord(random32(), patient.address, random32(), "u", 0, b"\x00" * 32),
            "InvalidCapsuleHash",
        ),
        (
            f.anchorRecord(random32(), patient.address, random32(), "u", 6, random32()),
            "InvalidRecordType",
        ),
        (
            f.anchorRecord(random32(), patient.address, random32(), "", 0, random32()),
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
    assert current.expires_at == current.granted_at + 2 * HOUR


# --------------------------------------------------------------------- nodes


def test_node_registry_requires_the_node_admin_role(
    anvil: AnvilProcess,
    registry: RegistryClient,
    deployer: LocalAccount,
    provider: LocalAccount,
) -> None:
    with pytest.raises(ChainRejected) as excinfo:
        registry.register_node(
            provider, node_id="node-1", endpoint="127.0.0.1:7001", signing_public_key=b"k"
        )
    rejected(excinfo, "AccessControlUnauthorizedAccount")
    assert provider.address in str(excinfo.value)  # the decoded argument names the caller

    tx_hash = registry.register_node(
        deployer, node_id="node-1", endpoint="127.0.0.1:7001", signing_public_key=b"\x02" * 33
    )
    registry.register_node(
        deployer, node_id="node-2", endpoint="127.0.0.1:7002", signing_public_key=b"\x03" * 33
    )
    (event,) = decode_events(anvil, registry, tx_hash, "NodeRegistered")
    assert event.args.nodeKey == Web3.keccak(text="node-1")
    assert event.args.nodeId == "node-1"

    with pytest.raises(ChainRejected) as excinfo:
        registry.register_node(
            deployer, node_id="node-1", endpoint="127.0.0.1:7003", signing_public_key=b"k"
        )
    rejected(excinfo, "NodeAlreadyRegistered")

    registry.set_node_active(deployer, node_id="node-2", active=False)
    assert registry.list_nodes() == [
        NodeInfo("node-1", "127.0.0.1:7001", b"\x02" * 33, True),
        NodeInfo("node-2", "127.0.0.1:7002", b"\x03" * 33, False),
    ]
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_node_active(provider, node_id="node-1", active=False)
    rejected(excinfo, "AccessControlUnauthorizedAccount")
    with pytest.raises(ChainRejected) as excinfo:
        registry.set_node_active(deployer, node_id="node-9", active=False)
    rejected(excinfo, "NodeNotRegistered")


def test_bad_node_fields_are_refused_before_sending(
    registry: RegistryClient, deployer: LocalAccount
) -> None:
    for node_id, endpoint, key in [
        ("", "e", b"k"),
        ("n" * 33, "e", b"k"),
        ("n", "", b"k"),
        ("n", "e", b""),
        ("n", "e", b"k" * 257),
    ]:
        with pytest.raises(InvalidRequest):
            registry.register_node(
                deployer, node_id=node_id, endpoint=endpoint, signing_public_key=key
            )


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
    rpc_recorder: RpcRecorder,
) -> None:
    record_id = anchor(registry, patient, patient.address, record_type=RecordType.VACCINATION)
    grant(registry, patient, provider.address, mask=to_mask([RecordType.VACCINATION]))
    number, timestamp = registry.latest_block()

    # A node's client, seen through a recording proxy: one request, and it is an eth_call.
    node_view = RegistryClient(rpc_recorder.url, registry.address)
    state = node_view.access_state(record_id, provider.address)
    assert rpc_recorder.methods == ["eth_call"]
    with ThreadPoolExecutor(max_workers=1) as pool:  # a fresh thread costs nothing extra
        pool.submit(node_view.access_state, record_id, provider.address).result()
    assert rpc_recorder.methods == ["eth_call", "eth_call"]

    assert state.record == registry.get_record(record_id)
    assert state.grant == registry.get_grant(patient.address, provider.address)
    assert state.grant is not None and state.grant.allowed_types_mask == 1 << 4
    assert (state.block_number, state.block_timestamp) == (number, timestamp)

    increase_time(anvil.rpc_url, 2 * HOUR)
    later = registry.access_state(record_id, provider.address)
    assert later.block_number == number + 1
    assert later.block_timestamp >= timestamp + 2 * HOUR
    assert later.grant is not None and later.grant.expires_at < later.block_timestamp

    # Unknown record: nothing. Known record, grantee without a grant: record only.
    assert registry.access_state(random32(), provider.address) == AccessState(
        record=None,
        grant=None,
        block_number=later.block_number,
        block_timestamp=later.block_timestamp,
    )
    stranger_view = registry.access_state(record_id, make_account().address)
    assert stranger_view.record is not None and stranger_view.grant is None


def test_access_state_after_revocation_and_deactivation(
    registry: RegistryClient, patient: LocalAccount, provider: LocalAccount
) -> None:
    record_id = anchor(registry, provider, patient.address)
    grant(registry, patient, provider.address)
    registry.revoke_access(patient, provider.address)
    registry.deactivate_record(patient, record_id)
    state = registry.access_state(record_id, provider.address)
    assert state.record is not None and state.record.active is False
    assert state.grant is not None and state.grant.active is False


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
        lambda: offline.access_state(random32(), patient.address),
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


def test_unfunded_sender_is_refused_by_the_chain(
    registry: RegistryClient,
) -> None:
    from eth_account import Account

    broke: LocalAccount = Account.create()
    with pytest.raises(ChainRejected) as excinfo:
        registry.register_patient(broke, compressed_point(), compressed_point())
    assert excinfo.value.reason == ""


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
