"""The bounded JSON parser: nesting and size are refused before json.loads sees them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import tracemalloc
from typing import TypedDict

import pytest

from core import bounded_json
from core.bounded_json import check_depth, loads, loads_object
from core.errors import InvalidRequest


class Limits(TypedDict):
    """The keyword arguments ``loads`` and ``loads_object`` take."""

    max_bytes: int
    max_depth: int
    what: str


LIMITS: Limits = {"max_bytes": 1 << 20, "max_depth": 8, "what": "test document"}


def nested(depth: int, inner: str = "1") -> bytes:
    """``depth`` alternating arrays and objects around ``inner``."""
    text = inner
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k":{text}}}'
    return text.encode()


def test_depth_at_the_limit_parses_one_more_is_refused() -> None:
    assert loads(nested(8), **LIMITS) is not None
    with pytest.raises(InvalidRequest, match="test document nests deeper than 8 levels"):
        loads(nested(9), **LIMITS)
    assert loads(b"[]", max_bytes=10, max_depth=1, what="x") == []
    assert loads(b"7", max_bytes=10, max_depth=0, what="x") == 7
    with pytest.raises(InvalidRequest, match="deeper than 0"):
        loads(b"[]", max_bytes=10, max_depth=0, what="x")


def test_brackets_inside_strings_do_not_count() -> None:
    value = json.dumps({"a": "[[[[[[[[[[{{{{{{{{{{{{", "b": ["]]]]]]]]}}}}}}}"]}).encode()
    assert loads(value, **LIMITS)["a"].startswith("[[[")


@pytest.mark.parametrize(
    "document",
    [
        # an escaped quote does not end the string: the brackets after it are inside it
        r'{"a": "x\" [[[[[[[[[[[[[[ y"}',
        # an escaped backslash does end it before the quote: these brackets are outside
        r'{"a": "x\\", "b": [[[[[[[[[[[[]]]]]]]]]]]]}',
        r'{"a": "\\\"[[[[[[[[[[[[[[[[[["}',
        r'{"a": "\u005b[[[[[[[[[[[[[[[["}',
    ],
)
def test_escapes_are_honoured(document: str) -> None:
    expected_ok = "]]]]" not in document
    if expected_ok:
        assert isinstance(loads(document.encode(), **LIMITS), dict)
    else:
        with pytest.raises(InvalidRequest, match="deeper"):
            loads(document.encode(), **LIMITS)


def test_size_is_refused_before_parsing() -> None:
    assert loads(b" " * 99 + b"1", max_bytes=100, max_depth=1, what="x") == 1
    with pytest.raises(InvalidRequest, match="x is larger than 100 bytes"):
        loads(b" " * 100 + b"1", max_bytes=100, max_depth=1, what="x")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # a BOM is not JSON text (RFC 8259 8.1)
        ("{}", "must be bytes"),
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"[1,]", "not JSON"),
        (b'{"a": NaN}', "not JSON"),
        (b"[Infinity]", "not JSON"),
        (b"1" * 5000, "not JSON"),  # more digits than Python converts
        (b'"' + b"[" * 20, "unterminated string"),
        (b"]" + b"[" * 20, "unbalanced"),
        (b"[" * 20 + b'"', "deeper"),
    ],
)
def test_malformed_input_is_an_invalid_request(data: bytes | str, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        loads(data, **LIMITS)  # type: ignore[arg-type]  # one case passes a str on purpose


@pytest.mark.parametrize("document", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_wrong_top_level_type_is_refused(document: bytes) -> None:
    with pytest.raises(InvalidRequest, match="test document is not a JSON object"):
        loads_object(document, **LIMITS)
    assert loads_object(b'{"a": [1]}', **LIMITS) == {"a": [1]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b'{"leaf_index": 1e400}', "a number too large for a float"),
        (b"[-1e400]", "a number too large for a float"),
        (b"[1" + b"0" * 400 + b".5]", "a number too large for a float"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b"[Infinity]", "Infinity is not a JSON number"),
        (b"[-Infinity]", "-Infinity is not a JSON number"),
    ],
    ids=["1e400", "-1e400", "401-digit-decimal", "NaN", "Infinity", "-Infinity"],
)
def test_a_number_that_is_no_finite_float_is_refused_naming_the_document(
    document: bytes, message: str
) -> None:
    """Python reads 1e400 as infinity, and a caller's int() of it raises OverflowError (the
    auditor's traceback on a receipts file): refused as not JSON, the number unquoted."""
    with pytest.raises(InvalidRequest) as raised:
        loads(document, **LIMITS)
    assert raised.value.message == f"test document is not JSON: {message}"


def test_finite_floats_still_parse() -> None:
    assert loads(b"[1e308, -2.5e-400, 0.1, 1E2]", **LIMITS) == [1e308, -0.0, 0.1, 100.0]


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("1", 0),
        ("[]", 1),
        ('[{}, {"a": [1, {}]}]', 5),
        (r'["[{", "\\"]', 1),  # brackets in strings, an escaped backslash
        (r'["\"[{"]', 1),  # an escaped quote
        ('[{"a": "[[', 2),  # up to a string that never ends
    ],
)
def test_containers_are_counted_only_where_brackets_open_outside_strings(
    text: str, count: int
) -> None:
    with pytest.raises(bounded_json.TooManyContainers) as raised:
        bounded_json.check_depth(text, max_depth=8, what="x", max_containers=count - 1)
    assert raised.value.count == count


def test_the_scan_is_linear() -> None:
    """Millions of structural characters and escapes scan in well under a second, and an
    unterminated string full of escaped quotes is not rescanned from each quote."""
    for text in (
        "[" + ",".join(['"\\"[{"'] * 200_000) + "]",
        '"' + '\\"' * 1_000_000,
        "[" + "[]," * 1_000_000 + "1]",
    ):
        started = time.perf_counter()
        try:
            check_depth(text, max_depth=4, what="x")
        except InvalidRequest:
            pass
        assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "unit",
    [
        '"[["[]',  # brackets in short strings between short runs of brackets
        '"\\"[["{}',  # the same with escapes
    ],
)
def test_the_scan_holds_about_the_documents_size_in_memory(unit: str) -> None:
    """Scanned whole, such a document made an object for each of its strings: 2 MiB of
    it took some 60 MiB to scan (30 times its size). A window at a time, at most about
    twice its size: the brackets found outside strings."""
    text = unit * ((2 << 20) // len(unit))
    tracemalloc.start()
    try:
        check_depth(text, max_depth=2, what="x", max_containers=10**7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(text)


def test_a_deep_document_is_refused_where_json_loads_would_kill_the_process() -> None:
    """With web3 imported (recursion limit 100 000) plain json.loads of deep nesting dies
    with SIGSEGV; the bounded parser refuses the same bytes and the process lives on."""
    script = (
        "import web3, json, sys\n"
        "from core.bounded_json import loads\n"
        "from core.errors import InvalidRequest\n"
        "data = b'[' * 200_000\n"
        "try:\n"
        "    loads(data, max_bytes=1 << 20, max_depth=32, what='x')\n"
        "except InvalidRequest as e:\n"
        "    print(e.message)\n"
        "if sys.argv[1] == 'plain':\n"
        "    json.loads(data)\n"
    )
    bounded = subprocess.run(
        [sys.executable, "-c", script, "bounded"], capture_output=True, text=True, timeout=60
    )
    assert bounded.returncode == 0, bounded.stderr
    assert bounded.stdout.strip() == "x nests deeper than 32 levels"
    plain = subprocess.run(
        [sys.executable, "-c", script, "plain"], capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == -11  # what the bound prevents: SIGSEGV


def test_json_rpc_bounds_fit_real_answers() -> None:
    receipt = {"jsonrpc": "2.0", "id": 1, "result": {"logs": [{"topics": ["0x00"]}]}}
    data = json.dumps(receipt).encode()
    assert (
        loads(
            data,
            max_bytes=bounded_json.JSON_RPC_MAX_BYTES,
            max_depth=bounded_json.JSON_RPC_MAX_DEPTH,
            what="answer",
        )
        == receipt
    )


def _reference_depth_check(text: str, max_depth: int) -> str | None:
    """The rule, one character at a time: brackets outside strings, escapes honoured;
    the first violation's message, or None."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                return "nests deeper"
        elif char in "]}":
            depth -= 1
            if depth < 0:
                return "unbalanced"
    return "unterminated string" if in_string else None


@pytest.mark.parametrize(
    "alphabet",
    [
        '[]{}"\\a,',  # with escapes
        '[]{}"a,\u00e9\u20ac',  # without (the scan's fast path), with text beyond Latin-1
    ],
)
def test_the_scan_agrees_with_the_rule_on_random_text(alphabet: str) -> None:
    """Any text (brackets, quotes, escapes, letters), against the rule applied one
    character at a time: the same verdict and the same first violation."""
    _agrees_with_the_rule_on_random_text(alphabet, runs=20_000, longest=24)


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("alphabet", ['[]{}"\\a,', '[]{}"a,\u00e9'])
def test_the_scan_agrees_with_the_rule_across_windows(
    alphabet: str, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanned a few characters at a time, strings, escapes and unterminated strings
    cross the windows' edges anywhere: the verdicts are the rule's still."""
    monkeypatch.setattr(bounded_json, "_WINDOW", window)
    _agrees_with_the_rule_on_random_text(alphabet, runs=3_000, longest=40)


def _agrees_with_the_rule_on_random_text(alphabet: str, *, runs: int, longest: int) -> None:
    rng = random.Random(20261204)
    for _ in range(runs):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))
        max_depth = rng.randint(0, 4)
        if text.count("[") + text.count("{") <= max_depth:
            continue  # too few brackets to nest too deep: not scanned, json.loads judges
        expected = _reference_depth_check(text, max_depth)
        try:
            check_depth(text, max_depth=max_depth, what="x")
            found = None
        except InvalidRequest as e:
            found = e.message
        if expected is None:
            assert found is None, (text, max_depth, found)
        else:
            assert found is not None and expected in found, (text, max_depth, expected, found)
