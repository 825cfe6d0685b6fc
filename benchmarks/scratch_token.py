"""A SoftHSM token with a node's keys, made in a temporary directory for one benchmark run."""

from __future__ import annotations

import secrets
from pathlib import Path

from kms_node.hsm.pkcs11_key_store import Pkcs11KeyStore, ensure_keys
from kms_node.hsm.softhsm_token import init_softhsm_token
from kms_node.settings import DEFAULT_SOFTHSM_MODULE


def scratch_keystore(root: Path, label: str) -> Pkcs11KeyStore:
    """A new token under ``root`` (PINs random, never shown), with the node's keys, open."""
    pin = secrets.token_hex(8)
    conf = root / "softhsm2.conf"
    init_softhsm_token(
        softhsm_conf=conf,
        token_dir=root / "tokens",
        module_path=DEFAULT_SOFTHSM_MODULE,
        token_label=label,
        so_pin=secrets.token_hex(8),
        user_pin=pin,
    )
    ensure_keys(DEFAULT_SOFTHSM_MODULE, label, pin, softhsm_conf=conf)
    return Pkcs11KeyStore.open(DEFAULT_SOFTHSM_MODULE, label, pin, softhsm_conf=conf)
