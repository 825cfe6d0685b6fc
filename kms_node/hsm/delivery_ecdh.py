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

import PyKCS11

from core import kfrag_delivery
from kms_node.hsm.key_specs import ECDH_SECRET
from kms_node.hsm.pkcs11_session import Handle, Session

ECDH_SECRET_LEN = kfrag_delivery.SHARED_SECRET_LEN
_ECDH_SECRET_TEMPLATE = ECDH_SECRET.template()


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
