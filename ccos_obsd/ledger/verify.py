"""Offline verification of a ledger or an export: every hash, every signature.

The checks, per entry in seq order: seqs are contiguous from 0, the stored bytes
are a JSON object whose ``seq`` is the row's, the leaf hash and the chain hash
recompute from the stored bytes, and the signature verifies under the key its
``key_id`` names, within the seq range that key signed. Signatures are checked
on a thread pool (Ed25519 verification releases the GIL), hashes in order.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ccos_obsd.errors import VerificationError
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import VerifierKey
from ccos_obsd.ledger.merkle import TreeBuilder
from ccos_obsd.ledger.note import Checkpoint, NoteError, parse_note, verify_checkpoint
from ccos_obsd.ledger.store import StoredEntry

_SIGNATURE_CHUNK = 512


@dataclass(frozen=True)
class KeyRange:
    key: VerifierKey
    first_seq: int = 0
    last_seq: int | None = None

    def covers(self, seq: int) -> bool:
        return self.first_seq <= seq and (self.last_seq is None or seq <= self.last_seq)


class KeyRing:
    """Verifier keys by key id, each with the seq range it may sign."""

    def __init__(self, ranges: Iterable[KeyRange]) -> None:
        self._by_id: dict[str, list[KeyRange]] = {}
        for key_range in ranges:
            self._by_id.setdefault(key_range.key.key_id, []).append(key_range)

    def __len__(self) -> int:
        return len(self._by_id)

    def all_keys(self) -> list[VerifierKey]:
        return [r.key for ranges in self._by_id.values() for r in ranges]

    def keys_named(self, name: str) -> list[VerifierKey]:
        return [r.key for ranges in self._by_id.values() for r in ranges if r.key.name == name]

    def key_for(self, key_id: str, seq: int) -> VerifierKey:
        ranges = self._by_id.get(key_id)
        if not ranges:
            raise VerificationError(seq, "unknown_key", f"signed by key {key_id}, which is not in the key ring")
        for key_range in ranges:
            if key_range.covers(seq):
                return key_range.key
        raise VerificationError(seq, "key_out_of_range", f"key {key_id} did not sign entries at this seq")


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    head_chain_hash: Hash
    signatures_checked: int
    checkpoints_checked: int = 0
    covered_size: int = 0
    """Entries covered by the latest verified checkpoint."""
    pending: int = 0
    """Unsigned entries after the latest checkpoint (only with ``allow_pending``)."""


@dataclass(frozen=True)
class CheckpointRecord:
    """A signed checkpoint to check against the entries: stored ones, or one saved earlier."""

    note: str
    source: str = "stored"
    size: int | None = None
    """The size the store filed it under, when it comes from the store (must match the note)."""


def verify_checkpoint_note(record: CheckpointRecord, keys: KeyRing) -> Checkpoint:
    """The checkpoint a note carries, once its signature verifies under a key of the ring."""
    seq_hint = max((record.size or 1) - 1, 0)
    try:
        checkpoint = Checkpoint.from_text(parse_note(record.note)[0])
        verify_checkpoint(record.note, keys.keys_named(checkpoint.origin), origin=checkpoint.origin)
    except NoteError as exc:
        raise VerificationError(seq_hint, "bad_checkpoint", f"{record.source} checkpoint: {exc}") from None
    if record.size is not None and checkpoint.size != record.size:
        raise VerificationError(
            seq_hint, "bad_checkpoint", f"{record.source} checkpoint filed at size {record.size} says {checkpoint.size}"
        )
    return checkpoint


def verify_entries(
    entries: Iterable[StoredEntry],
    keys: KeyRing,
    *,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    checkpoints: Sequence[CheckpointRecord] = (),
    allow_pending: bool = False,
) -> VerifyReport:
    """Check every entry and checkpoint; return a report or raise ``VerificationError``.

    Each entry must be authenticated: by its own signature, or (in checkpoint
    signing mode) by a verified checkpoint whose tree covers it. The Merkle tree is
    recomputed from the leaf hashes and each checkpoint is checked when the walk
    reaches its size, so the first damage in seq order is the one reported; a
    checkpoint larger than the ledger means its tail was cut off.
    """
    workers = workers or os.cpu_count() or 1
    # Signature checks release the GIL; a short switch interval lets the checking threads
    # take it back quickly while this thread walks the entries.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, 0.001))
    try:
        return _verify_entries(entries, keys, progress, workers, checkpoints, allow_pending)
    finally:
        sys.setswitchinterval(switch_interval)


def _verify_entries(
    entries: Iterable[StoredEntry],
    keys: KeyRing,
    progress: Callable[[int], None] | None,
    workers: int,
    checkpoints: Sequence[CheckpointRecord],
    allow_pending: bool,
) -> VerifyReport:
    waiting = sorted(checkpoints, key=_claimed_size)
    position = 0
    tree = TreeBuilder()
    expected = covered = verified_checkpoints = 0
    uncovered_from: int | None = None
    previous: Hash = CHAIN_ROOT
    chunk: list[tuple[int, VerifierKey, bytes, bytes]] = []
    futures: list[Future[VerificationError | None]] = []
    structural: VerificationError | None = None
    signatures = pending = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ccos-verify") as pool:
        for entry in entries:
            try:
                previous = _check_entry(entry, expected, previous)
                if entry.signature is not None:
                    key = keys.key_for(entry.key_id, entry.seq)
                    chunk.append((entry.seq, key, entry.signature, entry_signed_message(entry.chain_hash)))
                    signatures += 1
                elif uncovered_from is None:
                    uncovered_from = entry.seq
                tree.append(entry.leaf_hash)
                while position < len(waiting) and _claimed_size(waiting[position]) <= tree.size:
                    checkpoint = verify_checkpoint_note(waiting[position], keys)
                    position += 1
                    if checkpoint.size != tree.size:
                        raise VerificationError(
                            max(checkpoint.size - 1, 0), "bad_checkpoint", "checkpoint size is not a tree size"
                        )
                    _check_root(checkpoint, tree.root())
                    covered = checkpoint.size
                    verified_checkpoints += 1
                    uncovered_from = None
            except VerificationError as error:
                structural = error
                break
            expected += 1
            if len(chunk) >= _SIGNATURE_CHUNK:
                futures.append(pool.submit(_verify_signatures, chunk))
                chunk = []
                if progress is not None:
                    progress(_SIGNATURE_CHUNK)
        if chunk:
            futures.append(pool.submit(_verify_signatures, chunk))
        for future in futures:
            bad_signature = future.result()
            if bad_signature is not None and (structural is None or bad_signature.seq < structural.seq):
                structural = bad_signature
                break
    if structural is None and position < len(waiting):
        beyond = verify_checkpoint_note(waiting[position], keys)
        structural = VerificationError(
            expected, "truncated", f"a checkpoint covers {beyond.size} entries but the ledger has {expected}"
        )
    if structural is None and uncovered_from is not None:
        if not allow_pending:
            structural = VerificationError(
                uncovered_from, "unauthenticated",
                f"no signature, and no checkpoint covers it (the latest covers {covered} entries)",
            )
        pending = expected - uncovered_from
    if structural is not None:
        raise structural
    if progress is not None:
        progress(expected % _SIGNATURE_CHUNK)
    return VerifyReport(expected, previous, signatures, verified_checkpoints, covered, pending)


def _claimed_size(record: CheckpointRecord) -> int:
    """The size a checkpoint claims, read without verifying (verification comes at that size)."""
    if record.size is not None:
        return record.size
    try:
        return Checkpoint.from_text(parse_note(record.note)[0]).size
    except NoteError:
        return 0  # checked (and rejected) first


def _check_root(checkpoint: Checkpoint, root: Hash) -> None:
    if root != checkpoint.root_hash:
        raise VerificationError(
            checkpoint.size - 1, "checkpoint_mismatch",
            f"the checkpoint at size {checkpoint.size} signs a tree root the entries do not produce",
        )


def _check_entry(entry: StoredEntry, expected: int, previous: Hash) -> Hash:
    seq = entry.seq
    if seq != expected:
        if seq > expected:
            raise VerificationError(expected, "missing", f"no entry at seq {expected} (the next stored is {seq})")
        raise VerificationError(seq, "out_of_order", f"seq {seq} appears where seq {expected} was expected")
    try:
        fields = json.loads(entry.entry)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(seq, "malformed_entry", f"stored bytes are not JSON: {exc}") from None
    if not isinstance(fields, dict) or fields.get("seq") != seq:
        raise VerificationError(seq, "seq_mismatch", f"entry bytes name seq {_seq_of(fields)}, stored at seq {seq}")
    leaf = leaf_hash(entry.entry)
    if leaf != entry.leaf_hash:
        raise VerificationError(seq, "leaf_hash_mismatch", "the stored entry bytes do not hash to the stored leaf hash")
    chained = chain_hash(previous, leaf)
    if chained != entry.chain_hash:
        raise VerificationError(seq, "chain_hash_mismatch", "the chain hash does not follow from the previous entry")
    return chained


def _seq_of(fields: object) -> object:
    return fields.get("seq") if isinstance(fields, dict) else None


def _verify_signatures(chunk: list[tuple[int, VerifierKey, bytes, bytes]]) -> VerificationError | None:
    for seq, key, signature, message in chunk:
        if not key.verify(signature, message):
            return VerificationError(seq, "bad_signature", f"signature does not verify under key {key.key_id}")
    return None
