"""What each of the node's keys on the token is and may do, stated once as data.

Each object the node makes on a token has one :class:`KeySpec`: its class, its key type and
its attribute policy (whether it is kept on the token, whether it can leave it, what it may
be used for). Both the template the key is made with (:meth:`KeySpec.template`) and the check
of a key found on the token (:func:`check_key`) are derived from it, so they cannot drift
apart. A spec sets every usage flag of its object's class, false unless the spec allows the
use: token defaults differ (SoftHSM lets an AES key wrap, unwrap and sign (CMAC) unless told
otherwise).

The node's keys, one purpose each:

- :data:`KEK`: the key-encryption keys, AES-256, encrypt and decrypt only (with AES-GCM:
  :mod:`kms_node.keystore` describes the format); labelled by generation
  (:mod:`kms_node.hsm.kek_generations`).
- :data:`SIGNING_KEY` (``medkms-signing``): a P-256 key pair; the private half only signs
  (audit checkpoints and receipts).
- :data:`DELIVERY_KEY` (``medkms-delivery``): a P-256 key pair kfrags are sealed to; the
  private half only derives (ECDH, :mod:`kms_node.hsm.delivery_ecdh`).
- :data:`ETH_KEY` (``medkms-eth``): a secp256k1 key pair, the node's Ethereum account; the
  private half only signs.

Key-encryption keys and private halves are sensitive, never extractable and cannot be
modified. One more object is made, for a moment: :data:`ECDH_SECRET`, the result of an ECDH,
which is read back and destroyed at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import PyKCS11
from cryptography.hazmat.primitives.asymmetric import ec

from core import kfrag_delivery
from core.errors import HsmUnavailable
from kms_node.hsm.pkcs11_session import Handle, Session
from kms_node.keystore import KEK_LEN

#: the usage flags of each object class (PKCS#11 2.40, sections 4.8 to 4.10)
_USAGES: dict[int, tuple[int, ...]] = {
    PyKCS11.CKO_SECRET_KEY: (
        PyKCS11.CKA_ENCRYPT,
        PyKCS11.CKA_DECRYPT,
        PyKCS11.CKA_WRAP,
        PyKCS11.CKA_UNWRAP,
        PyKCS11.CKA_SIGN,
        PyKCS11.CKA_VERIFY,
        PyKCS11.CKA_DERIVE,
    ),
    PyKCS11.CKO_PRIVATE_KEY: (
        PyKCS11.CKA_SIGN,
        PyKCS11.CKA_DECRYPT,
        PyKCS11.CKA_UNWRAP,
        PyKCS11.CKA_DERIVE,
    ),
    PyKCS11.CKO_PUBLIC_KEY: (
        PyKCS11.CKA_VERIFY,
        PyKCS11.CKA_ENCRYPT,
        PyKCS11.CKA_WRAP,
        PyKCS11.CKA_DERIVE,
    ),
}

#: a secret key: kept on the token, used only after login, never revealed, never changed
_KEPT_SECRET: Mapping[int, bool] = {
    PyKCS11.CKA_TOKEN: True,
    PyKCS11.CKA_PRIVATE: True,
    PyKCS11.CKA_SENSITIVE: True,
    PyKCS11.CKA_EXTRACTABLE: False,
    PyKCS11.CKA_MODIFIABLE: False,
}

#: the public half of a key pair: kept on the token, readable without login, never changed
_PUBLIC: Mapping[int, bool] = {
    PyKCS11.CKA_TOKEN: True,
    PyKCS11.CKA_PRIVATE: False,
    PyKCS11.CKA_MODIFIABLE: False,
}

# CKA_EC_PARAMS: DER of the curve's OID, 1.2.840.10045.3.1.7 (prime256v1) or 1.3.132.0.10
# (secp256k1).
_EC_PARAMS = {
    ec.SECP256R1.name: bytes.fromhex("06082a8648ce3d030107"),
    ec.SECP256K1.name: bytes.fromhex("06052b8104000a"),
}


@dataclass(frozen=True)
class KeySpec:
    """One object on the token: its class, key type and attribute policy."""

    object_class: int
    key_type: int
    #: where it lives and whether it can leave: CKA_TOKEN, CKA_SENSITIVE, ... -> value
    protection: Mapping[int, bool]
    #: the usage flags that are true; every other usage flag of its class is false
    uses: frozenset[int] = frozenset()
    #: CKA_VALUE_LEN, for a secret key
    value_len: int | None = None

    def __post_init__(self) -> None:
        unknown = self.uses - set(_USAGES[self.object_class])
        if unknown:
            names = ", ".join(PyKCS11.CKA[u] for u in sorted(unknown))
            raise ValueError(f"{PyKCS11.CKO[self.object_class]} has no usage {names}")

    def attributes(self) -> dict[int, Any]:
        """Every attribute the spec fixes: set when the key is made, checked when it is found."""
        fixed: dict[int, Any] = {
            PyKCS11.CKA_CLASS: self.object_class,
            PyKCS11.CKA_KEY_TYPE: self.key_type,
        }
        if self.value_len is not None:
            fixed[PyKCS11.CKA_VALUE_LEN] = self.value_len
        fixed.update(self.protection)
        fixed.update({usage: usage in self.uses for usage in _USAGES[self.object_class]})
        return fixed

    def template(self, *identity: tuple[int, Any]) -> list[tuple[int, Any]]:
        """The template to make the key with: ``identity`` (its label, ...) and
        :meth:`attributes`."""
        return [*identity, *self.attributes().items()]


@dataclass(frozen=True)
class KeyPairSpec:
    """An EC key pair: both halves carry ``label``, and each has its spec."""

    label: str
    curve: ec.EllipticCurve
    private: KeySpec
    public: KeySpec

    @property
    def ec_params(self) -> bytes:
        """CKA_EC_PARAMS of the public half: names the curve."""
        return _EC_PARAMS[self.curve.name]

    def templates(self) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
        """The public and private templates to make the pair with (``C_GenerateKeyPair``)."""
        identity = ((PyKCS11.CKA_LABEL, self.label), (PyKCS11.CKA_ID, self.label.encode()))
        # CKA_ID ties the two halves together; the curve is named on the public half.
        public = self.public.template(*identity, (PyKCS11.CKA_EC_PARAMS, self.ec_params))
        return public, self.private.template(*identity)


def _ec_key_pair(
    label: str, curve: ec.EllipticCurve, *, private_uses: set[int], public_uses: set[int]
) -> KeyPairSpec:
    return KeyPairSpec(
        label,
        curve,
        private=KeySpec(
            object_class=PyKCS11.CKO_PRIVATE_KEY,
            key_type=PyKCS11.CKK_EC,
            protection=_KEPT_SECRET,
            uses=frozenset(private_uses),
        ),
        public=KeySpec(
            object_class=PyKCS11.CKO_PUBLIC_KEY,
            key_type=PyKCS11.CKK_EC,
            protection=_PUBLIC,
            uses=frozenset(public_uses),
        ),
    )


KEK = KeySpec(
    object_class=PyKCS11.CKO_SECRET_KEY,
    key_type=PyKCS11.CKK_AES,
    protection=_KEPT_SECRET,
    uses=frozenset({PyKCS11.CKA_ENCRYPT, PyKCS11.CKA_DECRYPT}),
    value_len=KEK_LEN,
)

SIGNING_KEY = _ec_key_pair(
    "medkms-signing",
    ec.SECP256R1(),
    private_uses={PyKCS11.CKA_SIGN},
    public_uses={PyKCS11.CKA_VERIFY},
)

DELIVERY_KEY = _ec_key_pair(
    "medkms-delivery", ec.SECP256R1(), private_uses={PyKCS11.CKA_DERIVE}, public_uses=set()
)

ETH_KEY = _ec_key_pair(
    "medkms-eth",
    ec.SECP256K1(),
    private_uses={PyKCS11.CKA_SIGN},
    public_uses={PyKCS11.CKA_VERIFY},
)

#: the x-coordinate an ECDH with the delivery key yields (CKD_NULL): a session object whose
#: value is read back, so neither sensitive nor kept on the token, and good for nothing else
ECDH_SECRET = KeySpec(
    object_class=PyKCS11.CKO_SECRET_KEY,
    key_type=PyKCS11.CKK_GENERIC_SECRET,
    protection={
        PyKCS11.CKA_TOKEN: False,
        PyKCS11.CKA_PRIVATE: True,
        PyKCS11.CKA_SENSITIVE: False,
        PyKCS11.CKA_EXTRACTABLE: True,
    },
    value_len=kfrag_delivery.SHARED_SECRET_LEN,
)


def check_key(
    session: Session, token_label: str, label: str, handle: Handle, spec: KeySpec
) -> None:
    """Refuse the key ``label`` unless it has every attribute ``spec`` fixes. Caller holds the
    module lock and translates PKCS#11 errors."""
    expected = spec.attributes()
    names = list(expected)
    values = session.getAttributeValue(handle, names)
    wrong = [
        PyKCS11.CKA[name]
        for name, value in zip(names, values, strict=True)
        if value != expected[name]
    ]
    if wrong:
        raise HsmUnavailable(
            f"key {label!r} on token {token_label!r} has unsafe or unexpected attributes "
            f"({', '.join(wrong)}); refusing to use it"
        )
