"""The coordinator's configuration: one typed object, read once from TOML."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from medkms.core.endpoints import parse_host_port
from medkms.core.errors import InvalidRequest


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
    #: how long a patient's registered keys are cached
    patient_cache_s: float = 60.0
    #: connections kept to each node; a node running several processes shares its
    #: port between them per connection, so this should match its process count
    connections_per_node: int = 1
    log_level: str = "info"

    @classmethod
    def from_toml(cls, path: Path) -> CoordinatorSettings:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequest(f"cannot read coordinator config {path}: {e}") from None
        try:
            settings = cls(
                listen=str(raw["listen"]),
                threshold=int(raw["threshold"]),
                nodes=tuple(
                    NodeAddress(str(n["node_id"]), str(n["address"])) for n in raw["nodes"]
                ),
                chain_rpc_url=str(raw["chain_rpc_url"]),
                registry_address=str(raw["registry_address"]),
                node_timeout_s=float(raw.get("node_timeout_s", 3.0)),
                patient_cache_s=float(raw.get("patient_cache_s", 60.0)),
                connections_per_node=int(raw.get("connections_per_node", 1)),
                log_level=str(raw.get("log_level", "info")),
            )
        except KeyError as e:
            raise InvalidRequest(f"coordinator config {path} is missing {e.args[0]!r}") from None
        settings.validate()
        return settings

    def validate(self) -> None:
        parse_host_port(self.listen, "listen")
        if not self.nodes:
            raise InvalidRequest("at least one node is required")
        ids = [n.node_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("node ids must be unique")
        for node in self.nodes:
            parse_host_port(node.address, f"address of {node.node_id}")
        if not 1 <= self.threshold <= len(self.nodes):
            raise InvalidRequest(f"threshold must be between 1 and {len(self.nodes)}")
        if not 1 <= self.connections_per_node <= 64:
            raise InvalidRequest("connections_per_node must be between 1 and 64")
        if self.node_timeout_s <= 0:
            raise InvalidRequest("node_timeout_s must be positive")
