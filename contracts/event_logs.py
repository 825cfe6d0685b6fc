"""Event logs as an ``eth_getLogs`` answer holds them (JSON), checked, and decoded by the
contract's ABI with eth_abi.

The registry client reads logs this way rather than through web3's result formatters and
contract events, which cost about 0.4 ms of CPU per log (a full replay of 100 000 patients
reads 300 000 logs). The endpoint is not trusted (docs/threat-model.md): an answer that is
not a list of logs of the contract asked about, in the blocks asked for, in chain order, or
a log whose topics and data do not fit its event's ABI, raises :class:`MalformedAnswer` saying
what was wrong and where; no log is skipped or read another way. (The transport reports it
as ``ChainUnavailable``: ``contracts/chain_transport.py``.)

Decoding follows the Solidity ABI specification ("Events"): topic 0 is the keccak256 of the
event's signature; each indexed argument is one more topic, a value type as its 32-byte
word and any other type as the keccak256 of its encoding (kept as those 32 bytes, as web3
does); the other arguments are the ABI encoding of a tuple, in ``data``. Values come out as
web3 gives them (``bytes``, ``int``, ``bool``, ``str``), addresses in EIP-55 form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import eth_abi.exceptions
from eth_abi.abi import decode as abi_decode
from eth_hash.auto import keccak
from eth_utils.abi import collapse_if_tuple

from contracts.json_rpc import MalformedAnswer, data, quantity
from core.addresses import eip55

#: at most 4 topics: the signature and 3 indexed arguments (the EVM's LOG4)
MAX_TOPICS: Final = 4
#: Solidity types an indexed argument is kept as, as such, in its topic (ABI spec, "Events")
_VALUE_TYPE_PREFIXES: Final = ("address", "bool", "uint", "int", "bytes", "fixed", "ufixed")


@dataclass(frozen=True)
class Log:
    """One log, checked for shape: emitted by the contract asked about, in ``block``."""

    block: int
    #: each 32 bytes; topic 0 is the event's signature hash
    topics: tuple[bytes, ...]
    data: bytes


def checked_logs(answer: Any, address: str, from_block: int, to_block: int) -> Iterator[Log]:
    """The logs of an ``eth_getLogs`` answer for contract ``address`` over blocks
    [from_block, to_block], one by one, each checked: a JSON object, of that contract, in
    those blocks and after the previous log (by block, then index in the block), not marked
    removed, with at most four 32-byte topics and hex data. :class:`MalformedAnswer` at the
    first that is not: a log out of order or given twice would be applied so."""
    if not isinstance(answer, list):
        raise MalformedAnswer("the answer to eth_getLogs is not a list of logs")
    wanted = address.lower()
    previous = from_block
    #: the log index of the previous log, while in the same block
    previous_index = -1
    for i, log in enumerate(answer):
        if not isinstance(log, dict):
            raise MalformedAnswer(f"log {i} of the answer is not a JSON object")
        emitter = log.get("address")
        if not isinstance(emitter, str) or emitter.lower() != wanted:
            raise MalformedAnswer(f"log {i} of the answer is not from the contract asked about")
        block = _block_number(log.get("blockNumber"), i)
        if not previous <= block <= to_block:
            raise MalformedAnswer(
                f"log {i} of the answer is in block {block}: out of chain order or outside "
                f"the blocks asked for ({from_block} to {to_block})"
            )
        index = quantity(log.get("logIndex"))
        if index is None:
            raise MalformedAnswer(f"log {i} of the answer (block {block}) has no log index")
        if block == previous and index <= previous_index:
            raise MalformedAnswer(
                f"log {i} of the answer is log {index} of block {block}: out of chain order "
                "(or given twice)"
            )
        previous, previous_index = block, index
        removed = log.get("removed")
        if removed is not None and removed is not False:
            raise MalformedAnswer(f"log {i} of the answer (block {block}) is marked removed")
        topics = log.get("topics")
        if not isinstance(topics, list) or len(topics) > MAX_TOPICS:
            raise MalformedAnswer(f"log {i} of the answer (block {block}) has no list of topics")
        yield Log(
            block,
            tuple(_hex(topic, i, block, 32) for topic in topics),
            _hex(log.get("data"), i, block, None),
        )


def _block_number(value: Any, i: int) -> int:
    number = quantity(value)
    if number is None:
        raise MalformedAnswer(f"log {i} of the answer has no block number")
    return number


def _hex(value: Any, i: int, block: int, length: int | None) -> bytes:
    """``0x``-prefixed hex of ``length`` bytes (any, if None), or MalformedAnswer."""
    raw = data(value, length)
    if raw is None:
        what = "a topic" if length is not None else "data"
        size = f"{length}-byte hex" if length is not None else "hex"
        where = f"log {i} of the answer (block {block})"
        raise MalformedAnswer(f"{where} has {what} that is not {size}")
    return raw


class EventDecoder:
    """Decodes the logs of one event of an ABI into its arguments by name."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        if entry.get("type") != "event" or entry.get("anonymous"):
            raise TypeError(f"{entry.get('name')!r} is not a non-anonymous ABI event")
        self.name = str(entry["name"])
        self.topic = event_topic(entry)
        inputs = list(entry.get("inputs", []))
        indexed = [i for i in inputs if i.get("indexed")]
        unindexed = [i for i in inputs if not i.get("indexed")]
        self._topic_types = tuple(_topic_type(collapse_if_tuple(i)) for i in indexed)
        self._data_types = tuple(collapse_if_tuple(i) for i in unindexed)
        names = [str(i["name"]) for i in (*indexed, *unindexed)]
        types = (*self._topic_types, *self._data_types)
        #: the position of each address among the decoded values, made EIP-55 as web3 does
        self._addresses = tuple(n for n, t in enumerate(types) if t == "address")
        self._names = tuple(names)

    def __repr__(self) -> str:
        return f"EventDecoder({self.name!r})"

    def decode(self, log: Log) -> dict[str, Any]:
        """The log's arguments by name; :class:`MalformedAnswer` if it is not one of this
        event's logs as the ABI encodes them."""
        if len(log.topics) != 1 + len(self._topic_types) or log.topics[0] != self.topic:
            raise MalformedAnswer(
                f"a {self.name} log in block {log.block} has {len(log.topics)} topics, "
                f"not {1 + len(self._topic_types)}"
            )
        try:
            # Indexed value types are whole words: their topics, joined, are their encoding.
            values = [
                *abi_decode(self._topic_types, b"".join(log.topics[1:])),
                *abi_decode(self._data_types, log.data),
            ]
        except (eth_abi.exceptions.DecodingError, ValueError) as e:
            # DecodingError: short data, bad offsets, non-zero padding, a value out of its
            # type's range; ValueError: a string that is not UTF-8.
            raise MalformedAnswer(
                f"a {self.name} log in block {log.block} does not decode by the ABI "
                f"({type(e).__name__})"
            ) from None
        for n in self._addresses:
            values[n] = eip55(values[n])
        return dict(zip(self._names, values, strict=True))


def _topic_type(abi_type: str) -> str:
    """How an indexed argument of ``abi_type`` is decoded from its topic: as itself if a
    value type, else as the 32-byte hash its topic holds."""
    is_value = abi_type.startswith(_VALUE_TYPE_PREFIXES) and not abi_type.endswith("]")
    dynamic_bytes = abi_type in ("bytes", "string")
    return abi_type if is_value and not dynamic_bytes else "bytes32"


def event_topic(entry: Mapping[str, Any]) -> bytes:
    """topic0 of an ABI event: the keccak256 of its signature."""
    types = ",".join(collapse_if_tuple(i) for i in entry.get("inputs", []))
    return bytes(keccak(f"{entry['name']}({types})".encode()))
