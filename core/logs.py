"""Structured JSON logs for every medkms process.

One JSON object per line on stderr, with a timestamp, level, the process's
component name and whatever the call site binds (request ids, decisions).
A last-line-of-defence processor drops any field whose name suggests a secret;
call sites log hashes and ids, never key material.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_HINTS = ("pin", "secret", "private", "password", "kfrag_bytes", "plaintext", "dek")


def _drop_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event):
        lowered = key.lower()
        if any(hint in lowered for hint in _SECRET_HINTS):
            event[key] = "[redacted]"
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
