"""Steps 2 to 5 of an audit, the node's log and its proofs (their order and why:
core/audit_verify.py): the checkpoint is this node's and signed with its registered key;
the entries as served (:class:`ServedLog`) are in order, none missing, canonical, this
node's; each is the one the signed checkpoint holds at its index; and the receipts the
caller holds that the node signed vouch for entries the log has (one it did not sign is
no evidence against it: a warning). Pure, no I/O beyond the
:class:`~core.audit_sources.LogSource` it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from core import bounded_json, merkle
from core.audit import (
    MAX_ENTRY_BYTES,
    AuditEntry,
    Checkpoint,
    Receipt,
    verify_checkpoint,
    verify_receipt,
)
from core.audit_findings import Check, Findings, VerifiedPrefix
from core.audit_sources import LogSource, failed_in_transit
from core.errors import InvalidRequest, KmsError
from core.registry_types import NodeInfo

#: how deep an entry that does not parse may nest for its request id still to be read
_LENIENT_ENTRY_DEPTH: Final = 8
#: receipts that are bad evidence (not verifying, or kept for another read) are named one
#: by one in the node's warnings up to this many of each kind, the rest counted: anyone
#: can write them, and a receipts file holds 100,000s
MAX_NAMED_BAD_RECEIPTS: Final = 20
#: a node whose served log shows this many problems (entries out of order, beyond its
#: checkpoint, or not valid) has failed: the rest is not read, so that a hostile node
#: streaming junk costs the auditor bounded time and memory
MAX_READ_PROBLEMS: Final = 1000
#: the most entries one audit reads of a node (beyond the prefix an earlier audit
#: verified): the auditor holds about 0.65 KB of each until the audit ends (measured on
#: test entries, 3.2 GB at the bound), and a node's checkpoint may claim any size. A
#: checkpoint beyond it is "could not read", not a failure of the node.
MAX_ENTRIES_PER_AUDIT: Final = 5_000_000


def check_checkpoint(checkpoint: Checkpoint, node: NodeInfo, findings: Findings) -> bool:
    """Step 2: whether the checkpoint is ``node``'s and signed with its registered key."""
    if checkpoint.node_id != node.node_id:
        findings.fail(Check.CHECKPOINT, f"the checkpoint is of node {checkpoint.node_id!r}")
        return False
    if not verify_checkpoint(checkpoint, node.signing_public_key):
        findings.fail(
            Check.CHECKPOINT,
            f"the checkpoint of {checkpoint.tree_size} entries does not verify with the "
            "signing key registered on-chain for this node",
        )
        return False
    return True


class ServedLog:
    """Step 3: the entries one node served, as read from ``start`` on (the end of the prefix
    an earlier audit verified, or 0)."""

    def __init__(self, node_id: str, since: VerifiedPrefix | None) -> None:
        self.node_id = node_id
        self.since = since
        #: the first entry read: the end of the verified prefix, or 0
        self.start = since.tree_size if since is not None else 0
        #: the verified prefix's tree, which the served leaves extend
        self.base = since.compact_range() if since is not None else merkle.CompactRange()
        #: leaf index -> parsed entry (None if invalid), leaf hash; of entries that do
        #: not parse, only the request id their JSON may still name (not their bytes, up
        #: to a message's 256 KiB each), so that a log of 100,000s of entries stays
        #: within bounds
        self.parsed: dict[int, AuditEntry | None] = {}
        self.leaves: dict[int, bytes] = {}
        self.unparsed_ids: dict[int, str] = {}
        #: the values entries repeat, held once (AuditEntry.from_canonical)
        self._shared: dict[object, object] = {}
        self._trees: dict[int, merkle.CompactRange | None] = {}
        #: first index of each missing range -> its end
        self.missing: dict[int, int] = {}

    def read(self, log: LogSource, size: int, findings: Findings) -> None:
        """Read entries ``[start, size)``, naming what is out of order, missing or invalid.
        A read that fails in transit leaves the rest unread ("could not read"), not missing.
        So does a checkpoint of more than :data:`MAX_ENTRIES_PER_AUDIT` entries to read; and
        after :data:`MAX_READ_PROBLEMS` problems the rest is not read (a failed node)."""
        self._trees.clear()
        expected = self.start
        if size - self.start > MAX_ENTRIES_PER_AUDIT:
            findings.cannot_read(
                f"the checkpoint covers {size - self.start} entries not verified yet; one "
                f"audit reads at most {MAX_ENTRIES_PER_AUDIT}"
            )
            return
        problems = len(findings.problems)
        try:
            for index, data in log.entries(self.start, size):
                if index >= size:
                    findings.fail(
                        Check.SEQUENCE,
                        f"the node served entry {index}, beyond its checkpoint of {size}",
                    )
                elif index < expected:
                    findings.fail(
                        Check.SEQUENCE,
                        f"served again or out of order, after entry {expected - 1}",
                        index,
                    )
                else:
                    if index > expected:
                        why = f"next the node serves entry {index}"
                        self._missing(expected, index, why, findings)
                    expected = index + 1
                    self._take(index, data, findings)
                if len(findings.problems) - problems >= MAX_READ_PROBLEMS:
                    findings.fail(
                        Check.SEQUENCE,
                        f"the rest of the log, from entry {expected}, was not read: the node "
                        f"served {MAX_READ_PROBLEMS} entries out of order, beyond its "
                        "checkpoint or not valid",
                    )
                    return
        except KmsError as e:
            stopped = f"the node stopped serving entries at entry {expected}: {e.message}"
            if failed_in_transit(e):
                findings.cannot_read(stopped)
                return
            findings.fail(Check.REACHABLE, stopped)
        if expected < size:
            self._missing(expected, size, f"the checkpoint covers {size} entries", findings)

    def _missing(self, start: int, end: int, why: str, findings: Findings) -> None:
        self.missing[start] = end
        span = f"entries {start} to {end - 1} are" if end - start > 1 else "the entry is"
        before = self.parsed.get(start - 1)
        after = f" after request {before.request_id}" if before is not None else ""
        findings.fail(Check.SEQUENCE, f"missing: {span} not served{after} ({why})", start)

    def _take(self, index: int, data: bytes, findings: Findings) -> None:
        self.leaves[index] = merkle.leaf_hash(data)
        try:
            entry: AuditEntry | None = AuditEntry.from_canonical(data, shared=self._shared)
        except InvalidRequest as e:
            entry = None
            self.unparsed_ids[index] = _lenient_request_id(data)
            findings.fail(Check.FORMAT, f"not a valid audit entry: {e.message}", index)
        if entry is not None and entry.node_id != self.node_id:
            findings.fail(Check.FORMAT, f"the entry names node {entry.node_id!r}", index)
        self.parsed[index] = entry

    def tree_through(self, size: int) -> merkle.CompactRange | None:
        """The compact range of the first ``size`` entries (the verified prefix, then the
        served leaves), or None if a served leaf below ``size`` is missing. Kept: the
        checks ask for the checkpoint's more than once, and the leaves are read by then."""
        if size in self._trees:
            return self._trees[size]
        tree = self.base.extend(self.leaves_from(self.base.size, size))
        self._trees[size] = tree if tree.size == size else None
        return self._trees[size]

    def leaves_from(self, start: int, end: int) -> Iterator[bytes]:
        """The served leaf hashes from ``start`` on, up to ``end`` or the first missing."""
        leaves = self.leaves
        for index in range(start, end):
            leaf = leaves.get(index)
            if leaf is None:
                return
            yield leaf

    def request_id(self, index: int) -> str:
        """The entry's request id; read leniently when the entry does not parse, "" if
        unknown."""
        entry = self.parsed.get(index)
        if entry is not None:
            return entry.request_id
        return self.unparsed_ids.get(index, "")


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


def check_inclusion(
    served: ServedLog, log: LogSource, checkpoint: Checkpoint, findings: Findings
) -> None:
    """Step 4: every served entry is the one the signed checkpoint holds at its index."""
    size = checkpoint.tree_size
    tree = served.tree_through(size)
    if tree is not None and tree.root() == checkpoint.root:
        return
    # Name the entries: each one's proof from the node, against the signed root.
    named = False
    for index in sorted(served.leaves):
        try:
            proof = log.inclusion_proof(index, size)
        except KmsError as e:
            if failed_in_transit(e):
                findings.cannot_read(f"entry {index}'s inclusion proof: {e.message}")
                return
            findings.fail(
                Check.INCLUSION,
                f"the node cannot prove this entry is in its checkpoint: {e.message}",
                index,
                primary=False,
            )
            continue
        if not merkle.verify_inclusion(served.leaves[index], index, size, proof, checkpoint.root):
            named = True
            findings.fail(
                Check.INCLUSION,
                f"not the entry the node's signed checkpoint of {size} entries holds at "
                "this index (altered, moved or inserted)",
                index,
            )
    if not named and not served.missing:
        findings.fail(
            Check.INCLUSION,
            f"the served entries do not have the root of the signed checkpoint of {size}",
        )


def check_receipts(
    receipts: list[Receipt],
    served: ServedLog,
    log: LogSource,
    node: NodeInfo,
    checkpoint: Checkpoint,
    findings: Findings,
) -> None:
    """Step 5: each of ``node``'s receipts signed by its registered key has its entry in
    the log with the hash the receipt vouches for (other nodes' are ignored).

    A receipt that does not verify with that key is no evidence against the node: anyone
    (an app, a coordinator relaying fragments) can write one, unsigned or badly signed.
    It is a warning naming the receipt, as bad evidence, and the node is judged without it.
    """
    size = checkpoint.tree_size
    vouched: dict[int, bytes] = {}
    unsigned = 0
    misattributed = 0
    for receipt in receipts:
        if findings.could_not_read:
            break
        if receipt.node_id != node.node_id:
            continue
        index = receipt.leaf_index
        if not verify_receipt(receipt, node.signing_public_key):
            unsigned += 1
            if unsigned <= MAX_NAMED_BAD_RECEIPTS:
                findings.warn(
                    f"bad evidence, ignored: the receipt for entry {index} (entry hash "
                    f"{receipt.entry_hash.hex()[:16]}..., tree size {receipt.tree_size}) does "
                    "not verify with the node's registered key, so it does not show the node "
                    "issued it (anyone can write a receipt)"
                )
            continue
        previous = vouched.setdefault(index, receipt.entry_hash)
        if previous != receipt.entry_hash:
            findings.fail(
                Check.RECEIPT,
                "the node signed two receipts for this entry with different hashes",
                index,
            )
        elif index >= size:
            findings.fail(
                Check.RECEIPT,
                f"the node issued a receipt for this entry, but its log has {size} entries",
                index,
            )
        elif index in served.leaves and served.leaves[index] != receipt.entry_hash:
            findings.fail(
                Check.RECEIPT, "not the entry the node's signed receipt vouches for", index
            )
        elif index < served.start:
            _check_receipt_by_proof(receipt, log, checkpoint, findings)
        elif (why := _kept_for_another(receipt, served.parsed.get(index))) is not None:
            misattributed += 1
            if misattributed <= MAX_NAMED_BAD_RECEIPTS:
                findings.warn(
                    f"bad evidence for its holder: the receipt for entry {index} was kept "
                    f"for {why}: the node logged another read than the one it was kept "
                    "for (a relay attached another read's receipt, or the holder's file "
                    "is wrong); the node is not at fault"
                )
    if unsigned > MAX_NAMED_BAD_RECEIPTS:
        findings.warn(
            f"bad evidence, ignored: {unsigned - MAX_NAMED_BAD_RECEIPTS} more receipts "
            "that do not verify with the node's registered key"
        )
    if misattributed > MAX_NAMED_BAD_RECEIPTS:
        findings.warn(
            f"bad evidence for its holder: {misattributed - MAX_NAMED_BAD_RECEIPTS} more "
            "receipts kept for another read than the entry's"
        )


def _kept_for_another(receipt: Receipt, entry: AuditEntry | None) -> str | None:
    """Why a receipt's holder's note (the request it was kept for, the fragment it came
    with) does not fit the entry it vouches for; None if it fits, or says nothing."""
    if entry is None:
        return None
    wanted, kept_cfrag = receipt.kept_for_request, receipt.kept_cfrag_hash
    if wanted is not None and wanted != entry.request_id:
        return f"request {wanted[:64]}, but the entry is request {entry.request_id}'s"
    if kept_cfrag is not None and kept_cfrag != entry.cfrag_hash:
        return (
            f"a fragment with SHA-256 {kept_cfrag.hex()[:16]}..., but the entry logs "
            f"{entry.cfrag_hash.hex()[:16] or 'none'}..."
        )
    return None


def _check_receipt_by_proof(
    receipt: Receipt, log: LogSource, checkpoint: Checkpoint, findings: Findings
) -> None:
    """A receipt for an entry of the verified prefix, which was not read again: the node's
    inclusion proof must show the receipted hash at its index."""
    index, size = receipt.leaf_index, checkpoint.tree_size
    try:
        proof = log.inclusion_proof(index, size)
    except KmsError as e:
        if failed_in_transit(e):
            findings.cannot_read(f"the receipted entry {index}'s inclusion proof: {e.message}")
            return
        findings.fail(
            Check.RECEIPT,
            f"the node cannot prove the receipted entry is in its checkpoint: {e.message}",
            index,
        )
        return
    if not merkle.verify_inclusion(receipt.entry_hash, index, size, proof, checkpoint.root):
        findings.fail(
            Check.RECEIPT,
            "not the entry the node's signed receipt vouches for (by the node's inclusion "
            "proof; an earlier audit read this entry)",
            index,
        )
