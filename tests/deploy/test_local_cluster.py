"""The local cluster's state file, cluster.json, as ``LocalCluster.open`` reads it: bounded,
and checked against the shape ``up`` writes, so that a command that uses the cluster meets
a one-line error naming the field, never a KeyError. Bringing a cluster up:
tests/integration."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli import kmsctl
from core.errors import InvalidRequest, PreconditionFailed
from deploy.local_cluster import (
    CLUSTER_FILE,
    CLUSTER_FILE_DEPTH,
    MAX_CLUSTER_FILE_BYTES,
    LocalCluster,
    NodeEntry,
)


def _node(i: int, state: Path) -> dict[str, Any]:
    return {
        "node_id": f"node-{i}",
        "address": f"127.0.0.1:{7000 + i}",
        "metrics_url": f"http://127.0.0.1:{9100 + i}/metrics",
        "config": str(state / "nodes" / f"node-{i}" / "node.toml"),
        "log": str(state / "logs" / f"node-{i}.log"),
        "pid": 0,
    }


def _state(state: Path) -> dict[str, Any]:
    """A stopped cluster's cluster.json, every section written, as ``up`` leaves it."""
    tls = state / "tls"
    return {
        "version": 1,
        "threshold": 2,
        "processes_per_node": 1,
        "node_settings": {},
        "coordinator_settings": {},
        "nodes": [_node(1, state), _node(2, state), _node(3, state)],
        "tls": {
            "ca_cert": str(tls / "ca.crt"),
            "operator_cert": str(tls / "operator-client.crt"),
            "operator_key": str(tls / "operator-client.key"),
        },
        "chain": {
            "rpc_url": "http://127.0.0.1:8545",
            "port": 8545,
            "pid": 0,
            "block_time_s": None,
            "registry_address": "0x" + "11" * 20,
            "chain_id": 31337,
            "registry_start_block": 1,
        },
        "accounts": {
            "admin": {
                "address": "0x" + "22" * 20,
                "role": "registry administrator",
                "identity_file": "accounts/admin.json",
            }
        },
        "coordinator": {
            "address": "127.0.0.1:7100",
            "config": str(state / "coordinator.toml"),
            "log": str(state / "logs" / "coordinator.log"),
            "pid": 0,
            "metrics_url": "http://127.0.0.1:9200/metrics",
        },
    }


def _write(state: Path, data: object) -> Path:
    state.mkdir(exist_ok=True)
    path = state / CLUSTER_FILE
    path.write_text(json.dumps(data))
    return path


def test_a_cluster_file_as_up_writes_it_opens(tmp_path: Path) -> None:
    data = _state(tmp_path)
    _write(tmp_path, data)
    cluster = LocalCluster.open(tmp_path)
    assert cluster.data == data
    assert cluster.nodes[1] == NodeEntry(**data["nodes"][1])
    assert cluster.threshold == 2
    assert (cluster.rpc_url, cluster.registry_address) == (
        "http://127.0.0.1:8545",
        "0x" + "11" * 20,
    )
    assert cluster.coordinator_address == "127.0.0.1:7100"
    assert cluster.transport.ca_cert == tmp_path / "tls" / "ca.crt"


def test_a_cluster_that_stopped_part_way_opens_and_says_what_it_lacks(tmp_path: Path) -> None:
    """``up`` writes the first fields at once and each section as it is made; a cluster
    that stopped before its chain was up still opens (``down``, ``up --reset``)."""
    data = _state(tmp_path)
    for section in ("tls", "chain", "accounts", "coordinator"):
        del data[section]
    data["nodes"] = []
    _write(tmp_path, data)
    cluster = LocalCluster.open(tmp_path)
    assert cluster.running() == [] and cluster.nodes == []
    with pytest.raises(PreconditionFailed, match="records no chain rpc_url: .* --reset"):
        _ = cluster.rpc_url
    with pytest.raises(PreconditionFailed, match="records no coordinator address"):
        _ = cluster.coordinator_address


def test_a_chain_without_its_registry_yet_opens_and_says_what_it_lacks(tmp_path: Path) -> None:
    data = _state(tmp_path)
    for name in ("registry_address", "chain_id", "registry_start_block"):
        del data["chain"][name]
    _write(tmp_path, data)
    with pytest.raises(PreconditionFailed, match="records no chain registry_address"):
        LocalCluster.open(tmp_path).registry()


Change = Callable[[dict[str, Any]], None]


def _parent(data: Any, path: str) -> tuple[Any, str]:
    """The object or list holding ``path`` (names and list indices, dotted), and its key."""
    *parents, last = path.split(".")
    for name in parents:
        data = data[int(name)] if isinstance(data, list) else data[name]
    return data, last


def _without(path: str) -> Change:
    def change(data: dict[str, Any]) -> None:
        parent, last = _parent(data, path)
        del parent[last]

    return change


def _set(path: str, value: object) -> Change:
    def change(data: dict[str, Any]) -> None:
        parent, last = _parent(data, path)
        parent[int(last) if isinstance(parent, list) else last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_without("nodes"), "nodes is missing (a list)"),
        (_without("version"), "version is missing (1)"),
        (_set("version", 2), "version must be 1, not a number"),
        (_set("threshold", 0), "threshold must be a whole number, 1 or more, not a number"),
        (_set("threshold", "2"), "threshold must be a whole number, 1 or more, not a string"),
        (_set("threshold", 4), "threshold must be at most the number of nodes (3), not 4"),
        (_set("processes_per_node", True), "processes_per_node must be a whole number, 1 or"),
        (_set("node_settings", []), "node_settings must be an object, not a list"),
        (_set("nodes", {}), "nodes must be a list, not an object"),
        (_set("nodes.1", "node-2"), "nodes[1] must be an object, not a string"),
        (_without("nodes.0.address"), "nodes[0].address is missing (a string)"),
        (_set("nodes.2.pid", "12"), "nodes[2].pid must be a whole number, 0 or more, not a str"),
        (_set("nodes.2.pid", -1), "nodes[2].pid must be a whole number, 0 or more, not a num"),
        (_set("nodes.0.extra", 1), "nodes[0].extra is not a field of this entry (node_id, "),
        (_set("chain", "x"), "chain must be an object, not a string"),
        (_set("chain", None), "chain must be an object, not null"),
        (_without("chain.rpc_url"), "chain.rpc_url is missing (a string)"),
        (_set("chain.block_time_s", "1"), "chain.block_time_s must be a whole number, 0 or m"),
        (_without("chain.chain_id"), "chain.chain_id is missing (a whole number, 0 or more)"),
        (_set("tls", []), "tls must be an object, not a list"),
        (_without("tls.operator_key"), "tls.operator_key is missing (a string)"),
        (_set("tls.ca_cert", 5), "tls.ca_cert must be a string, not a number"),
        (_set("accounts", "x"), "accounts must be an object, not a string"),
        (_set("accounts.admin", []), "accounts.admin must be an object, not a list"),
        (_without("accounts.admin.address"), "accounts.admin.address is missing (a string)"),
        (_set("coordinator", 1), "coordinator must be an object, not a number"),
        (_set("coordinator.address", 7), "coordinator.address must be a string, not a number"),
        (_set("coordinator_settings", "x"), "coordinator_settings must be an object, not a str"),
    ],
)
def test_a_malformed_cluster_file_is_refused_naming_the_field(
    tmp_path: Path, change: Change, message: str
) -> None:
    data = _state(tmp_path)
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(InvalidRequest) as refused:
        LocalCluster.open(tmp_path)
    assert str(refused.value).startswith(f"cluster state file {path}: {message}")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "version is missing"),
        ("[]", "is not a JSON object"),
        ("{", "is not JSON"),
        ('{"a":' * (CLUSTER_FILE_DEPTH + 1) + "1" + "}" * (CLUSTER_FILE_DEPTH + 1), "nests deeper"),
        (" " * MAX_CLUSTER_FILE_BYTES + "{}", f"is larger than {MAX_CLUSTER_FILE_BYTES} bytes"),
    ],
)
def test_a_cluster_file_that_is_no_state_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / CLUSTER_FILE
    path.write_text(text)
    with pytest.raises(InvalidRequest, match="cluster state file") as refused:
        LocalCluster.open(tmp_path)
    assert str(path) in str(refused.value) and message in str(refused.value)


def test_a_cluster_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / CLUSTER_FILE)
    with pytest.raises(InvalidRequest, match="is not a regular file"):
        LocalCluster.open(tmp_path)


def test_no_cluster_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(PreconditionFailed, match="no cluster in .*; run `kmsctl cluster up`"):
        LocalCluster.open(tmp_path)


@pytest.mark.parametrize(
    "command",
    [
        ["cluster", "status"],
        ["cluster", "down"],
        ["audit", "verify"],
        ["patient", "register"],
    ],
)
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "version is missing (1)"),
        ({**_state(Path("/s")), "chain": "x"}, "chain must be an object, not a string"),
        ({**_state(Path("/s")), "nodes": [{}]}, "nodes[0].node_id is missing (a string)"),
    ],
)
def test_kmsctl_reports_a_malformed_cluster_file_in_one_line(
    tmp_path: Path,
    command: list[str],
    data: dict[str, Any],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not a KeyError or AttributeError traceback."""
    path = _write(tmp_path, copy.deepcopy(data))
    assert kmsctl.main([*command, "--state-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"kmsctl: cluster state file {path}: {message}\n"
