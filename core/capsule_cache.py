"""Capsules the node has parsed and served, by hash, so that a record's repeated reads
skip the parse (umbral-pre checks a capsule's proof as it parses it: about half the cost
of the re-encryption itself). The node and the coordinator each keep one.

A capsule's hash is anchored on-chain with its record and never changes, so the hash of
the bytes a request carries names the capsule those bytes parse to. Only capsules of
requests the grant allowed are kept: a stranger's capsules are parsed every time and
cannot push the served ones out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

import umbral_pre as umbral

from core.umbral_codec import capsule_hash, load_capsule

DEFAULT_MAX_ENTRIES: Final = 10_000


class CapsuleCache:
    """A bounded map from a capsule's hash to the capsule, least recently used first out."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._capsules: OrderedDict[bytes, umbral.Capsule] = OrderedDict()

    def __len__(self) -> int:
        return len(self._capsules)

    def load(self, data: bytes, field: str = "capsule") -> umbral.Capsule:
        """The capsule ``data`` parses to: from the cache if served before, else parsed
        and checked (``load_capsule``: InvalidRequest naming ``field`` if malformed)."""
        key = capsule_hash(data)
        with self._lock:
            capsule = self._capsules.get(key)
            if capsule is not None:
                self._capsules.move_to_end(key)
                return capsule
        return load_capsule(data, field)

    def remember(self, key: bytes, capsule: umbral.Capsule) -> None:
        """Keep a capsule a request was served for (``key``: its ``capsule_hash``)."""
        if self._max_entries == 0:
            return
        with self._lock:
            self._capsules[key] = capsule
            self._capsules.move_to_end(key)
            while len(self._capsules) > self._max_entries:
                self._capsules.popitem(last=False)
