"""core/logs.py redacts fields whose names suggest secrets, at the top of an event and
nested in the dicts, lists and tuples it carries, as the last line of defence the threat
model names (docs/threat-model.md, "Secrets hygiene").

tests/conftest.py makes ``logs.configure`` a no-op for the test process, so the real
chain runs in a child process that configures itself as a medkms process does and logs
to its stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from core import logs

_ROOT = Path(__file__).resolve().parents[2]

_PRELUDE = """
import structlog
from core import logs
logs.configure("test-component")
log = structlog.get_logger("test")
"""

REDACTED = "[redacted]"


def _logged(code: str) -> tuple[list[dict[str, Any]], str]:
    """The events a fresh, configured process logs running ``code`` (``log`` is its
    logger), and its raw stderr."""
    result = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    events = [json.loads(line) for line in result.stderr.splitlines()]
    return events, result.stderr


def test_top_level_secret_fields_are_redacted() -> None:
    (event,), stderr = _logged(
        'log.info("unlocked", user_pin="sv-1111", dek="sv-2222", '
        'kfrag_bytes=b"sv-3333", private_key="sv-4444", record_id="rec-1")'
    )
    assert event["event"] == "unlocked"
    assert event["component"] == "test-component"
    for field in ("user_pin", "dek", "kfrag_bytes", "private_key"):
        assert event[field] == REDACTED
    assert event["record_id"] == "rec-1"
    assert "sv-" not in stderr


def test_bound_and_context_fields_are_redacted() -> None:
    (event,), stderr = _logged(
        'structlog.contextvars.bind_contextvars(hsm_password="sv-1111")\n'
        'log.bind(patient_secret="sv-2222").warning("bound")'
    )
    assert event["hsm_password"] == REDACTED
    assert event["patient_secret"] == REDACTED
    assert "sv-" not in stderr


def test_nested_secret_fields_are_redacted() -> None:
    (event,), stderr = _logged(
        'log.info("nested", settings={"user_pin": "sv-1111", "log_level": "info"}, '
        'nodes=[{"id": 1, "private_key": "sv-2222"}, {"id": 2}], '
        'pair=({"password": "sv-3333"}, "kept"), '
        'deep={"a": {"b": [{"node_secret": "sv-4444", "c": 3}]}})'
    )
    assert event["settings"] == {"user_pin": REDACTED, "log_level": "info"}
    assert event["nodes"] == [{"id": 1, "private_key": REDACTED}, {"id": 2}]
    assert event["pair"] == [{"password": REDACTED}, "kept"]
    assert event["deep"] == {"a": {"b": [{"node_secret": REDACTED, "c": 3}]}}
    assert "sv-" not in stderr


def _nest(levels: int, inner: object) -> object:
    """``levels`` dicts, one inside the other, the innermost holding ``inner``."""
    value = inner
    for _ in range(levels):
        value = {"next": value}
    return value


def _nest_lists(levels: int, inner: object) -> object:
    """``levels`` lists, one inside the other, the innermost holding ``inner``."""
    value = inner
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_past_the_bound_is_redacted_whole() -> None:
    events, stderr = _logged(
        'log.info("eight", deep=' + repr(_nest(8, "leaf")) + ")\n"
        'log.info("nine", deep=' + repr(_nest(9, "sv-1111")) + ")\n"
        'cycle = []\ncycle.append(cycle)\nlog.info("cycle", loop=cycle)'
    )
    eight, nine, cycle = events
    assert eight["deep"] == _nest(8, "leaf")
    assert nine["deep"] == _nest(8, REDACTED)
    assert cycle["loop"] == _nest_lists(8, REDACTED)
    assert "sv-" not in stderr


def test_the_callers_objects_are_left_as_they_were() -> None:
    settings = {"user_pin": "sv-1111", "nodes": [{"dek": "sv-2222"}], "pair": ({"pin": 1},)}
    before = repr(settings)
    event = logs._drop_secrets(None, "info", {"event": "x", "settings": settings})
    assert event["settings"] == {
        "user_pin": REDACTED,
        "nodes": [{"dek": REDACTED}],
        "pair": ({"pin": REDACTED},),
    }
    assert repr(settings) == before


def test_keys_that_are_not_strings_are_kept() -> None:
    event = logs._drop_secrets(None, "info", {"event": "x", "by_id": {1: "a", "pin": "b"}})
    assert event["by_id"] == {1: "a", "pin": REDACTED}
