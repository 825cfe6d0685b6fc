"""The key agreement that opens a sealed kfrag: ECDH with the node's delivery key
(``medkms-delivery``, P-256) inside the token; the KDF and AEAD that follow run in software
(:mod:`core.kfrag_delivery`).

``CKM_ECDH1_DERIVE``: SoftHSM supports only ``CKD_NULL``, which yields the bare x-coordinate
as a generic secret object. It is made a session object (``CKA_TOKEN`` false), read back and
destroyed at once, under the lock; if anything fails in between, the caller replaces the
session (:meth:`kms_node.hsm.pkcs11_session.Token.replace_session`), and closing it destroys
its session objects.
"""

from __future__ import annotations

from typing import Any

import PyKCS11

from core import kfrag_delivery
from kms_node.hsm.pkcs11_session import Handle, Session

ECDH_SECRET_LEN = kfrag_delivery.SHARED_SECRET_LEN

# The ECDH result: a short-lived session object whose value is read back (CKD_NULL).
_ECDH_SECRET_TEMPLATE: list[tuple[int, Any]] = [
    (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
    (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET),
    (PyKCS11.CKA_VALUE_LEN, ECDH_SECRET_LEN),
    (PyKCS11.CKA_TOKEN, False),
    (PyKCS11.CKA_PRIVATE, True),
    (PyKCS11.CKA_SENSITIVE, False),
    (PyKCS11.CKA_EXTRACTABLE, True),
    (PyKCS11.CKA_ENCRYPT, False),
    (PyKCS11.CKA_DECRYPT, False),
    (PyKCS11.CKA_SIGN, False),
    (PyKCS11.CKA_VERIFY, False),
    (PyKCS11.CKA_WRAP, False),
    (PyKCS11.CKA_UNWRAP, False),
    (PyKCS11.CKA_DERIVE, False),
]


def ecdh_x(session: Session, private_key: Handle, peer_point: bytes) -> bytes:
    """The ECDH x-coordinate (CKM_ECDH1_DERIVE, CKD_NULL). Caller holds the module lock.

    The derived session object lives only for these three calls.
    """
    mechanism = PyKCS11.ECDH1_DERIVE_Mechanism(peer_point, PyKCS11.CKD_NULL)
    secret = session.deriveKey(private_key, _ECDH_SECRET_TEMPLATE, mechanism)
    try:
        (value,) = session.getAttributeValue(secret, [PyKCS11.CKA_VALUE], allAsBinary=True)
    finally:
        session.destroyObject(secret)
    return bytes(value)
