"""Times and bytes as people and JSON files read them."""

from __future__ import annotations

import pytest

from core.formats import hex_0x, iso_utc


def test_a_unix_time_is_written_iso_8601_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(1_800_000_000) == "2027-01-15T08:00:00Z"


@pytest.mark.parametrize("ts", [2**64 - 1, 253_402_300_800, -(2**63)])
def test_a_time_no_calendar_has_is_written_as_a_number(ts: int) -> None:
    # a node may write any 64-bit time; a report must still be written
    assert iso_utc(ts) == f"unix time {ts} (not a date)"


def test_bytes_are_0x_lowercase_hex() -> None:
    assert hex_0x(b"\xab\x01") == "0xab01"
