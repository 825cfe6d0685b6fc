"""What the registry contract accepts: its roles, its limits, and the check each argument
passes before a call or transaction is sent (``contracts/src/Registry.sol`` enforces the
same limits; checking them here too means bad input never costs a round trip).

Each check returns the value as the contract takes it, or raises ``InvalidRequest`` naming
the argument.
"""

from __future__ import annotations

from eth_typing import ChecksumAddress
from eth_utils.address import is_address
from web3 import Web3
from web3.types import BlockIdentifier

from core.errors import InvalidRequest
from core.kfrag_delivery import load_delivery_public_key
from core.record_types import ALL_TYPES_MASK, RecordType

PROVIDER_ROLE = Web3.keccak(text="PROVIDER_ROLE")
EMERGENCY_ROLE = Web3.keccak(text="EMERGENCY_ROLE")

COMPRESSED_POINT_BYTES = 33
MAX_STORAGE_URI_BYTES = 256
MAX_ENDPOINT_BYTES = 256
MAX_SIGNING_KEY_BYTES = 256
MAX_CHECKPOINT_SIGNATURE_BYTES = 256
#: the contract's MAX_EMERGENCY_DURATION
MAX_EMERGENCY_DURATION_S = 4 * 3600
UINT64_MAX = 2**64 - 1
ZERO_32 = b"\x00" * 32


def address(value: object, what: str) -> ChecksumAddress:
    # is_address also rejects mixed-case addresses whose EIP-55 checksum is wrong.
    if not isinstance(value, str) or not is_address(value):
        raise InvalidRequest(f"{what} is not an Ethereum address: {value!r}")
    return Web3.to_checksum_address(value)


def bytes32(value: object, what: str, *, nonzero: bool = True) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise InvalidRequest(f"{what} must be 32 bytes")
    if nonzero and value == ZERO_32:
        raise InvalidRequest(f"{what} must not be all zeros")
    return value


def compressed_point(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != COMPRESSED_POINT_BYTES:
        raise InvalidRequest(f"{what} must be a {COMPRESSED_POINT_BYTES}-byte compressed point")
    if value[0] not in (2, 3):
        raise InvalidRequest(f"{what} must start with 0x02 or 0x03 (compressed point)")
    return value


def delivery_key(key: object) -> bytes:
    point = compressed_point(key, "delivery_public_key")
    load_delivery_public_key(point)  # on the P-256 curve, or InvalidRequest
    return point


def text(value: object, what: str, max_bytes: int) -> str:
    if not isinstance(value, str) or not 1 <= len(value.encode("utf-8")) <= max_bytes:
        raise InvalidRequest(f"{what} must be 1..{max_bytes} bytes of UTF-8 text")
    return value


def record_type(value: object) -> RecordType:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"record_type must be a RecordType, not {value!r}")
    try:
        return RecordType(value)
    except ValueError:
        raise InvalidRequest(f"unknown record type {value!r}") from None


def types_mask(mask: int) -> int:
    if isinstance(mask, bool) or not isinstance(mask, int):
        raise InvalidRequest("allowed_types_mask must be an int")
    if mask == 0 or mask & ~ALL_TYPES_MASK:
        raise InvalidRequest(f"allowed_types_mask must be a nonzero subset of {ALL_TYPES_MASK:#x}")
    return mask


def block(number: int | None) -> BlockIdentifier:
    """A block to read state at: the latest (None), or a non-negative block number."""
    if number is None:
        return "latest"
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise InvalidRequest("block must be a non-negative block number")
    return number
