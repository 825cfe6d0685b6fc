"""Ethereum addresses in their EIP-55 checksum form, cached.

Computing a checksum costs a keccak256 (about 60 µs through eth-utils); a node
sees the same few patients and requesters over and over, so the hot path looks
them up instead. Bounded so that a stream of fresh addresses cannot grow it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from eth_utils.address import to_checksum_address as _to_checksum_address

_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


@lru_cache(maxsize=65_536)
def checksum(address: bytes | str) -> str:
    """EIP-55 form of a 20-byte address or a hex string (which must be valid)."""
    return str(_to_checksum_address(address))


@lru_cache(maxsize=65_536)
def is_valid(address: str) -> bool:
    """True for a 0x-prefixed hex address that is all lower case, all upper case, or
    mixed case with a correct EIP-55 checksum. (eth-utils' ``is_address`` no longer
    checks the checksum of mixed-case input, so it is checked here.)"""
    if not isinstance(address, str) or not _HEX_ADDRESS.fullmatch(address):
        return False
    digits = address[2:]
    if digits == digits.lower() or digits == digits.upper():
        return True
    return checksum(address) == address


def is_checksummed(address: str) -> bool:
    """True for an address in its exact EIP-55 form (cached, like :func:`checksum`)."""
    return (
        isinstance(address, str)
        and _HEX_ADDRESS.fullmatch(address) is not None
        and checksum(address) == address
    )
