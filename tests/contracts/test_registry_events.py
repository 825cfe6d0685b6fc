"""The followed-event table agrees with the registry's ABI and with ``RegistryEvent``, and a
drift on either side is refused rather than dropping events; logs decode by the table.
No chain: logs are encoded here from the ABI."""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from collections.abc import Callable
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_utils.abi import collapse_if_tuple
from web3 import Web3

from contracts.build import load_artifact
from contracts.event_logs import Log, event_topic
from contracts.json_rpc import MalformedAnswer
from contracts.registry_arguments import EMERGENCY_ROLE, PROVIDER_ROLE
from contracts.registry_events import (
    FOLLOWED_EVENTS,
    EventRow,
    FollowedEvent,
    followed_events,
)
from core.record_types import RecordType
from core.registry_types import (
    AccessGranted,
    EmergencyRoleChanged,
    PatientRegistered,
    RecordAnchored,
    RegistryEvent,
)

ABI: list[dict[str, Any]] = load_artifact()["abi"]
PATIENT = Web3.to_checksum_address("0x" + "ab" * 20)
GRANTEE = Web3.to_checksum_address("0x" + "cd" * 20)


def drifted(edit: Callable[[dict[str, dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """The artifact's ABI after ``edit`` of its events, by name."""
    abi = copy.deepcopy(ABI)
    edit({e["name"]: e for e in abi if e["type"] == "event"})
    return abi


def refused(abi: list[dict[str, Any]]) -> str:
    with pytest.raises(TypeError, match="do not fit the registry's ABI") as excinfo:
        followed_events(abi)
    return str(excinfo.value)


def argument(event: dict[str, Any], name: str) -> dict[str, Any]:
    return next(i for i in event["inputs"] if i["name"] == name)


def decoders() -> dict[str, FollowedEvent]:
    return {d.name: d for d in followed_events(ABI).values()}


def log_of(name: str, **args: Any) -> Log:
    """A log of event ``name`` with these arguments, encoded as the contract would."""
    entry = next(e for e in ABI if e["type"] == "event" and e["name"] == name)
    indexed = [i for i in entry["inputs"] if i["indexed"]]
    data = [i for i in entry["inputs"] if not i["indexed"]]
    topics = [event_topic(entry)] + [
        encode([collapse_if_tuple(i)], [args[i["name"]]]) for i in indexed
    ]
    body = encode([collapse_if_tuple(i) for i in data], [args[i["name"]] for i in data])
    return Log(7, tuple(topics), body)


# ---------------------------------------------------------------- the table


def test_every_followed_event_is_in_the_abi_with_the_fields_of_its_dataclass() -> None:
    built = decoders()
    assert set(built) == set(FOLLOWED_EVENTS)
    for name, decoder in built.items():
        row = FOLLOWED_EVENTS[name]
        read = {field for field, _, _ in decoder.reads}
        mined = {"block", "timestamp"}
        assert read | mined | set(row.fixed) == {f.name for f in dataclasses.fields(row.type)}


def test_the_table_makes_exactly_the_registry_event_types() -> None:
    assert {row.type for row in FOLLOWED_EVENTS.values()} == set(typing.get_args(RegistryEvent))


def test_a_followed_event_missing_from_the_abi_is_refused() -> None:
    abi = [e for e in ABI if e.get("name") != "AccessRevoked"]
    assert "AccessRevoked: no such event in the ABI" in refused(abi)


def test_a_renamed_argument_is_refused() -> None:
    def rename(events: dict[str, dict[str, Any]]) -> None:
        argument(events["AccessGranted"], "expiresAt")["name"] = "expiry"

    message = refused(drifted(rename))
    assert "AccessGranted -> AccessGranted: no argument expiresAt for field expires_at" in message
    assert "AccessGranted -> AccessGranted: no field takes argument expiry" in message


def test_an_argument_of_a_type_without_a_conversion_is_refused() -> None:
    def retype(events: dict[str, dict[str, Any]]) -> None:
        argument(events["RecordAnchored"], "recordType")["type"] = "string"

    assert "no conversion from string recordType to field record_type" in refused(drifted(retype))


def test_an_argument_no_field_takes_is_refused() -> None:
    def widen(events: dict[str, dict[str, Any]]) -> None:
        events["RecordDeactivated"]["inputs"].append(
            {"indexed": False, "internalType": "string", "name": "reason", "type": "string"}
        )

    assert "RecordDeactivated -> RecordDeactivated: no field takes argument reason" in refused(
        drifted(widen)
    )


def test_a_dataclass_field_without_an_argument_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class Revoked:
        block: int
        timestamp: int
        patient: str
        grantee: str
        reason: str

    table = {**FOLLOWED_EVENTS, "AccessRevoked": EventRow(Revoked)}  # type: ignore[arg-type]
    monkeypatch.setattr("contracts.registry_events.FOLLOWED_EVENTS", table)
    assert "AccessRevoked -> Revoked: no argument reason for field reason" in refused(ABI)


# ------------------------------------------------------------------ decoding


def test_a_log_decodes_to_its_dataclass_with_addresses_checksummed() -> None:
    key = b"\x02" + os.urandom(32)
    log = log_of(
        "AccessGranted",
        patient=PATIENT.lower(),
        grantee=GRANTEE.lower(),
        granteeUmbralKey=key,
        expiresAt=5000,
        allowedTypes=0b10,
    )
    assert decoders()["AccessGranted"].decode(log, 1007) == AccessGranted(
        7, 1007, PATIENT, GRANTEE, key, 5000, 0b10
    )


def test_a_record_type_and_a_patients_keys_decode_to_their_core_types() -> None:
    capsule, content, record_id = os.urandom(32), os.urandom(32), os.urandom(32)
    anchored = decoders()["RecordAnchored"].decode(
        log_of(
            "RecordAnchored",
            recordId=record_id,
            patient=PATIENT,
            recordType=int(RecordType.IMAGING),
            creator=GRANTEE,
            contentHash=content,
            capsuleHash=capsule,
        ),
        1007,
    )
    assert anchored == RecordAnchored(
        7, 1007, record_id, PATIENT, RecordType.IMAGING, GRANTEE, content, capsule
    )
    assert isinstance(anchored.record_type, RecordType)

    keys = tuple(b"\x03" + os.urandom(32) for _ in RecordType)
    verifying = b"\x02" + os.urandom(32)
    registered = decoders()["PatientRegistered"]
    log = log_of(
        "PatientRegistered", patient=PATIENT, umbralKeys=b"".join(keys), verifyingKey=verifying
    )
    assert registered.decode(log, 1007) == PatientRegistered(7, 1007, PATIENT, keys, verifying)
    short = log_of("PatientRegistered", patient=PATIENT, umbralKeys=keys[0], verifyingKey=verifying)
    with pytest.raises(MalformedAnswer, match="patient key list of the wrong length"):
        registered.decode(short, 1007)


@pytest.mark.parametrize(("name", "held"), [("RoleGranted", True), ("RoleRevoked", False)])
def test_only_the_emergency_role_is_followed(name: str, held: bool) -> None:
    decoder = decoders()[name]
    emergency = log_of(name, role=EMERGENCY_ROLE, account=GRANTEE.lower(), sender=PATIENT)
    assert decoder.decode(emergency, 1007) == EmergencyRoleChanged(7, 1007, GRANTEE, held)
    provider = log_of(name, role=PROVIDER_ROLE, account=GRANTEE, sender=PATIENT)
    assert decoder.decode(provider, 1007) is None
