"""The auditor's checks on real logs (kms_node/audit_log.py, in-memory keys) tampered with in
their SQLite file, against a fake chain: every tamper kind fails and names the entry."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from core import merkle
from core.audit import AuditEntry, Checkpoint, Receipt
from core.audit_decisions import check_against_chain
from core.audit_findings import Check, Findings, NodeReport, Problem, Verdict, VerifiedPrefix
from core.audit_log_checks import (
    MAX_ENTRIES_PER_AUDIT,
    MAX_NAMED_BAD_RECEIPTS,
    MAX_READ_PROBLEMS,
    ServedLog,
)
from core.audit_sources import failed_in_transit
from core.audit_verify import verify_node
from core.errors import (
    ChainRejected,
    ChainUnavailable,
    InvalidRequest,
    ResourceExhausted,
    Unavailable,
    error_for_status,
)
from core.record_types import RecordType, to_mask
from core.registry_types import (
    AccessState,
    BlockRef,
    CheckpointAnchor,
    GrantInfo,
    NodeInfo,
    RecordInfo,
)
from kms_node.audit_log import AuditLog
from kms_node.keystore import MemoryKeyStore

NODE = "node-1"
PATIENT = "0x5B38Da6a701c568545dCfcB03FcB875f56beddC4"
DOCTOR = "0xAb8483F64d9C6d1EcF9b849Ae677dD3315835cb2"
STRANGER = "0x4B20993Bc481177ec7E8f571ceCaE8A9e22C02db"
RECORD = bytes(range(32))
CAPSULE = hashlib.sha256(b"capsule").digest()
T0 = 1_800_000_000
#: entry i is decided at block FIRST_BLOCK + i, at time T0 + i
FIRST_BLOCK = 100


def block_hash(number: int) -> bytes:
    return hashlib.sha256(b"block %d" % number).digest()


def make_entry(i: int, *, tag: str = "req", time: int | None = None) -> AuditEntry:
    """Every fifth request comes from a stranger, who has no grant and is denied."""
    granted = i % 5 != 4
    return AuditEntry(
        request_id=f"{tag}-{i}",
        node_id=NODE,
        time=T0 + i if time is None else time,
        requester=DOCTOR if granted else STRANGER,
        patient=PATIENT,
        record_id=RECORD,
        capsule_hash=CAPSULE,
        purpose_of_use="TREAT",
        decision="granted" if granted else "denied",
        reason_code="granted" if granted else "no_grant",
        reason="grant is active" if granted else "patient has not granted access",
        block_number=FIRST_BLOCK + i,
        block_hash=block_hash(FIRST_BLOCK + i),
        cfrag_hash=hashlib.sha256(b"cfrag %d" % i).digest() if granted else b"",
    )


class FakeChain:
    """Blocks FIRST_BLOCK... one second apart; the patient's record; a one-day grant to the
    doctor, revoked from block ``revoked_at`` on if set; the anchors given."""

    def __init__(self) -> None:
        self.anchors: list[CheckpointAnchor] = []
        self.revoked_at: int | None = None
        self.grant = GrantInfo(
            patient=PATIENT,
            grantee=DOCTOR,
            grantee_umbral_key=b"\x02" + b"k" * 32,
            expires_at=T0 + 86_400,
            allowed_types_mask=to_mask([RecordType.LAB_RESULT]),
            active=True,
            granted_at=T0 - 10,
        )
        self.record = RecordInfo(
            record_id=RECORD,
            patient=PATIENT,
            content_hash=b"c" * 32,
            storage_uri="blob:x",
            record_type=RecordType.LAB_RESULT,
            capsule_hash=CAPSULE,
            creator=PATIENT,
            active=True,
            created_at=T0 - 20,
        )
        self.calls = 0

    def checkpoint_anchors(self, node_id: str, /) -> list[CheckpointAnchor]:
        return [a for a in self.anchors if a.node_id == node_id]

    def block(self, number: int, /) -> BlockRef:
        return BlockRef(number, block_hash(number), T0 + number - FIRST_BLOCK)

    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int
    ) -> AccessState:
        self.calls += 1
        grant = self.grant if grantee == DOCTOR else None
        if grant is not None and self.revoked_at is not None and block >= self.revoked_at:
            grant = dataclasses.replace(grant, active=False)
        record = self.record if record_id == RECORD else None
        return AccessState(record, grant, block, self.block(block).timestamp)

    def anchor(self, checkpoint: Checkpoint) -> None:
        block = FIRST_BLOCK + 1000 + len(self.anchors)
        self.anchors.append(
            CheckpointAnchor(
                node_id=checkpoint.node_id,
                tree_size=checkpoint.tree_size,
                root_hash=checkpoint.root,
                timestamp=checkpoint.timestamp,
                signature=checkpoint.signature,
                block=block,
            )
        )


class Clock:
    """The node's clock: checkpoints are signed just after the latest entry."""

    def __init__(self) -> None:
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Node:
    path: Path
    keys: MemoryKeyStore
    log: AuditLog
    clock: Clock
    chain: FakeChain
    receipts: list[Receipt]

    @property
    def info(self) -> NodeInfo:
        return NodeInfo(
            node_id=NODE,
            endpoint="127.0.0.1:1",
            signing_public_key=self.keys.signing_public_key(),
            delivery_public_key=b"\x02" + b"d" * 32,
            account=PATIENT,
            active=True,
        )

    def append(self, entries: list[AuditEntry]) -> None:
        for entry in entries:
            self.receipts.append(self.log.append(entry))
            self.clock.now = max(self.clock.now, entry.time + 1)

    def anchor(self) -> Checkpoint:
        checkpoint = self.log.checkpoint()
        self.chain.anchor(checkpoint)
        return checkpoint

    def verify(self, **kwargs: Any) -> NodeReport:
        """verify_node on this node, with verify_node's keyword arguments."""
        return verify_node(self.info, self.log, self.chain, **kwargs)

    def sql(self) -> sqlite3.Connection:
        """A second connection to the node's file: the tamperer's."""
        return sqlite3.connect(self.path, isolation_level=None)

    def reopen(self) -> None:
        """The node restarts."""
        self.log.close()
        self.log = AuditLog(self.path, self.keys, NODE, clock=self.clock)

    def truncate(self, size: int) -> None:
        """The tamperer cuts the log to ``size`` entries and rebuilds the tree, so the node
        signs the shorter log; then the node restarts."""
        with closing(self.sql()) as conn:
            conn.execute("DELETE FROM entries WHERE leaf_index >= ?", (size,))
            rebuild_tree(conn)
        self.reopen()


def open_node(tmp_path: Path) -> Node:
    """40 entries, anchored at 16 and 32 (in blocks 1100 and 1101); the caller closes its
    log."""
    path, keys, clock = tmp_path / "audit.sqlite", MemoryKeyStore(), Clock()
    n = Node(path, keys, AuditLog(path, keys, NODE, clock=clock), clock, FakeChain(), [])
    n.append([make_entry(i) for i in range(16)])
    n.anchor()
    n.append([make_entry(i) for i in range(16, 32)])
    n.anchor()
    n.append([make_entry(i) for i in range(32, 40)])
    return n


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """40 entries, anchored at 16 and 32."""
    n = open_node(tmp_path)
    yield n
    n.log.close()


def first(report: NodeReport) -> Problem:
    problem = report.first_failure()
    assert problem is not None, "the auditor found nothing"
    return problem


def failed_indices(report: NodeReport) -> set[int]:
    return {r.leaf_index for r in report.entries if not r.ok}


def rebuild_tree(conn: sqlite3.Connection) -> None:
    """What a tamperer who knows the format does after editing entries: recompute the
    stored leaf hashes, subtree roots and tree row, so the node signs the edited log."""
    rows = conn.execute("SELECT leaf_index, entry FROM entries ORDER BY leaf_index").fetchall()
    conn.execute("DELETE FROM subtrees")
    tree = merkle.CompactRange()
    for index, data in rows:
        leaf = merkle.leaf_hash(data)
        conn.execute("UPDATE entries SET leaf_hash = ? WHERE leaf_index = ?", (leaf, index))
        tree, nodes = tree.append_with_nodes(leaf)
        conn.executemany(
            "INSERT INTO subtrees (level, idx, hash) VALUES (?, ?, ?)",
            [(n.level, n.index, n.hash) for n in nodes[1:]],
        )
    conn.execute(
        "UPDATE tree SET tree_size = ?, frontier = ? WHERE id = 1", (tree.size, tree.to_bytes())
    )


def entry_bytes(conn: sqlite3.Connection, index: int) -> bytes:
    (data,) = conn.execute("SELECT entry FROM entries WHERE leaf_index = ?", (index,)).fetchone()
    return bytes(data)


# --- an honest log -------------------------------------------------------------------------


def test_an_untouched_log_passes_every_check(node: Node) -> None:
    report = node.verify(receipts=node.receipts)
    assert report.ok, [report.describe(p) for p in report.problems]
    assert (len(report.entries), report.granted, report.denied) == (40, 32, 8)
    assert report.anchors_checked == 2
    assert report.warnings == ("entries 32 to 39 are not anchored yet",)
    assert report.checkpoint is not None and report.checkpoint.tree_size == 40
    # One chain read per granted entry and per checkable denial (the adapter caches them).
    assert node.chain.calls == 40


def test_without_anchors_the_log_is_checked_and_a_warning_says_so(node: Node) -> None:
    node.chain.anchors.clear()
    report = node.verify()
    assert report.ok and report.anchors_checked == 0
    assert any("no on-chain anchor yet" in w for w in report.warnings)


def test_the_node_may_keep_appending_while_it_is_audited(node: Node) -> None:
    class Growing:
        """Entries arrive between the checkpoint and the reading of the entries."""

        def __getattr__(self, name: str) -> Any:
            return getattr(node.log, name)

        def checkpoint(self) -> Checkpoint:
            checkpoint = node.log.checkpoint()
            node.append([make_entry(i) for i in range(40, 45)])
            return checkpoint

    report = verify_node(node.info, Growing(), node.chain)
    assert report.ok and len(report.entries) == 40


# --- tampering with the stored entries -----------------------------------------------------


@pytest.mark.parametrize("restart", [False, True], ids=["live", "after-restart"])
def test_one_changed_byte_names_the_entry(node: Node, restart: bool) -> None:
    with node.sql() as conn:
        data = entry_bytes(conn, 13)
        # One hex digit of the capsule hash: the entry still parses, it just says otherwise.
        at = data.index(b'"capsule_hash":"0x') + len(b'"capsule_hash":"0x')
        changed = data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 13", (changed,))
    if restart:
        node.reopen()  # the node's own open check looks at the newest entries only
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (13, Check.INCLUSION)
    assert report.describe(problem).startswith("entry 13 (request req-13): not the entry")
    assert failed_indices(report) == {13}
    # Both anchors cover it; the node's own tree is intact, so its proofs are consistent.
    assert [p.message for p in report.problems if p.leaf_index is None] == [
        "the first 16 entries differ from the checkpoint anchored in block 1100 "
        "(and 1 later anchor)"
    ]


def test_a_changed_byte_that_breaks_the_entry_still_names_it(node: Node) -> None:
    with node.sql() as conn:
        data = entry_bytes(conn, 7)
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 7", (data[:-1] + b" ",))
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (7, Check.FORMAT)
    assert report.request_id(7) == ""  # the JSON no longer parses at all
    assert failed_indices(report) == {7}


@pytest.mark.parametrize(
    "hostile",
    [
        b"[" * 200_000,  # plain json.loads of this kills a process that imported web3
        b'{"request_id":"req-7","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"request_id":"req-7","x":"' + b"y" * 100_000 + b'"}',
    ],
    ids=["deep", "deep-with-request-id", "huge"],
)
def test_a_hostile_entry_fails_that_entry_and_the_audit_goes_on(node: Node, hostile: bytes) -> None:
    with node.sql() as conn:
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 7", (hostile,))
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (7, Check.FORMAT)
    assert problem.message.startswith("not a valid audit entry: audit entry ")
    assert report.request_id(7) == ""  # too deep or too large: not read
    assert report.request_id(8) == "req-8"
    assert len(report.entries) == 40


class StrayRows:
    """A hostile node's entries: row after row beyond its checkpoint, without end."""

    def __init__(self) -> None:
        self.served = 0

    def entries(self, start: int, end: int, /) -> Iterator[tuple[int, bytes]]:
        while True:
            self.served += 1
            yield end + self.served, b"{}"


def test_a_node_streaming_junk_is_read_only_up_to_a_bound_of_problems() -> None:
    hostile, findings = StrayRows(), Findings()
    ServedLog(NODE, None).read(hostile, 40, findings)  # type: ignore[arg-type]
    assert hostile.served == MAX_READ_PROBLEMS
    assert len(findings.problems) == MAX_READ_PROBLEMS + 1
    assert findings.problems[-1].message.startswith(
        "the rest of the log, from entry 0, was not read: the node served 1000 entries"
    )


def test_a_checkpoint_beyond_what_one_audit_reads_is_not_read() -> None:
    """A checkpoint may claim any size (the node signs it): the auditor does not page
    through 2^63 entries. Not evidence against the node: it could not be read."""
    hostile, findings = StrayRows(), Findings()
    ServedLog(NODE, None).read(hostile, MAX_ENTRIES_PER_AUDIT + 1, findings)  # type: ignore[arg-type]
    assert hostile.served == 0 and findings.problems == []
    assert findings.could_not_read == [
        f"the checkpoint covers {MAX_ENTRIES_PER_AUDIT + 1} entries not verified yet; one "
        f"audit reads at most {MAX_ENTRIES_PER_AUDIT}"
    ]


def test_entries_are_judged_against_the_chain_in_block_order(node: Node) -> None:
    """The grant state at a block is rebuilt forward from the one before: a log whose
    blocks jump back and forth would make every entry replay the chain's events."""
    entries = {i: make_entry(i) for i in range(6)}
    jumping = {i: entries[j] for i, j in enumerate([5, 0, 4, 1, 3, 2])}
    served = ServedLog(NODE, None)
    served.parsed = dict(jumping)
    asked: list[int] = []
    access_state = node.chain.access_state

    def recorded(record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int) -> Any:
        asked.append(block)
        return access_state(record_id, grantee, capsule_hash, block=block)

    node.chain.access_state = recorded  # type: ignore[method-assign]
    findings = Findings()
    check_against_chain(served, node.chain, findings, rejudge_decisions=True)
    assert findings.problems == []
    assert asked == sorted(asked) and len(asked) == 6


def test_the_served_log_keeps_no_bytes_of_entries(node: Node) -> None:
    with node.sql() as conn:
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 7", (b"[1]",))
        conn.execute(
            "UPDATE entries SET entry = ? WHERE leaf_index = 9", (b'{"request_id": "req-9"}',)
        )
    served = ServedLog(NODE, None)
    served.read(node.log, 40, Findings())
    # Of entries that do not parse, only what a report names: the request id, if any.
    assert served.unparsed_ids == {7: "", 9: "req-9"} and len(served.leaves) == 40
    # What entries repeat is held once.
    one, other = served.parsed[0], served.parsed[1]
    assert one is not None and other is not None
    assert one.patient is other.patient and one.record_id is other.record_id
    assert one.request_id != other.request_id


def test_a_deleted_entry_is_named_with_the_entry_before_it(node: Node) -> None:
    with node.sql() as conn:
        conn.execute("DELETE FROM entries WHERE leaf_index = 13")
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (13, Check.SEQUENCE)
    assert "missing" in problem.message and "after request req-12" in problem.message
    # Its sibling cannot be proven any more: reported, but it is not what is named.
    sibling = [p for p in report.problems if p.leaf_index == 12]
    assert sibling and not any(p.primary for p in sibling)
    assert failed_indices(report) == {12, 13}


def test_two_swapped_entries_are_both_named(node: Node) -> None:
    with node.sql() as conn:
        a, b = entry_bytes(conn, 5), entry_bytes(conn, 21)
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 5", (b,))
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 21", (a,))
    report = node.verify()
    assert failed_indices(report) == {5, 21}
    problem = first(report)
    assert problem.leaf_index == 5 and problem.check == Check.INCLUSION
    # The request now at leaf 5 is the one that was at leaf 21.
    assert report.describe(problem).startswith("entry 5 (request req-21)")


def test_swapped_rows_with_their_stored_hashes_are_named_with_their_siblings(node: Node) -> None:
    """Rows swapped whole (entry and stored leaf hash): the node's proofs of the siblings
    then carry the swapped hashes, so each pair is named; the auditor cannot tell which of
    two siblings is the moved one without receipts."""
    with node.sql() as conn:
        conn.execute("UPDATE entries SET leaf_index = 999 WHERE leaf_index = 5")
        conn.execute("UPDATE entries SET leaf_index = 5 WHERE leaf_index = 21")
        conn.execute("UPDATE entries SET leaf_index = 21 WHERE leaf_index = 999")
    report = node.verify()
    assert {5, 21} <= failed_indices(report) <= {4, 5, 20, 21}
    with_receipts = node.verify(receipts=node.receipts)
    receipt_named = {p.leaf_index for p in with_receipts.problems if p.check == Check.RECEIPT}
    assert receipt_named == {5, 21}


def test_a_truncated_and_reappended_log_names_where_history_was_rewritten(node: Node) -> None:
    """The tamperer cuts the log at 20 and rebuilds the tree; the node appends new
    requests and signs the new log. The anchor at 32 shows it, and the first entry below
    32 written after that anchor names the cut."""
    node.truncate(20)
    node.clock.now = T0 + 500
    node.append([make_entry(20 + j, tag="new", time=T0 + 500 + j) for j in range(25)])
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (20, Check.REWRITTEN)
    assert report.describe(problem).startswith("entry 20 (request new-20): written at")
    assert "truncated here and re-appended" in problem.message
    log_wide = [p.message for p in report.problems if p.leaf_index is None]
    assert log_wide == [
        "the first 32 entries differ from the checkpoint anchored in block 1101",
        "the node's tree is not consistent between the checkpoint of 32 entries anchored in "
        "block 1101 and the one before (16 and 32 entries; RFC 9162 2.1.4) (and 1 later pair)",
    ]


def test_a_log_cut_below_its_anchor_names_the_first_missing_entry(node: Node) -> None:
    node.truncate(28)
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (28, Check.ANCHOR)
    assert "truncated" in problem.message


def test_a_rebuilt_log_is_bounded_by_the_anchors_and_named_by_receipts(node: Node) -> None:
    """Entry 25 edited and the whole tree rebuilt: the node signs the edited log, so only
    the anchors see it (somewhere in 16..31) and a receipt names it exactly."""
    with node.sql() as conn:
        data = entry_bytes(conn, 25).replace(
            b'"purpose_of_use":"TREAT"', b'"purpose_of_use":"HRESCH"'
        )
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 25", (data,))
        rebuild_tree(conn)
    node.reopen()
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (16, Check.ANCHOR)
    assert "entries 16 to 31 are not the ones anchored" in problem.message
    named = first(node.verify(receipts=node.receipts))
    assert (named.leaf_index, named.check) == (25, Check.RECEIPT)


def test_receipts_for_entries_the_log_no_longer_has_are_named(node: Node) -> None:
    node.chain.anchors.clear()
    node.truncate(35)
    assert node.verify().ok  # nothing else can tell
    problem = first(node.verify(receipts=node.receipts))
    assert (problem.leaf_index, problem.check) == (35, Check.RECEIPT)


def forgeries(receipt: Receipt) -> dict[str, Receipt]:
    """Receipts anyone can write, none signed by the node: well formed, badly signed."""
    other_hash = hashlib.sha256(b"an entry the node never wrote").digest()
    return {
        "someone else's key": dataclasses.replace(
            receipt, signature=MemoryKeyStore().sign(receipt.canonical_bytes())
        ),
        "no signature": dataclasses.replace(receipt, signature=b""),
        "garbage signature": dataclasses.replace(receipt, signature=b"\x30" * 70),
        # The node's signature over another statement: the hash the log contradicts.
        "another entry's hash": dataclasses.replace(receipt, entry_hash=other_hash),
    }


@pytest.mark.parametrize(
    "how", ["someone else's key", "no signature", "garbage signature", "another entry's hash"]
)
def test_a_receipt_the_node_did_not_sign_is_bad_evidence_not_a_failure(
    node: Node, how: str
) -> None:
    """Anyone (an app, a coordinator relaying fragments) can write a receipt: one that does
    not verify with the node's registered key does not fail an honest node. It is named in
    a warning, as bad evidence, and the node passes (its prefix verified for the next run)."""
    forged = forgeries(node.receipts[3])[how]
    report = node.verify(receipts=[forged, *node.receipts])
    assert report.verdict is Verdict.PASSED, [report.describe(p) for p in report.problems]
    assert report.verified is not None
    (warning,) = [w for w in report.warnings if "bad evidence" in w]
    assert "the receipt for entry 3" in warning
    assert forged.entry_hash.hex()[:16] in warning
    assert "does not verify with the node's registered key" in warning


def test_a_genuine_receipt_the_log_contradicts_still_fails_the_node(node: Node) -> None:
    """A receipt the node did sign, for entry 3 with a hash its log does not hold, fails it
    as before, whatever forged receipts come with it."""
    genuine = dataclasses.replace(
        node.receipts[3], entry_hash=make_entry(3, tag="other").leaf_hash()
    )
    genuine = dataclasses.replace(genuine, signature=node.keys.sign(genuine.canonical_bytes()))
    forged = forgeries(node.receipts[5])["garbage signature"]
    report = node.verify(receipts=[forged, genuine])
    assert report.verdict is Verdict.FAILED
    assert [(p.check, p.leaf_index) for p in report.problems] == [(Check.RECEIPT, 3)]
    assert "not the entry the node's signed receipt vouches for" in report.problems[0].message
    assert [w for w in report.warnings if "bad evidence" in w and "entry 5" in w]


def test_receipts_that_do_not_verify_are_named_up_to_a_bound_then_counted(node: Node) -> None:
    forged = [dataclasses.replace(r, signature=b"") for r in node.receipts for _ in range(2)]  # 80
    report = node.verify(receipts=forged)
    assert report.ok
    bad = [w for w in report.warnings if "bad evidence" in w]
    assert len(bad) == MAX_NAMED_BAD_RECEIPTS + 1
    assert f"{80 - MAX_NAMED_BAD_RECEIPTS} more receipts" in bad[-1]


def test_a_receipt_kept_for_another_read_is_named_for_its_holder_not_against_the_node(
    node: Node,
) -> None:
    """A receipt names its entry only by hash: a relay can hand an app the node's genuine
    receipt of another read. The app notes the request and fragment it kept the receipt
    for; the auditor compares the note with the entry and names the mismatch as bad
    evidence for the holder. The node, which signed a true statement, passes."""
    own = node.receipts[3].kept_for("req-3", b"cfrag 3")
    other_read = node.receipts[6].kept_for("req-3", b"cfrag 3")
    other_fragment = node.receipts[8].kept_for("req-8", b"cfrag 3")
    report = node.verify(receipts=[own, other_read, other_fragment])
    assert report.verdict is Verdict.PASSED, [report.describe(p) for p in report.problems]
    named = [w for w in report.warnings if "bad evidence for its holder" in w]
    assert len(named) == 2
    assert "entry 6 was kept for request req-3, but the entry is request req-6's" in named[0]
    assert "entry 8 was kept for a fragment with SHA-256" in named[1]
    assert "the node is not at fault" in named[0]
    # Receipts without a note (older receipts files) are judged as before.
    assert not [w for w in node.verify(receipts=node.receipts).warnings if "holder" in w]


# --- keys, anchors and the chain -----------------------------------------------------------


def test_the_registered_key_is_the_one_that_counts(node: Node) -> None:
    other = MemoryKeyStore()
    info = dataclasses.replace(node.info, signing_public_key=other.signing_public_key())
    report = verify_node(info, node.log, node.chain)
    checks = {p.check for p in report.problems}
    assert Check.CHECKPOINT in checks and Check.ANCHOR in checks
    assert report.anchors_checked == 0


def test_an_anchor_with_a_bad_signature_fails(node: Node) -> None:
    node.chain.anchors[0] = dataclasses.replace(node.chain.anchors[0], signature=b"\x30\x00")
    report = node.verify()
    assert report.anchors_checked == 1
    assert any(
        "anchored in block" in p.message and p.check == Check.ANCHOR for p in report.problems
    )


def test_a_block_hash_that_is_not_the_chains_is_named(node: Node) -> None:
    bad = dataclasses.replace(make_entry(40), block_hash=b"\x00" * 32)
    node.append([bad])
    problem = first(node.verify())
    assert (problem.leaf_index, problem.check) == (40, Check.BLOCK)


# --- a node that serves what is not its log ------------------------------------------------


class Serving:
    """A LogSource of a hostile node: the node's log, but with ``checkpoint`` served as its
    checkpoint (if given) and its entry stream edited by ``rows`` (if given)."""

    def __init__(
        self,
        log: AuditLog,
        *,
        checkpoint: Checkpoint | None = None,
        rows: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]] | None = None,
    ) -> None:
        self.log, self.served_checkpoint, self.rows = log, checkpoint, rows

    def checkpoint(self) -> Checkpoint:
        return self.served_checkpoint or self.log.checkpoint()

    def entries(self, start: int, end: int, /) -> list[tuple[int, bytes]]:
        rows = list(self.log.entries(start, end))
        return self.rows(rows) if self.rows is not None else rows

    def inclusion_proof(self, leaf_index: int, tree_size: int, /) -> list[bytes]:
        return self.log.inclusion_proof(leaf_index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int, /) -> list[bytes]:
        return self.log.consistency_proof(old_size, new_size)


@pytest.mark.parametrize("anchored", [True, False], ids=["anchored", "no-anchor"])
def test_a_checkpoint_of_another_node_fails_though_the_nodes_key_signed_it(
    node: Node, anchored: bool
) -> None:
    if not anchored:
        node.chain.anchors.clear()  # nothing else then ties the checkpoint to this node
    own = node.log.checkpoint()
    other = dataclasses.replace(own, node_id="node-2")
    other = dataclasses.replace(other, signature=node.keys.sign(other.canonical_bytes()))

    report = verify_node(node.info, Serving(node.log, checkpoint=other), node.chain)

    assert report.verdict is Verdict.FAILED
    assert report.problems == (Problem(Check.CHECKPOINT, "the checkpoint is of node 'node-2'"),)
    assert report.checkpoint == other and report.verified is None


def test_an_entry_naming_another_node_is_named(node: Node) -> None:
    """Another node's entry in this node's log (tree rebuilt, so the node signs it): the
    auditor does not count another node's decision as this one's."""
    node.append([make_entry(40)])
    foreign = dataclasses.replace(make_entry(40), node_id="node-2").canonical_bytes()
    with closing(node.sql()) as conn:
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 40", (foreign,))
        rebuild_tree(conn)
    node.reopen()

    report = node.verify()

    assert report.verdict is Verdict.FAILED
    assert report.problems == (Problem(Check.FORMAT, "the entry names node 'node-2'", 40),)
    assert report.describe(first(report)) == (
        "entry 40 (request req-40): the entry names node 'node-2'"
    )


def test_an_entry_served_beyond_the_checkpoint_is_refused_and_not_taken(node: Node) -> None:
    extra = make_entry(40, tag="forged").canonical_bytes()
    hostile = Serving(node.log, rows=lambda rows: [*rows, (40, extra)])

    report = verify_node(node.info, hostile, node.chain)

    assert report.verdict is Verdict.FAILED
    assert report.problems == (
        Problem(Check.SEQUENCE, "the node served entry 40, beyond its checkpoint of 40"),
    )
    assert [r.leaf_index for r in report.entries] == list(range(40))


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        # Entry 5 again after entry 9, with other bytes: the first one served counts.
        (
            lambda rows: [
                *rows[:10],
                (5, make_entry(5, tag="forged").canonical_bytes()),
                *rows[10:],
            ],
            [Problem(Check.SEQUENCE, "served again or out of order, after entry 9", 5)],
        ),
        # Entries 5 and 6 swapped: 5 is missing where it belongs, and out of order after 6.
        (
            lambda rows: [*rows[:5], rows[6], rows[5], *rows[7:]],
            [
                Problem(
                    Check.SEQUENCE,
                    "missing: the entry is not served after request req-4 (next the node "
                    "serves entry 6)",
                    5,
                ),
                Problem(Check.SEQUENCE, "served again or out of order, after entry 6", 5),
            ],
        ),
    ],
    ids=["again", "out-of-order"],
)
def test_an_entry_served_again_or_out_of_order_is_named(
    node: Node,
    stream: Callable[[list[tuple[int, bytes]]], list[tuple[int, bytes]]],
    expected: list[Problem],
) -> None:
    report = verify_node(node.info, Serving(node.log, rows=stream), node.chain)
    assert report.verdict is Verdict.FAILED
    assert list(report.problems) == expected
    assert report.request_id(5) == ("req-5" if len(expected) == 1 else "")


def test_an_unreachable_node_could_not_be_read_and_is_not_failed(node: Node) -> None:
    refused = "node-1 unavailable: connection refused"

    class Down:
        """A LogSource whose every call fails as an unreachable node's does."""

        def checkpoint(self) -> Checkpoint:
            raise Unavailable(refused)

        def entries(self, start: int, end: int, /) -> list[tuple[int, bytes]]:
            raise Unavailable(refused)

        def inclusion_proof(self, leaf_index: int, tree_size: int, /) -> list[bytes]:
            raise Unavailable(refused)

        def consistency_proof(self, old_size: int, new_size: int, /) -> list[bytes]:
            raise Unavailable(refused)

    report = verify_node(node.info, Down(), node.chain)
    assert report.problems == ()
    assert report.verdict is Verdict.COULD_NOT_READ and not report.ok
    assert report.could_not_read == (f"the node did not serve its checkpoint: {refused}",)
    assert report.entries == () and report.verified is None


class StopsAfter:
    """The node's log, whose entry stream fails with ``error`` after ``count`` entries
    (a deadline in the middle of a page); its proofs fail the same way if ``proofs``."""

    def __init__(self, log: AuditLog, count: int, error: Exception, *, proofs: bool = False):
        self.log, self.count, self.error, self.proofs = log, count, error, proofs

    def checkpoint(self) -> Checkpoint:
        return self.log.checkpoint()

    def entries(self, start: int, end: int, /) -> Iterator[tuple[int, bytes]]:
        for served, row in enumerate(self.log.entries(start, end)):
            if served == self.count:
                raise self.error
            yield row

    def inclusion_proof(self, leaf_index: int, tree_size: int, /) -> list[bytes]:
        if self.proofs:
            raise self.error
        return self.log.inclusion_proof(leaf_index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int, /) -> list[bytes]:
        if self.proofs:
            raise self.error
        return self.log.consistency_proof(old_size, new_size)


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("node-1: Deadline Exceeded"),  # what rpc.error_from_rpc makes of it
        ResourceExhausted("node-1: Received message larger than max"),
        error_for_status("CANCELLED", "node-1: Cancelled"),
    ],
    ids=["deadline", "resource-exhausted", "cancelled"],
)
def test_a_stream_cut_in_transit_could_not_be_read_and_is_never_missing(
    node: Node, error: Exception
) -> None:
    report = verify_node(node.info, StopsAfter(node.log, 10, error), node.chain)
    assert report.problems == (), [report.describe(p) for p in report.problems]
    assert report.verdict is Verdict.COULD_NOT_READ
    (reason,) = report.could_not_read
    assert reason.startswith("the node stopped serving entries at entry 10: ")
    assert report.verified is None
    assert node.chain.calls == 0  # the node's audit stopped at the failed read


def rewrite_from(node: Node, size: int, total: int) -> None:
    """The tamperer cuts the log at ``size`` (tree rebuilt); the node appends new requests
    up to ``total`` entries, later, and signs the rewritten log."""
    node.truncate(size)
    node.clock.now = T0 + 500
    node.append([make_entry(i, tag="new", time=T0 + 500 + i) for i in range(size, total)])


def test_a_rewritten_prefix_then_a_failed_read_fails_on_the_anchors(node: Node) -> None:
    """A node that serves a rewritten log and then answers UNAVAILABLE: the entries it
    served before are compared with the anchors (no more is asked of the node), and their
    mismatch is evidence. Only what the node did not serve is "could not read"."""
    rewrite_from(node, 20, 45)
    unavailable = Unavailable("node-1 unavailable: connection reset")

    report = verify_node(node.info, StopsAfter(node.log, 36, unavailable), node.chain)

    assert report.verdict is Verdict.FAILED
    assert report.could_not_read == (
        "the node stopped serving entries at entry 36: node-1 unavailable: connection reset",
    )
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (20, Check.REWRITTEN)
    assert [p.message for p in report.problems if p.leaf_index is None] == [
        "the first 32 entries differ from the checkpoint anchored in block 1101"
    ]
    assert node.chain.calls == 0  # nothing else is read after the failed read
    # A node that stops before the first anchor it no longer matches leaves no evidence.
    early = verify_node(node.info, StopsAfter(node.log, 30, unavailable), node.chain)
    assert early.problems == () and early.verdict is Verdict.COULD_NOT_READ


def test_a_stream_cut_by_the_node_is_still_a_finding(node: Node) -> None:
    """Only a failure in transit is spared: a node that refuses its own entries fails."""
    refusal = InvalidRequest("end must not be below start")
    report = verify_node(node.info, StopsAfter(node.log, 10, refusal), node.chain)
    assert report.verdict is Verdict.FAILED and report.could_not_read == ()
    assert (first(report).check, first(report).leaf_index) == (Check.SEQUENCE, 10)


def test_a_tampered_log_fails_even_when_a_later_read_could_not_be_made(node: Node) -> None:
    with node.sql() as conn:
        data = entry_bytes(conn, 13)
        conn.execute("UPDATE entries SET entry = ? WHERE leaf_index = 13", (data + b" ",))
    timeout = Unavailable("node-1: Deadline Exceeded")
    report = verify_node(node.info, StopsAfter(node.log, 40, timeout, proofs=True), node.chain)
    assert report.verdict is Verdict.FAILED
    assert (first(report).check, first(report).leaf_index) == (Check.FORMAT, 13)
    assert report.could_not_read == ("entry 0's inclusion proof: node-1: Deadline Exceeded",)


def test_a_chain_that_refuses_fails_the_granted_entries(node: Node) -> None:
    class Refusing(FakeChain):
        def access_state(
            self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int
        ) -> AccessState:
            raise ChainRejected("chain refused accessState: missing trie node")

    report = verify_node(node.info, node.log, Refusing())
    assert failed_indices(report) == {i for i in range(40) if i % 5 != 4}
    assert report.could_not_read == ()


def test_a_chain_that_cannot_be_reached_could_not_be_read(node: Node) -> None:
    class Down(FakeChain):
        def access_state(
            self, record_id: bytes, grantee: str, capsule_hash: bytes, /, *, block: int
        ) -> AccessState:
            raise ChainUnavailable("chain at http://127.0.0.1:1 unavailable")

    report = verify_node(node.info, node.log, Down())
    assert report.problems == () and report.verdict is Verdict.COULD_NOT_READ
    assert report.could_not_read == (
        "entry 0: cannot read the grant state at block 100: chain at http://127.0.0.1:1 "
        "unavailable",
    )


@pytest.mark.parametrize(
    ("error", "in_transit"),
    [
        (Unavailable("x"), True),
        (ChainUnavailable("x"), True),
        (ResourceExhausted("x"), True),
        (error_for_status("DEADLINE_EXCEEDED", "x"), True),
        (error_for_status("CANCELLED", "x"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (InvalidRequest("x"), False),
        (ChainRejected("x"), False),
        (error_for_status("DATA_LOSS", "x"), False),
        (error_for_status("UNKNOWN", "x"), False),
        (ValueError("x"), False),
    ],
)
def test_what_failed_in_transit(error: BaseException, in_transit: bool) -> None:
    assert failed_in_transit(error) is in_transit


# --- decisions re-judged against the grant state at their block ----------------------------


def test_granted_after_revocation_is_flagged(node: Node) -> None:
    node.chain.revoked_at = FIRST_BLOCK + 30
    report = node.verify()
    problem = first(report)
    assert (problem.leaf_index, problem.check) == (30, Check.POLICY)
    assert report.describe(problem) == (
        "entry 30 (request req-30): granted, but at block 130: grant has been revoked by the "
        "patient"
    )
    assert failed_indices(report) == {i for i in range(30, 40) if i % 5 != 4}


def test_a_denial_the_chain_does_not_explain_is_a_warning(node: Node) -> None:
    denied = dataclasses.replace(
        make_entry(40), decision="denied", reason_code="grant_revoked", reason="revoked",
        cfrag_hash=b"",
    )  # fmt: skip
    node.append([denied])
    report = node.verify()
    assert report.ok
    (result,) = [r for r in report.entries if r.leaf_index == 40]
    assert result.warnings == (
        "denied as grant_revoked, but the chain state gives granted: at block 140: grant is "
        "active and covers this record",
    )


def recorded(entry: AuditEntry, record_type: RecordType, key: bytes) -> AuditEntry:
    """``entry`` as a version 2 entry, recording the request's type and receiving key."""
    return dataclasses.replace(entry, record_type=record_type, requester_umbral_key=key)


def test_a_grant_for_another_receiving_key_is_flagged_and_its_denial_confirmed(
    node: Node,
) -> None:
    other_key = b"\x03" + b"z" * 32
    granted = recorded(make_entry(40), RecordType.LAB_RESULT, other_key)
    denied = dataclasses.replace(
        recorded(make_entry(41), RecordType.LAB_RESULT, other_key),
        decision="denied",
        reason_code="receiving_key_mismatch",
        reason="requester_umbral_key is not the key in the grant",
        cfrag_hash=b"",
    )
    legacy = dataclasses.replace(
        make_entry(42),
        decision="denied",
        reason_code="receiving_key_mismatch",
        reason="requester_umbral_key is not the key in the grant",
        cfrag_hash=b"",
    )
    node.append([granted, denied, legacy])

    report = node.verify()

    assert [(p.check, p.leaf_index) for p in report.problems] == [(Check.POLICY, 40)]
    assert "requester_umbral_key is not the key in the grant" in report.problems[0].message
    # The denial is confirmed, and the version 1 one is not judged: no warnings for either.
    assert {r.leaf_index: r.warnings for r in report.entries if r.leaf_index in (41, 42)} == {
        41: (),
        42: (),
    }


def test_granted_in_the_second_the_grant_expired_is_a_tie_not_a_failure(node: Node) -> None:
    node.chain.grant = dataclasses.replace(node.chain.grant, expires_at=T0 + 45)
    node.append([make_entry(40, time=T0 + 45)])  # block time T0 + 40
    report = node.verify()
    assert report.ok
    (result,) = [r for r in report.entries if r.leaf_index == 40]
    assert result.warnings == ("granted in the second the grant expired (a tie)",)
    node.append([make_entry(41, time=T0 + 46)])
    assert first(node.verify()).leaf_index == 41


def test_rejudging_can_be_left_out_for_an_integrity_only_check(node: Node) -> None:
    node.chain.revoked_at = FIRST_BLOCK
    assert node.verify(rejudge_decisions=False).ok
    assert node.chain.calls == 0


# --- incremental audits ----------------------------------------------------------------------


def test_an_incremental_audit_reads_only_what_came_after(node: Node) -> None:
    full = node.verify(receipts=node.receipts)
    prefix = full.verified
    assert prefix is not None and prefix.tree_size == 40
    assert prefix.anchor_block == node.chain.anchors[-1].block
    node.append([make_entry(i) for i in range(40, 52)])
    node.anchor()  # a new anchor, beyond the prefix
    node.append([make_entry(i) for i in range(52, 55)])
    node.chain.calls = 0

    report = node.verify(since=prefix, receipts=node.receipts)

    assert report.ok, [report.describe(p) for p in report.problems]
    assert report.start == 40
    assert [r.leaf_index for r in report.entries] == list(range(40, 55))
    assert node.chain.calls == 15  # only the new entries are judged again
    assert report.verified is not None and report.verified.tree_size == 55
    # The next prefix is the one a full audit gives.
    again = node.verify()
    assert again.verified is not None
    assert again.verified.checkpoint.root == report.verified.checkpoint.root
    assert again.verified.frontier == report.verified.frontier


def test_a_log_rewritten_below_the_verified_prefix_fails_the_incremental_audit(
    node: Node,
) -> None:
    prefix = node.verify().verified
    assert prefix is not None
    # Truncated to 36 and re-appended, tree rebuilt: the node signs the rewritten log.
    node.truncate(36)
    node.append([make_entry(i, tag="forged") for i in range(36, 44)])

    report = node.verify(since=prefix)

    assert not report.ok and report.verified is None
    problem = first(report)
    assert problem.check == Check.ANCHOR
    assert "does not extend the 40 entries an earlier audit verified" in problem.message
    assert report.entries == ()  # nothing is read from a log that left the verified history


def test_a_log_shorter_than_the_verified_prefix_is_named_truncated(node: Node) -> None:
    prefix = node.verify().verified
    assert prefix is not None
    node.truncate(38)

    report = node.verify(since=prefix)

    assert "the log was truncated" in first(report).message
    assert first(report).leaf_index == 38


def test_receipts_for_entries_of_the_prefix_are_checked_by_inclusion_proof(node: Node) -> None:
    prefix = node.verify().verified
    assert prefix is not None
    node.append([make_entry(40)])
    honest = node.verify(since=prefix, receipts=node.receipts)
    assert honest.ok
    # A receipt the node signed for entry 7 with another hash: the node equivocated.
    forged_hash = make_entry(7, tag="other").leaf_hash()
    forged = dataclasses.replace(node.receipts[7], entry_hash=forged_hash)
    forged = dataclasses.replace(forged, signature=node.keys.sign(forged.canonical_bytes()))
    report = node.verify(since=prefix, receipts=[forged])
    assert [(p.check, p.leaf_index) for p in report.problems] == [(Check.RECEIPT, 7)]
    assert "by the node's inclusion proof" in report.problems[0].message


def test_an_anchor_below_the_prefix_is_checked_for_consistency(node: Node) -> None:
    prefix = node.verify().verified
    assert prefix is not None
    # An anchor the node sends later, of a size inside the prefix, with a forged root.
    late = node.log.checkpoint()
    forged = Checkpoint(NODE, 24, b"\x13" * 32, late.timestamp)
    forged = dataclasses.replace(forged, signature=node.keys.sign(forged.canonical_bytes()))
    node.chain.anchor(forged)

    report = node.verify(since=prefix)

    assert [p.check for p in report.problems] == [Check.ANCHOR]
    assert "and the verified prefix" in report.problems[0].message


def forged_prefix(node: Node, anchor_block: int) -> VerifiedPrefix:
    """A state a forger writes: the node's current checkpoint (the node signs whatever log
    it holds) and its frontier, as a state file holds them, and any ``anchor_block``."""
    checkpoint = node.log.checkpoint()
    leaves = (merkle.leaf_hash(data) for _, data in node.log.entries(0, checkpoint.tree_size))
    frontier = merkle.CompactRange().extend(leaves).hashes
    state = {**VerifiedPrefix(checkpoint, frontier).to_json(), "anchor_block": anchor_block}
    return VerifiedPrefix.from_json(state, node.keys.signing_public_key())


@pytest.mark.parametrize(
    ("anchor_block", "refused"),
    [
        (
            10**12,
            "the audit state's anchor_block 1000000000000 is after the node's newest anchor "
            "(block 1101): no audit of this chain wrote it; every anchor is checked",
        ),
        (
            1101,
            "the audit state's verified prefix (a checkpoint of 45 entries the node signed) "
            "does not extend the checkpoint of 32 entries anchored in block 1101, the newest "
            "at or before its anchor_block 1101: every anchor is checked",
        ),
    ],
    ids=["after-the-newest-anchor", "the-newest-anchor"],
)
def test_a_forged_state_does_not_skip_the_anchors_of_a_rewritten_log(
    node: Node, anchor_block: int, refused: str
) -> None:
    """The state's checkpoint must be the node's, but its anchor_block is not signed: a
    state of the rewritten log (the node signs it) claiming the anchors were checked would
    skip every anchor that shows the rewrite."""
    rewrite_from(node, 20, 45)

    report = node.verify(since=forged_prefix(node, anchor_block))

    assert report.verdict is Verdict.FAILED and report.verified is None
    assert report.problems[0] == Problem(Check.ANCHOR, refused)
    # Every anchor is then checked, as by a full audit: the one at 32 shows the rewrite.
    assert report.problems[1] == Problem(
        Check.ANCHOR,
        "the node's tree is not consistent between the checkpoint of 32 entries anchored in "
        "block 1101 and the verified prefix (32 and 45 entries; RFC 9162 2.1.4) (and 2 later "
        "pairs)",
    )
    assert len(report.problems) == 2


def test_an_honest_state_still_skips_the_anchors_it_checked(node: Node) -> None:
    prefix = node.verify().verified
    assert prefix is not None and prefix.anchor_block == 1101
    node.append([make_entry(40)])
    asked: list[tuple[int, int]] = []

    class Counting(Serving):
        def consistency_proof(self, old_size: int, new_size: int, /) -> list[bytes]:
            asked.append((old_size, new_size))
            return super().consistency_proof(old_size, new_size)

    report = verify_node(node.info, Counting(node.log), node.chain, since=prefix)

    assert report.ok and report.verified is not None
    assert report.verified.anchor_block == 1101
    # The prefix extends the newest anchor it records (32 -> 40), and the log the prefix
    # (40 -> 41); the anchor at 16 is not checked again.
    assert sorted(asked) == [(32, 40), (40, 41)]


def test_a_state_whose_anchor_cannot_be_proven_in_transit_could_not_be_read(node: Node) -> None:
    prefix = node.verify().verified
    assert prefix is not None
    timeout = Unavailable("node-1: Deadline Exceeded")
    hostile = StopsAfter(node.log, 40, timeout, proofs=True)

    report = verify_node(node.info, hostile, node.chain, since=prefix)

    assert report.problems == () and report.verdict is Verdict.COULD_NOT_READ
    assert report.could_not_read == (
        "the consistency proof of the checkpoint anchored in block 1101 and the verified "
        "prefix: node-1: Deadline Exceeded",
    )


def test_a_verified_prefix_round_trips_and_must_be_the_nodes(node: Node) -> None:
    prefix = node.verify().verified
    assert prefix is not None
    key = node.keys.signing_public_key()
    assert VerifiedPrefix.from_json(prefix.to_json(), key) == prefix
    with pytest.raises(InvalidRequest, match="not signed by the node's registered key"):
        VerifiedPrefix.from_json(prefix.to_json(), MemoryKeyStore().signing_public_key())
    bad = {**prefix.to_json(), "frontier": [("00" * 32)] * len(prefix.frontier)}
    with pytest.raises(InvalidRequest, match="not a verified prefix"):
        VerifiedPrefix.from_json(bad, key)
    other = dataclasses.replace(prefix.checkpoint, node_id="node-2")
    with pytest.raises(InvalidRequest, match="is of node 'node-2'"):
        node.verify(since=dataclasses.replace(prefix, checkpoint=other))


def test_no_prefix_comes_from_a_failed_audit_or_one_without_policy_checks(node: Node) -> None:
    assert node.verify(rejudge_decisions=False).verified is None
    node.chain.revoked_at = FIRST_BLOCK + 10  # granted entries after it are now unexplained
    assert node.verify().verified is None
