"""ECDSA inside the token (``CKM_ECDSA``, over a digest computed outside it) with the node's
two signing keys:

- ``medkms-signing`` (P-256) signs SHA-256 digests; the signature is DER-encoded, low-S
  (:mod:`kms_node.keystore` describes it). Audit checkpoints and receipts are signed so.
- ``medkms-eth`` (secp256k1), the node's Ethereum account, signs the 32-byte digest a caller
  computed (keccak256 of a transaction); the signature is (recovery id, r, s), low-S, as
  :mod:`core.eth_tx` builds transactions from.
"""

from __future__ import annotations

import PyKCS11

from core.errors import HsmUnavailable, IntegrityError
from core.eth_tx import recoverable_signature
from kms_node.hsm.pkcs11_session import Handle, Session
from kms_node.keystore import low_s_der_signature

#: r || s, each as long as the group order: 32 bytes on both curves
_RAW_SIGNATURE_LEN = 64


def ecdsa(session: Session, key: Handle, digest: bytes) -> bytes:
    """The token's raw signature of ``digest``, r || s. Caller holds the module lock."""
    return bytes(session.sign(key, digest, PyKCS11.Mechanism(PyKCS11.CKM_ECDSA)))


def der_signature(raw: bytes, token_label: str) -> bytes:
    """A P-256 raw signature as DER, low-S."""
    return low_s_der_signature(*_r_s(raw, token_label))


def eth_signature(
    raw: bytes, digest: bytes, eth_public: bytes, token_label: str
) -> tuple[int, int, int]:
    """A secp256k1 raw signature of ``digest`` as (recovery id, r, s), low-S; the recovery id
    is the one that recovers ``eth_public`` (uncompressed SEC 1 point)."""
    r, s = _r_s(raw, token_label)
    try:
        return recoverable_signature(digest, r, s, eth_public)
    except IntegrityError as e:
        raise HsmUnavailable(
            f"the Ethereum key pair on token {token_label!r} does not match: {e}"
        ) from e


def _r_s(raw: bytes, token_label: str) -> tuple[int, int]:
    if len(raw) != _RAW_SIGNATURE_LEN:
        raise HsmUnavailable(f"token {token_label!r} returned a malformed ECDSA signature")
    half = _RAW_SIGNATURE_LEN // 2
    return int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
