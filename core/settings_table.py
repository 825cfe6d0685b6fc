"""Reading a settings dataclass's fields from a parsed TOML table.

Each setting's default is written once, on its dataclass field; a reader asks for a
key's value or that default (``value_or_default``), never restating it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def value_or_default(table: Mapping[str, Any], settings: type[Any], name: str) -> Any:
    """``table[name]``, or the default of the ``name`` field of the ``settings``
    dataclass when the table does not set it."""
    if name in table:
        return table[name]
    field = {f.name: f for f in dataclasses.fields(settings)}[name]
    if field.default is dataclasses.MISSING:
        raise KeyError(name)  # a required setting: the caller says which is missing
    return field.default
