"""Auditing one node's log against the chain: the auditor's workflow. Pure, no I/O.

The auditor trusts the chain and nothing the node says about itself: the node's signing
key is the one registered on-chain (:class:`~core.registry_types.NodeInfo`), the
anchors are the node's checkpoints as the chain recorded them, and each granted entry is
judged again against the grant state at the entry's block. What it reads comes through two
small interfaces (core/audit_sources.py), :class:`~core.audit_sources.LogSource` (the node's
``kms.v1.Audit`` service) and :class:`~core.audit_sources.ChainView` (the registry); their
implementations do the I/O and raise only :class:`~core.errors.KmsError`, which the checks
turn into findings (core/audit_findings.py).

:func:`verify_node` runs, in this order (steps 2 to 5 are core/audit_log_checks.py, step 6
core/audit_anchor_checks.py, step 7 core/audit_decisions.py):

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
5. Receipts the caller holds (optional): each signed by the registered key has its entry
   present with the hash the receipt vouches for; one that does not verify with that key
   is no evidence against the node (anyone can write one), only a warning.
6. Anchors: each anchor's signature; the root of the first ``s`` served entries is the root
   anchored at size ``s``; the node's consistency proofs (RFC 9162 2.1.4.2) between
   successive anchors and from the last anchor to the checkpoint. Where the log differs
   from an anchor, the first entry below the anchor's size written *after* the anchored
   checkpoint was signed names where history was rewritten (truncated and re-appended).
7. Each entry's block hash is the chain's at its block number; each granted entry was
   allowed by the grant state at that block (:func:`~core.audit_decisions.rejudge`).
   Denials are not failures; one the chain state does not explain is a warning.

Incremental audits: a run that passed returns what it verified
(:class:`~core.audit_findings.VerifiedPrefix`); given to the next run, step 3 reads only the
entries after it, once the node's consistency proof shows its tree extends it (steps 4 to 7
then cover the new entries and new anchors). The prefix's ``anchor_block`` is not signed:
anchors up to it are skipped only if the prefix extends the newest of them (step 6).

What can be named, and what cannot. A tamperer who edits stored entries but not the node's
Merkle state (the stored leaf hashes and subtree roots the node signs from) leaves the
signed checkpoint committing to the original log: each altered, swapped or deleted entry is
then named exactly. One who also rewrites a stored leaf hash makes that entry and its
sibling indistinguishable (both are named). One who rebuilds the whole tree gets the node to
sign the rewritten log; only anchors (and receipts) show it: anchors bound the rewritten range,
the entries' times name a truncation, and receipts name an altered entry exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.audit import Checkpoint, Receipt
from core.audit_anchor_checks import AnchorsChecked, check_anchors, extends_prefix
from core.audit_decisions import check_against_chain
from core.audit_findings import Check, EntryResult, Findings, NodeReport, VerifiedPrefix
from core.audit_log_checks import ServedLog, check_checkpoint, check_inclusion, check_receipts
from core.audit_sources import ChainView, LogSource, failed_in_transit
from core.errors import InvalidRequest, KmsError
from core.registry_types import CheckpointAnchor, NodeInfo


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
    if since is not None and since.node_id != node.node_id:
        raise InvalidRequest(
            f"the verified prefix is of node {since.node_id!r}, not {node.node_id!r}"
        )
    findings = Findings()
    served = ServedLog(node.node_id, since)
    anchored = AnchorsChecked(0, since.anchor_block if since is not None else 0)
    rejudged = signed = False
    # 1. Anchors before the checkpoint: every anchor read first is covered by the
    # checkpoint read after it, unless the log shrank.
    # A read that fails in transit ends the node's audit: what was not read is reported
    # as such ("could not read"), never as missing or altered. Only the anchors are still
    # compared with what was served before it, which asks nothing more of the node.
    anchors = _read_anchors(chain, node.node_id, findings)
    checkpoint = _read_checkpoint(log, findings) if not findings.could_not_read else None
    if checkpoint is not None:
        signed = check_checkpoint(checkpoint, node, findings)
        if since is None or extends_prefix(since, checkpoint, log, findings):
            served.read(log, checkpoint.tree_size, findings)
            if signed and not findings.could_not_read:
                check_inclusion(served, log, checkpoint, findings)
            check_receipts(list(receipts), served, log, node, checkpoint, findings)
            # Even after a failed read: a served prefix the anchors disown is evidence.
            anchored = check_anchors(
                anchors,
                checkpoint,
                signed=signed,
                served=served,
                log=log,
                node=node,
                findings=findings,
            )
            check_against_chain(served, chain, findings, rejudge_decisions=rejudge_decisions)
            rejudged = rejudge_decisions
    verified = None
    if (
        checkpoint is not None
        and signed
        and rejudged
        and not findings.problems
        and not findings.could_not_read
    ):
        tree = served.tree_through(checkpoint.tree_size)
        if tree is not None:
            verified = VerifiedPrefix(checkpoint, tree.hashes, anchored.block)
    return _report(served, findings, checkpoint, anchored, verified)


def _read_anchors(chain: ChainView, node_id: str, findings: Findings) -> list[CheckpointAnchor]:
    try:
        anchors = list(chain.checkpoint_anchors(node_id))
    except KmsError as e:
        message = f"cannot read the node's anchors on-chain: {e.message}"
        if failed_in_transit(e):
            findings.cannot_read(message)
        else:
            findings.fail(Check.REACHABLE, message)
        return []
    if not anchors:
        findings.warn(
            "no on-chain anchor yet: the log is checked against the node's own "
            "checkpoint only, which a node that rewrote its log would sign too"
        )
    return anchors


def _read_checkpoint(log: LogSource, findings: Findings) -> Checkpoint | None:
    try:
        return log.checkpoint()
    except KmsError as e:
        message = f"the node did not serve its checkpoint: {e.message}"
        if failed_in_transit(e):
            findings.cannot_read(message)
        else:
            findings.fail(Check.REACHABLE, message)
        return None


def _report(
    served: ServedLog,
    findings: Findings,
    checkpoint: Checkpoint | None,
    anchored: AnchorsChecked,
    verified: VerifiedPrefix | None,
) -> NodeReport:
    indices = sorted(set(served.leaves) | set(served.missing) | set(findings.entry_problems))
    results = tuple(
        EntryResult(
            leaf_index=index,
            entry=served.parsed.get(index),
            request_id=served.request_id(index),
            problems=tuple(findings.entry_problems.get(index, ())),
            warnings=tuple(findings.entry_warnings.get(index, ())),
        )
        for index in indices
    )
    warned = sum(1 for ws in findings.entry_warnings.values() if ws)
    warnings = list(findings.warnings)
    if warned:
        warnings.append(f"{warned} entries have warnings (see the report)")
    return NodeReport(
        node_id=served.node_id,
        checkpoint=checkpoint,
        entries=results,
        anchors_checked=anchored.count,
        anchored_size=anchored.size,
        anchored_block=anchored.block,
        problems=tuple(findings.problems),
        warnings=tuple(warnings),
        start=served.start,
        verified=verified,
        could_not_read=tuple(findings.could_not_read),
    )
