"""How times and bytes are written wherever a person or a JSON file reads them:
ISO 8601 UTC to the second, and ``0x``-prefixed lowercase hex."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(ts: int) -> str:
    """A Unix time as ``2026-12-03T17:57:58Z``; one no calendar date has (a node may
    write any 64-bit time) as ``unix time N (not a date)``, never an exception."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix time {ts} (not a date)"


def hex_0x(data: bytes) -> str:
    """Bytes as ``0x``-prefixed lowercase hex."""
    return "0x" + data.hex()
