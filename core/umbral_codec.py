"""Parsing of Umbral objects from untrusted bytes, with sizes checked first.

umbral-pre raises bare ValueErrors with serde messages; callers get an
``InvalidRequest`` naming the field instead. Sizes are those of umbral-pre
0.11's MessagePack serialisation.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import umbral_pre as umbral

from core.errors import InvalidRequest

# umbral-pre raises this when a signature or proof does not verify; its type
# stubs do not declare it.
VerificationError: type[Exception] = umbral.VerificationError  # type: ignore[attr-defined]

PUBLIC_KEY_SIZE = 33
CAPSULE_SIZE = 105
KFRAG_SIZE = 310
CFRAG_SIZE = 381


def _check_size(field: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise InvalidRequest(f"{field} must be {size} bytes, got {len(data)}")


def load_public_key(data: bytes, field: str = "umbral public key") -> umbral.PublicKey:
    _check_size(field, data, PUBLIC_KEY_SIZE)
    try:
        return _public_key(bytes(data))
    except ValueError:
        raise InvalidRequest(f"{field} is not a compressed secp256k1 point") from None


#: a node sees the same requesters' keys in request after request; decompressing the point
#: costs about 13 us each time. Bounded so that a stream of fresh keys cannot grow it;
#: keys that fail to parse raise and are not kept.
PUBLIC_KEYS_KEPT = 4096


@lru_cache(maxsize=PUBLIC_KEYS_KEPT)
def _public_key(data: bytes) -> umbral.PublicKey:
    return umbral.PublicKey.from_compressed_bytes(data)


def check_capsule_size(data: bytes, field: str = "capsule") -> None:
    """What can be checked of a capsule without parsing it (which costs two curve
    multiplications): its size."""
    _check_size(field, data, CAPSULE_SIZE)


def load_capsule(data: bytes, field: str = "capsule") -> umbral.Capsule:
    check_capsule_size(data, field)
    try:
        return umbral.Capsule.from_bytes(data)
    except ValueError:
        raise InvalidRequest(f"{field} is not a valid Umbral capsule") from None


def load_kfrag(data: bytes, field: str = "kfrag") -> umbral.KeyFrag:
    _check_size(field, data, KFRAG_SIZE)
    try:
        return umbral.KeyFrag.from_bytes(data)
    except ValueError:
        raise InvalidRequest(f"{field} is not a valid Umbral key fragment") from None


def load_cfrag(data: bytes, field: str = "cfrag") -> umbral.CapsuleFrag:
    _check_size(field, data, CFRAG_SIZE)
    try:
        return umbral.CapsuleFrag.from_bytes(data)
    except ValueError:
        raise InvalidRequest(f"{field} is not a valid Umbral capsule fragment") from None


#: where a cfrag's kfrag id and precursor lie in umbral-pre 0.11's simple serialisation
#: (``to_bytes_simple``: point E1, point V1, the kfrag id, then the precursor, a
#: compressed point)
_KFRAG_ID = slice(33 + 33, 33 + 33 + 32)
_PRECURSOR = slice(33 + 33 + 32, 33 + 33 + 32 + PUBLIC_KEY_SIZE)


def cfrag_kfrag_id(cfrag: umbral.CapsuleFrag | umbral.VerifiedCapsuleFrag) -> bytes:
    """The id of the kfrag a cfrag was made with (about 0.04 ms): umbral refuses two
    cfrags of one kfrag in one decryption."""
    return bytes(cfrag.to_bytes_simple()[_KFRAG_ID])


def cfrag_precursor(cfrag: umbral.CapsuleFrag | umbral.VerifiedCapsuleFrag) -> bytes:
    """The precursor of the kfrag set a cfrag was made with: every kfrag of one set (one
    ``generate_kfrags`` call) shares it, and cfrags of different sets cannot be combined
    (umbral-pre: "CapsuleFrags are not pairwise consistent")."""
    return bytes(cfrag.to_bytes_simple()[_PRECURSOR])


def is_umbral_panic(error: BaseException) -> bool:
    """Whether ``error`` is a panic inside umbral-pre, raised by PyO3 as
    ``pyo3_runtime.PanicException``: a ``BaseException``, not an ``Exception``, so it
    passes ``except Exception``. umbral-pre 0.11 panics, for one, when fragments that pass
    its consistency check combine to the point at infinity (``decrypt_reencrypted``):
    anyone can craft such fragments under a precursor of their own making."""
    return type(error).__name__ == "PanicException" and not isinstance(error, Exception)


def capsule_hash(capsule_bytes: bytes) -> bytes:
    """The 32-byte hash of a capsule as anchored in the registry (SHA-256)."""
    return hashlib.sha256(capsule_bytes).digest()
