"""What a provider reads with, parsed once: capsules and record envelopes.

Each is kept under the exact bytes it was parsed from (an envelope under the SHA-256 of
its blob, worked out here, never taken from a caller). Parsing is deterministic, so a
hit is what parsing those bytes again would give, and there is nothing to invalidate:
a patient's new key, another capsule or a changed blob is other bytes, parsed and
checked afresh. Public keys are kept process-wide by ``core.umbral_codec``, which the
node shares, so they are not kept twice here. Keeping a parse changes none of a read's
checks against the chain (the blob's hash, the envelope's record and capsule), which
``ProviderClient`` makes on every read; a capsule point decompression costs about a
third of a cfrag verification (``benchmarks/sdk_share.py``), and a read used to do three.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final, TypeVar

import umbral_pre as umbral

from clients.sdk.records import parse_envelope
from core.umbral_codec import load_capsule, load_public_key
from proto.kms.v1 import record_pb2

#: entries kept per cache and client, oldest dropped first
CACHE_ENTRIES: Final = 4096

K = TypeVar("K")
V = TypeVar("V")


def cached(cache: dict[K, V], key: K, load: Callable[[K], V | None]) -> V | None:
    """``cache[key]``, loading (and keeping) it on a miss; absent values are not kept."""
    value = cache.get(key)
    if value is None:
        value = load(key)
        if value is not None:
            if len(cache) >= CACHE_ENTRIES:
                cache.pop(next(iter(cache)))  # oldest first: dicts keep insertion order
            cache[key] = value
    return value


class ParsedObjects:
    """One client's parses, each bounded to :data:`CACHE_ENTRIES`. Errors are those of
    parsing (``InvalidRequest``, ``IntegrityError``), and nothing that failed is kept."""

    def __init__(self) -> None:
        self._capsules: dict[bytes, umbral.Capsule] = {}
        self._envelopes: dict[bytes, record_pb2.RecordEnvelope] = {}

    def capsule(self, data: bytes) -> umbral.Capsule:
        return _parsed(self._capsules, bytes(data), load_capsule)

    def public_key(self, data: bytes) -> umbral.PublicKey:
        """Parsed (and kept, bounded) by :func:`core.umbral_codec.load_public_key`."""
        return load_public_key(bytes(data))

    def envelope(self, blob: bytes) -> record_pb2.RecordEnvelope:
        """The envelope stored as ``blob``; callers must not change it (it is shared)."""
        digest = hashlib.sha256(blob).digest()
        return _parsed(self._envelopes, digest, lambda _: parse_envelope(blob))


def _parsed(cache: dict[bytes, V], key: bytes, parse: Callable[[bytes], V]) -> V:
    value = cached(cache, key, parse)
    assert value is not None  # parse raises rather than return nothing
    return value
