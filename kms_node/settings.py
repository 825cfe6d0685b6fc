"""The node's configuration: one typed object, read once at start-up from TOML.

Secrets (the token PINs) are never in the file: for each PIN it names one source, a file
or an environment variable (:class:`PinSource`). PINs never live beside the token or the
data: a PIN file inside the data directory or the SoftHSM token directory is refused, as is
one that others can read.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.endpoints import parse_host_port
from core.errors import ConfigurationError, InvalidRequest
from core.local_files import read_regular_file
from core.node_identity import check_node_id
from core.request_auth import MAX_REQUEST_WINDOW_S
from core.settings_table import (
    SettingsTable,
    check_float_settings,
    check_log_level,
    field_names,
    read_settings_file,
    reject_unknown_keys,
)
from kms_node.hsm.softhsm_token import softhsm_token_dir
from proto.transport import Transport, require_tls_settings

DEFAULT_SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
#: a PIN file longer than this is not a PIN (PKCS#11 tokens take at most a few hundred bytes)
MAX_PIN_FILE_BYTES = 4096
#: deeper than any reorganisation a chain this node should follow can have
MAX_CONFIRMATIONS = 1000
#: an unwrapped kfrag is kept an hour at most, whatever the config says (ADR 13)
MAX_KFRAG_CACHE_TTL_S = 3600.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PIN_NAMES = {"hsm_pin": "the token's user PIN", "hsm_so_pin": "the token's security-officer PIN"}


class PinSource:
    """Where one of the token's PINs comes from: exactly one of ``file`` and ``env``.

    ``file`` is a file the operator chooses, or a secret mounted at run time (e.g.
    ``/run/secrets/medkms-user-pin``); it must lie outside the data and token directories
    (:meth:`NodeSettings.validate`) and be readable by its owner only (checked as it is
    read, :func:`pin_file_mode_problem`). ``env`` names an environment variable; the CLI
    reads the environment once, at start-up, and the value is kept here, out of the repr
    (and out of copies' reprs: this is not a dataclass, so ``asdict`` cannot expose it).
    """

    __slots__ = ("setting", "file", "env", "_env_value")

    def __init__(
        self,
        setting: str,
        *,
        file: Path | None = None,
        env: str | None = None,
        env_value: str | None = None,
    ) -> None:
        #: "hsm_pin" or "hsm_so_pin": the config keys are <setting>_file and <setting>_env
        self.setting = setting
        self.file = file
        self.env = env
        self._env_value = env_value

    def __repr__(self) -> str:
        where = f"file={str(self.file)!r}" if self.file is not None else f"env={self.env!r}"
        return f"PinSource({self.setting!r}, {where})"

    @classmethod
    def from_config(
        cls, setting: str, table: SettingsTable, environ: Mapping[str, str]
    ) -> PinSource | None:
        """The source ``table`` names for ``setting``; None if it names none."""
        file_key, env_key = f"{setting}_file", f"{setting}_env"
        if file_key in table and env_key in table:
            raise ConfigurationError(
                f"node config sets both {file_key} and {env_key}: name exactly one source "
                f"for {_PIN_NAMES[setting]}"
            )
        if file_key in table:
            return cls(setting, file=table.path(file_key))
        if env_key in table:
            name = table.get(env_key, str)
            if not _ENV_NAME.fullmatch(name):
                raise ConfigurationError(f"{env_key} must name an environment variable")
            return cls(setting, env=name, env_value=environ.get(name))
        return None

    def read(self) -> str:
        if self.file is not None:
            return _read_pin_file(self.file, f"{self.setting}_file")
        value = (self._env_value or "").strip()
        if not value:
            state = "is not set" if self._env_value is None else "is empty"
            raise ConfigurationError(
                f"environment variable {self.env} (named by {self.setting}_env) {state}"
            )
        return value


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    #: gRPC listen address, HOST:PORT
    listen: str
    chain_rpc_url: str
    registry_address: str
    #: directory for the kfrag database
    data_dir: Path
    hsm_module: str
    hsm_token_label: str
    #: the token's user PIN: hsm_pin_file (mode 0600, outside the data and token
    #: directories) or hsm_pin_env (an environment variable)
    hsm_pin: PinSource
    #: Prometheus /metrics listen address, HOST:PORT, or "" for none
    metrics_listen: str = ""
    #: the token's security-officer PIN (hsm_so_pin_file or hsm_so_pin_env); only
    #: `kms-node init` reads it
    hsm_so_pin: PinSource | None = None
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
    #: judge by the registry as of this many blocks below the head (ADR 12): a grant and a
    #: revocation count only once this deep, so revocation takes k block times longer
    chain_confirmations: int = 0
    #: how often the node saves its grant index (with the block it reflects) in the data
    #: directory, signed by its HSM key; it saves once more at a clean shutdown, and a
    #: restart replays only the events after the snapshot's block (ADR 15)
    index_snapshot_interval_s: float = 60.0
    #: how far ahead a signed request's deadline may lie; nonces are kept this long
    #: (1 s to core.request_auth.MAX_REQUEST_WINDOW_S)
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
    #: how long an unwrapped kfrag stays in a server process's memory after its unwrap,
    #: so that a grant's next reads skip the HSM (ADR 13); 0: unwrap on every request
    kfrag_cache_ttl_s: float = 60.0
    #: threads per process for what may wait on the network or take long: chain reads
    #: (a refusal confirmed against the chain, a record the index does not know yet),
    #: enrollments and the auditor's RPCs. Reads themselves are served in the process's
    #: event loop, one thread (ADR 17), so these threads add no crypto.
    max_workers: int = 4
    #: server processes sharing the listen port (SO_REUSEPORT); umbral-pre holds the
    #: GIL and PKCS#11 calls are serialised per process, so one per core scales crypto
    processes: int = 1
    #: anchor the audit log's signed checkpoint on-chain (one process per node does), once
    #: this many entries are unanchored or this long after the last attempt, if any are
    anchoring: bool = True
    anchor_every_entries: int = 1000
    anchor_interval_s: float = 60.0
    log_level: str = "info"
    #: mutual TLS: the CA bundle (one or more CA certificates) that this node's and
    #: its clients' certificates chain to, and the node's own certificate and key.
    #: The certificate must name the node id as a DNS subject alternative name: the
    #: coordinator checks it. The serving node reloads the three files when they
    #: change (proto.transport.ServerIdentityReloader).
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
        return self.hsm_pin.read()

    def so_pin(self) -> str:
        if self.hsm_so_pin is None:
            raise ConfigurationError(
                "hsm_so_pin_file or hsm_so_pin_env is required to initialise a token"
            )
        return self.hsm_so_pin.read()

    def transport(self) -> Transport:
        """How the gRPC port is secured (the files are read when the port opens)."""
        if self.dev_plaintext:
            return Transport.plaintext()
        if self.tls_ca_cert is None or self.tls_cert is None or self.tls_key is None:
            raise ConfigurationError("node TLS settings are incomplete")  # validate() says which
        return Transport.tls(
            self.tls_ca_cert, self.tls_cert, self.tls_key, identity_name=self.node_id
        )

    @classmethod
    def from_toml(cls, path: Path, environ: Mapping[str, str] | None = None) -> NodeSettings:
        """Read ``path``; ``environ`` (the CLI passes ``os.environ``) holds the variables a
        ``*_pin_env`` key may name, and is read only here."""
        environ = {} if environ is None else environ
        raw = read_settings_file(path, what="node config")
        reject_unknown_keys(raw, node_config_keys(), where=f"node config {path}")
        table = SettingsTable(raw, cls, where=f"node config {path}", base=path.parent)
        try:
            settings = cls(
                node_id=table.get("node_id", str),
                listen=table.get("listen", str),
                metrics_listen=table.get("metrics_listen", str),
                chain_rpc_url=table.get("chain_rpc_url", str),
                registry_address=table.get("registry_address", str),
                data_dir=table.path("data_dir"),
                hsm_module=(
                    table.get("hsm_module", str)
                    if "hsm_module" in table
                    else DEFAULT_SOFTHSM_MODULE
                ),
                hsm_token_label=table.get("hsm_token_label", str),
                hsm_pin=_required_pin(PinSource.from_config("hsm_pin", table, environ)),
                hsm_so_pin=PinSource.from_config("hsm_so_pin", table, environ),
                softhsm_conf=table.optional_path("softhsm_conf"),
                softhsm_token_dir=table.optional_path("softhsm_token_dir"),
                registry_start_block=table.get("registry_start_block", int),
                chain_poll_interval_s=table.get("chain_poll_interval_s", float),
                chain_max_age_s=table.get("chain_max_age_s", float),
                chain_max_lag_blocks=table.get("chain_max_lag_blocks", int),
                chain_confirmations=table.get("chain_confirmations", int),
                index_snapshot_interval_s=table.get("index_snapshot_interval_s", float),
                max_workers=table.get("max_workers", int),
                processes=table.get("processes", int),
                anchoring=table.get("anchoring", bool),
                anchor_every_entries=table.get("anchor_every_entries", int),
                anchor_interval_s=table.get("anchor_interval_s", float),
                request_window_s=table.get("request_window_s", int),
                rate_limit_per_s=table.get("rate_limit_per_s", float),
                rate_limit_burst=table.get("rate_limit_burst", int),
                kfrag_cache_ttl_s=table.get("kfrag_cache_ttl_s", float),
                replay_max_entries=table.get("replay_max_entries", int),
                log_level=table.get("log_level", str),
                tls_ca_cert=table.optional_path("tls_ca_cert"),
                tls_cert=table.optional_path("tls_cert"),
                tls_key=table.optional_path("tls_key"),
                dev_plaintext=table.get("dev_plaintext", bool),
            )
        except KeyError as e:
            raise ConfigurationError(f"node config {path} is missing {e.args[0]!r}") from None
        settings.validate()
        return settings

    def validate(self) -> None:
        try:
            check_node_id(self.node_id)
        except InvalidRequest as e:
            raise ConfigurationError(e.message) from None
        parse_host_port(self.listen, "listen")
        check_log_level(self.log_level)
        # NaN and infinity first: NaN fails no "< bound" test, and NaN as a rate turns
        # rate limiting off
        check_float_settings(self)
        if self.metrics_listen:
            parse_host_port(self.metrics_listen, "metrics_listen")
        if not 0 < self.chain_poll_interval_s < self.chain_max_age_s:
            raise ConfigurationError("need 0 < chain_poll_interval_s < chain_max_age_s")
        if self.chain_max_lag_blocks < 0 or self.registry_start_block < 0:
            raise ConfigurationError("chain_max_lag_blocks and registry_start_block must be >= 0")
        if not 0 <= self.chain_confirmations <= MAX_CONFIRMATIONS:
            raise ConfigurationError(
                f"chain_confirmations must be between 0 and {MAX_CONFIRMATIONS}"
            )
        if not self.index_snapshot_interval_s > 0:
            raise ConfigurationError("index_snapshot_interval_s must be positive")
        if not 1 <= self.processes <= 64:
            raise ConfigurationError("processes must be between 1 and 64")
        if self.max_workers < 1:
            raise ConfigurationError("max_workers must be at least 1")
        if not isinstance(self.anchoring, bool):
            raise ConfigurationError("anchoring must be true or false")
        if self.anchor_every_entries < 1 or not self.anchor_interval_s > 0:
            raise ConfigurationError("need anchor_every_entries >= 1 and anchor_interval_s > 0")
        if not self.rate_limit_per_s > 0:
            raise ConfigurationError("rate_limit_per_s must be positive")
        if self.rate_limit_burst < 1:
            raise ConfigurationError("rate_limit_burst must be at least 1")
        if not 1 <= self.request_window_s <= MAX_REQUEST_WINDOW_S:
            # 0 would leave the replay memory unable to hold any nonce (it refuses to
            # start), and no request could ever be fresh
            raise ConfigurationError(
                f"request_window_s must be between 1 and {MAX_REQUEST_WINDOW_S} seconds"
            )
        if self.replay_max_entries < 1:
            raise ConfigurationError("replay_max_entries must be at least 1")
        if not 0 <= self.kfrag_cache_ttl_s <= MAX_KFRAG_CACHE_TTL_S:
            raise ConfigurationError(
                f"kfrag_cache_ttl_s must be between 0 and {MAX_KFRAG_CACHE_TTL_S:.0f} seconds"
            )
        if not isinstance(self.dev_plaintext, bool):
            raise ConfigurationError("dev_plaintext must be true or false")
        require_tls_settings(
            "node config",
            {"tls_ca_cert": self.tls_ca_cert, "tls_cert": self.tls_cert, "tls_key": self.tls_key},
            self.dev_plaintext,
        )
        self._check_pin_locations()

    def _check_pin_locations(self) -> None:
        """Refuse a PIN file inside a directory whose copy must yield nothing: the data
        directory and the token directory. Symlinks and ``..`` are resolved first."""
        guarded = self._guarded_dirs()
        for source in (self.hsm_pin, self.hsm_so_pin):
            if source is None or source.file is None:
                continue
            key, where = f"{source.setting}_file", source.file.resolve()
            for what, directory in guarded:
                if where.is_relative_to(directory):
                    resolved = "" if where == source.file else f" (resolved: {where})"
                    raise ConfigurationError(
                        f"{key} {source.file}{resolved} lies inside {what} {directory}, so "
                        "a copy of that directory would carry the PIN. Move the PIN file "
                        "to a directory of its own outside the data and token directories "
                        f"(e.g. a secret mounted under /run/secrets), or use {source.setting}_env"
                    )

    def _guarded_dirs(self) -> list[tuple[str, Path]]:
        """(description, resolved path) of each directory no PIN file may lie in."""
        guarded = [("the data directory (data_dir)", self.data_dir.resolve())]
        if self.softhsm_token_dir is not None:
            token_dir = self.softhsm_token_dir.resolve()
            guarded.append(("the SoftHSM token directory (softhsm_token_dir)", token_dir))
        if self.softhsm_conf is not None:
            named = softhsm_token_dir(self.softhsm_conf)
            if named is not None:
                token_dir = named.resolve()
                guarded.append(("the token directory softhsm_conf names", token_dir))
                conf_dir = self.softhsm_conf.resolve().parent
                if token_dir.is_relative_to(conf_dir):
                    guarded.append(
                        ("the directory of softhsm_conf, which holds the tokens", conf_dir)
                    )
        return guarded


def node_config_keys() -> frozenset[str]:
    """The keys node.toml may set: the fields, each PIN as its two sources."""
    pins = {f"{setting}_{source}" for setting in _PIN_NAMES for source in ("file", "env")}
    return (field_names(NodeSettings) - _PIN_NAMES.keys()) | pins


def _required_pin(source: PinSource | None) -> PinSource:
    if source is None:
        raise ConfigurationError(
            "node config names no source for the token's user PIN: set hsm_pin_file (a "
            "file outside the data and token directories, e.g. a secret mounted under "
            "/run/secrets) or hsm_pin_env (an environment variable)"
        )
    return source


def pin_file_mode_problem(
    mode: int, owner: int, group: int, *, euid: int, groups: frozenset[int]
) -> str | None:
    """Why a PIN file with this mode and ownership is refused, or None if it is not.

    Only its owner may have access, with one exception: a file another user owns may be
    readable by its group when this process reads it through that group. That is how a
    Kubernetes secret volume mounted with ``fsGroup`` looks (root-owned, mode 0440, the
    pod's group); a file this process owns can be made 0600 by it. Nothing for others,
    ever, and no group write.
    """
    perms = stat.S_IMODE(mode)
    if perms & 0o007:
        return f"is accessible to others (mode {perms:04o}): chmod 600 it"
    if perms & 0o070 and not (perms & 0o070 == 0o040 and owner != euid and group in groups):
        return (
            f"is accessible to its group (mode {perms:04o}): chmod 600 it. Group read is "
            "accepted only on a file another user owns whose group this process reads it "
            "through (a secret mounted with fsGroup)"
        )
    return None


def _read_pin_file(path: Path, key: str) -> str:
    """Read a PIN file, checking its mode on the opened file. Symlinks are followed: a
    mounted secret is one (its target was checked against the guarded directories)."""
    groups = frozenset([os.getegid(), *os.getgroups()])

    def mode_problem(info: os.stat_result) -> str | None:
        return pin_file_mode_problem(
            info.st_mode, info.st_uid, info.st_gid, euid=os.geteuid(), groups=groups
        )

    try:
        data = read_regular_file(path, max_bytes=MAX_PIN_FILE_BYTES, what=key, check=mode_problem)
    except InvalidRequest as e:
        raise ConfigurationError(e.message) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {key} {path}: {e.strerror}") from None
    try:
        value = data.decode().strip()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{key} {path} is not UTF-8 text") from None
    if not value:
        raise ConfigurationError(f"{key} {path} is empty")
    return value
