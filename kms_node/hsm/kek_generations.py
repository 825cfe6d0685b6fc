"""The node's key-encryption keys on the token, one per generation.

``medkms-kek`` is the first; ``kms-node rotate-kek`` (:mod:`kms_node.kek_rotation`) adds
``medkms-kek-2``, ``medkms-kek-3``, ...: the newest wraps, each unwraps what it wrapped until
it is destroyed. The token holds them apart by label alone.
"""

from __future__ import annotations

import re

import PyKCS11

from core.errors import HsmUnavailable
from kms_node.hsm.key_specs import KEK, check_key
from kms_node.hsm.pkcs11_session import Handle, Session, require

KEK_LABEL = "medkms-kek"
#: key-encryption keys of later generations are labelled medkms-kek-2, medkms-kek-3, ...
_KEK_GENERATION = re.compile(r"medkms-kek(?:-([2-9]|[1-9][0-9]+))?")


def kek_label(generation: int) -> str:
    """The token label of the key-encryption key of ``generation`` (1 is the first)."""
    return KEK_LABEL if generation == 1 else f"{KEK_LABEL}-{generation}"


def find_keks(session: Session, token_label: str) -> dict[int, Handle]:
    """The node's key-encryption keys on the token, by generation (one label each)."""
    found: dict[int, Handle] = {}
    for handle in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
        (label,) = session.getAttributeValue(handle, [PyKCS11.CKA_LABEL])
        match = _KEK_GENERATION.fullmatch(str(label))
        if match is None:
            continue
        generation = int(match.group(1) or 1)
        if generation in found:
            raise HsmUnavailable(
                f"two objects labelled {kek_label(generation)!r} on token {token_label!r}; "
                "refusing to guess"
            )
        found[generation] = handle
    return found


def load_keks(session: Session, token_label: str) -> dict[int, Handle]:
    """The key-encryption keys, each checked; at least the first must exist. Caller holds
    the lock and translates PKCS#11 errors."""
    keks = find_keks(session, token_label)
    if not keks:
        raise HsmUnavailable(
            f"key {KEK_LABEL!r} not found on token {token_label!r}; run `kms-node init`"
        )
    for generation, kek in keks.items():
        check_key(session, token_label, kek_label(generation), kek, KEK)
    return keks


def ensure_kek(session: Session, token_label: str) -> None:
    """The first key-encryption key, unless the token holds one (of any generation)."""
    if not find_keks(session, token_label):
        _generate_kek(session, KEK_LABEL)


def add_kek(session: Session, token_label: str, generation: int) -> Handle:
    """Create the key-encryption key of ``generation`` and check it. Caller holds the lock
    and translates PKCS#11 errors."""
    label = kek_label(generation)
    _generate_kek(session, label)
    handle = require(session, token_label, label, PyKCS11.CKO_SECRET_KEY)
    check_key(session, token_label, label, handle, KEK)
    return handle


def _generate_kek(session: Session, label: str) -> None:
    session.generateKey(KEK.template((PyKCS11.CKA_LABEL, label)), PyKCS11.MechanismAESGENERATEKEY)
