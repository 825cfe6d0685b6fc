"""Network endpoint strings as they appear in configuration."""

from __future__ import annotations

from core.errors import ConfigurationError


def parse_host_port(value: str, field: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 hosts in brackets), with a clear error if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{field} must look like HOST:PORT, got {value!r}")
    return host, int(port)
