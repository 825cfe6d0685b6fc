"""Reading a settings dataclass's fields from a TOML file.

The file is read bounded and parsed here (:func:`read_settings_file`), and every way it can
fail (not a regular file, too large, not UTF-8, not TOML, nested too deep) is a
:class:`ConfigurationError` naming it, never a traceback.

Each setting's default is written once, on its dataclass field; a reader asks for a
key's value or that default (``value_or_default``), never restating it, and a key
that is no field is refused (``reject_unknown_keys``). A value is read with the type its
setting takes (:class:`SettingsTable`, :func:`checked`): one of another type is refused
naming the key and the type, before any ``int()`` or ``float()`` could fail on it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Final, TypeVar

from core.errors import ConfigurationError, InvalidRequest
from core.local_files import read_regular_file

#: a settings file is a few dozen short lines (deploy/examples: 4 KiB with comments)
MAX_SETTINGS_FILE_BYTES: Final = 64 * 1024
#: the ``log_level`` values, as the logging module names its levels (core/logs.py upper-cases)
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: how a message names the type a setting takes
_KIND_NAMES: Final[Mapping[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "a table",
}

T = TypeVar("T")


def read_settings_file(path: Path, *, what: str) -> dict[str, Any]:
    """The table of the TOML file ``path``, which ``what`` names in messages ("node config").

    Read with :func:`core.local_files.read_regular_file`: a FIFO or a device is refused at
    once, and at most :data:`MAX_SETTINGS_FILE_BYTES` are read."""
    try:
        text = read_regular_file(path, max_bytes=MAX_SETTINGS_FILE_BYTES, what=what).decode()
        return tomllib.loads(text)
    except InvalidRequest as e:  # names the file: "node config PATH is not a regular file"
        raise ConfigurationError(e.message) from None
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigurationError(
            f"cannot read {what} {path}: not UTF-8 text (at byte {e.start})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigurationError(f"cannot read {what} {path}: not TOML: {e}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively
        raise ConfigurationError(
            f"cannot read {what} {path}: arrays or tables nested too deep"
        ) from None


def checked(value: object, kind: type[T], *, name: str, where: str) -> T:
    """``value``, if it is of ``kind``; else a :class:`ConfigurationError` naming ``name``,
    the type it must be and ``where`` it was written.

    The type must match exactly, so that ``true`` is no integer (Python's bool is an int)
    and ``2.5`` no integer either; an integer is a number (``rate_limit_per_s = 100``)."""
    if kind is float and type(value) is int:
        try:
            return float(value)  # type: ignore[return-value]  # kind is float
        except OverflowError:
            raise ConfigurationError(f"{where}: {name} must be a finite number") from None
    if type(value) is not kind:
        raise ConfigurationError(
            f"{where}: {name} must be {_KIND_NAMES[kind]}, got {type(value).__name__}"
        )
    return value  # narrowed by the check above


class SettingsTable:
    """A settings file's parsed table, read key by key with each value's type checked.

    ``settings`` is the dataclass whose fields' defaults stand for keys the table does not
    set; ``where`` ("node config PATH") prefixes a message; relative paths are taken
    relative to ``base``, the file's directory."""

    def __init__(
        self, raw: Mapping[str, Any], settings: type[Any], *, where: str, base: Path
    ) -> None:
        self.raw = raw
        self.settings = settings
        self.where = where
        self.base = base

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, kind: type[T]) -> T:
        """The table's value of ``name``, or its field's default, of type ``kind``;
        ``KeyError`` if neither is there (the caller says which setting is missing)."""
        return checked(
            value_or_default(self.raw, self.settings, name), kind, name=name, where=self.where
        )

    def path(self, name: str) -> Path:
        """The file or directory the string ``name`` names, relative to :attr:`base`."""
        p = Path(self.get(name, str))
        return p if p.is_absolute() else self.base / p

    def optional_path(self, name: str) -> Path | None:
        return self.path(name) if name in self.raw else None


def check_float_settings(settings: object) -> None:
    """Refuse a ``float`` field of the ``settings`` dataclass that is NaN or infinite.

    TOML has ``nan`` and ``inf``, and no bound compares false against NaN the way a
    validator expects: ``rate_limit_per_s = nan`` would turn rate limiting off."""
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        if field.type in (float, "float") and not math.isfinite(getattr(settings, field.name)):
            raise ConfigurationError(f"{field.name} must be a finite number")


def check_log_level(level: str) -> None:
    """Refuse a ``log_level`` the logging set-up (core/logs.py) would not know."""
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise ConfigurationError(f"log_level must be one of {', '.join(LOG_LEVELS)}")


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
