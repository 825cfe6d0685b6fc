"""A node's public identity: what ``kms-node init`` prints (and writes with
``--identity-out``), what the operator sends the registry admin, and what
``kmsctl admin register-node --identity FILE`` registers on-chain. Public keys only.

The fields are stated here once: ``kms-node init`` builds a :class:`NodeIdentity`, and
the admin's command parses one with :func:`parse_node_identity`, which checks each field
fully (a signing key that is not a P-256 SubjectPublicKeyInfo, a delivery key off the
curve, a malformed account, an unknown or missing field): a file that passes is one the
registry takes and the nodes' checks can use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core import addresses
from core.errors import InvalidRequest
from core.kfrag_delivery import load_delivery_public_key

#: the registry's bound on a node id (bytes of UTF-8)
MAX_NODE_ID_BYTES: Final = 32
#: a P-256 SubjectPublicKeyInfo in DER is 91 bytes
SIGNING_KEY_DER_BYTES: Final = 91
DELIVERY_KEY_BYTES: Final = 33
#: four short fields, pretty-printed
MAX_NODE_IDENTITY_FILE_BYTES: Final = 4 * 1024
_FIELDS: Final = ("node_id", "signing_public_key", "delivery_public_key", "account")
_NODE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    #: DER SubjectPublicKeyInfo of the node's P-256 key for checkpoints and receipts
    signing_public_key: bytes
    #: compressed P-256 point the patients seal kfrags to
    delivery_public_key: bytes
    #: the node's Ethereum account (EIP-55), which sends its checkpoint anchors
    account: str

    def to_json_object(self) -> dict[str, str]:
        return {
            "node_id": self.node_id,
            "signing_public_key": self.signing_public_key.hex(),
            "delivery_public_key": self.delivery_public_key.hex(),
            "account": self.account,
        }


def _hex(data: dict[str, Any], name: str, size: int) -> bytes:
    value = data[name]
    if not isinstance(value, str) or len(value) != 2 * size:
        raise InvalidRequest(f"{name} must be {size} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be {size} bytes of hex") from None


def check_node_id(node_id: object) -> str:
    """``node_id`` if it is one the registry accepts (and a file or metric label may
    carry): 1 to ``MAX_NODE_ID_BYTES`` letters, digits, '.', '_' or '-'."""
    if (
        not isinstance(node_id, str)
        or not _NODE_ID.fullmatch(node_id)
        or len(node_id.encode()) > MAX_NODE_ID_BYTES
    ):
        raise InvalidRequest(
            f"node_id must be 1..{MAX_NODE_ID_BYTES} letters, digits, '.', '_' or '-', "
            f"got {str(node_id)[: MAX_NODE_ID_BYTES + 8]!r}"
        )
    return node_id


def parse_node_identity(data: dict[str, Any]) -> NodeIdentity:
    """A node identity from its JSON object, every field checked."""
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise InvalidRequest(f"{missing[0]} is missing")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}")
    node_id = check_node_id(data["node_id"])
    signing = _hex(data, "signing_public_key", SIGNING_KEY_DER_BYTES)
    try:
        key = serialization.load_der_public_key(signing)
    except ValueError:
        raise InvalidRequest("signing_public_key is not a DER public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidRequest("signing_public_key is not a P-256 key")
    delivery = _hex(data, "delivery_public_key", DELIVERY_KEY_BYTES)
    try:
        load_delivery_public_key(delivery)
    except InvalidRequest:
        raise InvalidRequest("delivery_public_key is not a compressed P-256 point") from None
    account = data["account"]
    if not isinstance(account, str) or not addresses.is_valid(account):
        raise InvalidRequest("account must be an Ethereum address (0x and 40 hex digits)")
    return NodeIdentity(node_id, signing, delivery, addresses.checksum(account))
