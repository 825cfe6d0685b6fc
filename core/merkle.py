"""Merkle tree math of RFC 9162 (Certificate Transparency v2), section 2.1. Pure, no I/O.

The tree over leaves ``D[0:n]`` is the Merkle Tree Hash ``MTH`` of section 2.1.1, with
domain separation between leaves (``0x00``) and interior nodes (``0x01``) so that no leaf
can pass for a node. Proofs are the RFC's inclusion proofs (2.1.3) and consistency proofs
(2.1.4); their verification is the RFC's iterative algorithm, not a recomputation.

Two ways to compute proofs, one set of rules:

- from all leaf hashes (:func:`inclusion_proof`, :func:`consistency_proof`), for auditors and
  tests;
- from stored subtree roots: :func:`inclusion_proof_ranges` and
  :func:`consistency_proof_ranges` say which leaf ranges the proof hashes cover, and
  :func:`range_subtrees` says which perfect subtrees make up each range. A log that stores the
  root of every completed perfect subtree (:meth:`CompactRange.append_with_nodes` yields them)
  answers any proof with O(log n) lookups instead of rehashing every leaf.

:class:`CompactRange` keeps the roots of the perfect subtrees along the right edge of the
tree, so that a log updates its root in O(log n) per appended leaf.

Bad indices and sizes given to the functions that build proofs raise :class:`InvalidRequest`.
The ``verify_*`` functions never raise: a malformed proof is a proof that does not verify.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.errors import InvalidRequest

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
# RFC 9162 2.1.1: the hash of an empty list is the hash of an empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """``MTH({d(0)}) = HASH(0x00 || d(0))`` (RFC 9162 2.1.1)."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))`` (RFC 9162 2.1.1)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_size(value: int, what: str) -> int:
    if not _is_size(value):
        raise InvalidRequest(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _is_path(proof: object) -> bool:
    """A sequence of hashes (bytes and str are sequences too, but not of hashes)."""
    return (
        isinstance(proof, Sequence)
        and not isinstance(proof, bytes | str)
        and all(_is_hash(p) for p in proof)
    )


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): the ``k`` of RFC 9162 2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


# --- the tree hash ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """The root of a perfect subtree: leaves ``[index << level, (index + 1) << level)``."""

    level: int
    index: int
    hash: bytes


@dataclass(frozen=True)
class CompactRange:
    """The right edge of a tree of ``size`` leaves: the roots of its maximal perfect subtrees.

    There is one root per set bit of ``size``, left (largest) first; e.g. 13 = 8 + 4 + 1
    leaves are held as the roots of D[0:8], D[8:12] and D[12:13]. Appending a leaf merges
    equal-sized neighbours, like carrying in binary addition, and :meth:`root` folds the
    roots from the right, which is MTH (RFC 9162 2.1.1): MTH splits a list at the largest
    power of two below its size, and that left part is exactly the first perfect subtree.
    """

    size: int = 0
    hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_size(self.size, "tree size")
        if len(self.hashes) != self.size.bit_count():
            raise InvalidRequest(
                f"a compact range of {self.size} leaves holds {self.size.bit_count()} "
                f"subtree roots, not {len(self.hashes)}"
            )
        if not all(_is_hash(h) for h in self.hashes):
            raise InvalidRequest(f"subtree roots must be {HASH_SIZE}-byte hashes")

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: Sequence[bytes]) -> CompactRange:
        stack: list[bytes] = []
        for size, leaf in enumerate(leaf_hashes):
            if not _is_hash(leaf):
                raise InvalidRequest(f"leaf hash {size} is not a {HASH_SIZE}-byte hash")
            _push(stack, size, leaf)
        return cls(len(leaf_hashes), tuple(stack))

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> CompactRange:
        """Inverse of :meth:`to_bytes`, for a tree of ``size`` leaves."""
        if not isinstance(data, bytes) or len(data) % HASH_SIZE:
            raise InvalidRequest(f"compact range must be a multiple of {HASH_SIZE} bytes")
        hashes = tuple(data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE))
        return cls(size, hashes)

    def to_bytes(self) -> bytes:
        """The subtree roots concatenated, left first (the size is kept beside them)."""
        return b"".join(self.hashes)

    def append(self, leaf: bytes) -> CompactRange:
        """This range with one more leaf hash on the right."""
        return self.append_with_nodes(leaf)[0]

    def extend(self, leaf_hashes: Iterable[bytes]) -> CompactRange:
        """This range with the leaf hashes on the right, in order: :meth:`append` for each,
        without a range per leaf (an auditor extends by 100,000s)."""
        stack, size = list(self.hashes), self.size
        for leaf in leaf_hashes:
            if not _is_hash(leaf):
                raise InvalidRequest(f"leaf hash {size} is not a {HASH_SIZE}-byte hash")
            _push(stack, size, leaf)
            size += 1
        return CompactRange(size, tuple(stack))

    def append_with_nodes(self, leaf: bytes) -> tuple[CompactRange, list[Node]]:
        """This range with one more leaf, and the perfect subtrees the leaf completes.

        The nodes are the leaf itself (level 0) and then every merge it causes, lowest first.
        """
        if not _is_hash(leaf):
            raise InvalidRequest(f"leaf hash must be {HASH_SIZE} bytes")
        stack = list(self.hashes)
        nodes = _push(stack, self.size, leaf)
        return CompactRange(self.size + 1, tuple(stack)), nodes

    def root(self) -> bytes:
        """MTH of the leaves so far (RFC 9162 2.1.1); :data:`EMPTY_ROOT` for no leaves."""
        return fold(self.hashes)


def _push(stack: list[bytes], size: int, leaf: bytes) -> list[Node]:
    """Append ``leaf`` as leaf number ``size`` to the right-edge ``stack``; return new nodes."""
    nodes = [Node(0, size, leaf)]
    current, level = leaf, 0
    # Each trailing 1 bit of the old size is a perfect subtree of the new node's height.
    while (size >> level) & 1:
        current = node_hash(stack.pop(), current)
        level += 1
        nodes.append(Node(level, size >> level, current))
    stack.append(current)
    return nodes


def fold(subtree_roots: Sequence[bytes]) -> bytes:
    """Right fold of the roots of a tree's maximal perfect subtrees, largest first: its MTH."""
    if not subtree_roots:
        return EMPTY_ROOT
    current = subtree_roots[-1]
    for left in reversed(subtree_roots[:-1]):
        current = node_hash(left, current)
    return current


def subtree_root(leaf_hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """``MTH(D[start:end])`` given the leaf hashes (RFC 9162 2.1.1)."""
    if not 0 <= start <= end <= len(leaf_hashes):
        raise InvalidRequest(f"leaf range [{start}, {end}) is outside [0, {len(leaf_hashes)})")
    stack: list[bytes] = []
    for i in range(start, end):
        _push(stack, i - start, leaf_hashes[i])
    return fold(stack)


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """``MTH(D[n])`` (RFC 9162 2.1.1), computed with O(log n) memory."""
    return subtree_root(leaf_hashes, 0, len(leaf_hashes))


def range_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The perfect subtrees ``(level, index)`` whose :func:`fold` is ``MTH(D[start:end])``.

    ``D[start:end]`` must be a node of the tree (as every range of a proof is): ``start`` a
    multiple of the smallest power of two not below ``end - start``. Then the range is the
    perfect subtrees of the set bits of its size, largest first.
    """
    _check_size(start, "range start")
    _check_size(end, "range end")
    size = end - start
    if size <= 0:
        raise InvalidRequest(f"leaf range [{start}, {end}) is empty")
    if start % (1 << (size - 1).bit_length()):
        raise InvalidRequest(f"leaf range [{start}, {end}) is not a node of the tree")
    subtrees = []
    position = start
    for level in reversed(range(size.bit_length())):
        if (size >> level) & 1:
            subtrees.append((level, position >> level))
            position += 1 << level
    return subtrees


# --- inclusion proofs (RFC 9162 2.1.3) ---------------------------------------------------


def inclusion_proof_ranges(index: int, tree_size: int) -> list[tuple[int, int]]:
    """The leaf ranges ``(start, end)`` whose MTHs form ``PATH(index, D[tree_size])``.

    RFC 9162 2.1.3.1, unrolled: walking down from the root, each step keeps the half that
    holds the leaf and records the other half; the path lists them deepest first.
    """
    _check_size(index, "leaf index")
    _check_size(tree_size, "tree size")
    if index >= tree_size:
        raise InvalidRequest(f"leaf index {index} is not in a tree of {tree_size} leaves")
    ranges = []
    start, end = 0, tree_size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            # m < k: PATH(m, D[0:k]) : MTH(D[k:n])
            ranges.append((start + k, end))
            end = start + k
        else:
            # m >= k: PATH(m - k, D[k:n]) : MTH(D[0:k])
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``leaf_hashes`` (RFC 9162 2.1.3.1)."""
    return [
        subtree_root(leaf_hashes, start, end)
        for start, end in inclusion_proof_ranges(index, len(leaf_hashes))
    ]


def inclusion_proofs(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """The audit path of every leaf of a small in-memory tree (e.g. one batch), computing
    each subtree root once: O(n log n) hashes instead of O(n^2) for ``inclusion_proof``
    leaf by leaf."""
    roots: dict[tuple[int, int], bytes] = {}

    def subtree(start: int, end: int) -> bytes:
        found = roots.get((start, end))
        if found is None:
            if end - start == 1:
                found = leaf_hashes[start]
            else:
                k = _split(end - start)
                found = node_hash(subtree(start, start + k), subtree(start + k, end))
            roots[(start, end)] = found
        return found

    n = len(leaf_hashes)
    return [[subtree(start, end) for start, end in inclusion_proof_ranges(i, n)] for i in range(n)]


def root_from_inclusion_proof(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes | None:
    """The root that ``proof`` implies for ``leaf`` at ``index``, or None if it is malformed.

    RFC 9162 2.1.3.2, steps 1-4 (step 5, comparing with the root, is the caller's).
    """
    if not (_is_hash(leaf) and _is_size(index) and _is_size(tree_size)):
        return None
    if not _is_path(proof):
        return None
    # 1. leaf_index must be below tree_size.
    if index >= tree_size:
        return None
    # 2. fn = leaf_index, sn = tree_size - 1.  3. r = hash.
    fn, sn, r = index, tree_size - 1, leaf
    # 4. For each value p in the inclusion path:
    for p in proof:
        # a. sn == 0: the path is longer than the tree is deep.
        if sn == 0:
            return None
        # b. fn is a right child, or the last node of its level (no right sibling):
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # If fn was not a right child, skip the levels where it has no right sibling
            # and is promoted as is: shift until LSB(fn) is set or fn is 0.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        # c. Go up one level.
        fn >>= 1
        sn >>= 1
    # 5. (first half) sn must be 0: the path reached the root.
    if sn != 0:
        return None
    return r


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows ``leaf`` at ``index`` in the tree with ``root``.

    RFC 9162 2.1.3.2.
    """
    computed = root_from_inclusion_proof(leaf, index, tree_size, proof)
    # 5. Compare r against root_hash.
    return computed is not None and _is_hash(root) and computed == root


# --- consistency proofs (RFC 9162 2.1.4) ---------------------------------------------------


def consistency_proof_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose MTHs form ``PROOF(old_size, D[new_size])`` (RFC 9162 2.1.4.1).

    Empty when there is nothing to prove: ``old_size`` is 0 or equals ``new_size``.
    """
    _check_size(old_size, "old tree size")
    _check_size(new_size, "new tree size")
    if old_size > new_size:
        raise InvalidRequest(
            f"old tree size {old_size} is larger than the new tree size {new_size}"
        )
    ranges: list[tuple[int, int]] = []
    if old_size == 0:
        return ranges
    # SUBPROOF(m, D[n], b), unrolled; m is relative to the current subtree's start.
    m, start, end, whole = old_size, 0, new_size, True
    while True:
        if m == end - start:
            # SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}
            if not whole:
                ranges.append((start, end))
            break
        k = _split(end - start)
        if m <= k:
            # m <= k: SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            ranges.append((start + k, end))
            end = start + k
        else:
            # m > k: SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            ranges.append((start, start + k))
            start += k
            m -= k
            whole = False
    ranges.reverse()
    return ranges


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Proof that the tree of the first ``old_size`` leaves is a prefix (RFC 9162 2.1.4.1)."""
    return [
        subtree_root(leaf_hashes, start, end)
        for start, end in consistency_proof_ranges(old_size, len(leaf_hashes))
    ]


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree (old_size, old_root) is a prefix of (new_size, new_root).

    RFC 9162 2.1.4.2, plus the two cases with nothing to prove (empty proof): equal sizes
    with equal roots, and an empty old tree.
    """
    if not (_is_size(old_size) and _is_size(new_size) and old_size <= new_size):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    if not _is_path(proof):
        return False
    if old_size == 0 and old_root != EMPTY_ROOT:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    # 1. An empty path fails.
    if not proof:
        return False
    path = list(proof)
    # 2. If first is an exact power of 2, prepend first_hash: the old tree is then a node of
    #    the new one, and SUBPROOF left it out of the proof.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3. fn = first - 1, sn = second - 1.
    fn, sn = old_size - 1, new_size - 1
    # 4. Skip the levels where the old tree's last node is a right child.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. fr = sr = the first value of the path.
    fr = sr = path[0]
    # 6. For each subsequent value c:
    for c in path[1:]:
        # a. sn == 0: the path is longer than the tree is deep.
        if sn == 0:
            return False
        # b. c is a left sibling (in both trees), or the old tree's edge node has no right one:
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            # Then shift until LSB(fn) is set or fn is 0 (a no-op if LSB(fn) is set).
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            # c is a right sibling only in the new tree.
            sr = node_hash(sr, c)
        # c. Go up one level.
        fn >>= 1
        sn >>= 1
    # 7. fr must be first_hash, sr second_hash, and sn 0.
    return sn == 0 and fr == old_root and sr == new_root
