"""The node's keys on its token: finding and checking them when the store opens, creating the
missing ones at ``kms-node init``; what each key is and may do is in
:mod:`kms_node.hsm.key_specs`.

A token made before a key existed is brought up to date by :func:`create_missing_keys`,
which creates only what is missing; :func:`load_keys` refuses a token that lacks any key and
says to run ``kms-node init``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import PyKCS11
from cryptography.hazmat.primitives.asymmetric import ec

from core.errors import HsmUnavailable
from kms_node.hsm.kek_generations import ensure_kek, load_keks
from kms_node.hsm.key_specs import DELIVERY_KEY, ETH_KEY, SIGNING_KEY, KeyPairSpec, check_key
from kms_node.hsm.pkcs11_session import Handle, Session, Token, find_one, require

_EC_POINT_LEN = 65  # uncompressed: 0x04 || x(32) || y(32), for both curves


@dataclass(frozen=True, repr=False)
class TokenKeys:
    """Handles of the node's keys on one token, and their public halves."""

    #: key-encryption keys by generation
    keks: dict[int, Handle]
    signing: Handle
    signing_public: ec.EllipticCurvePublicKey
    delivery: Handle
    delivery_public: ec.EllipticCurvePublicKey
    eth: Handle
    eth_public: ec.EllipticCurvePublicKey


# --- finding and checking (opening the store) -----------------------------------------------


def load_keys(session: Session, token_label: str) -> TokenKeys:
    """Find the node's keys and check each against its spec. Caller holds the module lock."""
    try:
        keks = load_keks(session, token_label)
        signing, signing_public = _load_key_pair(session, token_label, SIGNING_KEY)
        delivery, delivery_public = _load_key_pair(session, token_label, DELIVERY_KEY)
        eth, eth_public = _load_key_pair(session, token_label, ETH_KEY)
    except PyKCS11.PyKCS11Error as e:
        raise HsmUnavailable(f"cannot read the keys on token {token_label!r}: {e}") from e
    return TokenKeys(keks, signing, signing_public, delivery, delivery_public, eth, eth_public)


def _load_key_pair(
    session: Session, token_label: str, spec: KeyPairSpec
) -> tuple[Handle, ec.EllipticCurvePublicKey]:
    """Find one EC key pair and check it. Caller holds the lock, translates PKCS#11 errors."""
    label, curve = spec.label, spec.curve
    private = require(session, token_label, label, PyKCS11.CKO_PRIVATE_KEY)
    check_key(session, token_label, label, private, spec.private)
    public = require(session, token_label, label, PyKCS11.CKO_PUBLIC_KEY)
    check_key(session, token_label, label, public, spec.public)
    params, point = session.getAttributeValue(
        public, [PyKCS11.CKA_EC_PARAMS, PyKCS11.CKA_EC_POINT], allAsBinary=True
    )
    if bytes(params) != spec.ec_params:
        raise HsmUnavailable(f"key {label!r} on token {token_label!r} is not {curve.name}")
    return private, _ec_public_key(bytes(point), curve, token_label, label)


def _ec_public_key(
    ec_point: bytes, curve: ec.EllipticCurve, token_label: str, label: str
) -> ec.EllipticCurvePublicKey:
    # CKA_EC_POINT is the DER OCTET STRING around the point (PKCS#11 2.40, 2.3.3); some
    # tokens return the bare point. Both are accepted; their lengths cannot be confused.
    if len(ec_point) == _EC_POINT_LEN + 2 and ec_point[:2] == bytes([0x04, _EC_POINT_LEN]):
        ec_point = ec_point[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, ec_point)
    except ValueError as e:
        raise HsmUnavailable(
            f"the public key {label!r} on token {token_label!r} is not a {curve.name} point"
        ) from e


# --- creating what is missing (`kms-node init`) ---------------------------------------------


def create_missing_keys(
    module_path: str, token_label: str, user_pin: str, softhsm_conf: Path | None
) -> None:
    """Create the node's keys on the token unless they exist. Existing keys are kept as they
    are; half a key pair (one of its halves missing) is refused rather than replaced."""
    token = Token(module_path, token_label, user_pin, softhsm_conf)
    try:
        with token.module.lock:
            try:
                ensure_kek(token.session, token_label)
                for spec in (SIGNING_KEY, DELIVERY_KEY, ETH_KEY):
                    _ensure_key_pair(token.session, token_label, spec)
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(f"cannot create the keys on token {token_label!r}: {e}") from e
    finally:
        token.close()


def _ensure_key_pair(session: Session, token_label: str, spec: KeyPairSpec) -> None:
    """Generate the key pair ``spec`` unless it exists."""
    label = spec.label
    private = find_one(session, token_label, label, PyKCS11.CKO_PRIVATE_KEY)
    public = find_one(session, token_label, label, PyKCS11.CKO_PUBLIC_KEY)
    if private is not None and public is not None:
        return
    if private is not None or public is not None:
        raise HsmUnavailable(
            f"token {token_label!r} holds only half of the key pair {label!r}; "
            "refusing to replace it (inspect the token)"
        )
    session.generateKeyPair(*spec.templates(), PyKCS11.MechanismECGENERATEKEYPAIR)
