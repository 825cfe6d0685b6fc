"""The state file of an incremental audit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clients.audit.state_file import MAX_STATE_FILE_NODES, load_state
from core.audit_findings import Verdict
from core.errors import InvalidRequest
from core.registry_types import NodeInfo
from tests.clients.test_receipts_file import NESTED
from tests.core.test_audit_verify import NODE, forged_prefix, open_node, rewrite_from
from tests.core.test_local_files import refuses_without_waiting

#: a registered node; its keys are never reached by the refusals below
REGISTERED = NodeInfo(NODE, "10.0.0.1:7001", b"spki", b"delivery", "0x" + "11" * 20, True)


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


def test_a_state_file_of_more_containers_than_nodes_need_is_refused_before_parsing(
    tmp_path: Path,
) -> None:
    """Each node's prefix is an object and its frontier: the most nodes a file holds
    load; one more object than they would open is refused, not parsed (some 60 bytes of
    memory for each 3 bytes of ``{},``)."""
    path = tmp_path / "state.json"
    most: dict[str, object] = {f"node-{i}": {"frontier": []} for i in range(MAX_STATE_FILE_NODES)}
    path.write_text(json.dumps({"nodes": most}))
    assert load_state(path, []) == {}  # none of them registered
    more = ",".join(f'"n{i}": {{}}' for i in range(2 * MAX_STATE_FILE_NODES + 1))
    path.write_text('{"nodes": {' + more + "}}")
    with pytest.raises(InvalidRequest, match=r"audit state .* holds 8195 arrays and objects"):
        load_state(path, [])


def test_a_forged_anchor_block_is_read_and_then_refused_by_the_audit(tmp_path: Path) -> None:
    """A state file's checkpoint must be the node's, but nothing signs its anchor_block. A
    tamperer who rewrote a node's log (tree rebuilt, so the node signs it) writes the state
    of the rewritten log, claiming every anchor up to a far block was checked: the audit
    refuses the claim and checks every anchor, which shows the rewrite."""
    node = open_node(tmp_path)
    try:
        rewrite_from(node, 20, 45)
        path = tmp_path / "state.json"
        forged = forged_prefix(node, 10**12)
        path.write_text(json.dumps({"registry": "0x01", "nodes": {NODE: forged.to_json()}}))
        since = load_state(path, [node.info])
        assert since[NODE].anchor_block == 10**12  # signed by the node where it is signed

        report = node.verify(since=since[NODE])

        assert report.verdict is Verdict.FAILED and report.verified is None
        assert [p.message for p in report.problems] == [
            "the audit state's anchor_block 1000000000000 is after the node's newest anchor "
            "(block 1101): no audit of this chain wrote it; every anchor is checked",
            "the node's tree is not consistent between the checkpoint of 32 entries anchored "
            "in block 1101 and the verified prefix (32 and 45 entries; RFC 9162 2.1.4) (and 2 "
            "later pairs)",
        ]
    finally:
        node.log.close()


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"NaN"], ids=bytes.decode)
def test_a_number_that_is_not_finite_is_refused_not_a_traceback(
    tmp_path: Path, number: bytes
) -> None:
    """``"tree_size": 1e400`` became float infinity, and int() of it an OverflowError
    traceback out of ``kmsctl audit verify --state-file``."""
    path = tmp_path / "state.json"
    path.write_bytes(b'{"nodes": {"node-1": {"tree_size": ' + number + b"}}}")
    with pytest.raises(InvalidRequest, match=f"^audit state {path} is not JSON: "):
        load_state(path, [REGISTERED])


def test_a_bad_entry_is_named_by_its_file_and_node(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"nodes": {NODE: {"tree_size": 3}, "unregistered": 1}}))
    with pytest.raises(InvalidRequest) as raised:
        load_state(path, [REGISTERED])
    assert raised.value.message == (
        f"audit state {path}, entry of node {NODE}: not a verified prefix "
        "(an earlier audit's state)"
    )


def test_a_fifo_given_as_the_state_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    error = refuses_without_waiting(fifo, lambda: load_state(fifo, [REGISTERED]))
    assert isinstance(error, InvalidRequest)
    assert error.message == f"audit state {fifo} is not a regular file"
