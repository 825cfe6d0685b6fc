"""JSON from outside the process, parsed with bounded size and nesting. Pure, no I/O.

Why a bound on nesting: importing web3 (py_ecc) raises Python's recursion limit to 100 000,
and the C JSON parser recurses once per ``[`` or ``{``; some 100 000 nested brackets then
overflow the C stack and the process dies (SIGSEGV), which no ``except`` can catch. So
:func:`loads` measures the nesting first, with a linear scan that counts brackets outside
strings, and ``json.loads`` only ever sees a document within both bounds.

Rules this module follows:

- Every caller names its bounds, fitting what it reads (a JSON-RPC answer, an audit entry,
  a receipts file); the chain's are here because two clients read JSON-RPC.
- Anything out of bounds or not JSON is :class:`~core.errors.InvalidRequest`, whose
  message names ``what`` was read and why, never its content. An adapter reading from a
  peer translates it into its own error (the chain adapter into ``ChainUnavailable``).
- Text is UTF-8 (RFC 8259 section 8.1); ``NaN`` and ``Infinity`` are not JSON and are
  refused, and so is a number too large for a float (``1e400``): Python would make it
  infinity, which a caller's ``int()`` turns into ``OverflowError``.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any, Final

from core.errors import InvalidRequest

#: deepest nesting of a JSON-RPC answer: a transaction receipt's log topics are 5 deep
#: (``{result: {logs: [{topics: [..]}]}}``); 32 leaves room for any client's extras
JSON_RPC_MAX_DEPTH: Final = 32
#: largest JSON-RPC answer read: an ``eth_getLogs`` over the node's catch-up window of the
#: registry's events (about 1 KiB each) fits many times; a block or a call answer is far less
JSON_RPC_MAX_BYTES: Final = 8 * 1024 * 1024

# A whole string: its quote, runs of plain characters and escape pairs, its closing quote
# (possessive: a scan never backtracks).
_STRING: Final = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
#: every byte but brackets and quotes
_NOT_STRUCTURE: Final = bytes(c for c in range(256) if chr(c) not in '[]{}"')
# Everything but the brackets, once strings are gone.
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
# From a point outside any string: runs of what is not a quote, and whole strings, up to
# the first string that does not close (possessive throughout: one pass, no backtracking).
_OUTSIDE_AND_WHOLE_STRINGS: Final = re.compile(
    r'(?:[^"]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL
)
#: characters (or bytes) of a document scanned at a time (see ``_brackets_outside_strings``)
_WINDOW: Final = 1 << 16
#: each bracket as its step of the depth, a signed byte: +1 opens, -1 (0xff) closes
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def loads(
    data: bytes, *, max_bytes: int, max_depth: int, what: str, max_containers: int | None = None
) -> Any:
    """Parse ``data`` (UTF-8 JSON) if it is at most ``max_bytes`` long, nests at most
    ``max_depth`` arrays and objects deep (a scalar is depth 0, ``[]`` depth 1) and, with
    ``max_containers``, opens at most that many arrays and objects in all
    (:class:`TooManyContainers`): parsing builds an object for each, some 60 bytes of
    memory for the 3 bytes of ``{},``."""
    if not isinstance(data, bytes):
        raise InvalidRequest(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what} is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not JSON: not UTF-8 text") from None
    check_depth(text, max_depth=max_depth, what=what, max_containers=max_containers)
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except _NotJsonNumber as e:
        raise InvalidRequest(f"{what} is not JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{what} is not JSON: {e.msg} at line {e.lineno}") from None
    except (ValueError, RecursionError) as e:
        # ValueError: an integer of more digits than Python converts.
        raise InvalidRequest(f"{what} is not JSON ({type(e).__name__})") from None


def loads_object(
    data: bytes, *, max_bytes: int, max_depth: int, what: str, max_containers: int | None = None
) -> dict[str, Any]:
    """:func:`loads`, for a document that must be a JSON object."""
    value = loads(
        data, max_bytes=max_bytes, max_depth=max_depth, what=what, max_containers=max_containers
    )
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} is not a JSON object")
    return value


class TooManyContainers(InvalidRequest):
    """A document that opens more arrays and objects than its reader allows."""

    def __init__(self, what: str, count: int, max_containers: int) -> None:
        super().__init__(f"{what} holds {count} arrays and objects, more than {max_containers}")
        #: how many it opens outside its strings (up to a string that never ends)
        self.count = count


def check_depth(text: str, *, max_depth: int, what: str, max_containers: int | None = None) -> None:
    """Refuse ``text`` if its arrays and objects nest deeper than ``max_depth`` or, with
    ``max_containers``, are more than that many (:class:`TooManyContainers`; too deep is
    named first). Linear in the length, one scan for both; exact for any prefix a JSON
    parser accepts, so the parser never goes deeper than this allowed, whatever follows."""
    # Fewer brackets in all than the bounds (strings included): nothing to scan.
    upper = text.count("[") + text.count("{")
    if upper <= max_depth and (max_containers is None or upper <= max_containers):
        return
    brackets, unterminated = _brackets_outside_strings(text)
    if not _nests_within(brackets, max_depth):
        _refuse_first_violation(brackets, max_depth, what)
    if max_containers is not None:
        count = brackets.count("[") + brackets.count("{")
        if count > max_containers:
            raise TooManyContainers(what, count, max_containers)
    if unterminated:
        raise InvalidRequest(f"{what} is not JSON: unterminated string")


def _brackets_outside_strings(text: str) -> tuple[str, bool]:
    """The brackets of ``text`` outside its strings, in order, up to a string that never
    ends (what follows its quote is inside it, and a parser stops there); and whether
    there is one. Each step is one pass in C, so that a large answer (an ``eth_getLogs``
    of thousands of logs, a few hundred strings for each bracket) scans fast; and the
    passes that make an object for each string (some 35 bytes) take a window of the text
    at a time, so that those never add up to more than a window's worth (over a whole
    document of brackets and strings in turns of a few bytes, they made some 30 times
    its size)."""
    if "\\" not in text:
        return _brackets_outside_strings_without_escapes(text)
    found: list[str] = []
    start = 0
    while start < len(text):
        window = text[start : start + _WINDOW]
        # Up to the first string that opens in the window and does not close in it.
        matched = _OUTSIDE_AND_WHOLE_STRINGS.match(window)  # always, if only empty
        end = matched.end() if matched else 0
        found.append(_NOT_BRACKET.sub("", _STRING.sub("", window[:end])))
        if end == len(window):
            start += end  # the window ends outside any string
            continue
        string = _STRING.match(text, start + end)
        if string is None:
            return "".join(found), True
        start = string.end()
    return "".join(found), False


def _brackets_outside_strings_without_escapes(text: str) -> tuple[str, bool]:
    """``_brackets_outside_strings`` of a text with no backslash: a string is a quote,
    anything but a quote, a quote. Keep only brackets and quotes (UTF-8 puts no other
    character on their bytes). Two quotes side by side are an empty string, or two
    strings with nothing between them: dropping them leaves the brackets outside strings
    as they were. Then the pieces between the quotes left are, in turn, outside and
    inside a string; where the last quote leaves the text inside one, that string never
    ends."""
    structure = text.encode("utf-8", "surrogatepass").translate(None, _NOT_STRUCTURE)
    structure = structure.replace(b'""', b"")
    found: list[bytes] = []
    inside = False
    for start in range(0, len(structure), _WINDOW):
        pieces = structure[start : start + _WINDOW].split(b'"')
        found.append(b"".join(pieces[1 if inside else 0 :: 2]))
        inside ^= len(pieces) % 2 == 0  # an odd number of quotes in the window
    return b"".join(found).decode("ascii"), inside


def _nests_within(brackets: str, max_depth: int) -> bool:
    """Whether ``brackets`` (only ``[]{}``) never closes what is not open and never nests
    deeper than ``max_depth`` (what is still open at the end is allowed): the running
    depth, summed in C, stays within 0 and ``max_depth``."""
    if not brackets:
        return True
    steps = array("b", brackets.encode("ascii").translate(_STEPS))
    return max(accumulate(steps)) <= max_depth and min(accumulate(steps)) >= 0


def _refuse_first_violation(brackets: str, max_depth: int, what: str) -> None:
    """Raise for the first bracket of ``brackets`` that nests too deep or closes what is
    not open (called only when there is one: refusals are rare, so this scan may be slow)."""
    depth = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > max_depth:
                levels = "level" if max_depth == 1 else "levels"
                raise InvalidRequest(f"{what} nests deeper than {max_depth} {levels}")
        else:
            depth -= 1
            if depth < 0:
                raise InvalidRequest(f"{what} is not JSON: unbalanced {char!r}")
    raise AssertionError("_nests_within refused brackets that nest within the bound")


class _NotJsonNumber(ValueError):
    """A number :func:`loads` refuses; its text says which kind, never the number."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJsonNumber("a number too large for a float")
    return value


def _no_constant(name: str) -> Any:
    # name is one of the parser's three constants, never the document's text.
    raise _NotJsonNumber(f"{name} is not a JSON number")
