"""The registry's logs decoded directly (``contracts/event_logs.py``) give exactly what web3's
contract events give, for every event of the registry, on a real anvil chain with the
compiled ABI; and the grant index built from them is the same."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import LogReceipt

from contracts.build import load_artifact
from contracts.event_logs import EventDecoder, Log, checked_logs, event_topic
from contracts.registry import RegistryClient
from contracts.registry_events import FOLLOWED_EVENTS, followed_events
from core.grant_index import GrantIndex
from core.record_types import ALL_TYPES_MASK, RecordType
from core.registry_types import BlockRef, RegistryEvent
from deploy.anvil import AnvilProcess, rpc_call

from .conftest import compressed_point, p256_point, umbral_keys

pytestmark = pytest.mark.anvil

ABI: list[dict[str, Any]] = load_artifact()["abi"]
EVENTS = {e["name"]: e for e in ABI if e["type"] == "event"}
#: declared (inherited from AccessControl) but never emitted: the registry sets no role admin
NEVER_EMITTED = {"RoleAdminChanged"}


def emit_every_event(
    registry: RegistryClient,
    deployer: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    """At least one log of every event the registry emits, through its own functions."""
    patient, provider, responder, node = (make_account() for _ in range(4))
    registry.register_patient(patient, umbral_keys(), compressed_point())
    registry.grant_provider_role(deployer, provider.address)
    registry.grant_emergency_role(deployer, responder.address)
    registry.set_record_writer(patient, provider.address, allowed=True)
    capsule = Web3.keccak(text="capsule")
    registry.anchor_record(
        provider,
        patient=patient.address,
        content_hash=Web3.keccak(text="content"),
        storage_uri="blob:equivalence",
        record_type=RecordType.IMAGING,
        capsule_hash=capsule,
    )
    record_id = registry.record_of_capsule(capsule)
    assert record_id is not None
    registry.deactivate_record(patient, record_id)
    registry.grant_access(
        patient,
        grantee=provider.address,
        grantee_umbral_key=compressed_point(),
        expires_at=2**40,
        allowed_types_mask=ALL_TYPES_MASK,
    )
    registry.revoke_access(patient, provider.address)
    registry.opt_in_emergency(
        patient,
        responder=responder.address,
        responder_umbral_key=compressed_point(),
        allowed_types_mask=0b101,
    )
    registry.open_emergency_access(responder, patient=patient.address, duration_s=600)
    registry.opt_out_emergency(patient, responder.address)
    registry.revoke_emergency_role(deployer, responder.address)
    registry.register_node(
        deployer,
        node_id="node-1",
        endpoint="127.0.0.1:7001",
        signing_public_key=b"\x02" * 33,
        delivery_public_key=p256_point(),
        account=node.address,
    )
    registry.anchor_checkpoint(
        node,
        node_id="node-1",
        tree_size=5,
        root_hash=Web3.keccak(text="root"),
        timestamp=1_700_000_000,
        signature=b"\x30" * 70,
    )
    registry.set_node_active(deployer, node_id="node-1", active=False)


def web3_args(log: LogReceipt) -> tuple[str, dict[str, Any]]:
    """The log's event and arguments as web3's contract events decode them."""
    contract = Web3().eth.contract(abi=ABI)
    topic = bytes(log["topics"][0])
    (name,) = (n for n, e in EVENTS.items() if event_topic(e) == topic)
    return name, dict(contract.events[name]().process_log(log)["args"])


def web3_events(registry: RegistryClient, logs: list[LogReceipt]) -> list[RegistryEvent]:
    """The followed events as the registry client read them before: web3's decoding, then
    each row's fields (the table's conversions, which this change did not touch)."""
    rows = {event_topic(EVENTS[name]): (name, row) for name, row in FOLLOWED_EVENTS.items()}
    reads = {d.name: d.reads for d in followed_events(ABI).values()}
    events: list[RegistryEvent] = []
    for log in logs:
        found = rows.get(bytes(log["topics"][0]))
        if found is None:
            continue
        name, row = found
        _, args = web3_args(log)
        if row.of_role is not None and args["role"] != row.of_role:
            continue
        block = int(log["blockNumber"])
        values = {field: convert(args[argument]) for field, argument, convert in reads[name]}
        events.append(
            row.type(
                block=block,
                timestamp=registry.block(block).timestamp,
                **values,
                **row.fixed,
            )
        )
    return events


def test_every_event_decodes_as_web3_decodes_it(
    anvil: AnvilProcess,
    registry: RegistryClient,
    deployer: LocalAccount,
    make_account: Callable[[], LocalAccount],
) -> None:
    emit_every_event(registry, deployer, make_account)
    head = registry.latest_block()[0]
    query = {"address": registry.address, "fromBlock": "0x0", "toBlock": hex(head)}
    answer = rpc_call(anvil.rpc_url, "eth_getLogs", [query])
    formatted = Web3(Web3.HTTPProvider(anvil.rpc_url)).eth.get_logs(
        {"address": registry.address, "fromBlock": 0, "toBlock": head}
    )
    logs = list(checked_logs(answer, registry.address, 0, head))
    assert len(logs) == len(formatted) > len(EVENTS)
    decoders = {event_topic(e): EventDecoder(e) for e in EVENTS.values()}
    seen = set()
    for log, reference in zip(logs, formatted, strict=True):
        name, expected = web3_args(reference)
        assert log.block == reference["blockNumber"]
        assert decoders[log.topics[0]].decode(log) == expected, name
        seen.add(name)
    assert seen == set(EVENTS) - NEVER_EMITTED

    # The registry client's events and the index built from them: as before.
    events = registry.events(0, head)
    assert events == web3_events(registry, formatted)
    assert {type(e) for e in events} == set(typing.get_args(RegistryEvent))
    through = BlockRef(head, b"\x01" * 32, 0)
    ours, theirs = GrantIndex(), GrantIndex()
    ours.apply(events, through)
    theirs.apply(web3_events(registry, formatted), through)
    assert ours.to_bytes() == theirs.to_bytes()
    # Checkpoint anchors too.
    (anchor,) = registry.checkpoint_anchors("node-1")
    assert (anchor.node_id, anchor.tree_size, anchor.timestamp) == ("node-1", 5, 1_700_000_000)


def test_an_event_never_emitted_decodes_as_web3_decodes_it() -> None:
    entry = EVENTS["RoleAdminChanged"]
    roles = [Web3.keccak(text=r) for r in ("A", "B", "C")]
    topics = (event_topic(entry), *(encode(["bytes32"], [r]) for r in roles))
    log = Log(9, topics, b"")
    formatted = typing.cast(
        LogReceipt,
        {
            "address": Web3.to_checksum_address("0x" + "12" * 20),
            "topics": list(topics),
            "data": b"",
            "blockNumber": 9,
            "blockHash": b"\x00" * 32,
            "transactionHash": b"\x00" * 32,
            "transactionIndex": 0,
            "logIndex": 0,
            "removed": False,
        },
    )
    assert EventDecoder(entry).decode(log) == web3_args(formatted)[1]
