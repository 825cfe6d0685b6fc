"""The local cluster: everything real, on one machine, on loopback.

``LocalCluster.up`` starts anvil, deploys the registry, creates demo accounts,
creates one SoftHSM2 token per node (through ``kms-node init``), registers the
nodes on-chain, starts them and the coordinator, and writes ``cluster.json``.
``kmsctl cluster up/down`` and the test suite both drive this class.

State directory layout::

    cluster.json            addresses, pids, account addresses (no secrets); its shape is
                            checked when it is opened (``_check_state``)
    accounts/NAME.json      demo identities (mode 0600)
    blobs/                  the content-addressed blob store
    logs/*.log              one JSON log per process
    nodes/node-N/           node.toml, softhsm2.conf, tokens/, kfrags.sqlite: the node's
                            data directory, which holds no PIN
    secrets/node-N/         the node's user.pin and so.pin (directory 0700, files 0600),
                            apart from its data and token directories
    coordinator.toml
    tls/                    the cluster's CA and every certificate and key (see deploy/certs.py)

Every gRPC hop is TLS: coordinator to nodes with mutual TLS, apps to the
coordinator with server authentication. ``cluster.json`` names the CA and the
operator's client certificate, so tools build a ``Transport`` from it
(:attr:`LocalCluster.transport`). ``up(dev_plaintext=True)`` runs everything in
plaintext instead, as a development mode.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final, NoReturn

import grpc

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.identity import Identity
from contracts.registry import RegistryClient
from core import bounded_json
from core.errors import InvalidRequest, KmsError, PreconditionFailed, Unavailable
from core.local_files import read_regular_file
from core.node_identity import NodeIdentity, parse_node_identity
from deploy import processes
from deploy.anvil import AnvilProcess, set_balance
from deploy.certs import ClusterCa
from kms_node import supervisor
from kms_node.settings import DEFAULT_SOFTHSM_MODULE
from proto.transport import Transport

CLUSTER_FILE = "cluster.json"
#: the ``version`` field of cluster.json: the shape :func:`_check_state` accepts
STATE_VERSION = 1
#: cluster.json names a chain, a coordinator and each node (a few hundred bytes each)
MAX_CLUSTER_FILE_BYTES = 1024 * 1024
#: {"nodes": [{...}], "node_settings": {...}}: objects in lists in objects
CLUSTER_FILE_DEPTH = 4
HOST = "127.0.0.1"
DEMO_ACCOUNTS = {
    "admin": "registry administrator",
    "patient": "Alice, a patient",
    "doctor": "Dr. Bob, a provider",
    "responder": "the emergency department, holder of the emergency role",
}
FUNDING_WEI = 100 * 10**18


@dataclass(frozen=True)
class NodeEntry:
    node_id: str
    address: str
    metrics_url: str
    config: str
    log: str
    pid: int


@dataclass(frozen=True)
class ServiceEntry:
    address: str
    config: str
    log: str
    pid: int
    metrics_url: str


# -- the shape of cluster.json ----------------------------------------------------------
#
# Only this module writes the file, and every `kmsctl` command on the cluster reads it: it is
# checked once, in LocalCluster.open, against what `up` writes, so that a command meets a
# named field, never a KeyError. `up` writes the file as the cluster comes up: the first
# fields at once, each section (tls, chain, accounts, nodes, coordinator) as it is made, so
# a cluster that stopped part way lacks some sections (its accessors say so).


@dataclass(frozen=True)
class _Kind:
    """What a field must hold: ``accepts`` checks it, ``expected`` says it in an error."""

    expected: str
    accepts: Callable[[Any], bool]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_STRING: Final = _Kind("a string", lambda v: isinstance(v, str))
_COUNT: Final = _Kind("a whole number, 0 or more", lambda v: _is_int(v) and v >= 0)
_POSITIVE: Final = _Kind("a whole number, 1 or more", lambda v: _is_int(v) and v >= 1)
_COUNT_OR_NULL: Final = _Kind(
    "a whole number, 0 or more, or null", lambda v: v is None or (_is_int(v) and v >= 0)
)
_OBJECT: Final = _Kind("an object", lambda v: isinstance(v, dict))
_LIST: Final = _Kind("a list", lambda v: isinstance(v, list))
_VERSION: Final = _Kind(str(STATE_VERSION), lambda v: _is_int(v) and v == STATE_VERSION)

#: what `up` writes first, so every cluster.json holds
_STATE_FIELDS: Final = {
    "version": _VERSION,
    "threshold": _POSITIVE,
    "processes_per_node": _POSITIVE,
    "node_settings": _OBJECT,
    "nodes": _LIST,
}
#: the sections, each written once its part is made
_SECTIONS: Final = ("coordinator_settings", "tls", "chain", "accounts", "coordinator")
_TLS_FIELDS: Final = {"ca_cert": _STRING, "operator_cert": _STRING, "operator_key": _STRING}
_CHAIN_FIELDS: Final = {
    "rpc_url": _STRING,
    "port": _COUNT,
    "pid": _COUNT,
    "block_time_s": _COUNT_OR_NULL,
}
#: added to "chain", all together, once the registry is deployed
_REGISTRY_FIELDS: Final = {
    "registry_address": _STRING,
    "chain_id": _COUNT,
    "registry_start_block": _COUNT,
}
_ACCOUNT_FIELDS: Final = {"address": _STRING, "role": _STRING, "identity_file": _STRING}


def _entry_fields(entry: type[NodeEntry] | type[ServiceEntry]) -> dict[str, _Kind]:
    """An entry's fields, from its dataclass (annotations are strings here)."""
    kinds = {"str": _STRING, "int": _COUNT}
    return {f.name: kinds[str(f.type)] for f in fields(entry)}


_NODE_FIELDS: Final = _entry_fields(NodeEntry)
_COORDINATOR_FIELDS: Final = _entry_fields(ServiceEntry)


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else "a number"


def _check_state(path: Path, data: dict[str, Any]) -> None:
    """Refuse, with :class:`InvalidRequest` naming the file and the field, a cluster.json
    that is not as :meth:`LocalCluster.up` writes it."""

    def refuse(field: str, kind: _Kind, value: object) -> NoReturn:
        raise InvalidRequest(
            f"cluster state file {path}: {field} must be {kind.expected}, not {_json_kind(value)}"
        )

    def check(obj: dict[str, Any], where: str, kinds: dict[str, _Kind], *, only: bool) -> None:
        for name, kind in kinds.items():
            if name not in obj:
                raise InvalidRequest(
                    f"cluster state file {path}: {where}{name} is missing ({kind.expected})"
                )
            if not kind.accepts(obj[name]):
                refuse(where + name, kind, obj[name])
        unknown = sorted(set(obj) - set(kinds)) if only else []
        if unknown:
            raise InvalidRequest(
                f"cluster state file {path}: {where}{unknown[0]} is not a field of this "
                f"entry ({', '.join(kinds)})"
            )

    def entry(value: object, where: str, kinds: dict[str, _Kind], *, only: bool) -> None:
        if not isinstance(value, dict):
            refuse(where, _OBJECT, value)
        check(value, f"{where}.", kinds, only=only)

    check(data, "", _STATE_FIELDS, only=False)
    for name in _SECTIONS:
        if name in data and not isinstance(data[name], dict):
            refuse(name, _OBJECT, data[name])
    for i, node in enumerate(data["nodes"]):
        # The dataclass's fields and no others: NodeEntry(**node) takes nothing else.
        entry(node, f"nodes[{i}]", _NODE_FIELDS, only=True)
    if data["nodes"] and data["threshold"] > len(data["nodes"]):
        raise InvalidRequest(
            f"cluster state file {path}: threshold must be at most the number of nodes "
            f"({len(data['nodes'])}), not {data['threshold']}"
        )
    if "tls" in data:
        check(data["tls"], "tls.", _TLS_FIELDS, only=False)
    if "chain" in data:
        check(data["chain"], "chain.", _CHAIN_FIELDS, only=False)
        if any(name in data["chain"] for name in _REGISTRY_FIELDS):
            check(data["chain"], "chain.", _REGISTRY_FIELDS, only=False)
    for name, account in data.get("accounts", {}).items():
        entry(account, f"accounts.{name}", _ACCOUNT_FIELDS, only=False)
    if "coordinator" in data:
        check(data["coordinator"], "coordinator.", _COORDINATOR_FIELDS, only=True)


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _write_toml(
    path: Path, values: dict[str, object], tables: dict[str, list[dict[str, object]]] | None = None
) -> None:
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    for name, rows in (tables or {}).items():
        for row in rows:
            lines += ["", f"[[{name}]]"] + [f"{k} = {_toml_value(v)}" for k, v in row.items()]
    path.write_text("\n".join(lines) + "\n")


class LocalCluster:
    def __init__(self, state_dir: Path, data: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.data = data
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- reading the state -------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path) -> LocalCluster:
        """The cluster recorded in ``state_dir``; :class:`InvalidRequest` naming the field if
        its cluster.json is not as :meth:`up` writes it (``OSError`` is the caller's)."""
        path = state_dir / CLUSTER_FILE
        try:
            raw = read_regular_file(
                path, max_bytes=MAX_CLUSTER_FILE_BYTES, what="cluster state file"
            )
        except FileNotFoundError:
            raise PreconditionFailed(
                f"no cluster in {state_dir}; run `kmsctl cluster up`"
            ) from None
        data = bounded_json.loads_object(
            raw,
            max_bytes=MAX_CLUSTER_FILE_BYTES,
            max_depth=CLUSTER_FILE_DEPTH,
            what=f"cluster state file {path}",
        )
        _check_state(path, data)
        return cls(state_dir, data)

    def _recorded(self, section: str, field: str) -> Any:
        """``field`` of a section :meth:`up` writes as the cluster comes up (its shape was
        checked in :meth:`open`)."""
        entry = self.data.get(section)
        if entry is None or field not in entry:
            raise PreconditionFailed(
                f"the cluster in {self.state_dir} records no {section} {field}: it stopped "
                "before it was up; run `kmsctl cluster up --reset`"
            )
        return entry[field]

    @property
    def rpc_url(self) -> str:
        return str(self._recorded("chain", "rpc_url"))

    @property
    def registry_address(self) -> str:
        return str(self._recorded("chain", "registry_address"))

    @property
    def coordinator_address(self) -> str:
        return str(self._recorded("coordinator", "address"))

    @property
    def coordinator_metrics_url(self) -> str:
        return str(self._recorded("coordinator", "metrics_url"))

    @property
    def threshold(self) -> int:
        return int(self.data["threshold"])

    @property
    def nodes(self) -> list[NodeEntry]:
        return [NodeEntry(**n) for n in self.data["nodes"]]

    def node(self, node_id: str) -> NodeEntry:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KmsError(f"no node {node_id!r} in this cluster")

    def registry(self) -> RegistryClient:
        return RegistryClient(self.rpc_url, self.registry_address)

    def identity(self, name: str) -> Identity:
        return Identity.load(self.state_dir / "accounts" / f"{name}.json")

    def blob_store(self) -> LocalBlobStore:
        return LocalBlobStore(self.state_dir / "blobs")

    @property
    def transport(self) -> Transport:
        """The operator's identity (mutual TLS), for tools and tests that call the
        nodes directly; it reaches the coordinator too."""
        tls = self.data.get("tls")
        if tls is None:
            return Transport.plaintext()
        return Transport.tls(
            Path(tls["ca_cert"]), Path(tls["operator_cert"]), Path(tls["operator_key"])
        )

    @property
    def app_transport(self) -> Transport:
        """How an app reaches the coordinator: TLS checked against the cluster's CA,
        no client certificate (apps sign their requests instead)."""
        tls = self.data.get("tls")
        return Transport.plaintext() if tls is None else Transport.tls(Path(tls["ca_cert"]))

    def coordinator_channel(self) -> grpc.Channel:
        """A new channel to the coordinator, as an app connects (caller closes it)."""
        return self.app_transport.channel(self.coordinator_address)

    def _save(self) -> None:
        path = self.state_dir / CLUSTER_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, path)

    def running(self) -> list[str]:
        """Names of the recorded processes that are still alive."""
        alive = []
        chain = self.data.get("chain", {})
        if chain.get("pid") and processes.pid_runs(chain["pid"], f"--port {chain['port']}"):
            alive.append("anvil")
        coordinator = self.data.get("coordinator")
        if (
            coordinator
            and coordinator.get("pid")
            and processes.pid_runs(coordinator["pid"], coordinator["config"])
        ):
            alive.append("coordinator")
        for node in self.nodes:
            if node.pid and processes.pid_runs(node.pid, node.config):
                alive.append(node.node_id)
        return alive

    # -- bringing it up ----------------------------------------------------

    @classmethod
    def up(
        cls,
        state_dir: Path,
        *,
        nodes: int = 5,
        threshold: int = 3,
        processes: int = 1,
        node_settings: dict[str, object] | None = None,
        coordinator_settings: dict[str, object] | None = None,
        reset: bool = False,
        dev_plaintext: bool = False,
        block_time_s: int | None = None,
        prune_history: int | None = None,
    ) -> LocalCluster:
        """Start a cluster; ``node_settings`` and ``coordinator_settings`` are extra
        node.toml and coordinator.toml keys (e.g. a benchmark lifting rate limits).
        ``dev_plaintext`` turns TLS off everywhere (development mode; the services log a
        warning). ``block_time_s`` makes anvil mine a block every that many seconds instead
        of one per transaction at once; ``prune_history`` keeps only that many recent states, as a
        chain node that is not an archive node."""
        if not 1 <= threshold <= nodes:
            raise PreconditionFailed("threshold must be between 1 and the number of nodes")
        state_dir = state_dir.resolve()
        if (state_dir / CLUSTER_FILE).exists():
            previous = cls.open(state_dir)
            alive = previous.running()
            if alive:
                raise PreconditionFailed(
                    f"a cluster is running in {state_dir} ({', '.join(alive)}); "
                    "run `kmsctl cluster down` first"
                )
            if not reset:
                raise PreconditionFailed(
                    f"{state_dir} holds a stopped cluster; pass --reset to start afresh"
                )
        if reset and state_dir.exists():
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cluster = cls(
            state_dir,
            {
                "version": STATE_VERSION,
                "threshold": threshold,
                "processes_per_node": processes,
                "node_settings": dict(node_settings or {}),
                "coordinator_settings": dict(coordinator_settings or {}),
                "nodes": [],
            },
        )
        try:
            if not dev_plaintext:
                cluster._issue_certificates()
            cluster._start_chain(block_time_s, prune_history)
            cluster._create_accounts()
            cluster._init_nodes(nodes)
            for node in cluster.nodes:
                cluster.start_node(node.node_id)
            cluster._start_coordinator()
        except BaseException:
            cluster.down()
            raise
        return cluster

    def _issue_certificates(self) -> None:
        """The cluster's CA and the operator's client certificate; the services'
        certificates are issued as their configs are written."""
        ca = ClusterCa.ensure(self.state_dir / "tls")
        operator = ca.client_cert("operator")
        self.data["tls"] = {
            "ca_cert": str(ca.ca_cert),
            "operator_cert": str(operator.cert),
            "operator_key": str(operator.key),
        }
        self._save()

    def _tls_settings(self, name: str, *, client: bool = False) -> dict[str, object]:
        """TOML keys for a service's TLS: its server certificate (named ``name``)
        and, with ``client``, a client certificate for calling the nodes."""
        if "tls" not in self.data:
            return {"dev_plaintext": True}
        ca = ClusterCa.ensure(self.state_dir / "tls")
        server = ca.server_cert(name)
        settings: dict[str, object] = {
            "tls_ca_cert": str(ca.ca_cert),
            "tls_cert": str(server.cert),
            "tls_key": str(server.key),
        }
        if client:
            identity = ca.client_cert(name)
            settings.update(tls_client_cert=str(identity.cert), tls_client_key=str(identity.key))
        return settings

    def _start_chain(self, block_time_s: int | None, prune_history: int | None) -> None:
        anvil = AnvilProcess(
            log_path=self.state_dir / "logs" / "anvil.log",
            block_time_s=block_time_s,
            prune_history=prune_history,
        ).start()
        self.data["chain"] = {
            "rpc_url": anvil.rpc_url,
            "port": anvil.port,
            "pid": anvil.pid,
            "block_time_s": block_time_s,
        }
        self._save()

    def _create_accounts(self) -> None:
        accounts_dir = self.state_dir / "accounts"
        accounts_dir.mkdir(mode=0o700, exist_ok=True)
        accounts = {}
        for name, role in DEMO_ACCOUNTS.items():
            identity = Identity.generate(name)
            identity.save(accounts_dir / f"{name}.json")
            set_balance(self.rpc_url, identity.address, FUNDING_WEI)
            accounts[name] = {
                "address": identity.address,
                "role": role,
                "identity_file": f"accounts/{name}.json",
            }
        admin = self.identity("admin")
        registry = RegistryClient.deploy(self.rpc_url, admin.account)
        deployed_at, _ = registry.latest_block()
        registry.grant_provider_role(admin.account, accounts["doctor"]["address"])
        registry.grant_emergency_role(admin.account, accounts["responder"]["address"])
        self.data["accounts"] = accounts
        self.data["chain"].update(
            registry_address=registry.address,
            chain_id=registry.chain_id(),
            registry_start_block=deployed_at,
        )
        self._save()

    def _init_nodes(self, count: int) -> None:
        entries = []
        for i in range(1, count + 1):
            node_id = f"node-{i}"
            node_dir = self.state_dir / "nodes" / node_id
            node_dir.mkdir(parents=True, mode=0o700)
            # PINs never live beside the token or data: a copy of node_dir must open nothing.
            pin_dir = self.node_secrets_dir(node_id)
            pin_dir.parent.mkdir(mode=0o700, exist_ok=True)
            pin_dir.mkdir(mode=0o700)
            _write_secret(pin_dir / "user.pin", secrets.token_hex(16))
            _write_secret(pin_dir / "so.pin", secrets.token_hex(16))
            port, metrics_port = processes.free_port(), processes.free_port()
            config = node_dir / "node.toml"
            _write_toml(
                config,
                {
                    "node_id": node_id,
                    "listen": f"{HOST}:{port}",
                    "metrics_listen": f"{HOST}:{metrics_port}",
                    "chain_rpc_url": self.rpc_url,
                    "registry_address": self.registry_address,
                    "registry_start_block": self.data["chain"]["registry_start_block"],
                    "data_dir": ".",
                    "hsm_module": DEFAULT_SOFTHSM_MODULE,
                    "hsm_token_label": f"medkms-{node_id}",
                    "hsm_pin_file": str(pin_dir / "user.pin"),
                    "hsm_so_pin_file": str(pin_dir / "so.pin"),
                    "softhsm_conf": "softhsm2.conf",
                    "softhsm_token_dir": "tokens",
                    "processes": self.data["processes_per_node"],
                    **self._tls_settings(node_id),
                    # Anchor demo traffic within seconds (production: 1000 entries / 60 s).
                    "anchor_every_entries": 50,
                    "anchor_interval_s": 2.0,
                    **self.data["node_settings"],
                },
            )
            entries.append(
                NodeEntry(
                    node_id=node_id,
                    address=f"{HOST}:{port}",
                    metrics_url=f"http://{HOST}:{metrics_port}/metrics",
                    config=str(config),
                    log=str(self.state_dir / "logs" / f"{node_id}.log"),
                    pid=0,
                )
            )
        # Each init is its own process: SoftHSM reads its configuration once per process.
        with ThreadPoolExecutor(max_workers=min(count, 4)) as pool:
            identities = list(pool.map(lambda e: _run_init(Path(e.config)), entries))
        admin = self.identity("admin")
        registry = self.registry()
        for entry, public in zip(entries, identities, strict=True):
            registry.register_node(
                admin.account,
                node_id=entry.node_id,
                endpoint=entry.address,
                signing_public_key=public.signing_public_key,
                delivery_public_key=public.delivery_public_key,
                account=public.account,
            )
            # The node pays for its own checkpoint anchors.
            set_balance(self.rpc_url, public.account, FUNDING_WEI)
        self.data["nodes"] = [asdict(e) for e in entries]
        self._save()

    def node_secrets_dir(self, node_id: str) -> Path:
        """Where a node's PIN files live: outside its data and token directories."""
        return self.state_dir / "secrets" / node_id

    def start_node(self, node_id: str) -> None:
        """Start (or restart) one node and wait until it serves."""
        node = self.node(node_id)
        if node.pid and processes.pid_runs(node.pid, node.config):
            raise PreconditionFailed(f"{node_id} is already running")
        log = Path(node.log)
        process = processes.spawn(
            [sys.executable, "-m", "cli.node", "serve", "--config", node.config], log
        )
        self._children[node_id] = process
        self._set_node_pid(node_id, process.pid)
        processes.wait_until(
            node_id,
            lambda: processes.grpc_serving(node.address, self.transport, server_name=node_id),
            process,
            log,
        )

    def stop_node(self, node_id: str, *, kill: bool = False) -> None:
        """Stop one node (SIGTERM, or SIGKILL with ``kill``)."""
        node = self.node(node_id)
        process = self._children.pop(node_id, None)
        if process is not None and kill:
            process.kill()
            process.wait()
        elif process is not None:
            process.terminate()
            # The supervisor stops its workers in two rounds of up to STOP_TIMEOUT_S each.
            process.wait(2 * supervisor.STOP_TIMEOUT_S + 5)
        elif node.pid:
            processes.stop_pid(node.pid, node.config, timeout_s=0 if kill else 5)
        self._set_node_pid(node_id, 0)

    def _set_node_pid(self, node_id: str, pid: int) -> None:
        for node in self.data["nodes"]:
            if node["node_id"] == node_id:
                node["pid"] = pid
        self._save()

    def _start_coordinator(self) -> None:
        """Write the coordinator's config (its ports chosen once) and start it."""
        port, metrics_port = processes.free_port(), processes.free_port()
        config = self.state_dir / "coordinator.toml"
        _write_toml(
            config,
            {
                "listen": f"{HOST}:{port}",
                "metrics_listen": f"{HOST}:{metrics_port}",
                "threshold": self.threshold,
                "chain_rpc_url": self.rpc_url,
                "registry_address": self.registry_address,
                "node_timeout_s": 3.0,
                "connections_per_node": self.data["processes_per_node"],
                **self._tls_settings("coordinator", client=True),
                **self.data.get("coordinator_settings", {}),
            },
            {"nodes": [{"node_id": n.node_id, "address": n.address} for n in self.nodes]},
        )
        log = self.state_dir / "logs" / "coordinator.log"
        metrics_url = f"http://{HOST}:{metrics_port}/metrics"
        entry = ServiceEntry(f"{HOST}:{port}", str(config), str(log), 0, metrics_url)
        self.data["coordinator"] = asdict(entry)
        self.start_coordinator()

    def start_coordinator(self) -> None:
        """Start (or restart) the coordinator on its configured ports and wait until it
        serves."""
        entry = self.data["coordinator"]
        if entry["pid"] and processes.pid_runs(entry["pid"], entry["config"]):
            raise PreconditionFailed("the coordinator is already running")
        log = Path(entry["log"])
        process = processes.spawn(
            [sys.executable, "-m", "cli.coordinator", "serve", "--config", entry["config"]], log
        )
        self._children["coordinator"] = process
        entry["pid"] = process.pid
        self._save()
        address = entry["address"]
        processes.wait_until(
            "coordinator",
            lambda: processes.grpc_serving(address, self.app_transport),
            process,
            log,
        )

    def stop_coordinator(self) -> None:
        """Stop the coordinator (SIGTERM) and wait for it to exit."""
        entry = self.data["coordinator"]
        process = self._children.pop("coordinator", None)
        if process is not None:
            process.terminate()
            # The supervisor stops its workers in two rounds of up to STOP_TIMEOUT_S each.
            process.wait(2 * supervisor.STOP_TIMEOUT_S + 5)
        elif entry["pid"]:
            processes.stop_pid(entry["pid"], entry["config"])
        entry["pid"] = 0
        self._save()

    # -- taking it down ----------------------------------------------------

    def down(self) -> list[str]:
        """Stop every process this cluster started; return the names stopped."""
        stopped = []
        coordinator = self.data.get("coordinator")
        if coordinator and coordinator.get("pid"):
            if processes.stop_pid(coordinator["pid"], coordinator["config"]):
                stopped.append("coordinator")
            coordinator["pid"] = 0
        for node in self.data["nodes"]:
            if node["pid"] and processes.stop_pid(node["pid"], node["config"]):
                stopped.append(node["node_id"])
            node["pid"] = 0
        chain = self.data.get("chain", {})
        if chain.get("pid"):
            if processes.stop_pid(chain["pid"], f"--port {chain['port']}"):
                stopped.append("anvil")
            chain["pid"] = 0
        for process in self._children.values():
            if process.poll() is None:
                process.kill()
            process.wait()
        self._children.clear()
        if self.state_dir.exists():
            self._save()
        return stopped


def _run_init(config: Path) -> NodeIdentity:
    result = subprocess.run(
        [sys.executable, "-m", "cli.node", "init", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise Unavailable(f"kms-node init failed for {config}: {result.stderr.strip()[-2000:]}")
    public = bounded_json.loads_object(
        result.stdout.encode(), max_bytes=64 * 1024, max_depth=1, what="kms-node init's output"
    )
    return parse_node_identity(public)
