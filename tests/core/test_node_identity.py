from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from eth_account import Account

from core.errors import InvalidRequest
from core.node_identity import NodeIdentity, parse_node_identity


def _identity() -> NodeIdentity:
    signing = ec.generate_private_key(ec.SECP256R1()).public_key()
    delivery = ec.generate_private_key(ec.SECP256R1()).public_key()
    return NodeIdentity(
        node_id="node-1",
        signing_public_key=signing.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        delivery_public_key=delivery.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        ),
        account=str(Account.create().address),
    )


def test_an_identity_roundtrips_through_its_json_object() -> None:
    identity = _identity()
    assert parse_node_identity(identity.to_json_object()) == identity


def _der(curve: ec.EllipticCurve) -> str:
    key = ec.generate_private_key(curve).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ).hex()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"node_id": ""}, "node_id must be"),
        ({"node_id": "a" * 33}, "node_id must be"),
        ({"node_id": "node 1"}, "node_id must be"),
        ({"node_id": 7}, "node_id must be"),
        ({"signing_public_key": "00" * 91}, "signing_public_key is not a DER public key"),
        ({"signing_public_key": "zz" * 91}, "signing_public_key must be 91 bytes of hex"),
        ({"signing_public_key": "30" * 10}, "signing_public_key must be 91 bytes"),
        ({"delivery_public_key": "04" + "11" * 32}, "delivery_public_key is not a compressed"),
        ({"delivery_public_key": "02" + "ff" * 32}, "delivery_public_key is not a compressed"),
        ({"delivery_public_key": ["02"]}, "delivery_public_key must be 33 bytes"),
        ({"account": "0x12"}, "account must be an Ethereum address"),
        ({"account": None}, "account must be an Ethereum address"),
        ({"endpoint": "h:1"}, "unknown field 'endpoint'"),
    ],
)
def test_a_bad_field_is_refused_by_name(change: dict[str, Any], fragment: str) -> None:
    document = {**_identity().to_json_object(), **change}
    with pytest.raises(InvalidRequest, match=fragment):
        parse_node_identity(document)


@pytest.mark.parametrize("curve", [ec.SECP256K1(), ec.SECP384R1()])
def test_a_signing_key_on_another_curve_is_refused(curve: ec.EllipticCurve) -> None:
    document = {**_identity().to_json_object(), "signing_public_key": _der(curve)}
    with pytest.raises(InvalidRequest, match="signing_public_key must be 91 bytes"):
        parse_node_identity(document)


@pytest.mark.parametrize(
    "field", ["node_id", "signing_public_key", "delivery_public_key", "account"]
)
def test_a_missing_field_is_named(field: str) -> None:
    document = _identity().to_json_object()
    del document[field]
    with pytest.raises(InvalidRequest, match=f"{field} is missing"):
        parse_node_identity(document)
