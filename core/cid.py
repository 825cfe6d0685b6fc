"""Content identifiers for blobs: CIDv1, raw codec, sha2-256 multihash, base32.

The same address IPFS would give the bytes, so a blob store can be swapped for
any content-addressed store without re-anchoring records.
"""

from __future__ import annotations

import base64
import hashlib

from core.errors import InvalidRequest

_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # CIDv1, raw, sha2-256, 32-byte digest


def cid_for(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "b" + base64.b32encode(_PREFIX + digest).decode().lower().rstrip("=")


def digest_of(cid: str) -> bytes:
    """The sha2-256 digest a CID names; rejects anything but our CID form."""
    if not cid.startswith("b") or len(cid) != 59:
        raise InvalidRequest(f"not a CIDv1 sha2-256 raw address: {cid[:64]!r}")
    try:
        raw = base64.b32decode(cid[1:].upper() + "=" * (-len(cid[1:]) % 8))
    except ValueError:
        raise InvalidRequest("CID is not valid base32") from None
    if raw[:4] != _PREFIX or len(raw) != 36:
        raise InvalidRequest("CID is not CIDv1 raw sha2-256")
    return raw[4:]
