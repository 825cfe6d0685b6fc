"""RFC 9162 Merkle math against a recursive reference written from the RFC's definitions.

The reference here follows the RFC's recursive definitions (2.1.1 MTH, 2.1.3.1 PATH,
2.1.4.1 SUBPROOF) literally and verifies proofs by replaying that recursion; the module under
test computes the same things iteratively and verifies with the RFC's iterative algorithms.
They must agree on every input, including every tampered one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import pytest

from core import merkle
from core.errors import InvalidRequest

MAX_SIZE = 70


# --- the reference, straight from the RFC's recursive definitions ------------------------


def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def ref_k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (RFC 9162 2.1.1)."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = ref_k(len(d))
    return ref_node(ref_mth(d[:k]), ref_mth(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) (RFC 9162 2.1.3.1)."""
    if len(d) == 1:
        return []
    k = ref_k(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) (RFC 9162 2.1.4.1)."""
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = ref_k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    if m == 0 or m == len(d):
        return []
    return ref_subproof(m, d, True)


def ref_verify_inclusion(leaf: bytes, m: int, n: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Replays PATH's recursion: the proof lists, last first, the siblings from the root down."""

    def climb(m: int, n: int, rest: list[bytes]) -> bytes | None:
        if n == 1:
            return leaf if not rest else None
        if not rest:
            return None
        k = ref_k(n)
        sibling, rest = rest[-1], rest[:-1]
        if m < k:
            below = climb(m, k, rest)
            return None if below is None else ref_node(below, sibling)
        below = climb(m - k, n - k, rest)
        return None if below is None else ref_node(sibling, below)

    if not 0 <= m < n:
        return False
    return climb(m, n, list(proof)) == root


def ref_verify_consistency(
    m: int, n: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Replays SUBPROOF's recursion, computing (old root, new root) from the proof."""

    def rebuild(m: int, n: int, b: bool, rest: list[bytes]) -> tuple[bytes, bytes] | None:
        if m == n:
            if b:
                return (old_root, old_root) if not rest else None
            return (rest[0], rest[0]) if len(rest) == 1 else None
        if not rest:
            return None
        k = ref_k(n)
        last, rest = rest[-1], rest[:-1]
        if m <= k:
            inner = rebuild(m, k, b, rest)
            return None if inner is None else (inner[0], ref_node(inner[1], last))
        inner = rebuild(m - k, n - k, False, rest)
        return None if inner is None else (ref_node(last, inner[0]), ref_node(last, inner[1]))

    if not 0 <= m <= n:
        return False
    if m == 0 and old_root != hashlib.sha256(b"").digest():
        return False
    if m == n:
        return not proof and old_root == new_root
    if m == 0:
        return not proof
    return rebuild(m, n, True, list(proof)) == (old_root, new_root)


# --- fixtures and helpers --------------------------------------------------------------

LEAVES = [ref_leaf(b"entry %d" % i) for i in range(MAX_SIZE)]
ROOTS = [ref_mth(LEAVES[:n]) for n in range(MAX_SIZE + 1)]


def flip(data: bytes, position: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def sizes() -> range:
    return range(1, MAX_SIZE + 1)


# --- hand-derived and published vectors --------------------------------------------------

# Leaves a, b, c; every value below is spelled out with hashlib, not with the module.
_A, _B, _C = (hashlib.sha256(b"\x00" + x).digest() for x in (b"a", b"b", b"c"))
_AB = hashlib.sha256(b"\x01" + _A + _B).digest()
_ABC = hashlib.sha256(b"\x01" + _AB + _C).digest()

# The Certificate Transparency reference leaves and roots (RFC 6962, whose tree RFC 9162
# keeps), as published in the CT and transparency-dev test suites.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}


def test_hand_derived_vectors_for_sizes_1_2_3() -> None:
    assert merkle.leaf_hash(b"a") == _A
    assert merkle.node_hash(_A, _B) == _AB
    # size: (root, inclusion paths by index, consistency proofs by old size)
    vectors: dict[int, tuple[bytes, dict[int, list[bytes]], dict[int, list[bytes]]]] = {
        1: (_A, {0: []}, {}),
        2: (_AB, {0: [_B], 1: [_A]}, {1: [_B]}),
        3: (_ABC, {0: [_B, _C], 1: [_A, _C], 2: [_AB]}, {1: [_B, _C], 2: [_C]}),
    }
    leaves = [_A, _B, _C]
    for n, (root, paths, consistency) in vectors.items():
        assert merkle.root(leaves[:n]) == root == ref_mth(leaves[:n])
        for index, path in paths.items():
            assert merkle.inclusion_proof(index, leaves[:n]) == path == ref_path(index, leaves[:n])
            assert merkle.verify_inclusion(leaves[index], index, n, path, root)
        for old, proof in consistency.items():
            assert merkle.consistency_proof(old, leaves[:n]) == proof == ref_proof(old, leaves[:n])
            assert merkle.verify_consistency(old, n, merkle.root(leaves[:old]), root, proof)


def test_empty_tree_is_the_hash_of_nothing() -> None:
    assert merkle.EMPTY_ROOT.hex() == CT_ROOTS[0]
    assert merkle.root([]) == merkle.EMPTY_ROOT == merkle.CompactRange().root()


def test_certificate_transparency_vectors() -> None:
    leaves = [merkle.leaf_hash(d) for d in CT_LEAVES]
    for n in range(len(CT_LEAVES) + 1):
        assert merkle.root(leaves[:n]).hex() == CT_ROOTS[n]
    for (index, n), path in CT_INCLUSION.items():
        assert [p.hex() for p in merkle.inclusion_proof(index, leaves[:n])] == path
    # 2 -> 8: the old tree is a node of the new one, so its root is not in the proof.
    assert [p.hex() for p in merkle.consistency_proof(2, leaves)] == [
        CT_INCLUSION[(0, 8)][1],
        CT_INCLUSION[(0, 8)][2],
    ]


# --- agreement with the reference on every size, index and old size ------------------------


def test_root_and_compact_range_at_every_size() -> None:
    compact = merkle.CompactRange()
    for n in range(MAX_SIZE + 1):
        assert merkle.root(LEAVES[:n]) == ROOTS[n]
        assert compact.size == n
        assert compact.root() == ROOTS[n]
        assert merkle.CompactRange.from_leaf_hashes(LEAVES[:n]) == compact
        assert merkle.CompactRange.from_bytes(n, compact.to_bytes()) == compact
        if n < MAX_SIZE:
            compact = compact.append(LEAVES[n])


def test_extending_a_range_is_appending_each_leaf() -> None:
    for start in range(0, MAX_SIZE + 1, 3):
        base = merkle.CompactRange.from_leaf_hashes(LEAVES[:start])
        for end in range(start, MAX_SIZE + 1, 5):
            assert base.extend(LEAVES[start:end]) == merkle.CompactRange.from_leaf_hashes(
                LEAVES[:end]
            )
    with pytest.raises(InvalidRequest, match="leaf hash 2 is not a 32-byte hash"):
        merkle.CompactRange.from_leaf_hashes(LEAVES[:2]).extend([b"short"])


def test_append_reports_every_perfect_subtree_once() -> None:
    compact = merkle.CompactRange()
    seen: dict[tuple[int, int], bytes] = {}
    for n in range(MAX_SIZE):
        compact, nodes = compact.append_with_nodes(LEAVES[n])
        assert nodes[0] == merkle.Node(0, n, LEAVES[n])
        for node in nodes:
            start, end = node.index << node.level, (node.index + 1) << node.level
            assert end == n + 1
            assert node.hash == ref_mth(LEAVES[start:end])
            assert (node.level, node.index) not in seen
            seen[(node.level, node.index)] = node.hash
    # n leaves make n - popcount(n) interior perfect subtrees.
    assert len([key for key in seen if key[0] > 0]) == MAX_SIZE - MAX_SIZE.bit_count()


def test_every_inclusion_proof_matches_the_reference_and_verifies() -> None:
    for n in sizes():
        for index in range(n):
            proof = merkle.inclusion_proof(index, LEAVES[:n])
            assert proof == ref_path(index, LEAVES[:n]), (n, index)
            assert merkle.verify_inclusion(LEAVES[index], index, n, proof, ROOTS[n])
            assert ref_verify_inclusion(LEAVES[index], index, n, proof, ROOTS[n])


def test_every_consistency_proof_matches_the_reference_and_verifies() -> None:
    for n in sizes():
        for old in range(n + 1):
            proof = merkle.consistency_proof(old, LEAVES[:n])
            assert proof == ref_proof(old, LEAVES[:n]), (old, n)
            assert merkle.verify_consistency(old, n, ROOTS[old], ROOTS[n], proof)
            assert ref_verify_consistency(old, n, ROOTS[old], ROOTS[n], proof)


def test_proofs_from_stored_subtrees_equal_proofs_from_leaves() -> None:
    # What a log that stores perfect subtrees does: resolve each range from them.
    nodes: dict[tuple[int, int], bytes] = {}
    compact = merkle.CompactRange()
    for leaf in LEAVES:
        compact, new = compact.append_with_nodes(leaf)
        nodes.update(((node.level, node.index), node.hash) for node in new)

    def resolve(start: int, end: int) -> bytes:
        return merkle.fold([nodes[s] for s in merkle.range_subtrees(start, end)])

    for n in sizes():
        assert resolve(0, n) == ROOTS[n]
        for index in range(n):
            ranges = merkle.inclusion_proof_ranges(index, n)
            assert [resolve(*r) for r in ranges] == ref_path(index, LEAVES[:n])
        for old in range(n + 1):
            ranges = merkle.consistency_proof_ranges(old, n)
            assert [resolve(*r) for r in ranges] == ref_proof(old, LEAVES[:n])


# --- tampering: the iterative verifiers agree with the reference and refuse -----------------


def test_tampered_inclusion_proofs_fail() -> None:
    for n in sizes():
        root = ROOTS[n]
        for index in range(n):
            leaf = LEAVES[index]
            proof = merkle.inclusion_proof(index, LEAVES[:n])
            # A flipped byte anywhere: leaf, root, each proof element.
            assert not merkle.verify_inclusion(flip(leaf, index), index, n, proof, root)
            assert not merkle.verify_inclusion(leaf, index, n, proof, flip(root, n))
            for j in range(len(proof)):
                bad = proof[:j] + [flip(proof[j], index + j)] + proof[j + 1 :]
                assert not merkle.verify_inclusion(leaf, index, n, bad, root)
            # An element missing or added.
            for j in range(len(proof)):
                assert not merkle.verify_inclusion(leaf, index, n, proof[:j] + proof[j + 1 :], root)
            assert not merkle.verify_inclusion(leaf, index, n, [*proof, LEAVES[0]], root)
            assert not merkle.verify_inclusion(leaf, index, n, [LEAVES[0], *proof], root)
            # Another index, or another leaf at this index.
            for other in {index - 1, index + 1, n - 1 - index, n, -1} - {index}:
                assert not merkle.verify_inclusion(leaf, other, n, proof, root), (n, index, other)
            if n > 1:
                other_leaf = LEAVES[(index + 1) % n]
                assert not merkle.verify_inclusion(other_leaf, index, n, proof, root)
            # Another tree size. The root, not the proof, fixes the size: where the path has
            # the same shape in both trees the proof still verifies (as in every RFC 9162
            # verifier), so the verdict must be exactly the reference's.
            for other_size in range(max(index + 1, n - 3), n + 4):
                if other_size != n:
                    expected = ref_verify_inclusion(leaf, index, other_size, proof, root)
                    got = merkle.verify_inclusion(leaf, index, other_size, proof, root)
                    assert got == expected, (n, index, other_size)


def test_tampered_consistency_proofs_fail() -> None:
    for n in sizes():
        for old in range(n + 1):
            proof = merkle.consistency_proof(old, LEAVES[:n])
            old_root, new_root = ROOTS[old], ROOTS[n]
            assert not merkle.verify_consistency(old, n, flip(old_root, n), new_root, proof)
            if old:
                assert not merkle.verify_consistency(old, n, old_root, flip(new_root, old), proof)
            for j in range(len(proof)):
                bad = proof[:j] + [flip(proof[j], old + j)] + proof[j + 1 :]
                assert not merkle.verify_consistency(old, n, old_root, new_root, bad)
                assert not merkle.verify_consistency(
                    old, n, old_root, new_root, proof[:j] + proof[j + 1 :]
                )
            assert not merkle.verify_consistency(old, n, old_root, new_root, [*proof, LEAVES[0]])
            assert not merkle.verify_consistency(old, n, old_root, new_root, [LEAVES[0], *proof])
            # Other sizes: exactly the reference's verdict (see the inclusion test).
            for other_old in range(max(0, old - 2), min(n, old + 2) + 1):
                for other_new in range(max(other_old, n - 2), n + 3):
                    if (other_old, other_new) == (old, n):
                        continue
                    expected = ref_verify_consistency(
                        other_old, other_new, old_root, new_root, proof
                    )
                    got = merkle.verify_consistency(other_old, other_new, old_root, new_root, proof)
                    assert got == expected, (old, n, other_old, other_new)
            # A tree that is not a prefix: the last old leaf replaced.
            if old:
                forked = [*LEAVES[: old - 1], ref_leaf(b"forged"), *LEAVES[old:n]]
                assert not merkle.verify_consistency(
                    old, n, old_root, ref_mth(forked), merkle.consistency_proof(old, forked)
                )


def test_every_byte_of_a_proof_matters() -> None:
    n, index, old = 45, 27, 19
    proof = merkle.inclusion_proof(index, LEAVES[:n])
    for j, element in enumerate(proof):
        for position in range(merkle.HASH_SIZE):
            bad = proof[:j] + [flip(element, position)] + proof[j + 1 :]
            assert not merkle.verify_inclusion(LEAVES[index], index, n, bad, ROOTS[n])
    consistency = merkle.consistency_proof(old, LEAVES[:n])
    for j, element in enumerate(consistency):
        for position in range(merkle.HASH_SIZE):
            bad = consistency[:j] + [flip(element, position)] + consistency[j + 1 :]
            assert not merkle.verify_consistency(old, n, ROOTS[old], ROOTS[n], bad)


def test_a_leaf_cannot_pass_for_a_node() -> None:
    # Domain separation: the data of a leaf that looks like two children hashes differently.
    fake_leaf_data = LEAVES[0] + LEAVES[1]
    assert merkle.leaf_hash(fake_leaf_data) != merkle.node_hash(LEAVES[0], LEAVES[1])
    # And a size-2 root cannot be presented as a leaf of a size-1 tree.
    assert not merkle.verify_inclusion(ROOTS[2], 0, 1, [], ROOTS[1])


# --- malformed input ---------------------------------------------------------------------------

GARBAGE: list[object] = [None, "", "00" * 32, b"", b"\x00" * 31, b"\x00" * 33, 0, [], True]


def test_verifiers_never_raise_on_malformed_input() -> None:
    n, index = 11, 6
    proof = merkle.inclusion_proof(index, LEAVES[:n])
    leaf, root = LEAVES[index], ROOTS[n]
    for bad in GARBAGE:
        assert not merkle.verify_inclusion(bad, index, n, proof, root)  # type: ignore[arg-type]
        assert not merkle.verify_inclusion(leaf, index, n, proof, bad)  # type: ignore[arg-type]
        assert not merkle.verify_inclusion(leaf, bad, n, proof, root)  # type: ignore[arg-type]
        assert not merkle.verify_inclusion(leaf, index, bad, proof, root)  # type: ignore[arg-type]
        assert not merkle.verify_inclusion(leaf, index, n, [bad, *proof[1:]], root)  # type: ignore[list-item]
        assert not merkle.verify_inclusion(leaf, index, n, bad, root)  # type: ignore[arg-type]
        assert not merkle.verify_consistency(bad, n, ROOTS[3], root, [])  # type: ignore[arg-type]
        assert not merkle.verify_consistency(3, bad, ROOTS[3], root, [])  # type: ignore[arg-type]
        assert not merkle.verify_consistency(3, n, bad, root, [])  # type: ignore[arg-type]
        assert not merkle.verify_consistency(3, n, ROOTS[3], bad, [])  # type: ignore[arg-type]
        assert not merkle.verify_consistency(3, n, ROOTS[3], root, [bad])  # type: ignore[list-item]
        assert not merkle.verify_consistency(3, n, ROOTS[3], root, bad)  # type: ignore[arg-type]
    assert not merkle.verify_inclusion(leaf, True, n, proof, root)
    assert not merkle.verify_inclusion(leaf, index, index, proof, root)
    assert not merkle.verify_inclusion(leaf, 0, 0, [], merkle.EMPTY_ROOT)
    assert not merkle.verify_consistency(n, 3, root, ROOTS[3], [])
    assert not merkle.verify_consistency(-1, n, ROOTS[0], root, [])
    # Proofs of one element past the tree's depth, and of absurd length.
    assert not merkle.verify_inclusion(leaf, index, n, proof + proof, root)
    assert not merkle.verify_consistency(3, n, ROOTS[3], root, [root] * 200)


def test_trivial_consistency() -> None:
    assert merkle.verify_consistency(0, 0, merkle.EMPTY_ROOT, merkle.EMPTY_ROOT, [])
    assert merkle.verify_consistency(0, 5, merkle.EMPTY_ROOT, ROOTS[5], [])
    assert merkle.verify_consistency(5, 5, ROOTS[5], ROOTS[5], [])
    assert not merkle.verify_consistency(0, 0, ROOTS[5], ROOTS[5], [])
    assert not merkle.verify_consistency(5, 5, ROOTS[5], ROOTS[4], [])
    assert not merkle.verify_consistency(0, 5, ROOTS[1], ROOTS[5], [])
    assert not merkle.verify_consistency(5, 5, ROOTS[5], ROOTS[5], [ROOTS[5]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: merkle.inclusion_proof(3, LEAVES[:3]), "not in a tree of 3"),
        (lambda: merkle.inclusion_proof(-1, LEAVES[:3]), "non-negative"),
        (lambda: merkle.inclusion_proof(0, []), "not in a tree of 0"),
        (lambda: merkle.inclusion_proof_ranges(True, 4), "non-negative"),
        (lambda: merkle.consistency_proof(4, LEAVES[:3]), "larger than the new tree size"),
        (lambda: merkle.consistency_proof(-1, LEAVES[:3]), "non-negative"),
        (lambda: merkle.consistency_proof_ranges(1, -2), "non-negative"),
        (lambda: merkle.subtree_root(LEAVES[:3], 2, 4), "outside"),
        (lambda: merkle.range_subtrees(3, 5), "not a node of the tree"),
        (lambda: merkle.range_subtrees(4, 4), "empty"),
        (lambda: merkle.CompactRange(3, (LEAVES[0],)), "holds 2 subtree roots, not 1"),
        (lambda: merkle.CompactRange(1, (b"short",)), "32-byte"),
        (lambda: merkle.CompactRange.from_bytes(2, b"\x00" * 33), "multiple of 32"),
        (lambda: merkle.CompactRange().append(b"short"), "32 bytes"),
        (lambda: merkle.CompactRange.from_leaf_hashes([b"short"]), "leaf hash 0"),
    ],
)
def test_bad_indices_and_sizes_are_invalid_requests(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        call()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 13, 32, 33])
def test_all_inclusion_proofs_at_once_equal_the_proofs_one_by_one(size: int) -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(size)]
    assert merkle.inclusion_proofs(leaves) == [
        merkle.inclusion_proof(i, leaves) for i in range(size)
    ]
