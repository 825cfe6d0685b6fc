"""An eth_getLogs answer is checked before any log in it is decoded, and a log that does not
fit its event's ABI is refused: a malformed log is a clear MalformedAnswer, never a log
skipped or read another way. No chain: answers are written here as an endpoint would."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from eth_abi.abi import encode

from contracts.build import load_artifact
from contracts.event_logs import EventDecoder, Log, checked_logs, event_topic
from contracts.json_rpc import MalformedAnswer
from contracts.registry_events import followed_events
from core.record_types import RecordType

ABI: list[dict[str, Any]] = load_artifact()["abi"]
EVENTS = {e["name"]: e for e in ABI if e["type"] == "event"}
REGISTRY = "0x" + "12" * 20
PATIENT = "0x" + "ab" * 20
GRANTEE = "0x" + "cd" * 20


def word(value: bytes | str | int, abi_type: str) -> str:
    return "0x" + encode([abi_type], [value]).hex()


def granted(block: int = 5, **changes: Any) -> dict[str, Any]:
    """An AccessGranted log as eth_getLogs answers it."""
    log = {
        "address": REGISTRY,
        "topics": [
            "0x" + event_topic(EVENTS["AccessGranted"]).hex(),
            word(PATIENT, "address"),
            word(GRANTEE, "address"),
        ],
        "data": "0x" + encode(["bytes", "uint64", "uint32"], [b"\x02" * 33, 10**9, 0b10]).hex(),
        "blockNumber": hex(block),
        "blockHash": "0x" + "00" * 32,
        "transactionHash": "0x" + "00" * 32,
        "logIndex": "0x0",
        "transactionIndex": "0x0",
        "removed": False,
    }
    return {**log, **changes}


def refused(answer: Any, reason: str, from_block: int = 0, to_block: int = 10) -> None:
    """``answer`` is refused, naming ``reason``, before or when its logs are decoded."""
    decoder = EventDecoder(EVENTS["AccessGranted"])
    with pytest.raises(MalformedAnswer, match=reason):
        for log in checked_logs(answer, REGISTRY, from_block, to_block):
            decoder.decode(log)


def test_a_well_formed_answer_decodes() -> None:
    (log,) = checked_logs([granted(address=REGISTRY.upper().replace("X", "x"))], REGISTRY, 0, 9)
    assert log.block == 5 and len(log.topics) == 3
    args = EventDecoder(EVENTS["AccessGranted"]).decode(log)
    assert args["patient"] == "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"
    assert (args["granteeUmbralKey"], args["expiresAt"], args["allowedTypes"]) == (
        b"\x02" * 33,
        10**9,
        0b10,
    )


BAD_ANSWERS: dict[str, tuple[Any, str]] = {
    "not-a-list": ({"logs": []}, "not a list of logs"),
    "a-string-for-a-log": (["x"], "log 0 of the answer is not a JSON object"),
    "another-contract": ([granted(address="0x" + "99" * 20)], "not from the contract asked"),
    "no-address": ([{k: v for k, v in granted().items() if k != "address"}], "not from the"),
    "block-after-the-range": ([granted(11)], "in block 11: out of chain order or outside"),
    "blocks-out-of-order": ([granted(6), granted(5)], "log 1 of the answer is in block 5"),
    "out-of-order-in-a-block": (
        [granted(5, logIndex="0x1"), granted(5, logIndex="0x0")],
        "log 1 of the answer is log 0 of block 5: out of chain order",
    ),
    "a-log-twice": ([granted(5), granted(5)], "log 1 of the answer is log 0 of block 5: out of"),
    "no-log-index": ([granted(logIndex=None)], "has no log index"),
    "block-as-number": ([granted(blockNumber=5)], "has no block number"),
    "block-negative": ([granted(blockNumber="-0x5")], "has no block number"),
    "block-with-spaces": ([granted(blockNumber="0x 5")], "has no block number"),
    "removed": ([granted(removed=True)], r"\(block 5\) is marked removed"),
    "topics-as-string": ([granted(topics="0x00")], "has no list of topics"),
    "five-topics": ([granted(topics=[word(1, "uint256")] * 5)], "has no list of topics"),
    "short-topic": ([granted(topics=["0xabcd"])], "has a topic that is not 32-byte hex"),
    "topic-not-hex": ([granted(topics=["0x" + "zz" * 32])], "a topic that is not 32-byte hex"),
    "topic-with-spaces": (
        [granted(topics=["0x" + "ab " * 21 + "ab" * 11])],
        "a topic that is not 32-byte hex",
    ),
    "data-odd-length": ([granted(data="0x123")], "has data that is not hex"),
    "data-without-0x": ([granted(data="00")], "has data that is not hex"),
}


@pytest.mark.parametrize(("answer", "reason"), BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
def test_an_answer_of_the_wrong_shape_is_refused(answer: Any, reason: str) -> None:
    refused(answer, reason, to_block=10)


def test_logs_in_chain_order_pass() -> None:
    answer = [granted(5, logIndex="0x0"), granted(5, logIndex="0x2"), granted(6, logIndex="0x0")]
    assert [log.block for log in checked_logs(answer, REGISTRY, 0, 10)] == [5, 5, 6]


def test_a_log_before_the_range_is_refused() -> None:
    refused([granted(3)], "in block 3: out of chain order", from_block=4)


def test_a_log_with_too_few_or_too_many_topics_for_its_event_is_refused() -> None:
    log = granted()
    refused([{**log, "topics": log["topics"][:2]}], "AccessGranted log in block 5 has 2 topics")
    extra = [*log["topics"], word(1, "uint256")]
    refused([{**log, "topics": extra}], "AccessGranted log in block 5 has 4 topics, not 3")


def test_short_data_is_refused() -> None:
    data = granted()["data"]
    for cut in (0, 64, len(data) - 2 - 64):
        refused([granted(data="0x" + data[2 : 2 + cut])], "does not decode by the ABI")


def test_an_address_topic_with_dirty_padding_is_refused() -> None:
    log = granted()
    dirty = "0x" + "01" + log["topics"][1][4:]
    refused([{**log, "topics": [log["topics"][0], dirty, log["topics"][2]]}], "does not decode")


def test_a_bad_offset_in_data_is_refused() -> None:
    body = bytearray(bytes.fromhex(granted()["data"][2:]))
    body[31] = 0xFF  # the offset of the key: past the end of the data
    refused([granted(data="0x" + body.hex())], "does not decode by the ABI")


def test_a_value_out_of_its_types_range_is_refused() -> None:
    entry = EVENTS["RecordAnchored"]
    (decoder,) = (d for d in followed_events(ABI).values() if d.name == "RecordAnchored")
    topics = (event_topic(entry), b"\x07" * 32, bytes.fromhex(word(PATIENT, "address")[2:]))
    wide = ["uint256", "address", "bytes32", "bytes32"]
    data = encode(wide, [300, GRANTEE, b"c" * 32, b"d" * 32])
    with pytest.raises(MalformedAnswer, match="RecordAnchored log in block 5 does not decode"):
        decoder.decode(Log(5, topics, data), 1005)
    # Within uint8, but no record type this node knows: refused, not guessed.
    data = encode(["uint8", "address", "bytes32", "bytes32"], [200, GRANTEE, b"c" * 32, b"d" * 32])
    with pytest.raises(MalformedAnswer, match="holds a value this node cannot take"):
        decoder.decode(Log(5, topics, data), 1005)
    data = encode(
        ["uint8", "address", "bytes32", "bytes32"],
        [int(RecordType.IMAGING), GRANTEE, b"c" * 32, b"d" * 32],
    )
    assert decoder.decode(Log(5, topics, data), 1005) is not None


def test_an_anonymous_event_or_a_function_is_not_decoded() -> None:
    anonymous = copy.deepcopy(EVENTS["AccessRevoked"]) | {"anonymous": True}
    with pytest.raises(TypeError, match="not a non-anonymous ABI event"):
        EventDecoder(anonymous)
    function = next(e for e in ABI if e["type"] == "function")
    with pytest.raises(TypeError):
        EventDecoder(function)
