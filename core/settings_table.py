"""Reading a settings dataclass's fields from a parsed TOML table.

Each setting's default is written once, on its dataclass field; a reader asks for a
key's value or that default (``value_or_default``), never restating it, and a key
that is no field is refused (``reject_unknown_keys``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from difflib import get_close_matches
from typing import Any

from core.errors import ConfigurationError


def value_or_default(table: Mapping[str, Any], settings: type[Any], name: str) -> Any:
    """``table[name]``, or the default of the ``name`` field of the ``settings``
    dataclass when the table does not set it."""
    if name in table:
        return table[name]
    field = {f.name: f for f in dataclasses.fields(settings)}[name]
    if field.default is dataclasses.MISSING:
        raise KeyError(name)  # a required setting: the caller says which is missing
    return field.default


def reject_unknown_keys(table: Mapping[str, Any], known: Iterable[str], *, where: str = "") -> None:
    """Refuse a key the settings do not know, naming it and ``where`` it was written: a
    typo (``chain_confirmation`` for ``chain_confirmations``) must not be silently
    ignored, leaving the default in force. ``where`` (the file) prefixes the message
    unless the caller adds it."""
    allowed = frozenset(known)
    unknown = sorted(set(table) - allowed)
    if unknown:
        close = get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        prefix = f"{where}: " if where else ""
        raise ConfigurationError(
            f"{prefix}unknown key {unknown[0]!r}{hint}; known: {', '.join(sorted(allowed))}"
        )


def field_names(settings: type[Any]) -> frozenset[str]:
    """The names of a settings dataclass's fields: the keys its table may set."""
    return frozenset(f.name for f in dataclasses.fields(settings))
