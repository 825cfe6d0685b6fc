"""Ethereum addresses in their EIP-55 checksum form, cached.

Computing a checksum costs a keccak256 (about 60 µs through eth-utils); a node
sees the same few patients and requesters over and over, so the hot path looks
them up instead. Bounded so that a stream of fresh addresses cannot grow it.
"""

from __future__ import annotations

from functools import lru_cache

from eth_utils.address import is_address
from eth_utils.address import to_checksum_address as _to_checksum_address


@lru_cache(maxsize=65_536)
def checksum(address: bytes | str) -> str:
    """EIP-55 form of a 20-byte address or a hex string (which must be valid)."""
    return str(_to_checksum_address(address))


@lru_cache(maxsize=65_536)
def is_valid(address: str) -> bool:
    """True for a hex address whose mixed case, if any, is a correct checksum."""
    return bool(is_address(address))
