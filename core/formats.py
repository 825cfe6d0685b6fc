"""How times and bytes are written wherever a person or a JSON file reads them:
ISO 8601 UTC to the second, and ``0x``-prefixed lowercase hex."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(ts: int) -> str:
    """A Unix time as ``2026-12-03T17:57:58Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def hex_0x(data: bytes) -> str:
    """Bytes as ``0x``-prefixed lowercase hex."""
    return "0x" + data.hex()
