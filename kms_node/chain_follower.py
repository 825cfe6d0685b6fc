"""Keeps a node's grant index in step with the chain, and says whether it is
fresh enough to judge by.

A background thread polls the head, fetches the registry's events since the
last block applied, and applies them. Judging uses the index only while the
last successful sync is younger than ``max_age_s`` and the index is at most
``max_lag_blocks`` behind the head seen then; otherwise the node refuses with
UNAVAILABLE (fails closed) rather than judge by stale grants. A reorg (the
block the index reflects is no longer canonical) rebuilds the index.

With ``confirmations = k`` the index follows the block ``k`` below the head
(ADR 12): a grant, and also a revocation, counts only once ``k`` blocks deep.
The freshness bound is then measured against that confirmed head.
:class:`ConfirmedRegistry` makes the node's other judging read (a refusal
confirmed against the chain) at the same depth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from core.errors import ChainAnswerTooLarge, KmsError, Unavailable
from core.event_ranges import EventLog, EventRanges
from core.grant_index import GrantIndex
from core.registry_interface import RegistryReader
from core.registry_types import (
    AccessState,
    BlockRef,
    EmergencyOptIn,
    GrantInfo,
    PatientInfo,
    RegistryEvent,
)
from kms_node import heap, metrics

log = structlog.get_logger("medkms.node.chain")

#: a sync that applies this many events gives the C heap's free memory back afterwards
#: (the answers it parsed, freed: ``kms_node/heap.py``); a routine poll applies a few
RELEASE_MEMORY_AFTER_EVENTS = 10_000


class EventSource(EventLog, Protocol):
    def block(self, identifier: int | str = "latest") -> BlockRef: ...


class ChainFollower:
    def __init__(
        self,
        source: EventSource,
        *,
        start_block: int = 0,
        poll_interval_s: float = 0.2,
        max_age_s: float = 2.0,
        max_lag_blocks: int = 2,
        confirmations: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_events: Callable[[list[RegistryEvent]], None] | None = None,
        index: GrantIndex | None = None,
    ) -> None:
        """``index``: where to start from instead of ``start_block`` (a snapshot the node
        saved, ``kms_node/index_snapshot.py``): only the events after its block are read."""
        self._source = source
        self._start_block = start_block
        self._poll_interval_s = poll_interval_s
        self.max_age_s = max_age_s
        self.max_lag_blocks = max_lag_blocks
        if confirmations < 0:
            raise ValueError("confirmations must be >= 0")
        #: the index reflects the block this far below the head (0: the head itself)
        self.confirmations = confirmations
        self._clock = clock
        #: called with each applied batch of events (to shred revoked kfrags); if it
        #: raises, the batch is handed over again at the start of each sync until it is
        #: handled, and consistent_index gives nothing meanwhile
        self.on_events = on_events
        self._unhanded: list[RegistryEvent] = []
        self.index = index if index is not None else GrantIndex()
        #: held while a sync applies events and hands them to ``on_events``
        self._sync_lock = threading.Lock()
        #: the blocks each eth_getLogs asks for, halved when the endpoint refuses a range
        self._ranges = EventRanges(source, on_halved=_log_halved)
        self._synced_at: float | None = None
        #: why the last background sync failed, while it is the latest word on the chain
        self._last_failure: str | None = None
        self._head_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- syncing -----------------------------------------------------------

    def sync_once(self) -> None:
        """Bring the index up to the confirmed head, the head less ``confirmations``
        blocks (raises on chain trouble)."""
        with self._sync_lock:
            self._sync()

    def consistent_index(self) -> GrantIndex | None:
        """A copy of the index between two syncs (every applied event also handed to
        ``on_events``), or None before the first sync or while an event waits."""
        with self._sync_lock:
            if self.index.block is None or self._unhanded:
                return None  # a snapshot must not hold a revocation not yet shredded
            return self.index.copy()

    def _sync(self) -> None:
        head = self._source.block("latest")
        if self.confirmations:
            head = self._source.block(max(0, head.number - self.confirmations))
        current = self.index.block
        if current is not None and self._reorged(current, head):
            log.warning("chain_reorg", index_block=current.number, head=head.number)
            self.index = GrantIndex()
            current = None
        # Events applied but not handed over (their shredding failed) go first: the
        # index is past them, so no later read of the chain would bring them back.
        self._hand_over([])
        start = self._start_block if current is None else current.number + 1
        index = self.index
        if head.number - start + 1 > self._ranges.range_blocks:
            # A long catch-up: the index is knowingly behind until it finishes. (A
            # routine poll publishes the head only once applied, so the blocks
            # mined since the last poll do not count as lag.)
            self._head_seen = head.number
        applied = 0
        for end, events in self._ranges.read(start, head.number):
            through = head if end == head.number else self._source.block(end)
            index.apply(events, through)
            self._hand_over(events)
            applied += len(events)
        if applied >= RELEASE_MEMORY_AFTER_EVENTS:
            heap.release_free_memory()
        if index.block is None or index.block.number < head.number:
            index.apply([], head)
        self._head_seen = head.number
        self._synced_at = self._clock()
        metrics.CHAIN_INDEX_BLOCK.set(head.number)

    def _hand_over(self, events: list[RegistryEvent]) -> None:
        """Hand ``events``, after any still waiting, to ``on_events``; if it raises they
        all wait for the next sync (which raises again until they are handled)."""
        self._unhanded += events
        if self._unhanded and self.on_events is not None:
            self.on_events(self._unhanded)
        self._unhanded = []

    def _reorged(self, current: BlockRef, head: BlockRef) -> bool:
        """Is the block the index reflects no longer canonical? Costs a call only
        when the head has moved on."""
        if head.number < current.number:
            return True
        if head.number == current.number:
            return head.hash != current.hash
        return self._source.block(current.number).hash != current.hash

    def start(self) -> None:
        """Sync once (so the node starts with current state), then follow in the background."""
        self.sync_once()
        self._thread = threading.Thread(target=self._run, name="chain-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            try:
                self.sync_once()
                self._last_failure = None
            except KmsError as e:
                self._failed(e.message)
            except Exception as e:  # noqa: BLE001 - a bug here must not end following for good
                # The adapter translates what the chain answers; anything else is a bug, and
                # the index then only goes stale (fails closed) while this says why.
                self._failed(f"unexpected {type(e).__name__}")
                log.exception("chain_sync_crashed")

    def _failed(self, why: str) -> None:
        metrics.CHAIN_SYNC_FAILURES.inc()
        self._last_failure = why
        log.warning("chain_sync_failed", error=why)

    # -- judging -----------------------------------------------------------

    def staleness(self) -> str | None:
        """Why the index may not be used now, or None if it is fresh enough."""
        if self._synced_at is None or self.index.block is None:
            return "the node has not synced the registry yet"
        age = self._clock() - self._synced_at
        if age > self.max_age_s:
            why = f": {self._last_failure}" if self._last_failure else ""
            return f"last chain sync was {age:.1f}s ago (bound {self.max_age_s:g}s){why}"
        lag = self._head_seen - self.index.block.number
        if lag > self.max_lag_blocks:
            return f"registry index is {lag} blocks behind (bound {self.max_lag_blocks})"
        return None

    def is_registered(self, address: str) -> bool:
        """Has the patient registered? (A registration is never undone, so a yes needs no
        freshness bound; a no may be a registration mined since the last sync.)"""
        return self.index.is_registered(address)

    def index_block(self) -> int:
        return self.index.block.number if self.index.block is not None else 0

    def access_state(self, record_id: bytes, grantee: str, capsule_hash: bytes) -> AccessState:
        problem = self.staleness()
        if problem is not None:
            raise Unavailable(f"cannot judge grants on stale chain state: {problem}")
        return self.index.access_state(record_id, grantee, capsule_hash)


def _log_halved(blocks: int, error: ChainAnswerTooLarge) -> None:
    log.info("chain_log_chunk_halved", blocks=blocks, error=error.message)


class ConfirmedRegistry:
    """The registry's judging views (``GrantReader``) as a node with ``confirmations = k``
    reads them. Judging (:meth:`access_state`, for a refusal confirmed against the chain)
    reads at the head less ``k`` blocks, the depth the grant index follows, so that no
    read serves a grant or ignores a revocation the index would not count yet; each such
    read costs one more call, for the head.

    Enrollment's reads (the patient's keys, the grant or opt-in a kfrag is for) stay at
    the head: storing a kfrag serves nothing, since every read is judged at depth, and a
    grant's kfrags can then be delivered as soon as it is mined (ADR 12)."""

    def __init__(self, registry: RegistryReader, confirmations: int) -> None:
        if confirmations < 1:
            raise ValueError("ConfirmedRegistry needs confirmations >= 1; use the registry")
        self._registry = registry
        self.confirmations = confirmations

    def block(self, identifier: int | str = "latest") -> BlockRef:
        return self._registry.block(identifier)

    def get_patient(self, address: str) -> PatientInfo | None:
        return self._registry.get_patient(address)

    def get_grant(
        self, patient: str, grantee: str, *, block: int | None = None
    ) -> GrantInfo | None:
        return self._registry.get_grant(patient, grantee, block=block)

    def get_emergency_opt_in(self, patient: str, responder: str) -> EmergencyOptIn | None:
        return self._registry.get_emergency_opt_in(patient, responder)

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState:
        if block is None:
            head, _ = self._registry.latest_block()
            block = max(0, head - self.confirmations)
        return self._registry.access_state(record_id, grantee, capsule_hash, block=block)
