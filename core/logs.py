"""Structured JSON logs for every medkms process.

One JSON object per line on stderr, with a timestamp, level, the process's
component name and whatever the call site binds (request ids, decisions).
A last-line-of-defence processor redacts any field whose name suggests a secret,
at the top of an event or nested in its dicts, lists and tuples; call sites log
hashes and ids, never key material.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_SECRET_HINTS = ("pin", "secret", "private", "password", "kfrag_bytes", "plaintext", "dek")
_REDACTED = "[redacted]"
#: containers nested deeper than this in a field's value are redacted whole, unread
_MAX_DEPTH = 8


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and any(hint in key.lower() for hint in _SECRET_HINTS)


def _scrub(value: Any, depth: int) -> Any:
    """``value`` with every field named like a secret redacted, in dicts, lists and
    tuples down to ``_MAX_DEPTH``; new containers, so the caller's are left as they are."""
    if not isinstance(value, Mapping | list | tuple):
        return value
    if depth > _MAX_DEPTH:
        return _REDACTED
    if isinstance(value, Mapping):
        return {
            key: _REDACTED if _is_secret(key) else _scrub(item, depth + 1)
            for key, item in value.items()
        }
    items = [_scrub(item, depth + 1) for item in value]
    return tuple(items) if isinstance(value, tuple) else items


def _drop_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event):
        event[key] = _REDACTED if _is_secret(key) else _scrub(event[key], 1)
    return event


def configure(component: str, level: str = "info") -> None:
    """Send JSON logs to stderr; call once at process start."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())

    def add_component(
        _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event["component"] = component
        return event

    structlog.configure(
        processors=[
            add_component,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
