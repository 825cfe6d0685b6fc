"""What the auditor finds in one node's log: problems, warnings, the per-entry results, the
node's report, and the prefix a passing audit verified for the next one. Pure, no I/O.

The checks (core/audit_log_checks.py, core/audit_anchor_checks.py, core/audit_decisions.py)
add what they find to a :class:`Findings`; :func:`core.audit_verify.verify_node` turns it
into a :class:`NodeReport`. Problems are values, not exceptions (ADR 5).

A read that failed in transit (a deadline, a dropped connection: see
:func:`core.audit_sources.failed_in_transit`) is not a problem: it is no evidence about the
log. It is kept apart, as a reason the node "could not be read", and the audit of that node
stops there, so that what was not read is never reported as missing (only the anchors are
still compared with the entries served before it: that asks nothing more of the node).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from core import merkle
from core.audit import GRANTED, AuditEntry, Checkpoint, verify_checkpoint
from core.errors import InvalidRequest


class Verdict(StrEnum):
    """What an audit concludes of one node."""

    #: every check passed
    PASSED = "passed"
    #: a check failed: the log, a signature or a decision is not what it should be
    FAILED = "failed"
    #: no check failed, but a read failed in transit: the audit of this node is incomplete
    COULD_NOT_READ = "could not read"


class Check(StrEnum):
    """Which check a problem comes from."""

    #: the node or the chain did not answer
    REACHABLE = "reachable"
    #: the checkpoint is signed by the registered key, for this node
    CHECKPOINT = "checkpoint"
    #: entries are served in order, none missing, none beyond the checkpoint
    SEQUENCE = "sequence"
    #: an entry is a canonical audit entry of this node
    FORMAT = "format"
    #: an entry is the one the signed checkpoint holds at its index
    INCLUSION = "inclusion"
    #: an entry is the one a receipt the node signed vouches for
    RECEIPT = "receipt"
    #: anchors verify and the log (and the node's tree) extends each of them
    ANCHOR = "anchor"
    #: an entry below an anchor's size was written after that anchor
    REWRITTEN = "rewritten"
    #: an entry's block hash is the chain's
    BLOCK = "block"
    #: the grant state at the entry's block allowed what the entry says was granted
    POLICY = "policy"


@dataclass(frozen=True)
class Problem:
    """One failed check, of one entry (``leaf_index``) or of the whole log (None)."""

    check: Check
    message: str
    leaf_index: int | None = None
    #: False when it follows from another problem, e.g. the node cannot prove an entry
    #: whose sibling was deleted; a node's first failure is its first primary one
    primary: bool = True


@dataclass(frozen=True, slots=True)  # slots: one per entry of every audited log
class EntryResult:
    """One leaf of the log as served, or a placeholder for missing ones."""

    leaf_index: int
    #: the parsed entry; None when the bytes are not a valid entry or the entry is missing
    entry: AuditEntry | None
    #: the entry's request id, read leniently when the entry does not parse; "" if unknown
    request_id: str
    problems: tuple[Problem, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class NodeReport:
    node_id: str
    #: the checkpoint the log was checked against; None if the node served none
    checkpoint: Checkpoint | None
    #: every leaf in order, plus one placeholder at the start of each missing range
    entries: tuple[EntryResult, ...]
    #: anchors found on-chain whose signature verified and that were compared with the log
    anchors_checked: int
    #: every problem, of entries and of the log
    problems: tuple[Problem, ...]
    warnings: tuple[str, ...]
    #: the first entry read: 0, or the end of the prefix an earlier audit verified
    start: int = 0
    #: the tree size and block of the newest anchor whose signature verified (the block
    #: may be an earlier audit's, see ``start``); 0 and 0 when there is none
    anchored_size: int = 0
    anchored_block: int = 0
    #: what this audit verified, for the next one to start from (None unless every check
    #: passed, decisions included, against a signed checkpoint)
    verified: VerifiedPrefix | None = None
    #: why the audit of this node stopped short: reads that failed in transit (not problems)
    could_not_read: tuple[str, ...] = ()

    @property
    def verdict(self) -> Verdict:
        """Failed on any problem; else could not read on a failed read; else passed."""
        if self.problems:
            return Verdict.FAILED
        return Verdict.COULD_NOT_READ if self.could_not_read else Verdict.PASSED

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.PASSED

    @property
    def granted(self) -> int:
        return sum(1 for r in self.entries if r.entry is not None and r.entry.decision == GRANTED)

    @property
    def denied(self) -> int:
        return sum(1 for r in self.entries if r.entry is not None and r.entry.decision != GRANTED)

    @property
    def failed_entries(self) -> int:
        return sum(1 for r in self.entries if not r.ok)

    def first_failure(self) -> Problem | None:
        """The earliest entry with a primary problem; else any entry's; else the log's."""
        by_entry = [p for p in self.problems if p.leaf_index is not None]
        for candidates in ([p for p in by_entry if p.primary], by_entry):
            if candidates:
                return min(candidates, key=lambda p: p.leaf_index or 0)
        return self.problems[0] if self.problems else None

    def request_id(self, leaf_index: int) -> str:
        """The request id of the first entry at ``leaf_index``; "" if there is none."""
        return self._request_ids.get(leaf_index, "")

    @cached_property
    def _request_ids(self) -> dict[int, str]:
        """Each leaf's request id (the first entry's, where a node served one twice),
        indexed once: a failing audit names the request of every problem."""
        ids: dict[int, str] = {}
        for result in self.entries:
            ids.setdefault(result.leaf_index, result.request_id)
        return ids

    def describe(self, problem: Problem) -> str:
        """``entry 17 (request abc): message``, or the message of a log-wide problem."""
        if problem.leaf_index is None:
            return problem.message
        request_id = self.request_id(problem.leaf_index)
        who = f" (request {request_id})" if request_id else ""
        return f"entry {problem.leaf_index}{who}: {problem.message}"


@dataclass(frozen=True)
class VerifiedPrefix:
    """What an audit established of a node's log, for the next one to start from: the
    first ``checkpoint.tree_size`` entries passed every check against ``checkpoint`` (signed
    by the node), ``frontier`` is their compact range (from which the root of any extension
    follows without them), and the anchors up to block ``anchor_block`` were checked. Nothing
    signs ``anchor_block``: the next audit trusts it only as far as the chain bears it out
    (core/audit_anchor_checks.py).

    An incremental audit (:func:`core.audit_verify.verify_node` with ``since``) checks that
    the node's current tree extends this prefix (a consistency proof) and reads only the
    entries after it. It relies on the tree: stored entry bytes below the prefix that were
    altered without the node's tree are found by a full audit only.
    """

    checkpoint: Checkpoint
    frontier: tuple[bytes, ...]
    anchor_block: int = 0

    def __post_init__(self) -> None:
        tree = merkle.CompactRange(self.checkpoint.tree_size, tuple(self.frontier))
        if tree.root() != self.checkpoint.root:
            raise InvalidRequest("the verified prefix's frontier does not have its root")
        if self.anchor_block < 0:
            raise InvalidRequest("anchor_block must not be negative")

    @property
    def node_id(self) -> str:
        return self.checkpoint.node_id

    @property
    def tree_size(self) -> int:
        return self.checkpoint.tree_size

    def compact_range(self) -> merkle.CompactRange:
        return merkle.CompactRange(self.tree_size, tuple(self.frontier))

    def to_json(self) -> dict[str, object]:
        c = self.checkpoint
        return {
            "node_id": c.node_id,
            "tree_size": c.tree_size,
            "root": c.root.hex(),
            "timestamp": c.timestamp,
            "signature": c.signature.hex(),
            "frontier": [h.hex() for h in self.frontier],
            "anchor_block": self.anchor_block,
        }

    @classmethod
    def from_json(cls, data: object, key: bytes) -> VerifiedPrefix:
        """Parse :meth:`to_json`; the checkpoint must verify with the node's ``key``, so a
        state file cannot vouch for a log the node never signed."""
        try:
            if not isinstance(data, dict):
                raise TypeError
            checkpoint = Checkpoint(
                node_id=data["node_id"],
                tree_size=int(data["tree_size"]),
                root=bytes.fromhex(data["root"]),
                timestamp=int(data["timestamp"]),
                signature=bytes.fromhex(data["signature"]),
            )
            prefix = cls(
                checkpoint,
                tuple(bytes.fromhex(h) for h in data["frontier"]),
                int(data.get("anchor_block", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InvalidRequest("not a verified prefix (an earlier audit's state)") from None
        if not verify_checkpoint(checkpoint, key):
            raise InvalidRequest(
                f"the verified prefix of {checkpoint.node_id} is not signed by the node's "
                "registered key"
            )
        return prefix


class Findings:
    """What one audit of one node has found so far, added to by each check in turn."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        #: of the whole log
        self.warnings: list[str] = []
        self.entry_problems: dict[int, list[Problem]] = {}
        self.entry_warnings: dict[int, list[str]] = {}
        #: reads that failed in transit; once there is one, the node's audit stops
        self.could_not_read: list[str] = []

    def cannot_read(self, message: str) -> None:
        """A read failed in transit: the node could not be read (no evidence of tampering)."""
        self.could_not_read.append(message)

    def fail(
        self, check: Check, message: str, index: int | None = None, *, primary: bool = True
    ) -> None:
        """A problem of entry ``index``, or of the whole log (None)."""
        problem = Problem(check, message, index, primary)
        self.problems.append(problem)
        if index is not None:
            self.entry_problems.setdefault(index, []).append(problem)

    def warn(self, message: str, index: int | None = None) -> None:
        """A warning of entry ``index``, or of the whole log (None)."""
        if index is None:
            self.warnings.append(message)
        else:
            self.entry_warnings.setdefault(index, []).append(message)

    def named_before(self, end: int) -> bool:
        """Whether an entry below ``end`` already has a primary problem."""
        return any(p.primary for i, ps in self.entry_problems.items() if i < end for p in ps)
