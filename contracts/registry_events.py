"""The registry's events (``contracts/src/Registry.sol``) as core values
(``core/registry_types.py``): the events a node's grant index follows, and the checkpoint
anchors an auditor reads.

``FOLLOWED_EVENTS`` states once which contract events a node follows and which dataclass
each becomes. How each field is read is derived from the ABI and the dataclass, not written
out: a field takes the event argument of its name in camelCase (``record_id`` from
``recordId``) unless its row renames it, converted by the one conversion ``_CONVERSIONS``
declares for that (ABI type, field type) pair; ``block`` and ``timestamp`` are the block the
log was mined in. Adding an event takes its Solidity declaration, its dataclass (and its
place in ``RegistryEvent``), and a row here.

:func:`followed_events` builds the decoders from the contract's ABI and refuses a table that
does not fit it (an event or an argument missing, a field with no conversion, an argument
that no field takes), so a drift fails when a client is made and in
``tests/contracts/test_registry_events.py``, instead of dropping events in silence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from eth_utils.abi import collapse_if_tuple

from contracts.event_logs import EventDecoder, Log
from contracts.json_rpc import MalformedAnswer
from contracts.registry_arguments import EMERGENCY_ROLE
from contracts.registry_views import patient_keys
from core.errors import ChainUnavailable
from core.record_types import RecordType
from core.registry_types import (
    AccessGranted,
    AccessRevoked,
    CheckpointAnchor,
    EmergencyAccessOpened,
    EmergencyOptInChanged,
    EmergencyRoleChanged,
    PatientRegistered,
    RecordAnchored,
    RecordDeactivated,
    RegistryEvent,
)


@dataclass(frozen=True)
class EventRow:
    """What one contract event becomes."""

    type: type[RegistryEvent]
    #: field -> event argument, where the argument is not the field's name in camelCase
    renamed: Mapping[str, str] = field(default_factory=dict)
    #: field -> the value the event itself stands for (RoleGranted: held=True)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: event arguments that no field takes
    unused: tuple[str, ...] = ()
    #: follow only the logs whose ``role`` argument is this role
    of_role: bytes | None = None


FOLLOWED_EVENTS: Mapping[str, EventRow] = {
    "PatientRegistered": EventRow(PatientRegistered, renamed={"umbral_public_keys": "umbralKeys"}),
    "RecordAnchored": EventRow(RecordAnchored),
    "RecordDeactivated": EventRow(RecordDeactivated),
    "AccessGranted": EventRow(AccessGranted, renamed={"allowed_types_mask": "allowedTypes"}),
    "AccessRevoked": EventRow(AccessRevoked),
    "EmergencyAccessOpened": EventRow(
        EmergencyAccessOpened, renamed={"allowed_types_mask": "allowedTypes"}
    ),
    "EmergencyOptInChanged": EventRow(
        EmergencyOptInChanged, renamed={"allowed_types_mask": "allowedTypes"}
    ),
    # Of EMERGENCY_ROLE only: an emergency window is in force while its responder holds it.
    "RoleGranted": EventRow(
        EmergencyRoleChanged,
        renamed={"responder": "account"},
        fixed={"held": True},
        unused=("sender",),
        of_role=EMERGENCY_ROLE,
    ),
    "RoleRevoked": EventRow(
        EmergencyRoleChanged,
        renamed={"responder": "account"},
        fixed={"held": False},
        unused=("sender",),
        of_role=EMERGENCY_ROLE,
    ),
}

#: fields every followed event has, from the block its log was mined in
_MINED = ("block", "timestamp")


def _patient_keys(value: Any) -> tuple[bytes, ...]:
    return patient_keys(bytes(value))


# (ABI type, dataclass field type) -> how the decoded argument becomes the field's value.
_CONVERSIONS: Mapping[tuple[str, object], Callable[[Any], Any]] = {
    ("address", str): str,  # EIP-55 already (contracts/event_logs.py)
    ("bytes32", bytes): bytes,
    ("bytes", bytes): bytes,
    ("bytes", tuple[bytes, ...]): _patient_keys,  # as getPatient answers them
    ("uint8", RecordType): RecordType,
    ("uint32", int): int,
    ("uint64", int): int,
    ("bool", bool): bool,
}


@dataclass(frozen=True)
class FollowedEvent:
    """The decoder of one followed event, built by :func:`followed_events`."""

    name: str
    row: EventRow
    #: the decoder of the log's topics and data, by the ABI
    event: EventDecoder
    #: (field, event argument, conversion) for each field read from the log
    reads: tuple[tuple[str, str, Callable[[Any], Any]], ...]

    def decode(self, log: Log, timestamp: int) -> RegistryEvent | None:
        """The log as its core value; None if the row follows another role than the log's.
        :class:`MalformedAnswer` if the log does not decode, or holds a value its core type
        refuses (a record type this code does not know)."""
        args = self.event.decode(log)
        if self.row.of_role is not None and args["role"] != self.row.of_role:
            return None
        try:
            values = {name: convert(args[argument]) for name, argument, convert in self.reads}
        except (ValueError, ChainUnavailable) as e:
            raise MalformedAnswer(
                f"a {self.name} log in block {log.block} holds a value this node cannot "
                f"take ({e.message if isinstance(e, ChainUnavailable) else type(e).__name__})"
            ) from None
        return self.row.type(block=log.block, timestamp=timestamp, **values, **self.row.fixed)


def followed_events(abi: Sequence[Mapping[str, Any]]) -> dict[bytes, FollowedEvent]:
    """topic0 -> decoder, for each row of ``FOLLOWED_EVENTS``; ``TypeError`` naming every way
    in which the table does not fit the contract's ABI."""
    declared = {e["name"]: e for e in abi if e["type"] == "event"}
    problems: list[str] = []
    decoders: dict[bytes, FollowedEvent] = {}
    for name, row in FOLLOWED_EVENTS.items():
        entry = declared.get(name)
        if entry is None:
            problems.append(f"{name}: no such event in the ABI")
            continue
        reads = _reads(name, row, entry, problems)
        event = EventDecoder(entry)
        decoders[event.topic] = FollowedEvent(name, row, event, reads)
    if problems:
        raise TypeError("the followed events do not fit the registry's ABI: " + "; ".join(problems))
    return decoders


def _reads(
    name: str, row: EventRow, entry: Mapping[str, Any], problems: list[str]
) -> tuple[tuple[str, str, Callable[[Any], Any]], ...]:
    """How each field of ``row.type`` is read from event ``name``; appends what does not fit."""
    inputs = {str(i["name"]): collapse_if_tuple(i) for i in entry.get("inputs", [])}
    hints = get_type_hints(row.type)
    fields = [f.name for f in dataclasses.fields(row.type)]
    where = f"{name} -> {row.type.__name__}"
    problems.extend(
        f"{where}: the dataclass has no field {f}"
        for f in (*_MINED, *row.renamed, *row.fixed)
        if f not in fields
    )
    filtered_by = ("role",) if row.of_role is not None else ()
    problems.extend(
        f"{where}: no argument {a}" for a in (*row.unused, *filtered_by) if a not in inputs
    )
    wanted = {*row.unused, *filtered_by}
    reads = []
    for field_name in fields:
        if field_name in _MINED or field_name in row.fixed:
            continue
        argument = row.renamed.get(field_name, _camel_case(field_name))
        wanted.add(argument)
        if argument not in inputs:
            problems.append(f"{where}: no argument {argument} for field {field_name}")
            continue
        convert = _CONVERSIONS.get((inputs[argument], hints[field_name]))
        if convert is None:
            problems.append(
                f"{where}: no conversion from {inputs[argument]} {argument} to field {field_name}"
            )
            continue
        reads.append((field_name, argument, convert))
    problems.extend(f"{where}: no field takes argument {a}" for a in sorted(inputs.keys() - wanted))
    return tuple(reads)


def _camel_case(snake: str) -> str:
    first, *rest = snake.split("_")
    return first + "".join(word.capitalize() for word in rest)


def checkpoint_anchor(args: Mapping[str, Any], block: int) -> CheckpointAnchor:
    """A ``CheckpointAnchored`` event mined in ``block``, from its decoded arguments."""
    return CheckpointAnchor(
        node_id=str(args["nodeId"]),
        tree_size=int(args["treeSize"]),
        root_hash=bytes(args["rootHash"]),
        timestamp=int(args["timestamp"]),
        signature=bytes(args["signature"]),
        block=block,
    )
