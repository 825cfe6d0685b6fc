"""Key specs (no token needed): what a spec fixes. Tokens made to them, and refused for
differing from them, are tested on SoftHSM in ``test_keystore.py``."""

from __future__ import annotations

import PyKCS11
import pytest

from kms_node.hsm.key_specs import DELIVERY_KEY, KEK, KeySpec


def test_a_use_its_class_does_not_have_is_refused() -> None:
    # A private key cannot verify: left unchecked, the flag would silently not be set.
    with pytest.raises(ValueError, match="CKO_PRIVATE_KEY has no usage CKA_VERIFY"):
        KeySpec(PyKCS11.CKO_PRIVATE_KEY, PyKCS11.CKK_EC, {}, frozenset({PyKCS11.CKA_VERIFY}))


def test_every_use_of_its_class_is_fixed_and_only_the_allowed_ones_are_true() -> None:
    kek = KEK.attributes()
    uses = [
        PyKCS11.CKA_ENCRYPT,
        PyKCS11.CKA_DECRYPT,
        PyKCS11.CKA_WRAP,
        PyKCS11.CKA_UNWRAP,
        PyKCS11.CKA_SIGN,
        PyKCS11.CKA_VERIFY,
        PyKCS11.CKA_DERIVE,
    ]
    assert [kek[use] for use in uses] == [True, True, False, False, False, False, False]
    delivery = DELIVERY_KEY.private.attributes()
    uses = [PyKCS11.CKA_SIGN, PyKCS11.CKA_DECRYPT, PyKCS11.CKA_UNWRAP, PyKCS11.CKA_DERIVE]
    assert [delivery[use] for use in uses] == [False, False, False, True]


def test_the_template_is_the_identity_then_every_fixed_attribute() -> None:
    public, private = DELIVERY_KEY.templates()
    identity = [(PyKCS11.CKA_LABEL, "medkms-delivery"), (PyKCS11.CKA_ID, b"medkms-delivery")]
    assert private == [*identity, *DELIVERY_KEY.private.attributes().items()]
    assert public == [
        *identity,
        (PyKCS11.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")),  # prime256v1
        *DELIVERY_KEY.public.attributes().items(),
    ]
