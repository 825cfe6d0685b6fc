"""Sealing a kfrag to one node's delivery key, and the one KDF + AEAD that opens it.

The patient's SDK seals each kfrag to the node that will hold it, so that the coordinator
or any relay carries only ciphertext (ECIES in the style of SEC 1 v2, section 5.1):

1. ``e`` = a fresh P-256 key pair (the ephemeral key); ``E`` its compressed point.
2. ``z`` = x-coordinate of ``e * N``, ``N`` the node's delivery public key (SEC 1 3.3.1,
   what PKCS#11 ``CKM_ECDH1_DERIVE`` with ``CKD_NULL`` returns).
3. ``k`` = HKDF-SHA256(ikm=z, salt=E || N, info=binding), 32 bytes (RFC 5869).
4. ``sealed`` = nonce(12) || AES-256-GCM_k(nonce, kfrag, aad=binding) || tag(16).

``E`` and ``N`` are the 33-byte compressed points. The binding (:func:`delivery_binding`)
names the node, patient, grantee, receiving key and record type: a sealed kfrag opens only
at the node it was sealed to and only for the grant it was made for. The node computes
``z`` inside its HSM (:meth:`kms_node.keystore.KeyStore.open_delivery`) and then calls
:func:`open_with_shared_secret` here, so SDK, in-memory twin and HSM share one KDF + AEAD.

Pure: no I/O; ``cryptography`` only.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_utils.address import is_checksum_address, is_hex_address

from core.errors import InvalidRequest, Unauthenticated

DELIVERY_VERSION: Final = b"medkms/kfrag-delivery/v1"

COMPRESSED_POINT_LEN: Final = 33
UNCOMPRESSED_POINT_LEN: Final = 65
SHARED_SECRET_LEN: Final = 32  # x-coordinate of a P-256 point
DELIVERY_KEY_LEN: Final = 32  # AES-256
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
# Empty plaintexts are refused, so the shortest sealed value carries one byte of ciphertext.
MIN_SEALED_LEN: Final = NONCE_LEN + 1 + TAG_LEN

SEALED_KFRAG_UNAUTHENTICATED: Final = "sealed kfrag does not open with this node's delivery key"

_FIELD_MAX: Final = 0xFFFF  # fields are prefixed by a 2-byte big-endian length


def _point(data: bytes, what: str) -> ec.EllipticCurvePublicKey:
    data = bytes(data)
    if len(data) != COMPRESSED_POINT_LEN or data[0] not in (0x02, 0x03):
        raise InvalidRequest(
            f"{what} must be a compressed P-256 point ({COMPRESSED_POINT_LEN} bytes)"
        )
    try:
        # Decompression checks that x is on the curve; P-256 has cofactor 1, so every point
        # on it is in the prime-order group and no small-subgroup check is needed.
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError as e:
        raise InvalidRequest(f"{what} is not a point on P-256") from e


def load_delivery_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A node's delivery public key (33-byte compressed P-256 point); :class:`InvalidRequest`
    if it is not one."""
    return _point(data, "delivery public key")


def ephemeral_point(ephemeral_public_key: bytes) -> bytes:
    """The sender's ephemeral key, checked and uncompressed (``04 || x || y``): the form every
    PKCS#11 token accepts as ``CKM_ECDH1_DERIVE`` public data. :class:`InvalidRequest` if it
    is not a compressed P-256 point."""
    public_key = _point(ephemeral_public_key, "ephemeral public key")
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def compressed(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 33-byte compressed SEC 1 encoding of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )


def check_sealed(sealed: bytes) -> None:
    """Refuse a sealed value too short to hold a nonce, one byte of ciphertext and a tag."""
    if len(sealed) < MIN_SEALED_LEN:
        raise InvalidRequest(
            f"sealed kfrag is {len(sealed)} bytes; at least {MIN_SEALED_LEN} expected"
        )


def _field(value: bytes, what: str) -> bytes:
    if len(value) > _FIELD_MAX:
        raise InvalidRequest(f"{what} is too long for a delivery binding")
    return len(value).to_bytes(2, "big") + value


def _address(address: str, what: str) -> bytes:
    """20 address bytes from hex; mixed case must be the EIP-55 checksum."""
    if not (isinstance(address, str) and len(address) == 42 and is_hex_address(address)):
        raise InvalidRequest(f"{what} is not an Ethereum address")
    digits = address[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(address):
        raise InvalidRequest(f"{what} has a wrong EIP-55 checksum")
    return bytes.fromhex(digits)


def delivery_binding(
    node_id: str, patient: str, grantee: str, receiving_key: bytes, record_type: int
) -> bytes:
    """The bytes a sealed kfrag is bound to, used as HKDF info and as GCM associated data.

    ``len || DELIVERY_VERSION``, then ``len || field`` for: node id (UTF-8), patient and
    grantee (20-byte addresses; hex in any valid case), receiving key (as given) and record
    type (one byte, as the ``uint8`` of the EIP-712 enrollment). Lengths are 2-byte big-endian,
    so no two different tuples give the same bytes.
    """
    if not node_id:
        raise InvalidRequest("node id is empty")
    if not receiving_key:
        raise InvalidRequest("receiving key is empty")
    if isinstance(record_type, bool) or not 0 <= int(record_type) <= 0xFF:
        raise InvalidRequest("record type must be an integer in 0..255")
    parts = (
        _field(DELIVERY_VERSION, "version"),
        _field(node_id.encode(), "node id"),
        _field(_address(patient, "patient"), "patient"),
        _field(_address(grantee, "grantee"), "grantee"),
        _field(bytes(receiving_key), "receiving key"),
        _field(bytes((int(record_type),)), "record type"),
    )
    return b"".join(parts)


def derive_delivery_key(
    shared_x: bytes, ephemeral_public_key: bytes, node_public_key: bytes, info: bytes
) -> bytes:
    """HKDF-SHA256 (RFC 5869) of the ECDH x-coordinate to the 32-byte AES-256-GCM key.

    The salt is ``E || N`` (both 33-byte compressed points), so the key is bound to the
    exact public keys on both sides as well as to ``info``. The result is a secret: do not
    keep it beyond the one decryption or encryption it serves.
    """
    if len(shared_x) != SHARED_SECRET_LEN:
        raise InvalidRequest(f"ECDH shared secret must be {SHARED_SECRET_LEN} bytes")
    if len(ephemeral_public_key) != COMPRESSED_POINT_LEN or (
        len(node_public_key) != COMPRESSED_POINT_LEN
    ):
        raise InvalidRequest(f"public keys must be {COMPRESSED_POINT_LEN}-byte compressed points")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=DELIVERY_KEY_LEN,
        salt=bytes(ephemeral_public_key) + bytes(node_public_key),
        info=bytes(info),
    )
    return hkdf.derive(bytes(shared_x))


def open_with_shared_secret(
    shared_x: bytes,
    ephemeral_public_key: bytes,
    node_public_key: bytes,
    sealed: bytes,
    *,
    info: bytes,
    aad: bytes,
) -> bytes:
    """Open ``sealed`` given the ECDH x-coordinate; the plaintext.

    Raises :class:`InvalidRequest` if ``sealed`` is too short and :class:`Unauthenticated`
    if it does not authenticate (tampered, or sealed to another node or another binding).
    """
    sealed = bytes(sealed)
    check_sealed(sealed)
    key = derive_delivery_key(shared_x, ephemeral_public_key, node_public_key, info)
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], bytes(aad))
    except InvalidTag:
        # `from None`: the cause carries nothing useful and the message must stay generic.
        raise Unauthenticated(SEALED_KFRAG_UNAUTHENTICATED) from None


def seal_for_node(
    node_delivery_public_key: bytes, plaintext: bytes, *, info: bytes, aad: bytes
) -> tuple[bytes, bytes]:
    """Seal ``plaintext`` to a node's delivery key: (ephemeral public key, sealed).

    The ephemeral public key is the 33-byte compressed point; ``sealed`` is
    ``nonce(12) || ciphertext || tag(16)``. A fresh ephemeral key per call, so the random
    nonce never repeats under one key.
    """
    node_public_key = bytes(node_delivery_public_key)
    node_point = load_delivery_public_key(node_public_key)
    plaintext = bytes(plaintext)
    if not plaintext:
        raise InvalidRequest("nothing to seal: plaintext is empty")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    ephemeral_public_key = compressed(ephemeral.public_key())
    shared_x = ephemeral.exchange(ec.ECDH(), node_point)
    key = derive_delivery_key(shared_x, ephemeral_public_key, node_public_key, info)
    nonce = os.urandom(NONCE_LEN)
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, bytes(aad))
    return ephemeral_public_key, sealed
