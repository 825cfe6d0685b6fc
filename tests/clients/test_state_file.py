"""The state file of an incremental audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.audit.state_file import load_state
from core.errors import InvalidRequest
from tests.clients.test_receipts_file import NESTED


def test_a_hostile_state_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"nodes": {"node-1": ' + NESTED + b"}}")
    with pytest.raises(InvalidRequest, match="audit state .* nests deeper than 4 levels"):
        load_state(path, [])
    path.write_bytes(b"[]")
    with pytest.raises(InvalidRequest, match="not a JSON object"):
        load_state(path, [])
    path.write_bytes(b'{"nodes": []}')
    with pytest.raises(InvalidRequest, match="not an audit state file"):
        load_state(path, [])
