"""A party's connection profile: where the chain, the registry and the coordinator are,
and the CA bundle that checks the coordinator's TLS certificate. Everything a patient, a
provider or the registry admin needs besides their own keystore; it holds no secret.

A profile is a small TOML file::

    chain_id = 31337
    chain_rpc_url = "https://chain.example:8545"
    registry_address = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    coordinator_address = "coordinator.example:7443"   # patients and providers
    tls_ca_cert = "ca.pem"                            # relative to the profile's folder
    threshold = 3                                      # patients: kfrags needed per read

It is read bounded in size, and every key is checked: a missing or malformed one, or a
key the format does not know (a typo would otherwise be ignored), is a
``ConfigurationError`` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from core import addresses
from core.endpoints import parse_host_port
from core.errors import ConfigurationError, InvalidRequest
from core.local_files import read_regular_file
from core.settings_table import reject_unknown_keys

#: a profile is a handful of short lines
MAX_PROFILE_BYTES: Final = 16 * 1024
#: the largest threshold a patient may ask for (the registry holds far fewer nodes)
MAX_THRESHOLD: Final = 64
PROFILE_KEYS: Final = frozenset(
    {
        "chain_id",
        "chain_rpc_url",
        "registry_address",
        "coordinator_address",
        "tls_ca_cert",
        "threshold",
    }
)


@dataclass(frozen=True)
class ConnectionProfile:
    path: Path
    chain_id: int
    chain_rpc_url: str
    registry_address: str
    coordinator_address: str | None
    tls_ca_cert: Path | None
    threshold: int | None

    def coordinator(self) -> tuple[str, Path]:
        """The coordinator's address and the CA bundle for its TLS: a patient's or a
        provider's profile must name both."""
        if self.coordinator_address is None or self.tls_ca_cert is None:
            raise ConfigurationError(
                f"profile {self.path}: coordinator_address and tls_ca_cert are required "
                "to reach the coordinator"
            )
        return self.coordinator_address, self.tls_ca_cert

    @classmethod
    def load(cls, path: Path) -> ConnectionProfile:
        try:
            text = read_regular_file(path, max_bytes=MAX_PROFILE_BYTES, what="profile").decode()
            raw = tomllib.loads(text)
        except InvalidRequest as e:
            raise ConfigurationError(e.message) from None
        except UnicodeDecodeError:
            raise ConfigurationError(f"profile {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigurationError(f"profile {path} is not TOML: {e}") from None
        except (ValueError, RecursionError) as e:
            # ValueError: an integer of more digits than Python converts (4300); its text
            # is not TOML's, so the kind only. RecursionError: arrays nested thousands deep.
            raise ConfigurationError(f"profile {path} is not TOML ({type(e).__name__})") from None
        except OSError as e:
            raise ConfigurationError(f"cannot read profile {path}: {e.strerror}") from None
        try:
            return cls._from_table(path, raw)
        except ConfigurationError as e:
            raise ConfigurationError(f"profile {path}: {e.message}") from None

    @classmethod
    def _from_table(cls, path: Path, raw: dict[str, Any]) -> ConnectionProfile:
        reject_unknown_keys(raw, PROFILE_KEYS)  # load() names the file
        missing = [k for k in ("chain_id", "chain_rpc_url", "registry_address") if k not in raw]
        if missing:
            raise ConfigurationError(f"{missing[0]} is missing")
        chain_id = _integer(raw, "chain_id", 1, 2**256 - 1)
        url = raw["chain_rpc_url"]
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise ConfigurationError("chain_rpc_url must be an http(s) URL")
        registry = raw["registry_address"]
        if not isinstance(registry, str) or not addresses.is_valid(registry):
            raise ConfigurationError("registry_address must be an Ethereum address (0x...)")
        coordinator = raw.get("coordinator_address")
        if coordinator is not None:
            if not isinstance(coordinator, str):
                raise ConfigurationError("coordinator_address must be HOST:PORT")
            parse_host_port(coordinator, "coordinator_address")
        ca = raw.get("tls_ca_cert")
        if ca is not None and (not isinstance(ca, str) or not ca):
            raise ConfigurationError("tls_ca_cert must be a file name")
        ca_path = None if ca is None else Path(ca) if Path(ca).is_absolute() else path.parent / ca
        if ca_path is not None and not ca_path.is_file():
            raise ConfigurationError(f"tls_ca_cert {ca_path} is not a file")
        threshold = _integer(raw, "threshold", 1, MAX_THRESHOLD) if "threshold" in raw else None
        return cls(
            path=path,
            chain_id=chain_id,
            chain_rpc_url=url,
            registry_address=addresses.checksum(registry),
            coordinator_address=coordinator,
            tls_ca_cert=ca_path,
            threshold=threshold,
        )


def _integer(raw: dict[str, Any], key: str, low: int, high: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{key} must be an integer in {low}..{high}")
    return value
