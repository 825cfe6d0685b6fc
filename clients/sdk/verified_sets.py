"""The kfrag sets a provider has verified fragments of, so that later reads of them may
open a record with the fragments as relayed (ADR 19).

A set is named by its precursor, which every fragment of the set carries and the
patient signs into each kfrag (with her delegating key and the grantee's key): once a
fragment of a set has passed ``CapsuleFrag.verify`` against the patient's registered
keys and this app's key, the set is the patient's delegation to this app. Fragments
under a precursor kept here cannot be forged to pass umbral's check without the shared
secret only the app can compute for it, so combining them unverified is safe; fragments
under any other precursor (one an attacker made up, for which it can compute that
secret) are verified one by one first, as before.

Each client keeps its own sets (its receiving key is fixed), bounded, oldest dropped.
"""

from __future__ import annotations

from typing import Final

#: kfrag sets kept per client: one per (patient, record type, grant) the app reads;
#: about 200 bytes each, so under a megabyte when full
KEPT_SETS: Final = 4096


class VerifiedSets:
    """(delegating key, verifying key, precursor) triples whose fragments this client
    verified and combined."""

    def __init__(self, limit: int = KEPT_SETS) -> None:
        self._limit = limit
        self._sets: dict[tuple[bytes, bytes, bytes], None] = {}

    def knows(self, delegating_key: bytes, verifying_key: bytes, precursor: bytes) -> bool:
        return (delegating_key, verifying_key, precursor) in self._sets

    def remember(self, delegating_key: bytes, verifying_key: bytes, precursor: bytes) -> None:
        key = (bytes(delegating_key), bytes(verifying_key), bytes(precursor))
        self._sets.pop(key, None)  # kept as the newest
        if len(self._sets) >= self._limit:
            self._sets.pop(next(iter(self._sets)))  # oldest first: dicts keep insertion order
        self._sets[key] = None

    def __len__(self) -> int:
        return len(self._sets)
