"""RFC 6962 Merkle tree: roots, proofs, verification, incremental building and tile storage.

Expected values come from the shared vectors (transparency-dev/merkle's testdata and the
RFC 6962 roots) and from a reference written here straight from RFC 6962, section 2.1
(``MTH``, ``PATH``, ``SUBPROOF`` over a list of leaf hashes), independent of the module.
Proofs are generated from stores filled with what ``TreeBuilder`` yields, so the storage
addressing is exercised by every proof test.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ccos_obsd.errors import ObsdError, ProofError
from ccos_obsd.ledger.hashing import Hash, leaf_hash
from ccos_obsd.ledger.merkle import (
    EMPTY_ROOT,
    TILE_WIDTH,
    NodeId,
    TiledHashReader,
    TileId,
    TileSpan,
    TreeBuilder,
    consistency_proof,
    consistency_proof_plan,
    hash_children,
    hash_from_tile,
    inclusion_proof,
    inclusion_proof_plan,
    root_from_inclusion_proof,
    root_from_reader,
    root_hash,
    stored_hash_count,
    stored_position,
    subtree_ids,
    tile_appends,
    tile_span,
    tile_widths,
    verify_consistency,
    verify_inclusion,
)
from tests.vectors import vectors_dir

VECTORS = vectors_dir() / "rfc6962"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# --- an independent reference, from the text of RFC 6962 section 2.1


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return sha256(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:]))


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], whole), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


# --- the test tree: leaves, stores filled from TreeBuilder output

MAX_SIZE = 2000
LEAVES = tuple(leaf_hash(f'{{"seq":{i}}}'.encode()) for i in range(MAX_SIZE))


@cache
def ref_range(start: int, end: int) -> bytes:
    """MTH of LEAVES[start:end], memoised over the aligned ranges RFC 6962 uses."""
    if end - start == 1:
        return LEAVES[start]
    k = 1 << ((end - start - 1).bit_length() - 1)
    return sha256(b"\x01" + ref_range(start, start + k) + ref_range(start + k, end))


def ref_root(size: int) -> bytes:
    return ref_range(0, size) if size else sha256(b"")


class NodeStore:
    """Every full subtree TreeBuilder yields, by (level, index)."""

    def __init__(self) -> None:
        self.nodes: dict[NodeId, bytes] = {}

    def add(self, nodes: Sequence[tuple[NodeId, bytes]]) -> None:
        for node, node_hash in nodes:
            assert node not in self.nodes, f"{node} yielded twice"
            self.nodes[node] = node_hash


class SizedReader:
    """A HashReader onto a store as it was at ``size``: reading a subtree that was not
    complete then is a bug in proof generation. Counts what it reads."""

    def __init__(self, store: NodeStore, size: int) -> None:
        self.store, self.size = store, size
        self.calls = 0
        self.reads = 0

    def get_hashes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls += 1
        self.reads += len(ids)
        for level, index in ids:
            assert (index + 1) << level <= self.size, f"read ({level}, {index}) beyond size {self.size}"
        return [self.store.nodes[NodeId(*node)] for node in ids]


class TileStore:
    """Tiles as a database would hold them: one growing byte string per tile."""

    def __init__(self) -> None:
        self.tiles: dict[TileId, bytearray] = {}

    def apply(self, nodes: Sequence[tuple[NodeId, Hash]]) -> None:
        for tile, append in tile_appends(nodes).items():
            data = self.tiles.setdefault(tile, bytearray())
            assert append.offset * 32 == len(data), "tile appends must land at the tile's end"
            data += append.hashes


class SizedTileReader:
    """Tiles cut to their width at ``size`` (what a log of that size would serve)."""

    def __init__(self, store: TileStore, size: int) -> None:
        self.store = store
        self.widths = dict(tile_widths(size))
        self.reads = 0

    def read_tiles(self, tiles: Sequence[TileId]) -> list[bytes]:
        self.reads += len(tiles)
        assert len(set(tiles)) == len(tiles), "each tile is read once per batch"
        return [bytes(self.store.tiles[tile][: self.widths[tile] * 32]) for tile in tiles]


def _build_stores() -> tuple[NodeStore, TileStore]:
    nodes, tiles = NodeStore(), TileStore()
    builder = TreeBuilder()
    batch = 1
    while builder.size < MAX_SIZE:
        # Batches of uneven sizes, like group commits, so tile appends cross batch edges.
        completed = builder.extend(LEAVES[builder.size : builder.size + batch])
        nodes.add(completed)
        tiles.apply(completed)
        batch = batch * 7 % 300 + 1
    return nodes, tiles


NODES, TILES = _build_stores()


def read_bound(size: int) -> int:
    """O(log n): at most two full subtrees per level of the tree."""
    return 2 * size.bit_length()


# --- hashes and roots


def test_node_hash_is_sha256_of_one_then_left_then_right() -> None:
    left, right = bytes(range(32)), bytes(range(32, 64))
    assert hash_children(left, right) == sha256(b"\x01" + left + right)


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert sha256(b"") == EMPTY_ROOT
    assert root_hash([]) == EMPTY_ROOT
    assert TreeBuilder().root() == EMPTY_ROOT
    assert root_from_reader(0, SizedReader(NODES, 0)) == EMPTY_ROOT


def load_roots() -> dict[str, Any]:
    roots: dict[str, Any] = json.loads((VECTORS / "roots.json").read_text())
    return roots


def test_roots_json_is_reproduced() -> None:
    roots = load_roots()
    leaves = [leaf_hash(bytes.fromhex(leaf)) for leaf in roots["leaves_hex"]]
    assert root_hash([]).hex() == roots["empty_root_hex"]
    builder = TreeBuilder()
    for size, leaf in enumerate(leaves, start=1):
        builder.append(leaf)
        expected = roots["roots_hex"][str(size)]
        assert root_hash(leaves[:size]).hex() == expected
        assert builder.root().hex() == expected


def test_roots_json_from_stored_subtrees() -> None:
    roots = load_roots()
    leaves = [leaf_hash(bytes.fromhex(leaf)) for leaf in roots["leaves_hex"]]
    store = NodeStore()
    store.add(TreeBuilder().extend(leaves))
    for size, expected in roots["roots_hex"].items():
        assert root_from_reader(int(size), SizedReader(store, int(size))).hex() == expected


def test_root_from_reader_matches_the_reference_for_every_size() -> None:
    for size in range(MAX_SIZE + 1):
        reader = SizedReader(NODES, size)
        assert root_from_reader(size, reader) == ref_root(size)
        assert reader.reads == bin(size).count("1")  # one full subtree per set bit
        assert root_from_reader(size, TiledHashReader(SizedTileReader(TILES, size))) == ref_root(size)


# --- the shared vectors (transparency-dev/merkle testdata), wantErr cases included


def vector_files(kind: str) -> list[Any]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    assert files, f"no {kind} vectors under {VECTORS}"
    return [pytest.param(path, id=str(path.relative_to(VECTORS / kind))) for path in files]


@pytest.mark.parametrize("path", vector_files("inclusion"))
def test_inclusion_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    proof = [b64(h) for h in case["proof"] or []]
    args = (b64(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, b64(case["root"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", vector_files("consistency"))
def test_consistency_vector(path: Path) -> None:
    case = json.loads(path.read_text())
    proof = [b64(h) for h in case["proof"] or []]
    args = (case["size1"], case["size2"], proof, b64(case["root1"]), b64(case["root2"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def rfc_tree_store() -> tuple[list[Hash], NodeStore]:
    leaves = [leaf_hash(bytes.fromhex(leaf)) for leaf in load_roots()["leaves_hex"]]
    store = NodeStore()
    store.add(TreeBuilder().extend(leaves))
    return leaves, store


@pytest.mark.parametrize("case_dir", ["0", "1", "2", "3", "4"])
def test_generated_inclusion_proofs_equal_the_happy_path_vectors(case_dir: str) -> None:
    case = json.loads((VECTORS / "inclusion" / case_dir / "happy-path.json").read_text())
    leaves, store = rfc_tree_store()
    size = case["treeSize"]
    assert leaves[case["leafIdx"]] == b64(case["leafHash"])
    proof = inclusion_proof(case["leafIdx"], size, SizedReader(store, size))
    assert proof == [b64(h) for h in case["proof"] or []]


@pytest.mark.parametrize("case_dir", ["0", "1", "2", "3", "4"])
def test_generated_consistency_proofs_equal_the_happy_path_vectors(case_dir: str) -> None:
    case = json.loads((VECTORS / "consistency" / case_dir / "happy-path.json").read_text())
    _, store = rfc_tree_store()
    size1, size2 = case["size1"], case["size2"]
    assert root_from_reader(size1, SizedReader(store, size1)) == b64(case["root1"])
    proof = consistency_proof(size1, size2, SizedReader(store, size2))
    assert proof == [b64(h) for h in case["proof"] or []]


# --- proof generation against the RFC 6962 reference


def test_inclusion_proofs_equal_the_rfc_reference_for_small_trees() -> None:
    for size in range(1, 65):
        leaves = LEAVES[:size]
        for index in range(size):
            assert inclusion_proof(index, size, SizedReader(NODES, size)) == ref_path(index, leaves)


def test_consistency_proofs_equal_the_rfc_reference_for_small_trees() -> None:
    for size2 in range(1, 65):
        leaves = LEAVES[:size2]
        for size1 in range(1, size2 + 1):
            expected = ref_subproof(size1, leaves, True)
            assert consistency_proof(size1, size2, SizedReader(NODES, size2)) == expected


def test_a_one_leaf_tree_has_an_empty_inclusion_proof_and_needs_no_reads() -> None:
    reader = SizedReader(NODES, 1)
    assert inclusion_proof(0, 1, reader) == []
    assert reader.calls == 0
    verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[0])


def test_equal_sizes_have_an_empty_consistency_proof() -> None:
    assert consistency_proof(5, 5, SizedReader(NODES, 5)) == []
    verify_consistency(5, 5, [], ref_root(5), ref_root(5))


@pytest.mark.parametrize(("index", "size"), [(-1, 4), (4, 4), (0, 0), (7, 3)])
def test_inclusion_proof_of_a_leaf_outside_the_tree_is_refused(index: int, size: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        inclusion_proof_plan(index, size)


@pytest.mark.parametrize(("size1", "size2"), [(0, 4), (0, 0), (5, 4), (-1, 3)])
def test_consistency_proof_needs_0_lt_size1_le_size2(size1: int, size2: int) -> None:
    with pytest.raises(ValueError, match="0 < size1 <= size2"):
        consistency_proof_plan(size1, size2)


def test_a_plan_names_at_most_one_partial_subtree() -> None:
    # Size 1000 = 512 + 256 + 128 + 64 + 32 + 8: leaf 3's top sibling is the right-edge
    # subtree [512, 1000), made of five full subtrees; every other sibling is full.
    plan = inclusion_proof_plan(3, 1000)
    assert [len(group) for group in plan] == [1] * 9 + [5]
    assert plan[-1] == [NodeId(8, 2), NodeId(7, 6), NodeId(6, 14), NodeId(5, 30), NodeId(3, 124)]


# --- properties over random trees: proofs verify, and any change breaks them

sizes = st.integers(1, MAX_SIZE)


@given(sizes, st.data())
def test_inclusion_proofs_verify_with_o_log_n_reads(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1), label="index")
    reader = SizedReader(NODES, size)
    proof = inclusion_proof(index, size, reader)
    assert reader.calls <= 1  # one batched read
    assert reader.reads <= read_bound(size)
    verify_inclusion(LEAVES[index], index, size, proof, ref_root(size))
    assert root_from_inclusion_proof(LEAVES[index], index, size, proof) == ref_root(size)


@given(sizes, st.data())
def test_inclusion_proofs_from_tiles_equal_those_from_nodes(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1), label="index")
    tiles = SizedTileReader(TILES, size)
    proof = inclusion_proof(index, size, TiledHashReader(tiles))
    assert proof == inclusion_proof(index, size, SizedReader(NODES, size))
    assert tiles.reads <= read_bound(size)


@given(sizes, st.data())
def test_a_flipped_bit_in_an_inclusion_proof_fails(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, size, SizedReader(NODES, size))
    if not proof:
        return  # size 1: nothing to flip
    position = data.draw(st.integers(0, len(proof) - 1), label="element")
    bit = data.draw(st.integers(0, 255), label="bit")
    tampered: list[bytes] = list(proof)
    tampered[position] = flip(proof[position], bit)
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[index], index, size, tampered, ref_root(size))


@given(sizes, st.data())
def test_an_inclusion_proof_fails_for_another_index_or_leaf(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, size, SizedReader(NODES, size))
    other = data.draw(st.integers(0, size + 2).filter(lambda i: i != index), label="other index")
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[index], other, size, proof, ref_root(size))
    bit = data.draw(st.integers(0, 255), label="bit")
    with pytest.raises(ProofError):
        verify_inclusion(flip(LEAVES[index], bit), index, size, proof, ref_root(size))


@given(sizes, st.data())
def test_an_inclusion_proof_fails_for_another_tree_size(size: int, data: st.DataObject) -> None:
    # Against the other size's own root: the proof alone does not pin the size (leaf 0
    # of 3 and of 4 follow the same path); the signed (size, root) pair does.
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = inclusion_proof(index, size, SizedReader(NODES, size))
    assume(not index + 1 == size == MAX_SIZE)  # no other size holds the leaf
    other = data.draw(st.integers(index + 1, MAX_SIZE).filter(lambda n: n != size), label="other size")
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[index], index, other, proof, ref_root(other))


def draw_sizes(data: st.DataObject) -> tuple[int, int]:
    size2 = data.draw(sizes, label="size2")
    size1 = data.draw(st.integers(1, size2), label="size1")
    return size1, size2


@given(st.data())
def test_consistency_proofs_verify_with_o_log_n_reads(data: st.DataObject) -> None:
    size1, size2 = draw_sizes(data)
    reader = SizedReader(NODES, size2)
    proof = consistency_proof(size1, size2, reader)
    assert reader.calls <= 1
    assert reader.reads <= read_bound(size2)
    verify_consistency(size1, size2, proof, ref_root(size1), ref_root(size2))
    assert proof == consistency_proof(size1, size2, TiledHashReader(SizedTileReader(TILES, size2)))


@given(st.data())
def test_a_flipped_bit_in_a_consistency_proof_fails(data: st.DataObject) -> None:
    size1, size2 = draw_sizes(data)
    proof = consistency_proof(size1, size2, SizedReader(NODES, size2))
    if not proof:
        return  # equal sizes: nothing to flip
    position = data.draw(st.integers(0, len(proof) - 1), label="element")
    tampered: list[bytes] = list(proof)
    tampered[position] = flip(proof[position], data.draw(st.integers(0, 255), label="bit"))
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, tampered, ref_root(size1), ref_root(size2))


@given(st.data())
def test_a_consistency_proof_fails_for_other_sizes_or_roots(data: st.DataObject) -> None:
    size1, size2 = draw_sizes(data)
    proof = consistency_proof(size1, size2, SizedReader(NODES, size2))
    other1 = data.draw(st.integers(0, size2).filter(lambda n: n != size1), label="other size1")
    with pytest.raises(ProofError):
        verify_consistency(other1, size2, proof, ref_root(other1), ref_root(size2))
    assume(not size1 == size2 == MAX_SIZE)
    other2 = data.draw(st.integers(size1, MAX_SIZE).filter(lambda n: n != size2), label="other size2")
    with pytest.raises(ProofError):
        verify_consistency(size1, other2, proof, ref_root(size1), ref_root(other2))
    bit = data.draw(st.integers(0, 255), label="bit")
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, proof, flip(ref_root(size1), bit), ref_root(size2))
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, proof, ref_root(size1), flip(ref_root(size2), bit))


def flip(value: bytes, bit: int) -> bytes:
    changed = bytearray(value)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


# --- verification edge cases beyond the vectors


def test_proof_error_is_an_obsd_error() -> None:
    assert issubclass(ProofError, ObsdError)


def test_proof_elements_must_be_32_bytes() -> None:
    proof = inclusion_proof(5, 8, SizedReader(NODES, 8))
    with pytest.raises(ProofError, match="element 1"):
        verify_inclusion(LEAVES[5], 5, 8, [proof[0], proof[1] + b"\x00", proof[2]], ref_root(8))
    with pytest.raises(ProofError, match="leaf hash"):
        verify_inclusion(LEAVES[5][:31], 5, 8, proof, ref_root(8))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_consistency_from_the_empty_tree_is_refused_even_with_the_empty_root(size: int) -> None:
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, size, [], EMPTY_ROOT, ref_root(size))
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)


# --- incremental building


def test_tree_builder_yields_every_full_subtree_exactly_once_with_its_hash() -> None:
    expected = {NodeId(level, index) for level in range(11) for index in range(MAX_SIZE >> level)}
    assert set(NODES.nodes) == expected
    for (level, index), node_hash in NODES.nodes.items():
        assert node_hash == ref_range(index << level, (index + 1) << level)


def test_an_append_completes_the_leaf_and_one_subtree_per_trailing_one_bit() -> None:
    builder = TreeBuilder()
    builder.extend(LEAVES[:7])
    completed = builder.append(LEAVES[7])  # leaf 7 completes [6, 8), [4, 8) and [0, 8)
    assert [node for node, _ in completed] == [NodeId(0, 7), NodeId(1, 3), NodeId(2, 1), NodeId(3, 0)]
    assert completed[-1][1] == builder.root() == ref_root(8)
    assert [node for node, _ in builder.append(LEAVES[8])] == [NodeId(0, 8)]


@given(st.integers(0, MAX_SIZE - 1), st.integers(0, 50))
def test_a_builder_resumed_from_storage_continues_the_same_tree(size: int, more: int) -> None:
    reader = SizedReader(NODES, size)
    builder = TreeBuilder.from_reader(size, reader)
    assert reader.reads == bin(size).count("1")
    assert builder.size == size
    assert builder.root() == ref_root(size)
    end = min(size + more, MAX_SIZE)
    completed = builder.extend(LEAVES[size:end])
    assert all(NODES.nodes[node] == node_hash for node, node_hash in completed)
    assert builder.root() == ref_root(end)


def test_tree_builder_rejects_a_leaf_hash_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="33 bytes"):
        TreeBuilder().append(bytes(33))


def test_subtree_ids_decompose_a_range_largest_first() -> None:
    assert subtree_ids(0, 13) == [NodeId(3, 0), NodeId(2, 2), NodeId(0, 12)]
    assert subtree_ids(8, 13) == [NodeId(2, 2), NodeId(0, 12)]
    assert subtree_ids(5, 5) == []
    with pytest.raises(ValueError, match="aligned"):
        subtree_ids(2, 7)


# --- tiles (C2SP tlog-tiles)


@pytest.mark.parametrize(
    ("node", "span"),
    [
        (NodeId(0, 300), TileSpan(TileId(0, 1), 44, 45)),
        (NodeId(3, 40), TileSpan(TileId(0, 1), 64, 72)),
        (NodeId(7, 1), TileSpan(TileId(0, 0), 128, 256)),
        (NodeId(8, 5), TileSpan(TileId(1, 0), 5, 6)),
        (NodeId(9, 200), TileSpan(TileId(1, 1), 144, 146)),
        (NodeId(16, 0), TileSpan(TileId(2, 0), 0, 1)),
    ],
)
def test_tile_span_maps_a_node_to_its_tile_hashes(node: NodeId, span: TileSpan) -> None:
    assert tile_span(node) == span


def test_only_levels_0_8_16_are_stored() -> None:
    assert stored_position(NodeId(0, 300)) == (TileId(0, 1), 44)
    assert stored_position(NodeId(8, 257)) == (TileId(1, 1), 1)
    assert stored_position(NodeId(3, 1)) is None


def test_tile_widths_follow_the_tlog_tiles_example() -> None:
    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial
    # level 0 tile of width 112, one full level 1 tile, one partial level 1 tile of width
    # 17, and one partial level 2 tile of width 1."
    widths = tile_widths(70_000)
    level0 = [(tile, w) for tile, w in widths if tile.level == 0]
    assert len(level0) == 274
    assert all(w == TILE_WIDTH for _, w in level0[:273])
    assert level0[273] == (TileId(0, 273), 112)
    assert [(t, w) for t, w in widths if t.level > 0] == [(TileId(1, 0), 256), (TileId(1, 1), 17), (TileId(2, 0), 1)]
    assert tile_widths(256) == [(TileId(0, 0), 256), (TileId(1, 0), 1)]
    assert tile_widths(0) == []


def test_tile_paths_use_the_tlog_tiles_encoding() -> None:
    assert TileId(0, 1234067).path() == "tile/0/x001/x234/067"
    assert TileId(1, 5).path(17) == "tile/1/005.p/17"
    assert TileId(2, 1000).path() == "tile/2/x001/000"
    with pytest.raises(ValueError, match="width"):
        TileId(0, 0).path(0)


def test_tile_storage_is_the_leaf_hashes_plus_about_one_in_255() -> None:
    stored = sum(len(data) for data in TILES.tiles.values()) // 32
    assert stored == stored_hash_count(MAX_SIZE) == MAX_SIZE + MAX_SIZE // 256
    assert stored == sum(w for _, w in tile_widths(MAX_SIZE))
    for size in [1, 255, 256, 70_000, 1_000_000, 2**40 + 12345]:
        assert stored_hash_count(size) <= size * 256 / 255 + 1
        assert stored_hash_count(size) <= 1.1 * size


def test_tile_appends_can_leave_out_the_leaf_tiles() -> None:
    builder = TreeBuilder()
    completed = builder.extend(LEAVES[:600])
    appends = tile_appends(completed, skip_leaf_tiles=True)
    assert appends == {TileId(1, 0): (0, NODES.nodes[NodeId(8, 0)] + NODES.nodes[NodeId(8, 1)])}


def test_tile_appends_refuse_a_gap() -> None:
    nodes = [(NodeId(0, 0), LEAVES[0]), (NodeId(0, 2), LEAVES[2])]
    with pytest.raises(ValueError, match="contiguous"):
        tile_appends(nodes)


def test_a_node_beyond_a_partial_tile_cannot_be_read() -> None:
    data = b"".join(LEAVES[:5])
    assert hash_from_tile(data, tile_span(NodeId(2, 0))) == ref_range(0, 4)
    with pytest.raises(ValueError, match="too few"):
        hash_from_tile(data, tile_span(NodeId(1, 2)))


@given(batches=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=6))
def test_extend_stored_gives_the_tiles_of_extend_without_the_unstored_nodes(batches: list[int]) -> None:
    full, lean = TreeBuilder(), TreeBuilder()
    for n, size in enumerate(batches):
        leaves = [hashlib.sha256(f"{n}/{i}".encode()).digest() for i in range(size)]
        assert tile_appends(lean.extend_stored(leaves), skip_leaf_tiles=True) == tile_appends(
            full.extend(leaves), skip_leaf_tiles=True
        )
        assert (lean.size, lean.root()) == (full.size, full.root())
