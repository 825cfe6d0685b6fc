"""Reads relayed without verification, kept briefly so that an app can report a bad
fragment (ADR 14).

The coordinator relays a read's first ``threshold`` fragments as the nodes sent them;
the app verifies each (it must, to decrypt). For ``KEEP_S`` after the answer the
coordinator keeps what it relayed, under a random read id it gave the app: which node
sent which fragment of which capsule, how to check them, which nodes have seen the
signed request, and how to ask another node. A retry names the read id, so only the
caller that was answered can report on a read, and only once: the read is taken out.

Rules this module follows: pure bookkeeping, time passed in; memory bounded by
``MAX_CAPSULES`` kept capsules (the oldest reads are forgotten first, as expired ones
are); a read id is 16 random bytes, so one cannot be guessed.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from coordinator.admission import Ticket
from coordinator.cfrag_verifier import CfragVerifier
from coordinator.node_connections import NodeClient
from proto.kms.v1 import common_pb2, node_pb2

#: how long a relayed read can be reported on
KEEP_S = 10.0
#: capsules kept at most, over all reads (about 1 KB each): at the cluster's ~150 reads
#: a second, 10 s of single reads is 1,500
MAX_CAPSULES = 50_000
READ_ID_BYTES = 16

#: asks one node for the read's fragments (the signed request as first sent), within a
#: timeout
Ask = Callable[[NodeClient, float], Awaitable[node_pb2.ReencryptBatchResponse]]


@dataclass(frozen=True)
class RelayedCapsule:
    verifier: CfragVerifier
    #: node id -> the fragment relayed from it, in the order relayed
    fragments: Mapping[str, common_pb2.CapsuleFragment]


@dataclass(frozen=True)
class RelayedRead:
    #: the admission ticket of the read: a false report is charged to its requester
    ticket: Ticket
    #: the id of the signed request, for logs
    request_id: str
    #: whose records (the requester is the ticket's): the grant a stale node is found for
    patient: str
    #: record id -> what was relayed for it (capsules that were served only)
    capsules: Mapping[bytes, RelayedCapsule]
    #: every node that was sent the signed request (a node refuses it a second time)
    asked: frozenset[str]
    ask: Ask
    #: the record ids of the read, in request order
    record_ids: tuple[bytes, ...]


class RelayedReads:
    def __init__(self, *, keep_s: float = KEEP_S, max_capsules: int = MAX_CAPSULES) -> None:
        self._keep_s = keep_s
        self._max_capsules = max_capsules
        self._reads: OrderedDict[bytes, tuple[float, RelayedRead]] = OrderedDict()
        self._capsules = 0

    def __len__(self) -> int:
        return len(self._reads)

    @property
    def keep_s(self) -> float:
        return self._keep_s

    def keep(self, read: RelayedRead, now: float) -> bytes:
        """Keep ``read`` until ``now + keep_s``; the read id to give the app."""
        self._forget(now)
        read_id = secrets.token_bytes(READ_ID_BYTES)
        self._reads[read_id] = (now + self._keep_s, read)
        self._capsules += len(read.capsules)
        while self._capsules > self._max_capsules:
            self._pop_oldest()
        return read_id

    def peek(self, read_id: bytes, now: float) -> RelayedRead | None:
        """The read kept under ``read_id``, left kept; None when there is none."""
        self._forget(now)
        kept = self._reads.get(read_id)
        return None if kept is None else kept[1]

    def take(self, read_id: bytes, now: float) -> RelayedRead | None:
        """The read kept under ``read_id`` (taken out: a read is retried once), or None
        when there is none or it has expired."""
        self._forget(now)
        kept = self._reads.pop(read_id, None)
        if kept is None:
            return None
        self._capsules -= len(kept[1].capsules)
        return kept[1]

    def _forget(self, now: float) -> None:
        while self._reads and next(iter(self._reads.values()))[0] <= now:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, (_, read) = self._reads.popitem(last=False)
        self._capsules -= len(read.capsules)
