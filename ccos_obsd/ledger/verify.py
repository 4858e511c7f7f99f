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
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ccos_obsd.errors import VerificationError
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import VerifierKey
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


def verify_entries(
    entries: Iterable[StoredEntry],
    keys: KeyRing,
    *,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Check every entry; return a report or raise ``VerificationError`` for the first bad seq."""
    workers = workers or os.cpu_count() or 1
    expected = 0
    previous: Hash = CHAIN_ROOT
    chunk: list[tuple[int, VerifierKey, bytes, bytes]] = []
    pending: list[Future[VerificationError | None]] = []
    structural: VerificationError | None = None
    signatures = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ccos-verify") as pool:
        for entry in entries:
            try:
                previous = _check_entry(entry, expected, previous)
                if entry.signature is None:
                    raise VerificationError(entry.seq, "missing_signature", "the entry has no signature")
                key = keys.key_for(entry.key_id, entry.seq)
                chunk.append((entry.seq, key, entry.signature, entry_signed_message(entry.chain_hash)))
                signatures += 1
            except VerificationError as error:
                structural = error
                break
            expected += 1
            if len(chunk) >= _SIGNATURE_CHUNK:
                pending.append(pool.submit(_verify_signatures, chunk))
                chunk = []
                if progress is not None:
                    progress(_SIGNATURE_CHUNK)
        if chunk:
            pending.append(pool.submit(_verify_signatures, chunk))
        for future in pending:
            bad_signature = future.result()
            if bad_signature is not None and (structural is None or bad_signature.seq < structural.seq):
                structural = bad_signature
                break
    if structural is not None:
        raise structural
    if progress is not None:
        progress(expected % _SIGNATURE_CHUNK)
    return VerifyReport(expected, previous, signatures)


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
