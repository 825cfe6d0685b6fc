"""The receipts file an auditor may bring."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from clients.audit import receipts_file
from clients.audit.receipts_file import (
    MAX_RECEIPTS,
    MAX_RECEIPTS_FILE_BYTES,
    load_receipts,
    receipt_to_json,
    save_receipts,
)
from core.errors import InvalidRequest
from tests.core.test_audit_verify import Node
from tests.core.test_audit_verify import node as node  # noqa: F401  (fixture)
from tests.core.test_local_files import refuses_without_waiting

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
        f.truncate(3 << 30)  # sparse: refused after the bound, never read whole
    with pytest.raises(InvalidRequest, match=f"larger than {MAX_RECEIPTS_FILE_BYTES} bytes"):
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


def test_a_file_of_more_receipts_than_the_bound_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    """64 MiB of ``[{},{},...]`` took 1.75 GB to parse: each ``{}`` is a dict of some 60
    bytes. The arrays and objects are counted first; a file of more than a receipt's
    share (one object, one array) is refused unparsed, whatever they are."""
    path = tmp_path / "receipts.json"
    bound = 2 * MAX_RECEIPTS + 1
    path.write_bytes(b"[" + b",".join([b"{}"] * bound) + b"]")  # one more than the bound
    with pytest.raises(InvalidRequest) as raised:
        load_receipts(path)
    assert raised.value.message == (
        f"receipts file {path} holds more than {MAX_RECEIPTS} receipts ({bound + 1} arrays "
        "and objects, where a receipt is one object and one array); keep receipts in "
        "several files"
    )
    path.write_bytes(b"[[" + b",".join([b"[]"] * bound) + b"]]")  # lists, nested: the same
    with pytest.raises(InvalidRequest, match=f"more than {MAX_RECEIPTS} receipts"):
        load_receipts(path)
    # At the bound the file is parsed (and refused for what it holds, not for its size).
    path.write_bytes(b"[" + b",".join([b"{}"] * (bound - 1)) + b"]")
    with pytest.raises(InvalidRequest, match="not a receipts file: KeyError"):
        load_receipts(path)
    # Brackets inside strings are not arrays or objects: counted exactly, not refused.
    path.write_bytes(b'[{"node_id": "' + b"[{" * bound + b'"}]')
    with pytest.raises(InvalidRequest, match="not a receipts file: KeyError"):
        load_receipts(path)


def test_the_bounds_fit_a_full_file_of_the_largest_receipts(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    largest = max(node.receipts, key=lambda r: len(r.batch_path))
    largest = largest.kept_for("r" * 128, b"cfrag")
    text = json.dumps([receipt_to_json(largest)] * MAX_RECEIPTS, indent=1) + "\n"
    assert len(text) <= MAX_RECEIPTS_FILE_BYTES
    path.write_text(text)
    assert len(load_receipts(path)) == MAX_RECEIPTS


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN", b"Infinity"], ids=bytes.decode)
def test_a_number_that_is_not_finite_is_refused_not_a_traceback(
    node: Node, tmp_path: Path, number: bytes
) -> None:
    """``"leaf_index": 1e400`` became float infinity and int() of it an OverflowError
    traceback out of ``kmsctl audit verify --receipts``."""
    path = tmp_path / "receipts.json"
    document = json.dumps([receipt_to_json(node.receipts[0])]).encode()
    path.write_bytes(document.replace(b'"leaf_index": 0', b'"leaf_index": ' + number))
    with pytest.raises(InvalidRequest, match=f"^receipts file {path} is not JSON: "):
        load_receipts(path)


def test_a_fifo_given_as_the_receipts_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "receipts.json"
    os.mkfifo(fifo)
    error = refuses_without_waiting(fifo, lambda: load_receipts(fifo))
    assert isinstance(error, InvalidRequest)
    assert error.message == f"receipts file {fifo} is not a regular file"


def test_a_saved_receipts_file_is_its_owners_alone(node: Node, tmp_path: Path) -> None:
    """Receipts say who read which record: 0600 when made, when added to (it was 0644
    after a save), and a wider file is narrowed, whatever the umask."""
    path = tmp_path / "receipts.json"
    old_umask = os.umask(0o022)
    try:
        save_receipts(path, node.receipts[:1])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        save_receipts(path, node.receipts[1:2])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o644)
        save_receipts(path, node.receipts[2:3])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
    assert load_receipts(path) == node.receipts[:3]


def test_a_temporary_left_by_a_crash_is_replaced_not_trusted(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "receipts.json"
    tmp = tmp_path / "receipts.json.tmp"
    tmp.write_text("left over")
    tmp.chmod(0o666)
    save_receipts(path, node.receipts[:1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_receipts(path) == node.receipts[:1]
    assert not tmp.exists()


def test_saving_refuses_a_file_it_could_not_read_back(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "receipts.json"
    monkeypatch.setattr(receipts_file, "MAX_RECEIPTS", 3)
    save_receipts(path, node.receipts[:3])
    before = path.read_bytes()
    with pytest.raises(InvalidRequest, match="would hold more than 3 receipts"):
        save_receipts(path, node.receipts[3:4])
    assert path.read_bytes() == before
