"""The node's configuration: one typed object, read once at start-up from TOML.

Secrets (the token PINs) are never in the file: it names files that hold them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from medkms.core.endpoints import parse_host_port
from medkms.core.errors import InvalidRequest
from medkms.proto.transport import Transport, require_tls_settings

DEFAULT_SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    #: gRPC listen address, HOST:PORT
    listen: str
    #: Prometheus /metrics listen address, HOST:PORT, or "" for none
    metrics_listen: str
    chain_rpc_url: str
    registry_address: str
    #: directory for the kfrag database
    data_dir: Path
    hsm_module: str
    hsm_token_label: str
    #: file holding the token's user PIN (mode 0600)
    hsm_pin_file: Path
    #: file holding the token's security-officer PIN; only `kms-node init` reads it
    hsm_so_pin_file: Path | None = None
    #: private SoftHSM2 configuration and token directory; None for a hardware token
    softhsm_conf: Path | None = None
    softhsm_token_dir: Path | None = None
    #: first block to read registry events from (the registry's deployment block)
    registry_start_block: int = 0
    #: how often the grant index polls the chain head
    chain_poll_interval_s: float = 0.2
    #: refuse (UNAVAILABLE) when the last successful chain sync is older than this
    chain_max_age_s: float = 2.0
    #: ... or when the index is more blocks than this behind the head seen
    chain_max_lag_blocks: int = 2
    #: how far ahead a signed request's deadline may lie; nonces are kept this long
    request_window_s: int = 300
    #: most nonces remembered at once (a memory bound; beyond it: RESOURCE_EXHAUSTED)
    replay_max_entries: int = 1_000_000
    #: a requester's budget at this node per second, and its burst, in single requests
    #: (a batch of n capsules costs 1 + (n - 1) / 4; a refused capsule 10: core/rate_limit.py).
    #: One node process serves about 450 single requests/s on 2 cores
    #: (benchmarks/README.md): one requester may take a fifth of it. With ``processes`` > 1
    #: each process enforces its share (rate / processes, burst // processes, at least 1),
    #: so a requester gets the limit only when its connections are spread over the
    #: processes, less when they all land on one
    rate_limit_per_s: float = 100.0
    rate_limit_burst: int = 200
    #: gRPC server threads per process. Crypto holds the GIL and PKCS#11 calls are
    #: serialised, so more threads add only contention: measured on 2 cores, 8
    #: threads cost 2.7 ms of node CPU per request, 2 threads 1.7 ms. Two keep one
    #: request moving while another waits on the chain (a refusal being confirmed).
    max_workers: int = 2
    #: server processes sharing the listen port (SO_REUSEPORT); umbral-pre holds the
    #: GIL and PKCS#11 calls are serialised per process, so one per core scales crypto
    processes: int = 1
    #: anchor the audit log's signed checkpoint on-chain (one process per node does), once
    #: this many entries are unanchored or this long after the last attempt, if any are
    anchoring: bool = True
    anchor_every_entries: int = 1000
    anchor_interval_s: float = 60.0
    log_level: str = "info"
    #: mutual TLS: the CA that signs this node's and its clients' certificates, and
    #: the node's own certificate and key. The certificate must name the node id as
    #: a DNS subject alternative name: the coordinator checks it.
    tls_ca_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: serve plaintext gRPC with no client authentication (development only); the
    #: node refuses to start with neither this nor the three TLS files
    dev_plaintext: bool = False

    @property
    def kfrag_db(self) -> Path:
        return self.data_dir / "kfrags.sqlite"

    @property
    def audit_db(self) -> Path:
        return self.data_dir / "audit.sqlite"

    def user_pin(self) -> str:
        return _read_secret(self.hsm_pin_file, "hsm_pin_file")

    def so_pin(self) -> str:
        if self.hsm_so_pin_file is None:
            raise InvalidRequest("hsm_so_pin_file is required to initialise a token")
        return _read_secret(self.hsm_so_pin_file, "hsm_so_pin_file")

    def transport(self) -> Transport:
        """How the gRPC port is secured (the files are read when the port opens)."""
        if self.dev_plaintext:
            return Transport.plaintext()
        if self.tls_ca_cert is None or self.tls_cert is None or self.tls_key is None:
            raise InvalidRequest("node TLS settings are incomplete")  # validate() says which
        return Transport.tls(self.tls_ca_cert, self.tls_cert, self.tls_key)

    @classmethod
    def from_toml(cls, path: Path) -> NodeSettings:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequest(f"cannot read node config {path}: {e}") from None
        base = path.parent

        def rel(value: object) -> Path:
            p = Path(str(value))
            return p if p.is_absolute() else base / p

        try:
            settings = cls(
                node_id=str(raw["node_id"]),
                listen=str(raw["listen"]),
                metrics_listen=str(raw.get("metrics_listen", "")),
                chain_rpc_url=str(raw["chain_rpc_url"]),
                registry_address=str(raw["registry_address"]),
                data_dir=rel(raw["data_dir"]),
                hsm_module=str(raw.get("hsm_module", DEFAULT_SOFTHSM_MODULE)),
                hsm_token_label=str(raw["hsm_token_label"]),
                hsm_pin_file=rel(raw["hsm_pin_file"]),
                hsm_so_pin_file=rel(raw["hsm_so_pin_file"]) if "hsm_so_pin_file" in raw else None,
                softhsm_conf=rel(raw["softhsm_conf"]) if "softhsm_conf" in raw else None,
                softhsm_token_dir=(
                    rel(raw["softhsm_token_dir"]) if "softhsm_token_dir" in raw else None
                ),
                registry_start_block=int(raw.get("registry_start_block", 0)),
                chain_poll_interval_s=float(raw.get("chain_poll_interval_s", 0.2)),
                chain_max_age_s=float(raw.get("chain_max_age_s", 2.0)),
                chain_max_lag_blocks=int(raw.get("chain_max_lag_blocks", 2)),
                max_workers=int(raw.get("max_workers", 2)),
                processes=int(raw.get("processes", 1)),
                anchoring=raw.get("anchoring", True),  # checked by validate()
                anchor_every_entries=int(raw.get("anchor_every_entries", 1000)),
                anchor_interval_s=float(raw.get("anchor_interval_s", 60.0)),
                request_window_s=int(raw.get("request_window_s", 300)),
                rate_limit_per_s=float(raw.get("rate_limit_per_s", 100.0)),
                rate_limit_burst=int(raw.get("rate_limit_burst", 200)),
                replay_max_entries=int(raw.get("replay_max_entries", 1_000_000)),
                log_level=str(raw.get("log_level", "info")),
                tls_ca_cert=rel(raw["tls_ca_cert"]) if "tls_ca_cert" in raw else None,
                tls_cert=rel(raw["tls_cert"]) if "tls_cert" in raw else None,
                tls_key=rel(raw["tls_key"]) if "tls_key" in raw else None,
                dev_plaintext=raw.get("dev_plaintext", False),  # checked by validate()
            )
        except KeyError as e:
            raise InvalidRequest(f"node config {path} is missing {e.args[0]!r}") from None
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 1 <= len(self.node_id.encode()) <= 32:
            raise InvalidRequest("node_id must be 1-32 bytes")
        parse_host_port(self.listen, "listen")
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "metrics_listen")
        if not 0 < self.chain_poll_interval_s < self.chain_max_age_s:
            raise InvalidRequest("need 0 < chain_poll_interval_s < chain_max_age_s")
        if self.chain_max_lag_blocks < 0 or self.registry_start_block < 0:
            raise InvalidRequest("chain_max_lag_blocks and registry_start_block must be >= 0")
        if not 1 <= self.processes <= 64:
            raise InvalidRequest("processes must be between 1 and 64")
        if self.max_workers < 1:
            raise InvalidRequest("max_workers must be at least 1")
        if not isinstance(self.anchoring, bool):
            raise InvalidRequest("anchoring must be true or false")
        if self.anchor_every_entries < 1 or not self.anchor_interval_s > 0:
            raise InvalidRequest("need anchor_every_entries >= 1 and anchor_interval_s > 0")
        if not isinstance(self.dev_plaintext, bool):
            raise InvalidRequest("dev_plaintext must be true or false")
        require_tls_settings(
            "node config",
            {"tls_ca_cert": self.tls_ca_cert, "tls_cert": self.tls_cert, "tls_key": self.tls_key},
            self.dev_plaintext,
        )


def _read_secret(path: Path, field: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise InvalidRequest(f"cannot read {field} {path}: {e.strerror}") from None
    if not value:
        raise InvalidRequest(f"{field} {path} is empty")
    return value
