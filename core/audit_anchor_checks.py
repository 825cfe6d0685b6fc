"""Step 6 of an audit (the steps in order: core/audit_verify.py): the log extends every
checkpoint the node committed to earlier, each one anchored on-chain, and the prefix an
earlier audit verified; where it does not, name where history was rewritten. Pure, no I/O
beyond the :class:`~core.audit_sources.LogSource` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.audit import Checkpoint, verify_checkpoint, verify_checkpoint_consistency
from core.audit_findings import Check, Findings, VerifiedPrefix
from core.audit_log_checks import ServedLog
from core.audit_sources import LogSource, failed_in_transit
from core.errors import InvalidRequest, KmsError
from core.formats import iso_utc
from core.registry_types import CheckpointAnchor, NodeInfo


def extends_prefix(
    prefix: VerifiedPrefix, checkpoint: Checkpoint, log: LogSource, findings: Findings
) -> bool:
    """Whether the node's tree (its current ``checkpoint``) extends the prefix an earlier
    audit verified: the first check of an incremental audit."""
    verified, size = prefix.checkpoint, checkpoint.tree_size
    earlier = (
        f"the {verified.tree_size} entries an earlier audit verified (checkpoint of "
        f"{iso_utc(verified.timestamp)})"
    )
    if size < verified.tree_size:
        findings.fail(
            Check.ANCHOR,
            f"missing: the log has {size} entries, fewer than {earlier}: the log was "
            "truncated; a full audit names where",
            size,
        )
        return False
    if size == verified.tree_size:
        problems = []
        if checkpoint.root != verified.root:
            problems.append(f"the node's checkpoint of {size} entries has another root")
    else:
        problems = _consistency(log, verified, checkpoint, "the verified prefix and now", findings)
    if findings.could_not_read:
        return False
    if problems:
        findings.fail(
            Check.ANCHOR,
            f"{problems[0]}: the log does not extend {earlier}; a full audit names where "
            "it was rewritten",
        )
        return False
    return True


@dataclass(frozen=True)
class AnchorsChecked:
    """What :func:`check_anchors` read of the chain's anchors."""

    #: anchors whose signature verified and that were compared with the log
    count: int
    #: the block of the newest of them (or of those an earlier audit checked)
    block: int
    #: the tree size the newest of them anchored; 0 if none verified
    size: int = 0


def check_anchors(
    anchors: list[CheckpointAnchor],
    checkpoint: Checkpoint,
    *,
    signed: bool,
    served: ServedLog,
    log: LogSource,
    node: NodeInfo,
    findings: Findings,
) -> AnchorsChecked:
    """Step 6: every anchor verifies and the log (and the node's tree) extends each of
    them. ``signed`` says whether ``checkpoint`` verified (step 2).

    After a read failed in transit, the anchors are still compared with the entries served
    before it (a mismatch is evidence, and needs nothing more from the node), but no proof
    is asked of the node."""
    size = checkpoint.tree_size
    since = served.since
    offline = bool(findings.could_not_read)
    verified: list[tuple[CheckpointAnchor, Checkpoint]] = []
    for anchor in anchors:
        try:
            anchored = Checkpoint(
                node.node_id,
                anchor.tree_size,
                anchor.root_hash,
                anchor.timestamp,
                anchor.signature,
            )
        except InvalidRequest as e:
            findings.fail(Check.ANCHOR, f"the anchor in block {anchor.block} is malformed: {e}")
            continue
        if anchor.node_id != node.node_id or not verify_checkpoint(
            anchored, node.signing_public_key
        ):
            findings.fail(
                Check.ANCHOR,
                f"the checkpoint anchored in block {anchor.block} does not verify with "
                "the node's registered key",
            )
            continue
        verified.append((anchor, anchored))
    # Anchors an earlier audit checked (``since``) are not checked again.
    skipped = _checked_before(since, verified, log, findings, offline=offline)
    checked = AnchorsChecked(
        len(verified),
        max([skipped] + [a.block for a, _ in verified]),
        max(verified, key=lambda v: v[0].block)[0].tree_size if verified else 0,
    )
    if findings.could_not_read and not offline:
        return checked
    verified = [(a, c) for a, c in verified if a.block > skipped]
    roots = _prefix_roots(served, {a.tree_size for a, _ in verified if a.tree_size <= size})
    matched, named = served.start, False
    beyond: list[CheckpointAnchor] = []
    differ: list[CheckpointAnchor] = []
    inconsistent: list[str] = []
    previous: tuple[CheckpointAnchor, Checkpoint] | None = None
    for anchor, anchored in verified:
        where = f"the checkpoint of {anchor.tree_size} entries anchored in block {anchor.block}"
        if anchor.tree_size > size:
            beyond.append(anchor)
            if not named:
                named = _name_rewrite(anchor, matched, size, served, findings, fallback=False)
        elif anchor.tree_size in roots and roots[anchor.tree_size] != anchor.root_hash:
            differ.append(anchor)
            if not named:
                named = _name_rewrite(anchor, matched, anchor.tree_size, served, findings)
        elif anchor.tree_size in roots:
            matched = anchor.tree_size
            _check_times(anchor, where, served, findings)
        elif offline:
            pass  # the rest asks the node for proofs
        elif since is not None and anchor.tree_size < since.tree_size:
            inconsistent += _consistency(
                log, anchored, since.checkpoint, f"{where} and the verified prefix", findings
            )
        if previous is not None and anchor.tree_size <= size and not offline:
            inconsistent += _consistency(
                log, previous[1], anchored, f"{where} and the one before", findings
            )
        previous = anchor, anchored
        if findings.could_not_read and not offline:
            return checked
    if previous is not None and signed and previous[0].tree_size <= size and not offline:
        inconsistent += _consistency(
            log,
            previous[1],
            checkpoint,
            "the last anchor and the node's current checkpoint",
            findings,
        )
        if findings.could_not_read:
            return checked
    # Once the log leaves the anchored history, every later anchor shows it again: one
    # problem each, naming the first.
    if beyond:
        first = beyond[0]
        findings.fail(
            Check.ANCHOR,
            f"missing: the log has {size} entries but the checkpoint anchored in block "
            f"{first.block} covers {first.tree_size}{_more(len(beyond) - 1, 'anchor')}: "
            "the log was truncated",
            size,
        )
    if differ:
        first = differ[0]
        findings.fail(
            Check.ANCHOR,
            f"the first {first.tree_size} entries differ from the checkpoint anchored in "
            f"block {first.block}{_more(len(differ) - 1, 'anchor')}",
        )
    if inconsistent:
        findings.fail(Check.ANCHOR, inconsistent[0] + _more(len(inconsistent) - 1, "pair"))
    if previous is not None and previous[0].tree_size < size:
        findings.warn(f"entries {previous[0].tree_size} to {size - 1} are not anchored yet")
    if offline:  # count only the anchors compared with what was served
        compared = sum(1 for a, _ in verified if a.tree_size > size or a.tree_size in roots)
        checked = AnchorsChecked(compared, checked.block, checked.size)
    return checked


def _checked_before(
    since: VerifiedPrefix | None,
    verified: list[tuple[CheckpointAnchor, Checkpoint]],
    log: LogSource,
    findings: Findings,
    *,
    offline: bool,
) -> int:
    """The block up to which anchors are not checked again: the verified prefix's
    ``anchor_block`` if the chain bears it out, else 0 (every anchor is checked).

    The state file's checkpoint is signed by the node, its ``anchor_block`` by no one. An
    audit that passed records the block of the newest anchor it checked, all of whose
    anchors were at most its checkpoint's size (they were read before it) and were extended
    by it. So ``anchor_block`` is trusted only if it is not after the node's newest anchor
    on-chain, and the prefix's checkpoint extends the newest anchor at or before it (one
    comparison or consistency proof). The anchors before that one are then covered by it:
    the audit that wrote the state checked that each extends the one before (a forged
    state could hide only a fork the node itself anchored, which a full audit names)."""
    if since is None or since.anchor_block == 0:
        return 0
    block = since.anchor_block
    newest = max((a.block for a, _ in verified), default=None)
    if newest is None or block > newest:
        after = f"block {newest}" if newest is not None else "there is none"
        findings.fail(
            Check.ANCHOR,
            f"the audit state's anchor_block {block} is after the node's newest anchor "
            f"({after}): no audit of this chain wrote it; every anchor is checked",
        )
        return 0
    earlier = [(a, c) for a, c in verified if a.block <= block]
    if not earlier:
        return 0  # no anchor to skip
    if offline:
        return 0  # the prefix's consistency with the anchor cannot be asked for
    anchor, anchored = earlier[-1]
    prefix = since.checkpoint
    if anchor.tree_size < prefix.tree_size:
        what = f"the checkpoint anchored in block {anchor.block} and the verified prefix"
        extends = not _consistency(log, anchored, prefix, what, findings)
        if findings.could_not_read:
            return 0
    else:
        extends = (anchor.tree_size, anchor.root_hash) == (prefix.tree_size, prefix.root)
    if extends:
        return block
    findings.fail(
        Check.ANCHOR,
        f"the audit state's verified prefix (a checkpoint of {prefix.tree_size} entries the "
        f"node signed) does not extend the checkpoint of {anchor.tree_size} entries "
        f"anchored in block {anchor.block}, the newest at or before its anchor_block "
        f"{block}: every anchor is checked",
    )
    return 0


def _prefix_roots(served: ServedLog, sizes: set[int]) -> dict[int, bytes]:
    """Root of the first ``s`` entries, for each ``s`` the served log (after the verified
    prefix, if any) covers."""
    roots: dict[int, bytes] = {}
    tree = served.base
    for size in sorted(sizes):
        if size < tree.size:
            continue  # inside the verified prefix: checked by consistency instead
        tree = tree.extend(served.leaves_from(tree.size, size))
        if tree.size < size:
            break
        roots[size] = tree.root()
    return roots


def _name_rewrite(
    anchor: CheckpointAnchor,
    matched: int,
    end: int,
    served: ServedLog,
    findings: Findings,
    *,
    fallback: bool = True,
) -> bool:
    """Name where the log stopped being the anchored one, looking at entries
    ``[matched, end)``; whether an entry was named."""
    for index in range(matched, end):
        entry = served.parsed.get(index)
        if entry is not None and entry.time > anchor.timestamp:
            findings.fail(
                Check.REWRITTEN,
                f"written at {iso_utc(entry.time)}, after the checkpoint anchored in block "
                f"{anchor.block} (signed at {iso_utc(anchor.timestamp)}, {anchor.tree_size} "
                "entries) already held an entry at this index: the log was truncated "
                "here and re-appended",
                index,
            )
            return True
    if not fallback:
        return False
    if findings.named_before(end):
        return True  # already named (an altered entry, a gap)
    findings.fail(
        Check.ANCHOR,
        f"entries {matched} to {anchor.tree_size - 1} are not the ones anchored in block "
        f"{anchor.block}: one or more of them were altered, removed or inserted, from "
        "this entry on at the earliest (receipts would name which)",
        matched,
    )
    return True


def _check_times(
    anchor: CheckpointAnchor, where: str, served: ServedLog, findings: Findings
) -> None:
    late = [
        i
        for i in range(anchor.tree_size)
        if (e := served.parsed.get(i)) is not None and e.time > anchor.timestamp
    ]
    if late:
        findings.warn(
            f"entry {late[0]} has a time after {where}, which holds it: the node's clock "
            "went backwards"
        )


def _consistency(
    log: LogSource, old: Checkpoint, new: Checkpoint, what: str, findings: Findings
) -> list[str]:
    """What is wrong with the node's consistency proof between two checkpoints (nothing
    when the proof could not be read in transit: that goes to ``findings``)."""
    try:
        proof = log.consistency_proof(old.tree_size, new.tree_size)
    except KmsError as e:
        if failed_in_transit(e):
            findings.cannot_read(f"the consistency proof of {what}: {e.message}")
            return []
        return [f"the node cannot prove {what} consistent: {e.message}"]
    if not verify_checkpoint_consistency(old, new, proof):
        return [
            f"the node's tree is not consistent between {what} "
            f"({old.tree_size} and {new.tree_size} entries; RFC 9162 2.1.4)"
        ]
    return []


def _more(count: int, what: str) -> str:
    return f" (and {count} later {what}{'s' if count > 1 else ''})" if count else ""
