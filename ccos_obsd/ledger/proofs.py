"""Proofs served from the ledger: C2SP tlog-proofs of inclusion, consistency proofs.

Each function reads one consistent snapshot of the database (the caller's
connection, inside a read transaction) and needs O(log n) hash reads: tiles of
the Merkle tree at levels 8, 16, ... and leaf hashes for level 0.
"""

from __future__ import annotations

import base64
import sqlite3
from typing import Any

from ccos_obsd.errors import InvalidRequest, NotFound, ProofError, Unavailable
from ccos_obsd.ledger import store
from ccos_obsd.ledger.merkle import (
    consistency_proof,
    inclusion_proof,
    root_from_reader,
    verify_consistency,
    verify_inclusion,
)
from ccos_obsd.ledger.note import build_tlog_proof


def inclusion(conn: sqlite3.Connection, *, seq: int | None = None, action_id: str | None = None) -> dict[str, Any]:
    """A tlog-proof that the entry is in the tree of the latest checkpoint.

    The proof carries the entry's exact stored bytes (its ``extra`` line) and the
    signed checkpoint, so ``ccos-obsd verify --proof`` needs nothing else.
    """
    entry = store.get_entry(conn, seq=seq, action_id=action_id)
    if entry is None:
        what = f"seq {seq}" if seq is not None else f"action_id {action_id!r}"
        raise NotFound(f"no entry with {what}")
    checkpoint = store.latest_checkpoint(conn)
    if checkpoint is None or checkpoint.size <= entry.seq:
        covered = 0 if checkpoint is None else checkpoint.size
        raise NotFound(
            f"seq {entry.seq} is not covered by a checkpoint yet (the latest covers {covered} entries); "
            "retry after checkpoint.interval"
        )
    try:
        hashes = inclusion_proof(entry.seq, checkpoint.size, store.hash_reader(conn))
        # Never hand out a proof that does not verify: damaged tiles must not become bad proofs.
        verify_inclusion(entry.leaf_hash, entry.seq, checkpoint.size, hashes, checkpoint.root_hash)
    except (ValueError, ProofError) as exc:
        raise Unavailable(f"the Merkle tiles are damaged ({exc}); restart the daemon to rebuild them") from None
    text = build_tlog_proof(entry.seq, entry.entry, hashes, checkpoint.note)
    return {"seq": entry.seq, "size": checkpoint.size, "proof": text}


def consistency(conn: sqlite3.Connection, size1: int, size2: int | None = None) -> dict[str, Any]:
    """RFC 6962 consistency proof from ``size1`` to ``size2`` (default: the ledger's size).

    JSON with the field names of the RFC 6962 test vectors; hashes in base64.
    """
    head = store.read_head(conn).size
    if size2 is None:
        size2 = head
    if not 0 < size1 <= size2:
        raise InvalidRequest(f"need 0 < size1 <= size2 (got {size1} and {size2})", field="size1")
    if size2 > head:
        raise InvalidRequest(f"size2 {size2} is beyond the ledger's {head} entries", field="size2")
    reader = store.hash_reader(conn)
    try:
        proof = consistency_proof(size1, size2, reader)
        root1, root2 = root_from_reader(size1, reader), root_from_reader(size2, reader)
        verify_consistency(size1, size2, proof, root1, root2)
        for checkpoint in store.read_checkpoints_at(conn, (size1, size2)):
            if checkpoint.root_hash != (root1 if checkpoint.size == size1 else root2):
                raise ProofError(f"tree root at size {checkpoint.size} differs from its checkpoint")
    except (ValueError, ProofError) as exc:
        raise Unavailable(f"the Merkle tiles are damaged ({exc}); restart the daemon to rebuild them") from None
    return {
        "size1": size1,
        "size2": size2,
        "root1": _b64(root1),
        "root2": _b64(root2),
        "proof": [_b64(h) for h in proof],
    }


def latest_checkpoint_note(conn: sqlite3.Connection) -> str:
    checkpoint = store.latest_checkpoint(conn)
    if checkpoint is None:
        raise NotFound("no checkpoint yet: the ledger is empty or the first one is under way")
    return checkpoint.note


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
