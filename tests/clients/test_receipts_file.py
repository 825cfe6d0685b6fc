"""The receipts file an auditor may bring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.audit.receipts_file import load_receipts, receipt_to_json, save_receipts
from core.errors import InvalidRequest
from tests.core.test_audit_verify import Node
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)

NESTED = b"[" * 200_000  # json.loads of it, in a process that imported web3, dies


def test_receipts_round_trip_through_their_file(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    path.write_text(json.dumps([receipt_to_json(r) for r in node.receipts]))
    assert load_receipts(path) == node.receipts
    # With the holder's notes (what each was kept for), and added to a file without them.
    kept = [r.kept_for(f"req-{r.leaf_index}", b"cfrag") for r in node.receipts[:3]]
    save_receipts(path, kept)
    assert load_receipts(path) == [*node.receipts, *kept]
    assert load_receipts(path)[-1].kept_for_request == "req-2"
    path.write_text('[{"node_id": "node-1"}]')
    with pytest.raises(InvalidRequest, match="not a receipts file"):
        load_receipts(path)


def test_a_hostile_receipts_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    path.write_bytes(NESTED)
    with pytest.raises(InvalidRequest, match="nests deeper than 3 levels"):
        load_receipts(path)
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # sparse: refused after 64 MiB, never read whole
    with pytest.raises(InvalidRequest, match="larger than 67108864 bytes"):
        load_receipts(path)


def test_saving_adds_to_the_file_and_leaves_no_temporary(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    save_receipts(path, node.receipts[:2])
    save_receipts(path, node.receipts[2:])
    assert load_receipts(path) == node.receipts
    assert not list(tmp_path.glob("receipts.json.*"))
    path.write_text("not json")
    with pytest.raises(InvalidRequest, match="not a receipts file|JSON"):
        save_receipts(path, node.receipts)  # never overwrites what it cannot read
    assert path.read_text() == "not json"
