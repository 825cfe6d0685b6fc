"""Talking to a PKCS#11 module safely: loading it once per process, one lock for all its
calls, a logged-in session on one token, and finding objects on it by label.

Rules this module follows, learnt from SoftHSM 2.6 through PyKCS11 1.5:

- Every PKCS#11 call into one loaded module is made under that module's lock
  (:attr:`LoadedModule.lock`): PyKCS11 calls ``C_Initialize`` without locking callbacks,
  and concurrent calls crash the process.
- PyKCS11 loads a module (and calls ``C_Initialize``) once per process and shares it between
  all users; SoftHSM reads ``SOFTHSM2_CONF`` only then. So, in one process, every token must
  live in the token directory of the configuration the module was loaded with; several tokens
  in that one directory are fine. This module counts its users of each module and unloads it
  (``C_Finalize``) when the last one closes; after that, loading with another
  ``SOFTHSM2_CONF`` works (verified: switching directories sequentially in one process).
  Asking for a different configuration while the module is loaded raises
  :class:`HsmUnavailable` rather than silently looking in the wrong directory. This only holds
  if nothing else in the process loads the module through PyKCS11.
- PKCS#11 login state belongs to the process, not the session, so a second login to a token
  already logged in cannot check the PIN. A token is therefore opened at most once per process
  at a time (opening it again raises :class:`HsmUnavailable`).
- Do not fork a process after opening a token: SoftHSM state is not fork-safe
  (``library.reset_on_fork`` is off). Open it in each worker process instead.
- An operation that fails may leave the session stuck (SoftHSM: ``C_Decrypt`` on empty input
  fails with ``CKR_ARGUMENTS_BAD`` and leaves the operation active), so a session is replaced
  after any unexpected error (:meth:`Token.replace_session`).

PINs are passed straight to ``C_Login``; they are never stored, logged or put in messages.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PyKCS11

from core.errors import HsmUnavailable, InvalidRequest

#: CK_TOKEN_INFO.label is 32 bytes, blank-padded
TOKEN_LABEL_LEN = 32

_LOGIN_FAILURES = {
    PyKCS11.CKR_PIN_INCORRECT: "wrong user PIN",
    PyKCS11.CKR_PIN_LEN_RANGE: "wrong user PIN",
    PyKCS11.CKR_PIN_INVALID: "wrong user PIN",
    PyKCS11.CKR_PIN_LOCKED: "the user PIN is locked",
    PyKCS11.CKR_USER_PIN_NOT_INITIALIZED: "the user PIN is not set; run `kms-node init`",
    PyKCS11.CKR_USER_ALREADY_LOGGED_IN: "already logged in by other code in this process",
}

# PyKCS11 is untyped; these names say what a value is.
Session = Any
Handle = Any


# --- loaded modules -------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedModule:
    """One loaded PKCS#11 module: the lock for all its calls and the tokens open through it."""

    path: str
    conf: str | None  # SOFTHSM2_CONF when the module was initialised
    pkcs11: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0
    open_tokens: set[str] = field(default_factory=set)

    def where(self) -> str:
        return self.conf if self.conf else self.path


_MODULES: dict[str, LoadedModule] = {}
_MODULES_LOCK = threading.Lock()  # guards _MODULES; taken before any LoadedModule.lock


def _resolve_conf(conf: Path | str | None) -> str | None:
    return str(Path(conf).resolve()) if conf else None


def acquire_module(module_path: str, softhsm_conf: Path | None) -> LoadedModule:
    """Load (or share) the module, initialised with ``softhsm_conf`` if one is given. Each
    call is paired with one :func:`release_module`."""
    path = os.path.realpath(module_path)  # one entry however the module is spelt
    conf = _resolve_conf(softhsm_conf)
    with _MODULES_LOCK:
        module = _MODULES.get(path)
        if module is not None:
            if conf is not None and conf != module.conf:
                raise HsmUnavailable(
                    f"PKCS#11 module {module_path} is already in use in this process with "
                    f"SOFTHSM2_CONF={module.conf}; it cannot also read {conf} "
                    "(one token directory per process)"
                )
            module.users += 1
            return module
        if not os.path.isfile(path):
            raise HsmUnavailable(f"PKCS#11 module {module_path} not found")
        if conf is not None:
            # SoftHSM reads the variable in C_Initialize, which PyKCS11 calls in load().
            os.environ["SOFTHSM2_CONF"] = conf
        conf_used = _resolve_conf(os.environ.get("SOFTHSM2_CONF"))
        try:
            pkcs11 = PyKCS11.PyKCS11Lib().load(path)
        except PyKCS11.PyKCS11Error as e:
            raise HsmUnavailable(
                f"cannot initialise PKCS#11 module {module_path} (SOFTHSM2_CONF={conf_used}): {e}"
            ) from e
        module = LoadedModule(path=path, conf=conf_used, pkcs11=pkcs11, users=1)
        _MODULES[path] = module
        return module


def release_module(module: LoadedModule) -> None:
    with _MODULES_LOCK:
        module.users -= 1
        if module.users > 0:
            return
        del _MODULES[module.path]
        with module.lock:
            try:
                # C_Finalize: lets a later load read another SOFTHSM2_CONF.
                module.pkcs11.unload()
            except PyKCS11.PyKCS11Error as e:
                raise HsmUnavailable(f"cannot unload PKCS#11 module {module.path}: {e}") from e


def check_token_label(label: str) -> None:
    if not (
        0 < len(label) <= TOKEN_LABEL_LEN
        and label.isascii()
        and label.isprintable()
        and label == label.strip()
    ):
        raise InvalidRequest(
            "token label must be 1-32 printable ASCII characters without surrounding spaces"
        )


def find_slot(module: LoadedModule, token_label: str) -> tuple[int, Any] | None:
    """The slot and token info of the initialised token with this label. Caller holds the lock."""
    found = []
    for slot in module.pkcs11.getSlotList(tokenPresent=True):
        info = module.pkcs11.getTokenInfo(slot)
        if info.flags & PyKCS11.CKF_TOKEN_INITIALIZED and (
            info.label.rstrip(" \x00") == token_label
        ):
            found.append((slot, info))
    if len(found) > 1:
        raise HsmUnavailable(
            f"{len(found)} tokens are labelled {token_label!r} in {module.where()}; "
            "refusing to guess"
        )
    return found[0] if found else None


def close_quietly(session: Session) -> None:
    try:
        session.closeSession()
    except PyKCS11.PyKCS11Error:
        pass  # closing is best effort: the session is being abandoned anyway


# --- a logged-in session --------------------------------------------------------------------


class Token:
    """A logged-in R/W user session on one token, which it holds open for this process."""

    def __init__(
        self, module_path: str, token_label: str, user_pin: str, softhsm_conf: Path | None
    ) -> None:
        check_token_label(token_label)
        self.label = token_label
        self.module = acquire_module(module_path, softhsm_conf)
        try:
            with self.module.lock:
                self.slot, self.session = self._login(user_pin)
                self.module.open_tokens.add(token_label)
        except BaseException:
            release_module(self.module)
            raise
        self._open = True

    def _login(self, user_pin: str) -> tuple[int, Session]:
        module = self.module
        if self.label in module.open_tokens:
            raise HsmUnavailable(f"token {self.label!r} is already open in this process")
        try:
            found = find_slot(module, self.label)
            if found is None:
                raise HsmUnavailable(
                    f"token {self.label!r} not found in {module.where()}; run `kms-node init`"
                )
            slot = found[0]
            session = module.pkcs11.openSession(slot, PyKCS11.CKF_RW_SESSION)
        except PyKCS11.PyKCS11Error as e:
            raise HsmUnavailable(f"cannot open token {self.label!r}: {e}") from e
        try:
            session.login(user_pin, PyKCS11.CKU_USER)
        except PyKCS11.PyKCS11Error as e:
            close_quietly(session)
            reason = _LOGIN_FAILURES.get(e.value, str(e))
            raise HsmUnavailable(f"cannot log in to token {self.label!r}: {reason}") from e
        return slot, session

    def replace_session(self) -> None:
        """Swap in a fresh session after an error that may have left an operation active.

        Caller holds the lock. Login state is per token and process, and the new session is
        opened before the old one closes, so the token stays logged in.
        """
        try:
            fresh = self.module.pkcs11.openSession(self.slot, PyKCS11.CKF_RW_SESSION)
        except PyKCS11.PyKCS11Error:
            return  # keep the old one; the next call reports whatever is wrong
        close_quietly(self.session)
        self.session = fresh

    def close(self) -> None:
        with self.module.lock:
            if not self._open:
                return
            self._open = False
            self.module.open_tokens.discard(self.label)
            # Closing the last session of the token also logs the user out (PKCS#11 5.6).
            close_quietly(self.session)
        release_module(self.module)


# --- objects on the token -------------------------------------------------------------------


def find_one(session: Session, token_label: str, label: str, cls: int) -> Handle | None:
    """The one object of class ``cls`` labelled ``label``, if any. Caller holds the lock."""
    handles = session.findObjects([(PyKCS11.CKA_CLASS, cls), (PyKCS11.CKA_LABEL, label)])
    if len(handles) > 1:
        raise HsmUnavailable(
            f"{len(handles)} objects labelled {label!r} on token {token_label!r}; refusing to guess"
        )
    return handles[0] if handles else None


def require(session: Session, token_label: str, label: str, cls: int) -> Handle:
    """As :func:`find_one`, but a missing key says to run `kms-node init`."""
    handle = find_one(session, token_label, label, cls)
    if handle is None:
        raise HsmUnavailable(
            f"key {label!r} not found on token {token_label!r}; run `kms-node init`"
        )
    return handle
