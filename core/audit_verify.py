"""Auditing one node's log against the chain: the auditor's workflow. Pure, no I/O.

The auditor trusts the chain and nothing the node says about itself: the node's signing
key is the one registered on-chain (:class:`~core.registry_types.NodeInfo`), the
anchors are the node's checkpoints as the chain recorded them, and each granted entry is
judged again against the grant state at the entry's block. What it reads comes through two
small interfaces, :class:`LogSource` (the node's ``kms.v1.Audit`` service) and
:class:`ChainView` (the registry); their implementations do the I/O and raise only
:class:`~core.errors.KmsError`, which this module turns into findings.

:func:`verify_node` runs, in this order:

1. Read the node's anchors, *then* its checkpoint. The log only grows, so every anchor read
   first is covered by the checkpoint read after it; an anchor larger than the checkpoint
   means the log shrank.
2. The checkpoint's signature, with the registered key.
3. Every entry ``[0, tree_size)``, streamed: in order, none missing, canonical, this node's.
4. Inclusion: the Merkle root of the served entries is the checkpoint's root, which shows
   every entry at its index in the signed tree at once (RFC 9162 2.1.1: the root commits
   to every leaf and its position). Only when it is not does the auditor ask the node for
   each entry's inclusion proof (RFC 9162 2.1.3.2), to name the entries the signed tree does
   not hold.
5. Receipts the caller holds (optional): each signed by the registered key, each entry
   present with the hash the receipt vouches for.
6. Anchors: each anchor's signature; the root of the first ``s`` served entries is the root
   anchored at size ``s``; the node's consistency proofs (RFC 9162 2.1.4.2) between
   successive anchors and from the last anchor to the checkpoint. Where the log differs
   from an anchor, the first entry below the anchor's size written *after* the anchored
   checkpoint was signed names where history was rewritten (truncated and re-appended).
7. Each entry's block hash is the chain's at its block number; each granted entry was
   allowed by the grant state at that block (:func:`rejudge`). Denials are not failures;
   one the chain state does not explain is a warning.

Incremental audits: a run that passed returns what it verified (:class:`VerifiedPrefix`);
given to the next run, step 3 reads only the entries after it, once the node's consistency
proof shows its tree extends it (steps 4 to 7 then cover the new entries and new anchors).

What can be named, and what cannot. A tamperer who edits stored entries but not the node's
Merkle state (the stored leaf hashes and subtree roots the node signs from) leaves the
signed checkpoint committing to the original log: each altered, swapped or deleted entry is
then named exactly. One who also rewrites a stored leaf hash makes that entry and its
sibling indistinguishable (both are named). One who rebuilds the whole tree gets the node to
sign the rewritten log; only anchors (and receipts) show it: anchors bound the rewritten range,
the entries' times name a truncation, and receipts name an altered entry exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, Protocol

from core import bounded_json, merkle
from core.audit import (
    GRANTED,
    MAX_ENTRY_BYTES,
    AuditEntry,
    Checkpoint,
    Receipt,
    verify_checkpoint,
    verify_checkpoint_consistency,
    verify_receipt,
)
from core.errors import InvalidRequest, KmsError
from core.policy import POLICY_DENIALS, Reason, judge
from core.record_types import RecordType
from core.registry_types import AccessState, BlockRef, CheckpointAnchor, NodeInfo

#: denials a version 1 entry cannot be judged on: it did not record what they compare
_UNRECORDED_DENIALS: Final = frozenset({Reason.RECORD_TYPE_MISMATCH, Reason.RECEIVING_KEY_MISMATCH})


# --- what the auditor reads --------------------------------------------------------------


class LogSource(Protocol):
    """One node's audit service (the node's ``AuditLog`` is one, in process). Implementations
    raise only :class:`KmsError`."""

    def checkpoint(self) -> Checkpoint: ...

    def entries(self, start: int, end: int, /) -> Iterable[tuple[int, bytes]]:
        """``(leaf_index, canonical entry bytes)`` rows for ``[start, end)`` as served."""
        ...

    def inclusion_proof(self, leaf_index: int, tree_size: int, /) -> Sequence[bytes]: ...

    def consistency_proof(self, old_size: int, new_size: int, /) -> Sequence[bytes]: ...


class ChainView(Protocol):
    """What the auditor reads from the registry (``RegistryClient`` is one)."""

    def checkpoint_anchors(self, node_id: str, /) -> Sequence[CheckpointAnchor]: ...

    def block(self, number: int, /) -> BlockRef: ...

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int
    ) -> AccessState: ...


# --- what the auditor finds --------------------------------------------------------------


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


@dataclass(frozen=True)
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
    #: what this audit verified, for the next one to start from (None unless every check
    #: passed, decisions included, against a signed checkpoint)
    verified: VerifiedPrefix | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

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
        for result in self.entries:
            if result.leaf_index == leaf_index:
                return result.request_id
        return ""

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
    follows without them), and the anchors up to block ``anchor_block`` were checked.

    An incremental audit (:func:`verify_node` with ``since``) checks that the node's current
    tree extends this prefix (a consistency proof) and reads only the entries after it. It
    relies on the tree: stored entry bytes below the prefix that were altered without the
    node's tree are found by a full audit only.
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


# --- re-judging a decision ---------------------------------------------------------------


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _RecordedRequest:
    """The request an audit entry recorded, as the policy reads it (core/policy.Request)."""

    record_id: bytes
    patient: str
    capsule_hash: bytes
    record_type: RecordType
    requester_umbral_key: bytes
    purpose_of_use: str


def rejudge(
    entry: AuditEntry, state: AccessState, *, wall_clock: int | None = None
) -> tuple[Reason, str]:
    """What the registry state at the entry's block says of the entry's request: the reason
    code :func:`core.policy.judge` gives it (``Reason.GRANTED`` if allowed) and why.

    The node's own rules, by the same function. A version 1 entry did not record the
    request's record type and receiving key: the record's type and the grant's key stand in
    for them, so those two rules are not judged again. Expiry is judged at the block's time
    and at ``wall_clock`` (default: the entry's time, the node's wall clock when it wrote
    the entry), as the node does.
    """
    record, grant = state.record, state.grant
    if entry.record_type is not None and entry.requester_umbral_key is not None:
        record_type, key = entry.record_type, entry.requester_umbral_key
    else:
        # (When there is no record or no grant, judge refuses before it reads these.)
        record_type = record.record_type if record is not None else RecordType(0)
        key = grant.grantee_umbral_key if grant is not None else b""
    request = _RecordedRequest(
        entry.record_id,
        entry.patient,
        entry.capsule_hash,
        record_type,
        key,
        entry.purpose_of_use,
    )
    decision = judge(request, state, entry.time if wall_clock is None else wall_clock)
    return decision.code, f"at block {state.block_number}: {decision.reason}"


# --- verifying one node ------------------------------------------------------------------


def verify_node(
    node: NodeInfo,
    log: LogSource,
    chain: ChainView,
    *,
    receipts: Iterable[Receipt] = (),
    rejudge_decisions: bool = True,
    since: VerifiedPrefix | None = None,
) -> NodeReport:
    """Check ``node``'s log as served by ``log`` against the chain (see the module doc).

    ``receipts`` are receipts the caller holds (of any node; others' are ignored).
    ``rejudge_decisions=False`` skips step 7's grant checks (block hashes are still
    checked), e.g. for an export that needs only the log's integrity.

    ``since``, what an earlier audit of this node verified (``NodeReport.verified``), makes
    the audit incremental: the node's tree must extend that prefix (its consistency proof,
    RFC 9162 2.1.4), and only the entries after it are read and checked; receipts for
    entries before it are checked with the node's inclusion proofs; anchors checked then are
    not checked again.
    """
    return _Audit(node, log, chain, since).run(list(receipts), rejudge_decisions)


#: how deep an entry that does not parse may nest for its request id still to be read
_LENIENT_ENTRY_DEPTH: Final = 8


def _lenient_request_id(data: bytes) -> str:
    """The request id of an entry that does not parse, if its JSON still names one; the
    node serves these bytes, so they are read within an entry's bounds or not at all."""
    try:
        fields = bounded_json.loads_object(
            data, max_bytes=MAX_ENTRY_BYTES, max_depth=_LENIENT_ENTRY_DEPTH, what="audit entry"
        )
    except InvalidRequest:
        return ""
    value = fields.get("request_id")
    return value[:128] if isinstance(value, str) and value.isprintable() else ""


class _Audit:
    """One run of :func:`verify_node`; collects problems as it goes."""

    def __init__(
        self, node: NodeInfo, log: LogSource, chain: ChainView, since: VerifiedPrefix | None
    ) -> None:
        if since is not None and since.node_id != node.node_id:
            raise InvalidRequest(
                f"the verified prefix is of node {since.node_id!r}, not {node.node_id!r}"
            )
        self.since = since
        #: the first entry read: the end of the verified prefix, or 0
        self.start = since.tree_size if since is not None else 0
        self.base = since.compact_range() if since is not None else merkle.CompactRange()
        self.anchor_block = since.anchor_block if since is not None else 0
        self.rejudged = False
        self.node_id = node.node_id
        self.key = node.signing_public_key
        self.log = log
        self.chain = chain
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.entry_problems: dict[int, list[Problem]] = {}
        self.entry_warnings: dict[int, list[str]] = {}
        #: leaf index -> served bytes, parsed entry (None if invalid), leaf hash
        self.data: dict[int, bytes] = {}
        self.parsed: dict[int, AuditEntry | None] = {}
        self.leaves: dict[int, bytes] = {}
        #: first index of each missing range -> its end
        self.missing: dict[int, int] = {}
        self.anchors_checked = 0

    def fail(
        self, check: Check, message: str, index: int | None = None, *, primary: bool = True
    ) -> None:
        problem = Problem(check, message, index, primary)
        self.problems.append(problem)
        if index is not None:
            self.entry_problems.setdefault(index, []).append(problem)

    def run(self, receipts: list[Receipt], rejudge_decisions: bool) -> NodeReport:
        anchors = self._read_anchors()
        checkpoint = self._read_checkpoint()
        signed = False
        if checkpoint is not None:
            signed = self._check_checkpoint(checkpoint)
            if self.since is None or self._extends_prefix(checkpoint):
                self._read_entries(checkpoint.tree_size)
                if signed:
                    self._check_inclusion(checkpoint)
                self._check_receipts(receipts, checkpoint)
                self._check_anchors(anchors, checkpoint, signed)
                self._check_chain(rejudge_decisions)
                self.rejudged = rejudge_decisions
        return self._report(checkpoint, signed)

    def _extends_prefix(self, checkpoint: Checkpoint) -> bool:
        """Whether the node's tree extends the prefix an earlier audit verified."""
        assert self.since is not None
        prefix, size = self.since.checkpoint, checkpoint.tree_size
        earlier = (
            f"the {prefix.tree_size} entries an earlier audit verified (checkpoint of "
            f"{_iso(prefix.timestamp)})"
        )
        if size < prefix.tree_size:
            self.fail(
                Check.ANCHOR,
                f"missing: the log has {size} entries, fewer than {earlier}: the log was "
                "truncated; a full audit names where",
                size,
            )
            return False
        if size == prefix.tree_size:
            problems = []
            if checkpoint.root != prefix.root:
                problems.append(f"the node's checkpoint of {size} entries has another root")
        else:
            problems = self._consistency(prefix, checkpoint, "the verified prefix and now")
        if problems:
            self.fail(
                Check.ANCHOR,
                f"{problems[0]}: the log does not extend {earlier}; a full audit names where "
                "it was rewritten",
            )
            return False
        return True

    # 1. -----------------------------------------------------------------------------------

    def _read_anchors(self) -> list[CheckpointAnchor]:
        try:
            anchors = list(self.chain.checkpoint_anchors(self.node_id))
        except KmsError as e:
            self.fail(Check.REACHABLE, f"cannot read the node's anchors on-chain: {e.message}")
            return []
        if not anchors:
            self.warnings.append(
                "no on-chain anchor yet: the log is checked against the node's own "
                "checkpoint only, which a node that rewrote its log would sign too"
            )
        return anchors

    def _read_checkpoint(self) -> Checkpoint | None:
        try:
            return self.log.checkpoint()
        except KmsError as e:
            self.fail(Check.REACHABLE, f"the node did not serve its checkpoint: {e.message}")
            return None

    # 2. -----------------------------------------------------------------------------------

    def _check_checkpoint(self, checkpoint: Checkpoint) -> bool:
        if checkpoint.node_id != self.node_id:
            self.fail(Check.CHECKPOINT, f"the checkpoint is of node {checkpoint.node_id!r}")
            return False
        if not verify_checkpoint(checkpoint, self.key):
            self.fail(
                Check.CHECKPOINT,
                f"the checkpoint of {checkpoint.tree_size} entries does not verify with the "
                "signing key registered on-chain for this node",
            )
            return False
        return True

    # 3. -----------------------------------------------------------------------------------

    def _read_entries(self, size: int) -> None:
        expected = self.start
        try:
            for index, data in self.log.entries(self.start, size):
                if index >= size:
                    self.fail(
                        Check.SEQUENCE,
                        f"the node served entry {index}, beyond its checkpoint of {size}",
                    )
                    continue
                if index < expected:
                    self.fail(
                        Check.SEQUENCE,
                        f"served again or out of order, after entry {expected - 1}",
                        index,
                    )
                    continue
                if index > expected:
                    self._missing(expected, index, f"next the node serves entry {index}")
                expected = index + 1
                self._take(index, data)
        except KmsError as e:
            self.fail(
                Check.REACHABLE,
                f"the node stopped serving entries at entry {expected}: {e.message}",
            )
        if expected < size:
            self._missing(expected, size, f"the checkpoint covers {size} entries")

    def _missing(self, start: int, end: int, why: str) -> None:
        self.missing[start] = end
        span = f"entries {start} to {end - 1} are" if end - start > 1 else "the entry is"
        before = self.parsed.get(start - 1)
        after = f" after request {before.request_id}" if before is not None else ""
        self.fail(Check.SEQUENCE, f"missing: {span} not served{after} ({why})", start)

    def _take(self, index: int, data: bytes) -> None:
        self.data[index] = data
        self.leaves[index] = merkle.leaf_hash(data)
        try:
            entry: AuditEntry | None = AuditEntry.from_canonical(data)
        except InvalidRequest as e:
            entry = None
            self.fail(Check.FORMAT, f"not a valid audit entry: {e.message}", index)
        if entry is not None and entry.node_id != self.node_id:
            self.fail(Check.FORMAT, f"the entry names node {entry.node_id!r}", index)
        self.parsed[index] = entry

    def _tree_through(self, size: int) -> merkle.CompactRange | None:
        """The compact range of the first ``size`` entries (the verified prefix, then the
        served leaves), or None if a served leaf below ``size`` is missing."""
        tree = self.base
        while tree.size < size and tree.size in self.leaves:
            tree = tree.append(self.leaves[tree.size])
        return tree if tree.size == size else None

    # 4. -----------------------------------------------------------------------------------

    def _check_inclusion(self, checkpoint: Checkpoint) -> None:
        size = checkpoint.tree_size
        tree = self._tree_through(size)
        if tree is not None and tree.root() == checkpoint.root:
            return
        # Name the entries: each one's proof from the node, against the signed root.
        named = False
        for index in sorted(self.leaves):
            try:
                proof = self.log.inclusion_proof(index, size)
            except KmsError as e:
                self.fail(
                    Check.INCLUSION,
                    f"the node cannot prove this entry is in its checkpoint: {e.message}",
                    index,
                    primary=False,
                )
                continue
            if not merkle.verify_inclusion(self.leaves[index], index, size, proof, checkpoint.root):
                named = True
                self.fail(
                    Check.INCLUSION,
                    f"not the entry the node's signed checkpoint of {size} entries holds at "
                    "this index (altered, moved or inserted)",
                    index,
                )
        if not named and not self.missing:
            self.fail(
                Check.INCLUSION,
                f"the served entries do not have the root of the signed checkpoint of {size}",
            )

    # 5. -----------------------------------------------------------------------------------

    def _check_receipts(self, receipts: list[Receipt], checkpoint: Checkpoint) -> None:
        size = checkpoint.tree_size
        vouched: dict[int, bytes] = {}
        for receipt in receipts:
            if receipt.node_id != self.node_id:
                continue
            index = receipt.leaf_index
            if not verify_receipt(receipt, self.key):
                self.fail(
                    Check.RECEIPT,
                    f"the receipt for entry {index} does not verify with the node's registered key",
                )
                continue
            previous = vouched.setdefault(index, receipt.entry_hash)
            if previous != receipt.entry_hash:
                self.fail(
                    Check.RECEIPT,
                    "the node signed two receipts for this entry with different hashes",
                    index,
                )
            elif index >= size:
                self.fail(
                    Check.RECEIPT,
                    f"the node issued a receipt for this entry, but its log has {size} entries",
                    index,
                )
            elif index in self.leaves and self.leaves[index] != receipt.entry_hash:
                self.fail(
                    Check.RECEIPT, "not the entry the node's signed receipt vouches for", index
                )
            elif index < self.start:
                self._check_receipt_by_proof(receipt, checkpoint)

    def _check_receipt_by_proof(self, receipt: Receipt, checkpoint: Checkpoint) -> None:
        """A receipt for an entry of the verified prefix, which was not read again: the
        node's inclusion proof must show the receipted hash at its index."""
        index, size = receipt.leaf_index, checkpoint.tree_size
        try:
            proof = self.log.inclusion_proof(index, size)
        except KmsError as e:
            self.fail(
                Check.RECEIPT,
                f"the node cannot prove the receipted entry is in its checkpoint: {e.message}",
                index,
            )
            return
        if not merkle.verify_inclusion(receipt.entry_hash, index, size, proof, checkpoint.root):
            self.fail(
                Check.RECEIPT,
                "not the entry the node's signed receipt vouches for (by the node's inclusion "
                "proof; an earlier audit read this entry)",
                index,
            )

    # 6. -----------------------------------------------------------------------------------

    def _prefix_roots(self, sizes: set[int]) -> dict[int, bytes]:
        """Root of the first ``s`` entries, for each ``s`` the served log (after the
        verified prefix, if any) covers."""
        roots: dict[int, bytes] = {}
        tree = self.base
        for size in sorted(sizes):
            if size < tree.size:
                continue  # inside the verified prefix: checked by consistency instead
            while tree.size < size and tree.size in self.leaves:
                tree = tree.append(self.leaves[tree.size])
            if tree.size < size:
                break
            roots[size] = tree.root()
        return roots

    def _check_anchors(
        self, anchors: list[CheckpointAnchor], checkpoint: Checkpoint, signed: bool
    ) -> None:
        size = checkpoint.tree_size
        verified: list[tuple[CheckpointAnchor, Checkpoint]] = []
        for anchor in anchors:
            try:
                anchored = Checkpoint(
                    self.node_id,
                    anchor.tree_size,
                    anchor.root_hash,
                    anchor.timestamp,
                    anchor.signature,
                )
            except InvalidRequest as e:
                self.fail(Check.ANCHOR, f"the anchor in block {anchor.block} is malformed: {e}")
                continue
            if anchor.node_id != self.node_id or not verify_checkpoint(anchored, self.key):
                self.fail(
                    Check.ANCHOR,
                    f"the checkpoint anchored in block {anchor.block} does not verify with "
                    "the node's registered key",
                )
                continue
            verified.append((anchor, anchored))
        self.anchors_checked = len(verified)
        if verified:
            self.anchor_block = max(self.anchor_block, max(a.block for a, _ in verified))
        # Anchors an earlier audit checked (``since``) are not checked again.
        since = self.since
        if since is not None:
            verified = [(a, c) for a, c in verified if a.block > since.anchor_block]
        roots = self._prefix_roots({a.tree_size for a, _ in verified if a.tree_size <= size})
        matched, named = self.start, False
        beyond: list[CheckpointAnchor] = []
        differ: list[CheckpointAnchor] = []
        inconsistent: list[str] = []
        previous: tuple[CheckpointAnchor, Checkpoint] | None = None
        for anchor, anchored in verified:
            where = f"the checkpoint of {anchor.tree_size} entries anchored in block {anchor.block}"
            if anchor.tree_size > size:
                beyond.append(anchor)
                if not named:
                    named = self._name_rewrite(anchor, matched, size, fallback=False)
            elif anchor.tree_size in roots and roots[anchor.tree_size] != anchor.root_hash:
                differ.append(anchor)
                if not named:
                    named = self._name_rewrite(anchor, matched, anchor.tree_size)
            elif anchor.tree_size in roots:
                matched = anchor.tree_size
                self._check_times(anchor, where)
            elif since is not None and anchor.tree_size < since.tree_size:
                inconsistent += self._consistency(
                    anchored, since.checkpoint, f"{where} and the verified prefix"
                )
            if previous is not None and anchor.tree_size <= size:
                inconsistent += self._consistency(
                    previous[1], anchored, f"{where} and the one before"
                )
            previous = anchor, anchored
        if previous is not None and signed and previous[0].tree_size <= size:
            inconsistent += self._consistency(
                previous[1], checkpoint, "the last anchor and the node's current checkpoint"
            )
        # Once the log leaves the anchored history, every later anchor shows it again: one
        # problem each, naming the first.
        if beyond:
            first = beyond[0]
            self.fail(
                Check.ANCHOR,
                f"missing: the log has {size} entries but the checkpoint anchored in block "
                f"{first.block} covers {first.tree_size}{_more(len(beyond) - 1, 'anchor')}: "
                "the log was truncated",
                size,
            )
        if differ:
            first = differ[0]
            self.fail(
                Check.ANCHOR,
                f"the first {first.tree_size} entries differ from the checkpoint anchored in "
                f"block {first.block}{_more(len(differ) - 1, 'anchor')}",
            )
        if inconsistent:
            self.fail(Check.ANCHOR, inconsistent[0] + _more(len(inconsistent) - 1, "pair"))
        if previous is not None and previous[0].tree_size < size:
            self.warnings.append(
                f"entries {previous[0].tree_size} to {size - 1} are not anchored yet"
            )

    def _name_rewrite(
        self, anchor: CheckpointAnchor, matched: int, end: int, *, fallback: bool = True
    ) -> bool:
        """Name where the log stopped being the anchored one, looking at entries
        ``[matched, end)``; whether an entry was named."""
        for index in range(matched, end):
            entry = self.parsed.get(index)
            if entry is not None and entry.time > anchor.timestamp:
                self.fail(
                    Check.REWRITTEN,
                    f"written at {_iso(entry.time)}, after the checkpoint anchored in block "
                    f"{anchor.block} (signed at {_iso(anchor.timestamp)}, {anchor.tree_size} "
                    "entries) already held an entry at this index: the log was truncated "
                    "here and re-appended",
                    index,
                )
                return True
        if not fallback:
            return False
        if any(p.primary for i, ps in self.entry_problems.items() if i < end for p in ps):
            return True  # already named (an altered entry, a gap)
        self.fail(
            Check.ANCHOR,
            f"entries {matched} to {anchor.tree_size - 1} are not the ones anchored in block "
            f"{anchor.block}: one or more of them were altered, removed or inserted, from "
            "this entry on at the earliest (receipts would name which)",
            matched,
        )
        return True

    def _check_times(self, anchor: CheckpointAnchor, where: str) -> None:
        late = [
            i
            for i in range(anchor.tree_size)
            if (e := self.parsed.get(i)) is not None and e.time > anchor.timestamp
        ]
        if late:
            self.warnings.append(
                f"entry {late[0]} has a time after {where}, which holds it: the node's clock "
                "went backwards"
            )

    def _consistency(self, old: Checkpoint, new: Checkpoint, what: str) -> list[str]:
        """What is wrong with the node's consistency proof between two checkpoints."""
        try:
            proof = self.log.consistency_proof(old.tree_size, new.tree_size)
        except KmsError as e:
            return [f"the node cannot prove {what} consistent: {e.message}"]
        if not verify_checkpoint_consistency(old, new, proof):
            return [
                f"the node's tree is not consistent between {what} "
                f"({old.tree_size} and {new.tree_size} entries; RFC 9162 2.1.4)"
            ]
        return []

    # 7. -----------------------------------------------------------------------------------

    def _check_chain(self, rejudge_decisions: bool) -> None:
        for index in sorted(self.parsed):
            entry = self.parsed[index]
            if entry is None:
                continue
            self._check_block(index, entry)
            if rejudge_decisions:
                self._check_decision(index, entry)

    def _check_block(self, index: int, entry: AuditEntry) -> None:
        try:
            block = self.chain.block(entry.block_number)
        except KmsError as e:
            self.fail(Check.BLOCK, f"cannot read block {entry.block_number}: {e.message}", index)
            return
        if block.hash != entry.block_hash:
            self.fail(
                Check.BLOCK,
                f"names block {entry.block_number} with hash 0x{entry.block_hash.hex()}; the "
                f"chain's is 0x{block.hash.hex()}",
                index,
            )

    def _check_decision(self, index: int, entry: AuditEntry) -> None:
        granted = entry.decision == GRANTED
        if granted and entry.reason_code != Reason.GRANTED:
            self.fail(Check.POLICY, f"granted with reason {entry.reason_code!r}", index)
            return
        if not granted and entry.reason_code not in POLICY_DENIALS:
            return  # the grant state cannot confirm it (no_kfrag: the node's kfrag store)
        if not granted and entry.version == 1 and entry.reason_code in _UNRECORDED_DENIALS:
            return
        try:
            state = self.chain.access_state(
                entry.record_id, entry.requester, entry.capsule_hash, block=entry.block_number
            )
        except KmsError as e:
            if granted:
                self.fail(
                    Check.POLICY,
                    f"cannot read the grant state at block {entry.block_number}: {e.message}",
                    index,
                )
            else:
                self._warn(index, f"denial not re-checked: {e.message}")
            return
        code, why = rejudge(entry, state)
        if granted and code == Reason.GRANT_EXPIRED and entry.time == _expiry(state):
            # The node judges a moment before it writes the entry's time: a grant expiring
            # in between is a tie the entry cannot settle. The other rules still apply.
            code, why = rejudge(entry, state, wall_clock=entry.time - 1)
            if code == Reason.GRANTED:
                self._warn(index, "granted in the second the grant expired (a tie)")
                return
        if granted and code != Reason.GRANTED:
            self.fail(Check.POLICY, f"granted, but {why}", index)
        elif not granted and code != entry.reason_code:
            self._warn(
                index,
                f"denied as {entry.reason_code}, but the chain state gives {code}: {why}",
            )

    def _warn(self, index: int, message: str) -> None:
        self.entry_warnings.setdefault(index, []).append(message)

    # --------------------------------------------------------------------------------------

    def _report(self, checkpoint: Checkpoint | None, signed: bool) -> NodeReport:
        indices = sorted(set(self.data) | set(self.missing) | set(self.entry_problems))
        results = []
        for index in indices:
            entry = self.parsed.get(index)
            if entry is not None:
                request_id = entry.request_id
            else:
                request_id = _lenient_request_id(self.data.get(index, b""))
            results.append(
                EntryResult(
                    leaf_index=index,
                    entry=entry,
                    request_id=request_id,
                    problems=tuple(self.entry_problems.get(index, ())),
                    warnings=tuple(self.entry_warnings.get(index, ())),
                )
            )
        warned = sum(1 for ws in self.entry_warnings.values() if ws)
        warnings = list(self.warnings)
        if warned:
            warnings.append(f"{warned} entries have warnings (see the report)")
        verified = None
        if checkpoint is not None and signed and self.rejudged and not self.problems:
            tree = self._tree_through(checkpoint.tree_size)
            if tree is not None:
                verified = VerifiedPrefix(checkpoint, tree.hashes, self.anchor_block)
        return NodeReport(
            node_id=self.node_id,
            checkpoint=checkpoint,
            entries=tuple(results),
            anchors_checked=self.anchors_checked,
            problems=tuple(self.problems),
            warnings=tuple(warnings),
            start=self.start,
            verified=verified,
        )


def _more(count: int, what: str) -> str:
    return f" (and {count} later {what}{'s' if count > 1 else ''})" if count else ""


def _expiry(state: AccessState) -> int | None:
    return state.grant.expires_at if state.grant is not None else None
