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
  refused.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from core.errors import InvalidRequest

#: deepest nesting of a JSON-RPC answer: a transaction receipt's log topics are 5 deep
#: (``{result: {logs: [{topics: [..]}]}}``); 32 leaves room for any client's extras
JSON_RPC_MAX_DEPTH: Final = 32
#: largest JSON-RPC answer read: an ``eth_getLogs`` over the node's catch-up window of the
#: registry's events (about 1 KiB each) fits many times; a block or a call answer is far less
JSON_RPC_MAX_BYTES: Final = 8 * 1024 * 1024

# A bracket or the start of a string; then the rest of a string: runs of plain characters
# and escape pairs, up to its closing quote (possessive: a scan never backtracks).
_STRUCTURE: Final = re.compile(r'["\[\]{}]')
_STRING_REST: Final = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


def loads(data: bytes, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """Parse ``data`` (UTF-8 JSON) if it is at most ``max_bytes`` long and nests at most
    ``max_depth`` arrays and objects deep (a scalar is depth 0, ``[]`` depth 1)."""
    if not isinstance(data, bytes):
        raise InvalidRequest(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what} is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not JSON: not UTF-8 text") from None
    check_depth(text, max_depth=max_depth, what=what)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{what} is not JSON: {e.msg} at line {e.lineno}") from None
    except (ValueError, RecursionError) as e:
        # ValueError: NaN/Infinity, an integer of more digits than Python converts.
        raise InvalidRequest(f"{what} is not JSON ({type(e).__name__})") from None


def loads_object(data: bytes, *, max_bytes: int, max_depth: int, what: str) -> dict[str, Any]:
    """:func:`loads`, for a document that must be a JSON object."""
    value = loads(data, max_bytes=max_bytes, max_depth=max_depth, what=what)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} is not a JSON object")
    return value


def check_depth(text: str, *, max_depth: int, what: str) -> None:
    """Refuse ``text`` if its arrays and objects nest deeper than ``max_depth``. Linear in
    the length; exact for any prefix a JSON parser accepts, so the parser never goes deeper
    than this allowed, whatever follows."""
    # Fewer brackets in all than the bound (strings included): nothing to scan.
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth, pos = 0, 0
    while (found := _STRUCTURE.search(text, pos)) is not None:
        pos = found.end()
        char = found.group()
        if char == '"':
            rest = _STRING_REST.match(text, pos)
            if rest is None:
                raise InvalidRequest(f"{what} is not JSON: unterminated string")
            pos = rest.end()
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                levels = "level" if max_depth == 1 else "levels"
                raise InvalidRequest(f"{what} nests deeper than {max_depth} {levels}")
        else:
            depth -= 1
            if depth < 0:
                raise InvalidRequest(f"{what} is not JSON: unbalanced {char!r}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
