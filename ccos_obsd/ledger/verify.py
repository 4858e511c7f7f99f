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
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ccos_obsd.errors import NoteError, VerificationError
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import VerifierKey
from ccos_obsd.ledger.merkle import TreeBuilder
from ccos_obsd.ledger.note import Checkpoint, parse_note, verify_checkpoint
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
    reaches its size; a checkpoint larger than the ledger means its tail was cut off.
    The error with the lowest seq is the one reported.

    The per-entry checks (bytes, leaf hash, chain hash against the stored previous
    one, signature) run in chunks on ``workers`` threads (Ed25519 verification
    releases the GIL; a process pool measured no faster); this thread only walks
    seqs, the tree and the checkpoints.
    """
    workers = workers or os.cpu_count() or 1
    switch_interval = sys.getswitchinterval()
    # Signature checks release the GIL; a short switch interval lets the checking
    # threads take it back quickly while this thread walks the entries.
    sys.setswitchinterval(min(switch_interval, 0.001))
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ccos-verify") as threads:
            return _verify_entries(entries, keys, progress, threads, checkpoints, allow_pending)
    finally:
        sys.setswitchinterval(switch_interval)


def verify_range(
    entries: Iterable[StoredEntry],
    keys: KeyRing,
    *,
    start: int,
    previous_chain_hash: Hash,
    authenticated_below: int = 0,
    allow_pending: bool = False,
) -> VerifyReport:
    """The per-entry checks of :func:`verify_entries` on the entries from seq ``start`` on.

    ``previous_chain_hash`` is the stored chain hash of seq ``start - 1`` (taken as
    is: what lies before ``start`` is not checked). An unsigned entry must lie below
    ``authenticated_below`` (a checkpoint the caller verified covers it) or, with
    ``allow_pending``, may lie anywhere. Runs on the calling thread.
    """
    expected, previous, signatures, pending = start, previous_chain_hash, 0, 0
    chunk: list[CheckItem] = []
    for entry in entries:
        _check_position(entry.seq, expected)
        public_key: bytes | None = None
        if entry.signature is not None:
            public_key = keys.key_for(entry.key_id, entry.seq).public_key
            signatures += 1
        elif entry.seq >= authenticated_below:
            if not allow_pending:
                raise VerificationError(
                    entry.seq, "unauthenticated",
                    f"no signature, and no checkpoint covers it (the latest covers {authenticated_below} entries)",
                )
            pending += 1
        chunk.append((entry.seq, entry.entry, entry.leaf_hash, entry.chain_hash, previous,
                      public_key, entry.key_id, entry.signature))
        previous = entry.chain_hash
        expected += 1
        if len(chunk) >= _SIGNATURE_CHUNK:
            _raise_finding(_check_chunk(chunk))
            chunk = []
    _raise_finding(_check_chunk(chunk))
    return VerifyReport(expected - start, previous, signatures, pending=pending)


def _raise_finding(finding: Finding | None) -> None:
    if finding is not None:
        raise VerificationError(*finding)


def check_checkpoint_root(checkpoint: Checkpoint, root: Hash) -> None:
    """``checkpoint_mismatch`` (at its last seq) unless ``root`` is the root it signs."""
    _check_root(checkpoint, root)


CheckItem = tuple[int, bytes, bytes, bytes, bytes, bytes | None, str, bytes | None]
"""seq, entry bytes, stored leaf hash, stored chain hash, previous stored chain hash,
public key (None: unsigned), key id, signature."""
Finding = tuple[int, str, str]
"""seq, kind, detail: what a worker found (the caller raises the VerificationError)."""


def _verify_entries(
    entries: Iterable[StoredEntry],
    keys: KeyRing,
    progress: Callable[[int], None] | None,
    pool: Executor,
    checkpoints: Sequence[CheckpointRecord],
    allow_pending: bool,
) -> VerifyReport:
    walk = _Walk(keys, checkpoints)
    chunk: list[CheckItem] = []
    futures: list[Future[Finding | None]] = []
    findings: list[VerificationError] = []
    for entry in entries:
        try:
            chunk.append(walk.check_item(entry))
            walk.add_leaf(entry)
        except VerificationError as error:
            findings.append(error)
            break
        if len(chunk) >= _SIGNATURE_CHUNK:
            futures.append(pool.submit(_check_chunk, chunk))
            chunk = []
            if progress is not None:
                progress(_SIGNATURE_CHUNK)
    if chunk:
        futures.append(pool.submit(_check_chunk, chunk))
    findings += _first_chunk_finding(futures)
    if not findings:
        findings += walk.end_findings(allow_pending)
    if findings:
        raise min(findings, key=lambda error: error.seq)
    if progress is not None:
        progress(walk.expected % _SIGNATURE_CHUNK)
    return VerifyReport(
        walk.expected, walk.previous, walk.signatures, walk.verified_checkpoints, walk.covered, walk.pending
    )


def _first_chunk_finding(futures: Sequence[Future[Finding | None]]) -> list[VerificationError]:
    """The workers' first finding: chunks are in seq order, so later ones can only find higher seqs."""
    for future in futures:
        finding = future.result()
        if finding is not None:
            return [VerificationError(*finding)]
    return []


class _Walk:
    """What :func:`verify_entries` checks in seq order: positions, key ranges, the tree, the checkpoints."""

    def __init__(self, keys: KeyRing, checkpoints: Sequence[CheckpointRecord]) -> None:
        self.keys = keys
        self.waiting = sorted(checkpoints, key=_claimed_size)
        self.position = 0
        """Index in ``waiting`` of the next checkpoint to check."""
        self.tree = TreeBuilder()
        self.expected = 0
        """The next seq, and the number of entries walked."""
        self.previous: Hash = CHAIN_ROOT
        self.signatures = self.covered = self.verified_checkpoints = 0
        self.uncovered_from: int | None = None
        """The first unsigned entry no verified checkpoint covers yet."""

    @property
    def pending(self) -> int:
        return 0 if self.uncovered_from is None else self.expected - self.uncovered_from

    def check_item(self, entry: StoredEntry) -> CheckItem:
        """Check the entry's seq and key; return what the workers are to check of it."""
        _check_position(entry.seq, self.expected)
        public_key: bytes | None = None
        if entry.signature is not None:
            public_key = self.keys.key_for(entry.key_id, entry.seq).public_key
            self.signatures += 1
        elif self.uncovered_from is None:
            self.uncovered_from = entry.seq
        item = (entry.seq, entry.entry, entry.leaf_hash, entry.chain_hash, self.previous,
                public_key, entry.key_id, entry.signature)
        self.previous = entry.chain_hash
        return item

    def add_leaf(self, entry: StoredEntry) -> None:
        """Grow the tree by the entry's leaf; check every checkpoint of the size reached."""
        self.tree.push(entry.leaf_hash)
        while self.position < len(self.waiting) and _claimed_size(self.waiting[self.position]) <= self.tree.size:
            checkpoint = verify_checkpoint_note(self.waiting[self.position], self.keys)
            self.position += 1
            if checkpoint.size != self.tree.size:
                raise VerificationError(
                    max(checkpoint.size - 1, 0), "bad_checkpoint", "checkpoint size is not a tree size"
                )
            _check_root(checkpoint, self.tree.root())
            self.covered = checkpoint.size
            self.verified_checkpoints += 1
            self.uncovered_from = None
        self.expected += 1

    def end_findings(self, allow_pending: bool) -> list[VerificationError]:
        """After the last entry: a checkpoint beyond it (a cut-off tail), or entries nothing authenticates."""
        if self.position < len(self.waiting):
            beyond = verify_checkpoint_note(self.waiting[self.position], self.keys)
            return [VerificationError(
                self.expected, "truncated",
                f"a checkpoint covers {beyond.size} entries but the ledger has {self.expected}",
            )]
        if self.uncovered_from is not None and not allow_pending:
            return [VerificationError(
                self.uncovered_from, "unauthenticated",
                f"no signature, and no checkpoint covers it (the latest covers {self.covered} entries)",
            )]
        return []


def _check_position(seq: int, expected: int) -> None:
    if seq != expected:
        if seq > expected:
            raise VerificationError(expected, "missing", f"no entry at seq {expected} (the next stored is {seq})")
        raise VerificationError(seq, "out_of_order", f"seq {seq} appears where seq {expected} was expected")


def _check_chunk(chunk: list[CheckItem]) -> Finding | None:
    """On a worker thread: each entry's bytes, leaf and chain hash, and signature; the first finding."""
    public_keys: dict[bytes, Ed25519PublicKey] = {}
    for seq, entry, stored_leaf, stored_chain, previous_chain, public_key, key_id, signature in chunk:
        try:
            fields = json.loads(entry)
        except (ValueError, UnicodeDecodeError) as exc:
            return seq, "malformed_entry", f"stored bytes are not JSON: {exc}"
        if not isinstance(fields, dict) or fields.get("seq") != seq:
            return seq, "seq_mismatch", f"entry bytes name seq {_seq_of(fields)}, stored at seq {seq}"
        leaf = leaf_hash(entry)
        if leaf != stored_leaf:
            return seq, "leaf_hash_mismatch", "the stored entry bytes do not hash to the stored leaf hash"
        if chain_hash(previous_chain, leaf) != stored_chain:
            return seq, "chain_hash_mismatch", "the chain hash does not follow from the previous entry"
        if public_key is not None and signature is not None:
            key = public_keys.get(public_key)
            if key is None:
                key = public_keys[public_key] = Ed25519PublicKey.from_public_bytes(public_key)
            try:
                key.verify(signature, entry_signed_message(stored_chain))
            except InvalidSignature:
                return seq, "bad_signature", f"signature does not verify under key {key_id}"
    return None


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


def _seq_of(fields: object) -> object:
    return fields.get("seq") if isinstance(fields, dict) else None


