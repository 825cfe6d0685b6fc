"""The state file of an incremental audit (``kmsctl audit verify --state-file FILE``): the
prefix of each node's log the last audit verified, for the next one to start from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from clients.audit.auditor import ClusterReport
from clients.sdk.input_files import load_json_object
from clients.sdk.output_files import private_dir, private_file
from core.audit_findings import VerifiedPrefix
from core.errors import InvalidRequest
from core.registry_types import NodeInfo

# Bounds on the file (clients/sdk/input_files.py).
#: per node a checkpoint and a frontier of at most 64 hashes, some 5 KiB: thousands of nodes
MAX_STATE_FILE_BYTES: Final = 16 * 1024 * 1024
#: {"nodes": {node id: {"frontier": [...]}}}
STATE_FILE_DEPTH: Final = 4
#: the most nodes whose prefixes a state file holds; far more than a registry registers
MAX_STATE_FILE_NODES: Final = 4096
#: the document and its "nodes", then per node an object and its frontier: a file that
#: opens more (some 60 bytes of memory for the 3 of ``{},``) is refused before parsing
MAX_STATE_FILE_CONTAINERS: Final = 2 + 2 * MAX_STATE_FILE_NODES


def load_state(path: Path, nodes: Sequence[NodeInfo]) -> dict[str, VerifiedPrefix]:
    """The prefixes an earlier ``audit verify --state-file`` verified, of the registered
    ``nodes`` (each checked with its registered key); none if the file does not exist."""
    if not path.exists():
        return {}
    try:
        data = load_json_object(
            path,
            max_bytes=MAX_STATE_FILE_BYTES,
            max_depth=STATE_FILE_DEPTH,
            what="audit state",
            max_containers=MAX_STATE_FILE_CONTAINERS,
        )
    except InvalidRequest:
        raise
    except OSError as e:
        raise InvalidRequest(f"cannot read the audit state {path}: {e}") from None
    if not isinstance(data.get("nodes"), dict):
        raise InvalidRequest(f"{path} is not an audit state file")
    keys = {n.node_id: n.signing_public_key for n in nodes}
    prefixes: dict[str, VerifiedPrefix] = {}
    for node_id, item in data["nodes"].items():
        if node_id not in keys:
            continue
        try:
            prefixes[node_id] = VerifiedPrefix.from_json(item, keys[node_id])
        except (InvalidRequest, OverflowError) as e:
            # OverflowError: int() of a float too large, should one get past bounded_json.
            # The node id is a registered node's (in keys), not any text of the file.
            message = e.message if isinstance(e, InvalidRequest) else "a number out of range"
            raise InvalidRequest(
                f"audit state {path}, entry of node {node_id}: {message}"
            ) from None
    return prefixes


def save_state(path: Path, report: ClusterReport, earlier: dict[str, VerifiedPrefix]) -> None:
    """What this audit verified, for the next run: a node that failed keeps its earlier
    prefix (so the next run checks again from there)."""
    prefixes = dict(earlier)
    for node in report.nodes:
        if node.verified is not None:
            prefixes[node.node_id] = node.verified
    document = {
        "registry": report.registry_address,
        "nodes": {node_id: p.to_json() for node_id, p in sorted(prefixes.items())},
    }
    private_dir(path.parent)
    private_file(path).write_text(json.dumps(document, indent=2) + "\n")
