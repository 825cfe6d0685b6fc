"""Sealing kfrags to a node's delivery key: binding, KDF + AEAD, refusals (pure)."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.errors import InvalidRequest, Unauthenticated
from core.kfrag_delivery import (
    COMPRESSED_POINT_LEN,
    DELIVERY_VERSION,
    MIN_SEALED_LEN,
    NONCE_LEN,
    SEALED_KFRAG_UNAUTHENTICATED,
    TAG_LEN,
    compressed,
    delivery_binding,
    derive_delivery_key,
    ephemeral_point,
    load_delivery_public_key,
    open_with_shared_secret,
    seal_for_node,
)

PATIENT = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
GRANTEE = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
RECEIVING_KEY = bytes([0x02]) + bytes(range(32))
KFRAG = bytes(range(256)) + bytes(54)
BINDING = delivery_binding("node-1", PATIENT, GRANTEE, RECEIVING_KEY, 1)


def node_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, compressed(key.public_key())


def open_as(
    key: ec.EllipticCurvePrivateKey,
    ephemeral: bytes,
    sealed: bytes,
    *,
    info: bytes = BINDING,
    aad: bytes = BINDING,
) -> bytes:
    """What a node does, in software."""
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
    shared_x = key.exchange(ec.ECDH(), peer)
    return open_with_shared_secret(
        shared_x, ephemeral, compressed(key.public_key()), sealed, info=info, aad=aad
    )


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out, to pin the KDF independently of the code under test."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


# --- sealing and opening --------------------------------------------------------------------


def test_seal_then_open() -> None:
    key, public = node_key()
    ephemeral, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    assert len(ephemeral) == COMPRESSED_POINT_LEN and ephemeral[0] in (2, 3)
    assert len(sealed) == NONCE_LEN + len(KFRAG) + TAG_LEN
    assert KFRAG not in sealed
    assert open_as(key, ephemeral, sealed) == KFRAG


def test_every_seal_uses_a_fresh_ephemeral_key_and_nonce() -> None:
    _, public = node_key()
    first = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    second = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    assert first[0] != second[0]
    assert first[1][:NONCE_LEN] != second[1][:NONCE_LEN]


def test_wire_format_matches_an_independent_implementation() -> None:
    """ECDH x, HKDF-SHA256(salt = E || N, info), AES-256-GCM(nonce || ct || tag, aad)."""
    key, public = node_key()
    ephemeral_key = ec.generate_private_key(ec.SECP256R1())
    ephemeral = compressed(ephemeral_key.public_key())
    shared_x = ephemeral_key.exchange(ec.ECDH(), key.public_key())
    aes_key = _hkdf_sha256(shared_x, ephemeral + public, BINDING, 32)
    assert derive_delivery_key(shared_x, ephemeral, public, BINDING) == aes_key
    nonce = os.urandom(NONCE_LEN)
    sealed = nonce + AESGCM(aes_key).encrypt(nonce, KFRAG, BINDING)
    assert open_as(key, ephemeral, sealed) == KFRAG


def test_sealed_to_another_node_does_not_open() -> None:
    _, public = node_key()
    other, _ = node_key()
    ephemeral, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    with pytest.raises(Unauthenticated, match=SEALED_KFRAG_UNAUTHENTICATED):
        open_as(other, ephemeral, sealed)


@pytest.mark.parametrize("which", ["info", "aad"])
def test_another_binding_does_not_open(which: str) -> None:
    key, public = node_key()
    ephemeral, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    other = delivery_binding("node-2", PATIENT, GRANTEE, RECEIVING_KEY, 1)
    with pytest.raises(Unauthenticated):
        open_as(key, ephemeral, sealed, **{which: other})


@pytest.mark.parametrize("where", [0, NONCE_LEN, NONCE_LEN + 100, -1])
def test_tampered_sealed_does_not_open(where: int) -> None:
    key, public = node_key()
    ephemeral, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    tampered = bytearray(sealed)
    tampered[where] ^= 0x01
    with pytest.raises(Unauthenticated):
        open_as(key, ephemeral, bytes(tampered))
    with pytest.raises(Unauthenticated):
        open_as(key, ephemeral, sealed[:-1])


def test_another_ephemeral_key_does_not_open() -> None:
    key, public = node_key()
    _, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    other_ephemeral, _ = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    with pytest.raises(Unauthenticated):
        open_as(key, other_ephemeral, sealed)


def test_failure_reveals_no_secret() -> None:
    key, public = node_key()
    ephemeral, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
    shared_x = key.exchange(ec.ECDH(), peer)
    aes_key = derive_delivery_key(shared_x, ephemeral, public, BINDING)
    with pytest.raises(Unauthenticated) as caught:
        open_as(key, ephemeral, sealed, aad=b"other")
    assert str(caught.value) == SEALED_KFRAG_UNAUTHENTICATED
    assert caught.value.__cause__ is None
    for secret in (shared_x, aes_key):
        assert secret.hex() not in repr(caught.value)
        assert secret.hex() not in repr(caught.value.__context__)


@pytest.mark.parametrize("length", [0, NONCE_LEN, NONCE_LEN + TAG_LEN, MIN_SEALED_LEN - 1])
def test_too_short_is_an_invalid_request(length: int) -> None:
    key, public = node_key()
    ephemeral, sealed = seal_for_node(public, KFRAG, info=BINDING, aad=BINDING)
    with pytest.raises(InvalidRequest, match="at least"):
        open_as(key, ephemeral, sealed[:length])


def test_empty_plaintext_is_refused() -> None:
    _, public = node_key()
    with pytest.raises(InvalidRequest, match="empty"):
        seal_for_node(public, b"", info=BINDING, aad=BINDING)


def _not_on_curve() -> bytes:
    """A compressed encoding whose x has no point on P-256."""
    for x in range(1, 1000):
        candidate = bytes([0x02]) + x.to_bytes(32, "big")
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), candidate)
        except ValueError:
            return candidate
    raise AssertionError("unreachable: about half of all x are off the curve")


def _bad_points() -> list[bytes]:
    _, public = node_key()
    uncompressed = load_delivery_public_key(public).public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    candidates = [b"", public[:-1], public + b"\x00", bytes([0x04]) + public[1:], uncompressed]
    return [*candidates, _not_on_curve(), bytes(33), _secp256k1_point_off_p256()]


def _secp256k1_point_off_p256() -> bytes:
    """A point of the other curve whose x is not on P-256 (the first small key that gives
    one), so that the same cases are collected on every run."""
    for k in range(1, 64):
        point = (
            ec.derive_private_key(k, ec.SECP256K1())
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        )
        if _off_p256(point):
            return point
    raise AssertionError("no small secp256k1 key gives a point off P-256")


def _off_p256(point: bytes) -> bool:
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("point", _bad_points())
def test_bad_points_are_invalid_requests(point: bytes) -> None:
    with pytest.raises(InvalidRequest, match="delivery public key"):
        seal_for_node(point, KFRAG, info=BINDING, aad=BINDING)
    with pytest.raises(InvalidRequest, match="ephemeral public key"):
        ephemeral_point(point)


def test_ephemeral_point_is_uncompressed() -> None:
    _, public = node_key()
    point = ephemeral_point(public)
    assert len(point) == 65 and point[0] == 0x04 and point[1:33] == public[1:]


# --- the binding ----------------------------------------------------------------------------


def test_binding_layout() -> None:
    expected = b"".join(
        len(p).to_bytes(2, "big") + p
        for p in (
            DELIVERY_VERSION,
            b"node-1",
            bytes.fromhex(PATIENT[2:]),
            bytes.fromhex(GRANTEE[2:]),
            RECEIVING_KEY,
            b"\x01",
        )
    )
    assert BINDING == expected


def test_binding_ignores_address_case_only() -> None:
    assert delivery_binding("node-1", PATIENT.lower(), GRANTEE.lower(), RECEIVING_KEY, 1) == (
        BINDING
    )


@pytest.mark.parametrize(
    "args",
    [
        ("node-2", PATIENT, GRANTEE, RECEIVING_KEY, 1),
        ("node-1", GRANTEE, PATIENT, RECEIVING_KEY, 1),
        ("node-1", PATIENT, PATIENT, RECEIVING_KEY, 1),
        ("node-1", PATIENT, GRANTEE, RECEIVING_KEY[:-1] + b"\x00", 1),
        ("node-1", PATIENT, GRANTEE, RECEIVING_KEY, 2),
        ("node-1" + "\x00", PATIENT, GRANTEE, RECEIVING_KEY, 1),
    ],
)
def test_every_field_changes_the_binding(args: tuple[str, str, str, bytes, int]) -> None:
    assert delivery_binding(*args) != BINDING


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", PATIENT, GRANTEE, RECEIVING_KEY, 1), "node id"),
        (("node-1", "0x1234", GRANTEE, RECEIVING_KEY, 1), "patient"),
        (("node-1", PATIENT, PATIENT[:2] + PATIENT[2:].swapcase(), RECEIVING_KEY, 1), "grantee"),
        (("node-1", PATIENT, GRANTEE[2:] + "00", RECEIVING_KEY, 1), "grantee"),
        (("node-1", PATIENT, GRANTEE, b"", 1), "receiving key"),
        (("node-1", PATIENT, GRANTEE, RECEIVING_KEY, 256), "record type"),
        (("node-1", PATIENT, GRANTEE, RECEIVING_KEY, -1), "record type"),
        (("node-1", PATIENT, GRANTEE, RECEIVING_KEY, True), "record type"),
        (("x" * 70_000, PATIENT, GRANTEE, RECEIVING_KEY, 1), "node id"),
    ],
)
def test_binding_refuses_bad_fields(args: tuple[str, str, str, bytes, int], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        delivery_binding(*args)
