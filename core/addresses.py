"""Ethereum addresses in their EIP-55 checksum form, cached.

A checksum is one keccak256 of the lower-case hex (EIP-55), computed here directly
(eth-utils' ``to_checksum_address`` validates and converts its way there at about ten
times the cost); a node sees the same few requesters over and over, so the results are
cached too. Bounded so that a stream of fresh addresses cannot grow it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from eth_hash.auto import keccak

_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


@lru_cache(maxsize=65_536)
def checksum(address: bytes | str) -> str:
    """EIP-55 form of a 20-byte address or a hex string (which must be valid:
    ``ValueError`` otherwise)."""
    return eip55(address)


def eip55(address: bytes | str) -> str:
    """:func:`checksum`, not cached: for a stream of addresses each seen about once (a
    replay of the registry's events), which would only push the hot ones out of the cache."""
    if isinstance(address, bytes):
        if len(address) != 20:
            raise ValueError("an address is 20 bytes")
        digits = address.hex()
    elif isinstance(address, str) and _HEX_ADDRESS.fullmatch(address):
        digits = address[2:].lower()
    else:
        raise ValueError(f"not an Ethereum address: {str(address)[:64]!r}")
    # EIP-55: a letter is upper case where the nibble of keccak256(hex) at its place is >= 8.
    hashed = keccak(digits.encode()).hex()
    return "0x" + "".join(
        c.upper() if h in "89abcdef" else c for c, h in zip(digits, hashed, strict=False)
    )


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
