"""Ethereum transactions signed by a key that never leaves its store (the node's HSM).

The node anchors audit checkpoints on-chain from its own account, whose secp256k1 key lives
in the HSM. The HSM signs a 32-byte digest and knows nothing of Ethereum; this module does
the rest, with no web3 and no I/O:

- :func:`address_of`: the EIP-55 address of a public key (keccak256 of x || y, last 20 bytes).
- :func:`recoverable_signature`: (recovery id, r, s) from a raw ECDSA (r, s): ``s`` made low
  (EIP-2; Ethereum rejects high-S) and the recovery id found by recovering the public key.
- :func:`sign_transaction`: a raw signed EIP-1559 (type 2) transaction, ready for
  ``eth_sendRawTransaction``, from a transaction dict and a digest signer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import coincurve
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_hash.auto import keccak
from eth_utils.address import to_checksum_address

from core.errors import IntegrityError, InvalidRequest

# Order of the secp256k1 group (SEC 2, section 2.4.1).
SECP256K1_ORDER: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
DIGEST_LEN: Final = 32
PUBLIC_KEY_LEN: Final = 64  # x || y
EIP1559_TYPE: Final = 2

#: (recovery id 0/1, r, s) with low s, over a 32-byte digest
DigestSigner = Callable[[bytes], tuple[int, int, int]]

_REQUIRED_FIELDS: Final = frozenset(
    {"chainId", "nonce", "gas", "maxFeePerGas", "maxPriorityFeePerGas"}
)
_OPTIONAL_FIELDS: Final = frozenset({"type", "to", "value", "data", "accessList"})
# Integer fields as Python ints (not hex strings), with their bounds: EIP-2681 caps the
# nonce, and gas limits fit 64 bits on every client; the rest are uint256.
_INTEGER_FIELDS: Final = {
    "chainId": 2**256,
    "nonce": 2**64 - 1,
    "gas": 2**64,
    "maxFeePerGas": 2**256,
    "maxPriorityFeePerGas": 2**256,
    "value": 2**256,
}


def _public_key64(public_key: bytes) -> bytes:
    public_key = bytes(public_key)
    if len(public_key) == PUBLIC_KEY_LEN + 1 and public_key[0] == 0x04:
        public_key = public_key[1:]
    if len(public_key) != PUBLIC_KEY_LEN:
        raise InvalidRequest("secp256k1 public key must be x || y (64 bytes) or 04 || x || y")
    return public_key


def address_of(public_key: bytes) -> str:
    """EIP-55 address of a secp256k1 public key, uncompressed (``04 || x || y``) or ``x || y``."""
    return str(to_checksum_address(keccak(_public_key64(public_key))[-20:]))


def _recover(digest: bytes, r: int, s: int, recovery_id: int) -> bytes | None:
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((recovery_id,))
    try:
        recovered = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
    except ValueError:
        return None
    return recovered.format(compressed=False)[1:]


def recoverable_signature(digest: bytes, r: int, s: int, public_key: bytes) -> tuple[int, int, int]:
    """(recovery id, r, s) for a raw ECDSA signature over ``digest`` by ``public_key``.

    ``s`` is replaced by ``n - s`` when above ``n / 2`` (EIP-2), which flips the parity of
    the recovery id; the id is then found by recovering with libsecp256k1 (coincurve) and
    comparing with ``public_key``, so a signature that does not belong to the key is never
    returned: :class:`IntegrityError` instead. Recovery ids 2 and 3 (``r >= n``, probability
    about 2**-128) are not representable in a transaction and are treated the same way.
    """
    public_key = _public_key64(public_key)
    if len(digest) != DIGEST_LEN:
        raise InvalidRequest(f"digest must be {DIGEST_LEN} bytes")
    if not (0 < r < SECP256K1_ORDER and 0 < s < SECP256K1_ORDER):
        raise IntegrityError("ECDSA signature values are out of range")
    if s > SECP256K1_ORDER // 2:
        s = SECP256K1_ORDER - s
    for recovery_id in (0, 1):
        if _recover(bytes(digest), r, s, recovery_id) == public_key:
            return recovery_id, r, s
    raise IntegrityError("ECDSA signature does not recover to the signer's public key")


def _unsigned(tx: Mapping[str, Any]) -> TypedTransaction:
    fields = set(tx)
    missing = _REQUIRED_FIELDS - fields
    if missing:
        raise InvalidRequest(f"transaction lacks {', '.join(sorted(missing))}")
    unknown = fields - _REQUIRED_FIELDS - _OPTIONAL_FIELDS
    if unknown:
        # e.g. "gasPrice" (not EIP-1559) or "from" (the signer decides the sender).
        raise InvalidRequest(f"transaction has unsupported fields: {', '.join(sorted(unknown))}")
    if tx.get("type", EIP1559_TYPE) not in (EIP1559_TYPE, hex(EIP1559_TYPE)):
        raise InvalidRequest("only EIP-1559 (type 2) transactions are signed here")
    for name, bound in _INTEGER_FIELDS.items():
        value = tx.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
            raise InvalidRequest(f"{name} must be a non-negative integer below {bound}")
    if tx["chainId"] == 0:
        raise InvalidRequest("chainId must be positive (EIP-155 replay protection)")
    if tx["maxPriorityFeePerGas"] > tx["maxFeePerGas"]:
        raise InvalidRequest("maxPriorityFeePerGas exceeds maxFeePerGas (EIP-1559)")
    try:
        # from_dict may rewrite its argument: give it a copy.
        return TypedTransaction.from_dict({**tx, "type": EIP1559_TYPE})
    except (TypeError, ValueError, KeyError) as e:  # eth-utils ValidationError is a ValueError
        raise InvalidRequest(f"malformed transaction: {e}") from e


def transaction_digest(tx: Mapping[str, Any]) -> bytes:
    """The EIP-1559 signing digest: keccak256(0x02 || rlp(unsigned fields))."""
    return bytes(_unsigned(tx).hash())


def sign_transaction(tx: Mapping[str, Any], sign_digest: DigestSigner) -> bytes:
    """Raw signed EIP-1559 transaction (``0x02 || rlp([...fields, yParity, r, s])``).

    ``tx`` holds ``chainId``, ``nonce``, ``gas``, ``maxFeePerGas`` and
    ``maxPriorityFeePerGas``, and optionally ``to``, ``value``, ``data``, ``accessList``
    (and ``type`` = 2), in eth-account's dict form. ``sign_digest`` is e.g.
    :meth:`kms_node.keystore.KeyStore.sign_eth_digest`.
    """
    unsigned = _unsigned(tx)
    v, r, s = sign_digest(bytes(unsigned.hash()))
    if v not in (0, 1):
        raise InvalidRequest("the signer returned a recovery id other than 0 or 1")
    if not (0 < r < SECP256K1_ORDER and 0 < s <= SECP256K1_ORDER // 2):
        raise InvalidRequest("the signer returned an out-of-range or high-S signature")
    signed = {**unsigned.as_dict(), "v": v, "r": r, "s": s}
    try:
        return bytes(TypedTransaction.from_dict(signed).encode())
    except (TypeError, ValueError, KeyError) as e:
        raise InvalidRequest(f"cannot encode the signed transaction: {e}") from e
