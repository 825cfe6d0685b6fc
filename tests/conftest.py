"""Settings for the whole test suite."""

from __future__ import annotations

import pytest


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Byte values (random keys, made at collection) get a stable id naming their length,
    so test ids are the same on every run."""
    if isinstance(val, bytes | bytearray):
        return f"{argname}-{len(val)}-bytes"
    return None
