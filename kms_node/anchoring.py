"""Anchoring the audit log on-chain: each node periodically publishes its latest signed
checkpoint in the registry (``anchorCheckpoint``), from its own Ethereum account, whose key
never leaves its HSM.

An anchor puts the log's state where the node's operator cannot rewrite it: whoever later
holds the log, a checkpoint or a receipt checks it against the anchors with RFC 9162
consistency proofs (section 2.1.4). So the anchorer never anchors a tree that does not extend
the last anchor: if the local log is shorter than the anchored tree, or has another root at
the anchored size, it reports ``audit_log_diverges_from_anchor`` (an error log line and the
``kms_node_audit_log_diverges_from_anchor`` gauge) and anchors nothing more until an operator
has looked; the node keeps serving, its log being fail-closed on its own.

Anchoring runs off the request path, in a background thread of one process per node. A
checkpoint is anchored once ``every_entries`` entries are unanchored, or ``interval_s`` after
the last attempt if any are; chain or HSM trouble is logged, counted and retried
``interval_s`` later. A graceful stop (:meth:`Anchorer.stop`, once the gRPC server takes no
more requests) anchors the entries appended since the last anchor, so that an auditor need
not wait for the node's next start to see them anchored; it waits a bounded time for the
chain, and anchors nothing after a divergence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import structlog

from core.audit import Checkpoint
from core.errors import InvalidRequest, KmsError
from core.eth_tx import sign_transaction
from core.registry_interface import TxSigner
from kms_node import metrics
from kms_node.audit_log import AuditLog
from kms_node.keystore import KeyStore

log = structlog.get_logger("medkms.node.anchoring")

#: the longest the thread sleeps between looks at the log's size
MAX_POLL_INTERVAL_S = 0.5


class HsmTxSigner:
    """The node's Ethereum account as the registry adapter's :class:`TxSigner`: transactions
    are signed by the key store (``sign_eth_digest``), the key never leaves it."""

    def __init__(self, keystore: KeyStore) -> None:
        self._keystore = keystore
        self._address = keystore.eth_address()

    def __repr__(self) -> str:
        return f"HsmTxSigner({self._address})"

    @property
    def address(self) -> str:
        return self._address

    def sign_raw_transaction(self, tx: dict[str, Any]) -> bytes:
        """Raw signed EIP-1559 transaction. web3's ``build_transaction`` names the sender in
        ``from``; it must be this account, and it is not part of what is signed."""
        fields = dict(tx)
        sender = fields.pop("from", None)
        if sender is not None and str(sender).lower() != self._address.lower():
            raise InvalidRequest(f"transaction is from {sender}, this signer is {self._address}")
        return sign_transaction(fields, self._keystore.sign_eth_digest)


class AnchorRegistry(Protocol):
    """What anchoring needs of the registry (:class:`~contracts.registry.RegistryClient`)."""

    def latest_checkpoint(self, node_id: str) -> tuple[int, bytes, int] | None: ...

    def anchor_checkpoint(
        self,
        node: TxSigner,
        *,
        node_id: str,
        tree_size: int,
        root_hash: bytes,
        timestamp: int,
        signature: bytes,
    ) -> str: ...


class AnchorOutcome(StrEnum):
    ANCHORED = "anchored"
    #: the chain already has an anchor of this size or larger
    NOTHING_NEW = "nothing_new"
    #: chain, HSM or log trouble; retried ``interval_s`` later
    FAILED = "failed"
    #: the local log does not extend the last anchor: nothing is anchored
    REFUSED = "refused"


@dataclass(frozen=True)
class Anchored:
    """A checkpoint this process anchored, and what it cost."""

    checkpoint: Checkpoint
    tx_hash: str
    #: checkpoint signature, transaction signature, sending and waiting for the receipt
    seconds: float


@dataclass(frozen=True)
class Divergence:
    """The local log is not an extension of the latest on-chain anchor."""

    anchored_size: int
    local_size: int
    problem: str


class Anchorer:
    """Anchors ``log``'s checkpoints through ``registry``, sent by ``signer`` (the node's
    registered account). :meth:`start` runs it in a thread; :meth:`anchor_once` is one round."""

    def __init__(
        self,
        log: AuditLog,
        registry: AnchorRegistry,
        signer: TxSigner,
        *,
        every_entries: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(every_entries, bool) or not isinstance(every_entries, int):
            raise InvalidRequest("every_entries must be an int")
        if every_entries < 1 or not interval_s > 0:
            raise InvalidRequest("need every_entries >= 1 and interval_s > 0")
        self._log = log
        self._registry = registry
        self._signer = signer
        self._node_id = log.node_id
        self.every_entries = every_entries
        self.interval_s = interval_s
        self._clock = clock
        self._poll_s = min(MAX_POLL_INTERVAL_S, interval_s)
        #: tree size of the latest anchor on-chain, as last read or made (0: none yet)
        self._anchored_size = 0
        self._last_attempt = clock()
        self._retry_at = 0.0
        self.divergence: Divergence | None = None
        self.last_anchored: Anchored | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Anchorer(node_id={self._node_id!r}, signer={self._signer.address})"

    # -- one round ---------------------------------------------------------

    def anchor_once(self) -> AnchorOutcome:
        """Compare the log with the latest anchor and anchor a newer checkpoint if there is
        one. Failures are logged and counted, not raised."""
        self._last_attempt = self._clock()
        try:
            outcome = self._anchor()
        except KmsError as e:
            self._retry_at = self._clock() + self.interval_s
            metrics.AUDIT_ANCHORS.labels(outcome=AnchorOutcome.FAILED).inc()
            log.warning(
                "audit_anchor_failed",
                node_id=self._node_id,
                error=e.message,
                retry_in_s=self.interval_s,
            )
            return AnchorOutcome.FAILED
        if outcome is not AnchorOutcome.NOTHING_NEW:
            metrics.AUDIT_ANCHORS.labels(outcome=outcome).inc()
        return outcome

    def _anchor(self) -> AnchorOutcome:
        if self.divergence is not None:
            return AnchorOutcome.REFUSED
        latest = self._registry.latest_checkpoint(self._node_id)
        self._set_anchored(latest[0] if latest else 0)
        if latest is not None and self._check(latest[0], latest[1]) is not None:
            return AnchorOutcome.REFUSED
        if self._log.size() <= self._anchored_size:
            return AnchorOutcome.NOTHING_NEW
        started = time.perf_counter()
        checkpoint = self._log.checkpoint()
        tx_hash = self._registry.anchor_checkpoint(
            self._signer,
            node_id=self._node_id,
            tree_size=checkpoint.tree_size,
            root_hash=checkpoint.root,
            timestamp=checkpoint.timestamp,
            signature=checkpoint.signature,
        )
        seconds = time.perf_counter() - started
        metrics.AUDIT_ANCHOR_SECONDS.observe(seconds)
        self._set_anchored(checkpoint.tree_size)
        self.last_anchored = Anchored(checkpoint, tx_hash, seconds)
        log.info(
            "audit_anchored",
            node_id=self._node_id,
            tree_size=checkpoint.tree_size,
            tx=tx_hash,
            seconds=round(seconds, 4),
        )
        return AnchorOutcome.ANCHORED

    def _check(self, anchored_size: int, anchored_root: bytes) -> Divergence | None:
        """Is the local log an extension of the anchored tree? The anchor was read first
        and the log only grows, so its size now is at least what it was then."""
        local_size = self._log.size()
        if local_size < anchored_size:
            problem = f"the local log has {local_size} entries, the anchor covers {anchored_size}"
        elif self._log.root(anchored_size) != anchored_root:
            problem = f"the local log's root at size {anchored_size} is not the anchored root"
        else:
            metrics.AUDIT_LOG_DIVERGES.set(0)
            return None
        self.divergence = Divergence(anchored_size, local_size, problem)
        metrics.AUDIT_LOG_DIVERGES.set(1)
        log.error(
            "audit_log_diverges_from_anchor",
            node_id=self._node_id,
            anchored_size=anchored_size,
            local_size=local_size,
            problem=problem,
        )
        return self.divergence

    def _set_anchored(self, size: int) -> None:
        self._anchored_size = size
        metrics.AUDIT_ANCHORED_TREE_SIZE.set(size)

    # -- the thread --------------------------------------------------------

    def due(self) -> bool:
        """Whether a round should run now: unanchored entries, and either enough of them or
        ``interval_s`` since the last attempt; never while diverged or backing off."""
        now = self._clock()  # read at every look, even diverged: tests wait for looks by it
        if self.divergence is not None:
            return False
        if now < self._retry_at:
            return False
        try:
            unanchored = self._log.size() - self._anchored_size
        except KmsError:
            return True  # the round fails, logs why and backs off
        metrics.AUDIT_UNANCHORED_ENTRIES.set(max(unanchored, 0))
        if unanchored <= 0:
            return False
        return unanchored >= self.every_entries or now - self._last_attempt >= self.interval_s

    def start(self) -> None:
        """Run in the background; the first round (the start-up comparison with the chain)
        runs at once."""
        if self._thread is not None:
            raise InvalidRequest("the anchorer is already started")
        self._thread = threading.Thread(target=self._run, name="audit-anchorer", daemon=True)
        self._thread.start()
        log.info(
            "audit_anchorer_started",
            node_id=self._node_id,
            account=self._signer.address,
            every_entries=self.every_entries,
            interval_s=self.interval_s,
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, which first runs one last round if entries were appended since
        the last anchor (never after a divergence). Call it once nothing appends to the log
        any more. Waits at most ``timeout_s``: a chain that is down fails the round (logged
        as any failed round), one that does not answer is left behind, logged, and the
        entries are anchored at the next start."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning("audit_anchorer_stop_timed_out", node_id=self._node_id, timeout_s=timeout_s)

    def _run(self) -> None:
        self._round()
        while not self._stop.wait(self._poll_s):
            if self.due():
                self._round()
        # Stopping: one last round whatever the schedule or back-off, if there is anything
        # to anchor; stop() bounds how long it is waited for.
        if self.divergence is None and self._unanchored_at_stop():
            self._round()

    def _unanchored_at_stop(self) -> bool:
        """Whether the log has entries the last anchor does not cover; a log that cannot be
        read says yes, so that the round runs, fails and logs why."""
        try:
            return self._log.size() > self._anchored_size
        except KmsError:
            return True

    def _round(self) -> None:
        try:
            self.anchor_once()
        except Exception:  # noqa: BLE001 - a bug here must not end anchoring for good
            self._retry_at = self._clock() + self.interval_s
            metrics.AUDIT_ANCHORS.labels(outcome=AnchorOutcome.FAILED).inc()
            log.exception("audit_anchor_crashed", node_id=self._node_id)


def anchors_here(enabled: bool, worker: int | None) -> bool:
    """Whether this server process anchors: one per node (the only process, or worker 0),
    so that two processes never race to send the node's transactions."""
    return enabled and not worker
