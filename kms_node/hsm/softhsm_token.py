"""A node's own SoftHSM2 token: its private configuration file (which names the token
directory) and initialising the token in it, the first step of ``kms-node init``; the second
creates the node's keys (:func:`kms_node.hsm.pkcs11_key_store.ensure_keys`).

PINs are passed straight to ``C_InitToken``, ``C_Login`` and ``C_InitPIN``; they are never
written to the configuration, logged or put in messages.
"""

from __future__ import annotations

from pathlib import Path

import PyKCS11

from core.errors import HsmUnavailable, InvalidRequest
from kms_node.hsm.pkcs11_session import (
    TOKEN_LABEL_LEN,
    LoadedModule,
    acquire_module,
    check_token_label,
    close_quietly,
    find_slot,
    release_module,
)

#: the key of a SoftHSM2 configuration that names its token directory
_TOKENDIR_KEY = "directories.tokendir"


def softhsm_token_dir(softhsm_conf: Path) -> Path | None:
    """The token directory a SoftHSM2 configuration names; None if the file cannot be read
    or names none. (SoftHSM's format: ``key = value`` lines, ``#`` comments.)"""
    try:
        lines = softhsm_conf.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == _TOKENDIR_KEY and value.strip():
            return Path(value.strip())
    return None


def init_softhsm_token(
    *,
    softhsm_conf: Path,
    token_dir: Path,
    module_path: str,
    token_label: str,
    so_pin: str,
    user_pin: str,
) -> None:
    """Write a private softhsm2.conf and initialise a token in it; idempotent.

    The configuration points SoftHSM at ``token_dir`` (created with mode 0700). If a token
    with this label already exists it is kept (its PINs are not checked); if its user PIN was
    never set (an earlier run stopped half way), it is set now. Otherwise a token is
    initialised in a free slot and its user PIN set by the security officer.

    The module must not be in use in this process with another configuration (see
    :mod:`kms_node.hsm.pkcs11_session`); tokens in the same ``token_dir`` can be created and
    opened freely.
    """
    check_token_label(token_label)
    token_dir = token_dir.resolve()
    token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_dir.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored if it exists
    conf_text = (
        "# medkms: private SoftHSM2 configuration for one node\n"
        f"{_TOKENDIR_KEY} = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    if not softhsm_conf.exists() or softhsm_conf.read_text() != conf_text:
        softhsm_conf.parent.mkdir(parents=True, exist_ok=True)
        partial = softhsm_conf.with_name(softhsm_conf.name + ".tmp")
        partial.write_text(conf_text)
        partial.replace(softhsm_conf)
    module = acquire_module(module_path, softhsm_conf)
    try:
        with module.lock:
            try:
                _init_token(module, token_label, so_pin, user_pin)
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(f"cannot initialise token {token_label!r}: {e}") from e
    finally:
        release_module(module)


def _init_token(module: LoadedModule, token_label: str, so_pin: str, user_pin: str) -> None:
    """Caller holds the module lock."""
    pkcs11 = module.pkcs11
    found = find_slot(module, token_label)
    if found is not None:
        slot, info = found
        if info.flags & PyKCS11.CKF_USER_PIN_INITIALIZED:
            return
    else:
        free = [
            s
            for s in pkcs11.getSlotList(tokenPresent=True)
            if not pkcs11.getTokenInfo(s).flags & PyKCS11.CKF_TOKEN_INITIALIZED
        ]
        if not free:
            raise HsmUnavailable(f"no free slot for token {token_label!r} in {module.where()}")
        slot, info = free[0], pkcs11.getTokenInfo(free[0])
    for name, pin in (("SO PIN", so_pin), ("user PIN", user_pin)):
        if not info.ulMinPinLen <= len(pin) <= info.ulMaxPinLen:
            raise InvalidRequest(
                f"{name} must be {info.ulMinPinLen}-{info.ulMaxPinLen} characters long"
            )
    if found is None:
        pkcs11.initToken(slot, so_pin, token_label.ljust(TOKEN_LABEL_LEN))
    session = pkcs11.openSession(slot, PyKCS11.CKF_RW_SESSION)
    try:
        try:
            session.login(so_pin, PyKCS11.CKU_SO)
        except PyKCS11.PyKCS11Error as e:
            reason = "wrong SO PIN" if e.value == PyKCS11.CKR_PIN_INCORRECT else str(e)
            raise HsmUnavailable(f"cannot log in to token {token_label!r}: {reason}") from e
        session.initPin(user_pin)
        session.logout()
    finally:
        close_quietly(session)
