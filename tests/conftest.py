"""Settings for the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core import logs


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Byte values (random keys, made at collection) get a stable id naming their length,
    so test ids are the same on every run."""
    if isinstance(val, bytes | bytearray):
        return f"{argname}-{len(val)}-bytes"
    return None


@pytest.fixture(autouse=True, scope="session")
def _keep_logging() -> Iterator[None]:
    """Commands run in this process (``kmsctl``'s ``main`` and the others, in tests and
    in session or module fixtures alike) would point structlog, for good (loggers cache
    their configuration), at one test's captured stderr and level: later tests' servers
    would log to it once closed, and ``capture_logs`` would miss events. Tests leave the
    process's logging as it is."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "configure", lambda *_args, **_kwargs: None)
        yield
