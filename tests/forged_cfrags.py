"""Capsule fragments a hostile party can make with no secret (ADR 19's threat): sets that
pass umbral-pre 0.11's one consistency check in ``decrypt_reencrypted`` under a
precursor of the forger's own choosing. Used to show the SDK never combines fragments of
a kfrag set it has not verified.

Two sets, for a grantee ``pk_b`` and a capsule of the patient's key ``pk_a``:

- :func:`forged_by_a_reader`: a past reader of the capsule (another grantee, holding
  genuine fragments of her own) works out the capsule's key seed and makes fragments that
  open the true DEK for ``pk_b``, whom the patient never delegated to; none verifies;
- :func:`forged_to_panic`: fragments whose combination is the point at infinity, on which
  umbral panics (``pyo3_runtime.PanicException``) instead of refusing.

Plain secp256k1 arithmetic in Python (slow, a few ms a set: tests only). Umbral's hashes
to scalars: SHA-256 over the tag's length (4 bytes, big-endian), the tag, then the parts;
the digest taken mod (n - 1), plus 1.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence

import umbral_pre as umbral

Point = tuple[int, int] | None  # None: the point at infinity

_P = 2**256 - 2**32 - 977
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_G: Point = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)


def _add(a: Point, b: Point) -> Point:
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % _P == 0:
        return None
    if a == b:
        slope = 3 * a[0] * a[0] * pow(2 * a[1], -1, _P) % _P
    else:
        slope = (b[1] - a[1]) * pow(b[0] - a[0], -1, _P) % _P
    x = (slope * slope - a[0] - b[0]) % _P
    return (x, (slope * (a[0] - x) - a[1]) % _P)


def _mul(k: int, point: Point) -> Point:
    k %= _N
    result: Point = None
    while k:
        if k & 1:
            result = _add(result, point)
        point = _add(point, point)
        k >>= 1
    return result


def _neg(point: Point) -> Point:
    return None if point is None else (point[0], (-point[1]) % _P)


def _compressed(point: Point) -> bytes:
    assert point is not None
    return bytes([2 + (point[1] & 1)]) + point[0].to_bytes(32, "big")


def _point(data: bytes) -> Point:
    x = int.from_bytes(data[1:33], "big")
    y = pow((x**3 + 7) % _P, (_P + 1) // 4, _P)
    return (x, y if (y & 1) == (data[0] & 1) else _P - y)


def _scalar(tag: bytes, *parts: bytes) -> int:
    digest = hashlib.sha256(len(tag).to_bytes(4, "big") + tag + b"".join(parts)).digest()
    return int.from_bytes(digest, "big") % (_N - 1) + 1


def _lagrange(xs: Sequence[int]) -> list[int]:
    """The coefficients at 0 of the points ``xs``."""
    out = []
    for i, xi in enumerate(xs):
        c = 1
        for j, xj in enumerate(xs):
            if j != i:
                c = c * xj * pow(xj - xi, -1, _N) % _N
        out.append(c)
    return out


class _Capsule:
    def __init__(self, capsule: umbral.Capsule) -> None:
        simple = bytes(capsule.to_bytes_simple())
        self.e, self.v = _point(simple[:33]), _point(simple[33:66])
        self.s = int.from_bytes(simple[66:98], "big")
        self.h = _scalar(b"CAPSULE_POINTS", simple[:33], simple[33:66])


def _forged_set(
    template: umbral.VerifiedCapsuleFrag,
    pk_b: umbral.PublicKey,
    e_of: Callable[[int], Point],
    v_of: Callable[[int], Point],
    m: int,
) -> list[bytes]:
    """``m`` fragments under a precursor of our own, for ``pk_b``, whose combination is
    (``e_of(d)``, ``v_of(d)``), ``d`` being the shared secret we can work out for it.
    The proof fields are the template's (so none verifies)."""
    x = secrets.randbelow(_N - 1) + 1
    precursor = _mul(x, _G)
    receiving = _point(bytes(pk_b.to_compressed_bytes()))
    shared = _compressed(_mul(x, receiving))
    named = (_compressed(precursor), bytes(pk_b.to_compressed_bytes()), shared)
    d = _scalar(b"SHARED_SECRET", *named)
    ids = [secrets.token_bytes(32) for _ in range(m)]
    coefficients = _lagrange([_scalar(b"POLYNOMIAL_ARG", *named, i) for i in ids])
    # m - 1 random fragments; the last one makes the combination what was asked for.
    randoms = [secrets.randbelow(_N - 1) + 1 for _ in range(m - 1)]
    e1: list[Point] = [_mul(r, _G) for r in randoms]
    v1: list[Point] = [_mul(r + 7, _G) for r in randoms]
    sum_e: Point = None
    sum_v: Point = None
    for c, e, v in zip(coefficients, e1, v1, strict=False):
        sum_e, sum_v = _add(sum_e, _mul(c, e)), _add(sum_v, _mul(c, v))
    inverse = pow(coefficients[-1], -1, _N)
    e1.append(_mul(inverse, _add(e_of(d), _neg(sum_e))))
    v1.append(_mul(inverse, _add(v_of(d), _neg(sum_v))))
    raw, simple = bytes(template), bytes(template.to_bytes_simple())
    forged = []
    for e, v, kfrag_id in zip(e1, v1, ids, strict=True):
        data = raw
        for old, new in (
            (simple[:33], _compressed(e)),
            (simple[33:66], _compressed(v)),
            (simple[66:98], kfrag_id),
            (simple[98:131], _compressed(precursor)),
        ):
            assert data.count(old) == 1
            data = data.replace(old, new)
        forged.append(data)
    return forged


def forged_by_a_reader(
    capsule: umbral.Capsule,
    pk_a: umbral.PublicKey,
    reader_sk: umbral.SecretKey,
    reader_cfrags: Sequence[umbral.VerifiedCapsuleFrag],
    pk_b: umbral.PublicKey,
) -> list[bytes]:
    """Fragments for ``pk_b`` that open ``capsule``'s true DEK, made by a reader who
    opened it with ``reader_cfrags`` (her own genuine fragments, under her own grant):
    she works out the capsule's key seed K and solves umbral's check for it."""
    c = _Capsule(capsule)
    pka = _point(bytes(pk_a.to_compressed_bytes()))
    simples = [bytes(f.to_bytes_simple()) for f in reader_cfrags]
    precursor = _point(simples[0][98:131])
    reader_pk = bytes(reader_sk.public_key().to_compressed_bytes())
    shared = _compressed(_mul(int.from_bytes(bytes(reader_sk.to_be_bytes()), "big"), precursor))
    named = (simples[0][98:131], reader_pk, shared)
    d = _scalar(b"SHARED_SECRET", *named)
    coefficients = _lagrange([_scalar(b"POLYNOMIAL_ARG", *named, s[66:98]) for s in simples])
    seed: Point = None
    for coefficient, s in zip(coefficients, simples, strict=True):
        seed = _add(seed, _mul(coefficient, _add(_point(s[:33]), _point(s[33:66]))))
    seed = _mul(d, seed)
    # e'h + v' = s pk_A / d and d (e' + v') = K, so e' (h - 1) = (s pk_A - K) / d.
    target = _add(_mul(c.s, pka), _neg(seed))

    def e_of(d: int) -> Point:
        return _mul(pow(d * (c.h - 1), -1, _N), target)

    def v_of(d: int) -> Point:
        return _add(_mul(pow(d, -1, _N), seed), _neg(e_of(d)))

    return _forged_set(reader_cfrags[0], pk_b, e_of, v_of, len(reader_cfrags))


def forged_to_panic(
    capsule: umbral.Capsule,
    pk_a: umbral.PublicKey,
    template: umbral.VerifiedCapsuleFrag,
    pk_b: umbral.PublicKey,
    m: int,
) -> list[bytes]:
    """``m`` fragments for ``pk_b`` that pass umbral's check and combine to e' + v' = O:
    ``decrypt_reencrypted`` panics on them. Needs no secret."""
    c = _Capsule(capsule)
    pka = _point(bytes(pk_a.to_compressed_bytes()))

    def e_of(d: int) -> Point:
        return _mul(c.s * pow(d * (c.h - 1), -1, _N), pka)

    return _forged_set(template, pk_b, e_of, lambda d: _neg(e_of(d)), m)
