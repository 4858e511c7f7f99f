"""RFC 6962 / RFC 9162 Merkle tree over the ledger's leaf hashes.

Nodes are addressed as tlog "stored hashes": ``NodeId(level, index)`` is the hash of
the *full* subtree over leaves ``[index * 2**level, (index + 1) * 2**level)``. A full
subtree never changes once its last leaf is appended, so it can be stored as soon as
it completes (:class:`TreeBuilder` yields exactly those). Every hash a tree of size
``n`` needs that is not a full subtree (its root, the right-edge siblings in proofs)
is computed from at most ``log2(n)`` full ones, so roots and proofs cost O(log n)
reads and never a rebuild.

Storage follows C2SP tlog-tiles: only levels 0, 8, 16, ... are stored, in tiles of
256 consecutive hashes; a hash at an intermediate level is recomputed from at most
128 hashes of one tile (:class:`TiledHashReader`). The tree then costs
``n * (1 + 1/256 + 1/256**2 + ...)``, about ``n * 256/255`` hashes, of which ``n`` are
the leaf hashes themselves (level-0 tiles; a store that already keeps the leaf hashes
can serve level-0 tiles from there and store only the ``n/255`` others).

Verification follows RFC 9162, sections 2.1.3.2 and 2.1.4.2: ``verify_*`` return
nothing or raise :class:`ProofError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from ccos_obsd.errors import ProofError
from ccos_obsd.ledger.hashing import HASH_SIZE, Hash

NODE_PREFIX = b"\x01"
EMPTY_ROOT = Hash(hashlib.sha256(b"").digest())
"""The root of the empty tree: ``SHA-256()`` of nothing (RFC 6962, section 2.1)."""

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
"""A full tile holds 256 hashes (8,192 bytes), as in C2SP tlog-tiles."""


class NodeId(NamedTuple):
    """A full subtree: ``level`` 0 is a leaf; ``index`` counts subtrees of that level."""

    level: int
    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here calls


StoredNode = tuple[NodeId, Hash]


class HashReader(Protocol):
    """Where proofs read full-subtree hashes: one batched read per proof or root."""

    def get_hashes(self, ids: Sequence[NodeId]) -> list[bytes]:
        """The hashes of ``ids``, in order; every id is a complete subtree of the tree."""
        ...


def hash_children(left: bytes, right: bytes) -> Hash:
    """Interior node hash, ``SHA-256(0x01 || left || right)``."""
    return Hash(hashlib.sha256(NODE_PREFIX + left + right).digest())


def _fold_right(hashes: Sequence[bytes]) -> Hash:
    """Hash of a range from its full subtrees, largest (leftmost) first.

    RFC 6962 splits a range at its largest power of two, so a range decomposed as
    ``[a, b, c]`` hashes as ``node(a, node(b, c))``.
    """
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = hash_children(left, result)
    return Hash(result)


def _largest_power_of_two_below(size: int) -> int:
    return 1 << ((size - 1).bit_length() - 1)


def subtree_ids(start: int, end: int) -> list[NodeId]:
    """The full subtrees that make up leaves ``[start, end)``, largest first.

    The range must be one RFC 6962 ever hashes as a unit: ``start`` a multiple of
    the largest power of two in ``end - start`` (true of ``[0, n)`` and of every
    subtree a proof names).
    """
    width = end - start
    if start < 0 or width < 0:
        raise ValueError(f"bad leaf range [{start}, {end})")
    if width and start % (1 << (width.bit_length() - 1)):
        raise ValueError(f"leaf range [{start}, {end}) is not aligned to a subtree")
    ids = []
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            ids.append(NodeId(level, start >> level))
            start += 1 << level
    return ids


def root_hash(leaf_hashes: Iterable[bytes]) -> Hash:
    """The RFC 6962 Merkle tree hash of ``leaf_hashes`` (``EMPTY_ROOT`` if none)."""
    builder = TreeBuilder()
    builder.extend(leaf_hashes)
    return builder.root()


def _read(reader: HashReader, ids: Sequence[NodeId]) -> list[bytes]:
    if not ids:
        return []
    hashes = reader.get_hashes(ids)
    if len(hashes) != len(ids) or any(len(h) != HASH_SIZE for h in hashes):
        raise ValueError(f"hash reader returned {len(hashes)} hashes for {len(ids)} ids, or a hash of the wrong size")
    return hashes


def root_from_reader(size: int, reader: HashReader) -> Hash:
    """The root of the tree's first ``size`` leaves, from at most ``log2(size) + 1`` reads."""
    if size < 0:
        raise ValueError(f"tree size {size} is negative")
    if size == 0:
        return EMPTY_ROOT
    return _fold_right(_read(reader, subtree_ids(0, size)))


# --- proof generation

ProofPlan = list[list[NodeId]]
"""One group per proof hash, bottom-up; each group is folded right into that hash."""


def inclusion_proof_plan(index: int, size: int) -> ProofPlan:
    """Which full subtrees make up the inclusion proof of leaf ``index`` at ``size``.

    The RFC 6962 ``PATH`` recursion, top-down: at most one sibling is a partial
    (right-edge) subtree, so the plan names at most ``2 * log2(size)`` nodes.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    top_down = []
    low, high = 0, size
    while high - low > 1:
        split = low + _largest_power_of_two_below(high - low)
        if index < split:
            top_down.append(subtree_ids(split, high))
            high = split
        else:
            top_down.append(subtree_ids(low, split))
            low = split
    return top_down[::-1]


def consistency_proof_plan(size1: int, size2: int) -> ProofPlan:
    """Which full subtrees make up the consistency proof from ``size1`` to ``size2``.

    The RFC 6962 ``SUBPROOF`` recursion, top-down. A proof from the empty tree is
    refused, as by the verifier: it would prove nothing.
    """
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2} (need 0 < size1 <= size2)")
    top_down = []
    low, high = 0, size2
    whole_old_tree = True  # SUBPROOF's flag: the old tree's root is known to the verifier
    while size1 != high:
        split = low + _largest_power_of_two_below(high - low)
        if size1 <= split:
            top_down.append(subtree_ids(split, high))
            high = split
        else:
            top_down.append(subtree_ids(low, split))
            low = split
            whole_old_tree = False
    if not whole_old_tree:
        top_down.append(subtree_ids(low, high))
    return top_down[::-1]


def _resolve(plan: ProofPlan, reader: HashReader) -> list[Hash]:
    hashes = iter(_read(reader, [node for group in plan for node in group]))
    return [_fold_right([next(hashes) for _ in group]) for group in plan]


def inclusion_proof(index: int, size: int, reader: HashReader) -> list[Hash]:
    """RFC 6962 audit path of leaf ``index`` in the tree of ``size`` leaves, bottom-up."""
    return _resolve(inclusion_proof_plan(index, size), reader)


def consistency_proof(size1: int, size2: int, reader: HashReader) -> list[Hash]:
    """RFC 6962 consistency proof between the trees of ``size1`` and ``size2`` leaves."""
    return _resolve(consistency_proof_plan(size1, size2), reader)


# --- verification (RFC 9162)


def _check_hashes(proof: Sequence[bytes]) -> None:
    for position, element in enumerate(proof):
        if len(element) != HASH_SIZE:
            raise ProofError(f"proof element {position} is {len(element)} bytes, not {HASH_SIZE}")


def _check_root(calculated: bytes, expected: bytes, what: str) -> None:
    if not hmac.compare_digest(calculated, expected):
        raise ProofError(f"{what} does not match the proof")


def _shift_past_right_border(first: int, last: int) -> tuple[int, int]:
    # On the right border a node may have no right sibling at some levels (RFC 6962
    # lifts it unchanged): skip those levels.
    while first and not first & 1:
        first >>= 1
        last >>= 1
    return first, last


def root_from_inclusion_proof(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> Hash:
    """The root that ``proof`` implies for ``leaf_hash`` at ``index`` in a tree of ``size``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    if len(leaf_hash) != HASH_SIZE:
        raise ProofError(f"leaf hash is {len(leaf_hash)} bytes, not {HASH_SIZE}")
    _check_hashes(proof)
    node, last = index, size - 1
    result = leaf_hash
    for sibling in proof:
        if last == 0:
            raise ProofError("inclusion proof is too long for the tree size")
        if node & 1 or node == last:
            result = hash_children(sibling, result)
            if not node & 1:
                node, last = _shift_past_right_border(node, last)
        else:
            result = hash_children(result, sibling)
        node >>= 1
        last >>= 1
    if last != 0:
        raise ProofError("inclusion proof is too short for the tree size")
    return Hash(result)


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``."""
    _check_root(root_from_inclusion_proof(leaf_hash, index, size, proof), root, "tree root")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Check that the tree of ``size2`` with ``root2`` extends the tree of ``size1`` with ``root1``.

    Refuses ``size1 == 0``: every tree extends the empty tree, so such a proof proves
    nothing and is more likely a mistake (RFC 9162 requires ``0 < size1``).
    """
    if size1 < 0 or size2 < size1:
        raise ProofError(f"size2 ({size2}) is smaller than size1 ({size1})")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("sizes are equal but the proof is not empty")
        _check_root(root1, root2, "root2")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    _check_hashes(proof)

    path = list(proof)
    if size1 & (size1 - 1) == 0:
        # The old tree is a full subtree of the new one: its root is the proof's seed.
        path.insert(0, root1)
    node, last = size1 - 1, size2 - 1
    while node & 1:
        node >>= 1
        last >>= 1
    old_root = new_root = path[0]
    for sibling in path[1:]:
        if last == 0:
            raise ProofError("consistency proof is too long for the tree sizes")
        if node & 1 or node == last:
            old_root = hash_children(sibling, old_root)
            new_root = hash_children(sibling, new_root)
            if not node & 1:
                node, last = _shift_past_right_border(node, last)
        else:
            new_root = hash_children(new_root, sibling)
        node >>= 1
        last >>= 1
    if last != 0:
        raise ProofError("consistency proof is too short for the tree sizes")
    _check_root(old_root, root1, "root1")
    _check_root(new_root, root2, "root2")


# --- incremental building


class TreeBuilder:
    """The right border of a growing tree (a "compact range" over ``[0, size)``).

    Holds one hash per set bit of ``size``: the full subtrees that make up the tree,
    largest first. Appending a leaf completes the leaf itself and one subtree per
    trailing one bit of the old size; ``append`` returns all of them, to be stored.
    """

    def __init__(self) -> None:
        self._size = 0
        self._border: list[Hash] = []

    @classmethod
    def from_reader(cls, size: int, reader: HashReader) -> TreeBuilder:
        """Resume at ``size`` from stored hashes (``log2(size) + 1`` reads at most)."""
        if size < 0:
            raise ValueError(f"tree size {size} is negative")
        builder = cls()
        builder._size = size
        builder._border = [Hash(h) for h in _read(reader, subtree_ids(0, size))]
        return builder

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> list[StoredNode]:
        """Add one leaf; return every full subtree it completes, lowest level first."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash is {len(leaf_hash)} bytes, not {HASH_SIZE}")
        index = self._size
        node = Hash(bytes(leaf_hash))
        completed: list[StoredNode] = [(NodeId(0, index), node)]
        level = 0
        while index >> level & 1:
            node = hash_children(self._border.pop(), node)
            level += 1
            completed.append((NodeId(level, index >> level), node))
        self._border.append(node)
        self._size += 1
        return completed

    def push(self, leaf_hash: bytes) -> None:
        """Add one leaf without reporting completed subtrees (verifiers only need roots)."""
        index = self._size
        node = leaf_hash
        border = self._border
        sha256 = hashlib.sha256
        while index & 1:
            node = sha256(NODE_PREFIX + border.pop() + node).digest()
            index >>= 1
        border.append(Hash(node))
        self._size += 1

    def extend_stored(self, leaf_hashes: Iterable[bytes]) -> list[StoredNode]:
        """Append each leaf; return only the completed subtrees that tiles above level 0 store.

        The same as filtering :meth:`extend` for levels 8, 16, ..., without building
        the nodes nobody stores (the hot path of every commit).
        """
        stored: list[StoredNode] = []
        border = self._border
        sha256 = hashlib.sha256
        for leaf in leaf_hashes:
            index = self._size
            node = bytes(leaf)
            level = 0
            while index >> level & 1:
                node = sha256(NODE_PREFIX + border.pop() + node).digest()
                level += 1
                if level % TILE_HEIGHT == 0:
                    stored.append((NodeId(level, index >> level), Hash(node)))
            border.append(Hash(node))
            self._size = index + 1
        return stored

    def extend(self, leaf_hashes: Iterable[bytes]) -> list[StoredNode]:
        """Append each leaf in order; return all completed subtrees, in completion order."""
        completed: list[StoredNode] = []
        for leaf in leaf_hashes:
            completed.extend(self.append(leaf))
        return completed

    def root(self) -> Hash:
        return _fold_right(self._border) if self._border else EMPTY_ROOT


# --- tiles (C2SP tlog-tiles)


class TileId(NamedTuple):
    """Tile ``index`` at tile ``level``: hashes at tree level ``8 * level``."""

    level: int
    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here calls

    def path(self, width: int = TILE_WIDTH) -> str:
        """The tlog-tiles resource path, e.g. ``tile/0/x001/x234/067.p/17``."""
        if not 1 <= width <= TILE_WIDTH:
            raise ValueError(f"tile width {width} is not in 1..{TILE_WIDTH}")
        digits = f"{self.index:03d}"
        digits = "0" * (-len(digits) % 3) + digits
        groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
        encoded = "/".join([*("x" + g for g in groups[:-1]), groups[-1]])
        suffix = "" if width == TILE_WIDTH else f".p/{width}"
        return f"tile/{self.level}/{encoded}{suffix}"


class TileSpan(NamedTuple):
    """The hashes ``[start, end)`` of ``tile`` whose subtree hash is one node."""

    tile: TileId
    start: int
    end: int


class TileAppend(NamedTuple):
    """Hashes to write into a tile at hash ``offset`` (a tile only grows at its end)."""

    offset: int
    hashes: bytes


def tile_span(node: NodeId) -> TileSpan:
    """Where ``node`` lives: tree level ``8t + s`` is ``2**s`` hashes of a level-``t`` tile."""
    level, index = node
    if level < 0 or index < 0:
        raise ValueError(f"bad node {node}")
    tile_level, sublevel = divmod(level, TILE_HEIGHT)
    first = index << sublevel
    start = first % TILE_WIDTH
    return TileSpan(TileId(tile_level, first // TILE_WIDTH), start, start + (1 << sublevel))


def stored_position(node: NodeId) -> tuple[TileId, int] | None:
    """The tile and offset where ``node`` is stored, or None if it is recomputed."""
    if node.level % TILE_HEIGHT:
        return None
    span = tile_span(node)
    return span.tile, span.start


def tile_appends(nodes: Iterable[StoredNode], *, skip_leaf_tiles: bool = False) -> dict[TileId, TileAppend]:
    """Group completed subtrees (as :class:`TreeBuilder` returns them) into tile writes.

    Only nodes at levels 0, 8, 16, ... are stored. With ``skip_leaf_tiles`` the
    level-0 tiles are left out, for a store that serves them from its leaf hashes.
    Nodes of one tile must be contiguous and in order, as appends produce them.
    """
    pending: dict[TileId, tuple[int, bytearray]] = {}
    for node, node_hash in nodes:
        position = stored_position(node)
        if position is None or (skip_leaf_tiles and node.level == 0):
            continue
        tile, offset = position
        start, data = pending.setdefault(tile, (offset, bytearray()))
        if offset != start + len(data) // HASH_SIZE:
            raise ValueError(f"node {node} is not contiguous with the earlier hashes of tile {tile}")
        data += node_hash
    return {tile: TileAppend(start, bytes(data)) for tile, (start, data) in pending.items()}


def tile_widths(size: int) -> list[tuple[TileId, int]]:
    """Every tile of a tree of ``size`` leaves with its width; the partial ones are < 256."""
    tiles: list[tuple[TileId, int]] = []
    level = 0
    while hashes_at_level := size >> (TILE_HEIGHT * level):
        full, partial = divmod(hashes_at_level, TILE_WIDTH)
        tiles.extend((TileId(level, index), TILE_WIDTH) for index in range(full))
        if partial:
            tiles.append((TileId(level, full), partial))
        level += 1
    return tiles


def stored_hash_count(size: int) -> int:
    """Hashes stored in tiles for ``size`` leaves (level-0 tiles included): about ``size * 256/255``."""
    count, level_size = 0, size
    while level_size:
        count += level_size
        level_size >>= TILE_HEIGHT
    return count


def hash_from_tile(tile_data: bytes, span: TileSpan) -> Hash:
    """The node hash over ``span`` of a tile's concatenated hashes."""
    if len(tile_data) % HASH_SIZE or len(tile_data) < span.end * HASH_SIZE:
        raise ValueError(f"tile {span.tile} holds {len(tile_data)} bytes: too few for [{span.start}, {span.end})")
    level = [tile_data[i : i + HASH_SIZE] for i in range(span.start * HASH_SIZE, span.end * HASH_SIZE, HASH_SIZE)]
    sha256 = hashlib.sha256  # the hot loop of proof generation: no wrapper calls
    while len(level) > 1:
        level = [sha256(NODE_PREFIX + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return Hash(level[0])


class TileReader(Protocol):
    """A tile store: each tile's hashes, concatenated (a partial tile is shorter)."""

    def read_tiles(self, tiles: Sequence[TileId]) -> list[bytes]: ...


class TiledHashReader:
    """A :class:`HashReader` over a tile store: one read per distinct tile."""

    def __init__(self, tiles: TileReader) -> None:
        self._tiles = tiles

    def get_hashes(self, ids: Sequence[NodeId]) -> list[bytes]:
        spans = [tile_span(node) for node in ids]
        wanted = list(dict.fromkeys(span.tile for span in spans))
        data = dict(zip(wanted, self._tiles.read_tiles(wanted), strict=True))
        return [hash_from_tile(data[span.tile], span) for span in spans]
