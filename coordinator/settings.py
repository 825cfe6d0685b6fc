"""The coordinator's configuration: one typed object, read once from TOML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.endpoints import parse_host_port
from core.errors import ConfigurationError, InvalidRequest
from core.node_identity import check_node_id
from core.request_auth import MAX_REQUEST_WINDOW_S
from core.settings_table import (
    SettingsTable,
    check_float_settings,
    check_log_level,
    checked,
    field_names,
    read_settings_file,
    reject_unknown_keys,
)
from proto import rpc
from proto.transport import Transport, require_tls_settings


@dataclass(frozen=True)
class NodeAddress:
    node_id: str
    address: str


@dataclass(frozen=True)
class CoordinatorSettings:
    listen: str
    threshold: int
    nodes: tuple[NodeAddress, ...]
    chain_rpc_url: str
    registry_address: str
    #: how long to wait for any one node
    node_timeout_s: float = 3.0
    #: verify every capsule fragment before relaying it; by default only those of
    #: nodes suspected of lying are, and the app reports bad ones (ADR 14)
    verify_every_fragment: bool = False
    #: how long a patient's registered keys are cached
    patient_cache_s: float = 60.0
    #: connections kept to each node; a node running several processes shares its
    #: port between them per connection, so this should match its process count
    connections_per_node: int = 1
    #: send the reads that meet at a node connection while a call is in flight as one
    #: ReencryptMany call when it returns (ADR 16); a lone read always goes at once
    coalesce_node_calls: bool = True
    #: how far ahead a signed request's deadline may lie (as at the nodes; 1 s to
    #: core.request_auth.MAX_REQUEST_WINDOW_S)
    request_window_s: int = 300
    #: each requester's budget, in single requests (a batch of n capsules costs
    #: 1 + (n - 1) / 4); a refused request costs 10. Half a node's default budget
    #: (``rate_limit_per_s`` 100, burst 200): the coordinator is where a requester is
    #: held to its budget, a node's limit is the backstop against a coordinator that
    #: does not, and a requester admitted here must not meet it (the coordinator's
    #: hedges, retries and its clock's jitter against the node's all spend at the node;
    #: with equal budgets, two readers at the limit were refused by a node during a
    #: partition, when no other node could answer instead). An app reading more
    #: should send batches.
    requester_rate_per_s: float = 50.0
    requester_burst: int = 100
    #: refusals per second (and burst) one peer address gets for requesters not served
    #: lately: throw-away keys from one host are held to this
    peer_refusals_per_s: float = 5.0
    peer_refusal_burst: int = 20
    #: how long a served requester is exempt from its address's refusal budget
    served_memory_s: float = 900.0
    #: Prometheus /metrics listen address, HOST:PORT, or "" for none
    metrics_listen: str = ""
    log_level: str = "info"
    #: TLS for apps (server authentication): the CA and the coordinator's own
    #: server certificate and key
    tls_ca_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: mutual TLS to the nodes: the coordinator's client certificate and key,
    #: from the CA the nodes trust (tls_ca_cert, which also checks the nodes)
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    #: plaintext both ways (development only; the nodes must be in that mode too)
    dev_plaintext: bool = False

    @classmethod
    def from_toml(cls, path: Path) -> CoordinatorSettings:
        raw = read_settings_file(path, what="coordinator config")
        where = f"coordinator config {path}"
        reject_unknown_keys(raw, field_names(cls), where=where)
        table = SettingsTable(raw, cls, where=where, base=path.parent)
        try:
            settings = cls(
                listen=table.get("listen", str),
                threshold=table.get("threshold", int),
                nodes=_node_addresses(table),
                chain_rpc_url=table.get("chain_rpc_url", str),
                registry_address=table.get("registry_address", str),
                node_timeout_s=table.get("node_timeout_s", float),
                verify_every_fragment=table.get("verify_every_fragment", bool),
                patient_cache_s=table.get("patient_cache_s", float),
                connections_per_node=table.get("connections_per_node", int),
                coalesce_node_calls=table.get("coalesce_node_calls", bool),
                request_window_s=table.get("request_window_s", int),
                requester_rate_per_s=table.get("requester_rate_per_s", float),
                requester_burst=table.get("requester_burst", int),
                peer_refusals_per_s=table.get("peer_refusals_per_s", float),
                peer_refusal_burst=table.get("peer_refusal_burst", int),
                served_memory_s=table.get("served_memory_s", float),
                metrics_listen=table.get("metrics_listen", str),
                log_level=table.get("log_level", str),
                tls_ca_cert=table.optional_path("tls_ca_cert"),
                tls_cert=table.optional_path("tls_cert"),
                tls_key=table.optional_path("tls_key"),
                tls_client_cert=table.optional_path("tls_client_cert"),
                tls_client_key=table.optional_path("tls_client_key"),
                dev_plaintext=table.get("dev_plaintext", bool),
            )
        except KeyError as e:
            raise ConfigurationError(
                f"coordinator config {path} is missing {e.args[0]!r}"
            ) from None
        settings.validate()
        return settings

    def validate(self) -> None:
        parse_host_port(self.listen, "listen")
        check_log_level(self.log_level)
        # NaN and infinity first: NaN fails no "<= 0" test
        check_float_settings(self)
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "metrics_listen")
        if not self.nodes:
            raise ConfigurationError("at least one node is required")
        ids = [n.node_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ConfigurationError("node ids must be unique")
        for node in self.nodes:
            try:
                check_node_id(node.node_id)
            except InvalidRequest as e:
                raise ConfigurationError(f"[[nodes]]: {e.message}") from None
            parse_host_port(node.address, f"address of {node.node_id}")
        if not 1 <= self.threshold <= len(self.nodes):
            raise ConfigurationError(f"threshold must be between 1 and {len(self.nodes)}")
        if self.threshold > rpc.MAX_THRESHOLD:
            raise ConfigurationError(
                f"threshold must be at most {rpc.MAX_THRESHOLD}: a coordinator's answers are "
                "sized by it, and apps accept answers of that threshold at most"
            )
        if not 1 <= self.connections_per_node <= 64:
            raise ConfigurationError("connections_per_node must be between 1 and 64")
        if not self.node_timeout_s > 0:
            raise ConfigurationError("node_timeout_s must be positive")
        if self.patient_cache_s < 0:
            raise ConfigurationError("patient_cache_s must be >= 0")
        if not 1 <= self.request_window_s <= MAX_REQUEST_WINDOW_S:
            raise ConfigurationError(
                f"request_window_s must be between 1 and {MAX_REQUEST_WINDOW_S} seconds"
            )
        if self.served_memory_s < 0:
            raise ConfigurationError("served_memory_s must be >= 0")
        if not (self.requester_rate_per_s > 0 and self.peer_refusals_per_s > 0):
            raise ConfigurationError(
                "requester_rate_per_s and peer_refusals_per_s must be positive"
            )
        if self.requester_burst < 1 or self.peer_refusal_burst < 1:
            raise ConfigurationError("requester_burst and peer_refusal_burst must be at least 1")
        for flag in ("dev_plaintext", "verify_every_fragment", "coalesce_node_calls"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"{flag} must be true or false")
        require_tls_settings("coordinator config", self._tls_files(), self.dev_plaintext)

    def _tls_files(self) -> dict[str, Path | None]:
        return {
            "tls_ca_cert": self.tls_ca_cert,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_client_cert": self.tls_client_cert,
            "tls_client_key": self.tls_client_key,
        }

    def server_transport(self) -> Transport:
        """Apps' side: the coordinator's server certificate."""
        return self._transport(self.tls_cert, self.tls_key)

    def node_transport(self) -> Transport:
        """Nodes' side: the coordinator's client certificate (mutual TLS)."""
        return self._transport(self.tls_client_cert, self.tls_client_key)

    def _transport(self, cert: Path | None, key: Path | None) -> Transport:
        if self.dev_plaintext:
            return Transport.plaintext()
        if self.tls_ca_cert is None or cert is None or key is None:
            raise ConfigurationError(
                "coordinator TLS settings are incomplete"
            )  # validate() says which
        return Transport.tls(self.tls_ca_cert, cert, key)


def _node_addresses(table: SettingsTable) -> tuple[NodeAddress, ...]:
    """The ``[[nodes]]`` array of tables, each checked like the top-level table."""
    nodes = table.get("nodes", list)
    addresses = []
    for i, node in enumerate(nodes, start=1):
        at = f"[[nodes]] {i}"
        entry: dict[str, Any] = checked(node, dict, name=at, where=table.where)
        where = f"{table.where} {at}"
        reject_unknown_keys(entry, field_names(NodeAddress), where=where)
        fields = SettingsTable(entry, NodeAddress, where=where, base=table.base)
        addresses.append(NodeAddress(fields.get("node_id", str), fields.get("address", str)))
    return tuple(addresses)
