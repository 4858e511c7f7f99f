"""Offline verification: every tampering with a ledger or an export is caught, at the right seq.

Entries are built here with the real canonical encoding, hashing and signing, as
the ledger writer builds them (DESIGN.md, "Entry bytes, hashes, signatures").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from functools import cache
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.errors import VerificationError
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import CHAIN_ROOT, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import KeyId, SigningKey
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.ledger.verify import KeyRange, KeyRing, verify_entries

N = 20


def signing_key(seed_byte: int, name: str = "test/ccos-obsd") -> SigningKey:
    return SigningKey(name, Ed25519PrivateKey.from_private_bytes(bytes([seed_byte]) * 32))


KEY = signing_key(1)
NEXT_KEY = signing_key(2)
ATTACKER = signing_key(3)
RING = KeyRing([KeyRange(KEY.verifier)])


def fields_for(seq: int) -> dict[str, Any]:
    return {
        "v": 1,
        "seq": seq,
        "recorded_at_ms": 1_700_000_000_000 + seq,
        "action_id": f"action-{seq}",
        "action_type": "CapabilityCall",
        "function_name": "ccos.echo",
        "cost": seq / 10,
        "peer": {"uid": 1000, "gid": 1000, "pid": 4242},
    }


def seal(
    entries: Sequence[bytes], keys: Sequence[SigningKey | None] | SigningKey = KEY, start: int = 0,
    previous: bytes = CHAIN_ROOT,
) -> list[StoredEntry]:
    """Hash, chain and sign ``entries`` (stored at seqs from ``start``) as the writer does."""
    sealed = []
    for offset, entry in enumerate(entries):
        key = keys if isinstance(keys, SigningKey) else keys[offset]
        leaf = leaf_hash(entry)
        previous = chain_hash(previous, leaf)
        signature = None if key is None else key.sign(entry_signed_message(previous))
        key_id = KEY.key_id if key is None else key.key_id
        sealed.append(StoredEntry(start + offset, entry, leaf, previous, KeyId(key_id), signature))
    return sealed


@cache
def ledger(n: int = N) -> tuple[StoredEntry, ...]:
    return tuple(seal([canonical_bytes(fields_for(seq)) for seq in range(n)]))


def modified_bytes(seq: int) -> bytes:
    """Entry ``seq`` with one field changed (still valid JSON, still naming its seq)."""
    fields = fields_for(seq)
    fields["cost"] = 1_000_000
    return canonical_bytes(fields)


def replaced(entries: Sequence[StoredEntry], index: int, **changes: Any) -> list[StoredEntry]:
    out = list(entries)
    out[index] = dataclasses.replace(out[index], **changes)
    return out


def rewritten_from(index: int, keys: Sequence[SigningKey | None] | SigningKey) -> list[StoredEntry]:
    """History rewritten at ``index``, every later hash recomputed and signed by ``keys``."""
    original = ledger()
    tail = [modified_bytes(index), *(e.entry for e in original[index + 1 :])]
    previous = original[index - 1].chain_hash if index else CHAIN_ROOT
    return [*original[:index], *seal(tail, keys, start=index, previous=previous)]


def failure(entries: Sequence[StoredEntry], keys: KeyRing = RING) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        verify_entries(entries, keys, workers=2)
    assert str(caught.value).startswith(f"seq {caught.value.seq}: {caught.value.kind}")
    return caught.value


indexes = st.integers(0, N - 1)


# --- an intact ledger


def test_intact_chain_verifies() -> None:
    report = verify_entries(ledger(), RING, workers=2)
    assert report.entries == N
    assert report.signatures_checked == N
    assert report.head_chain_hash == ledger()[-1].chain_hash


def test_entries_are_built_as_the_contract_says() -> None:
    # The fixture itself, checked against DESIGN.md so the tests below test the real format.
    first = ledger()[0]
    assert first.entry.startswith(b'{"action_id":"action-0","action_type":"CapabilityCall","cost":0.0,')
    assert json.loads(first.entry)["seq"] == 0
    assert first.chain_hash == chain_hash(bytes(32), leaf_hash(first.entry))
    assert KEY.verifier.verify(first.signature or b"", b"ccos-obsd/entry/v1\x00" + first.chain_hash)


def test_empty_ledger_verifies_to_the_chain_root() -> None:
    report = verify_entries([], RING)
    assert (report.entries, report.signatures_checked, report.head_chain_hash) == (0, 0, CHAIN_ROOT)


def test_a_generator_of_entries_verifies() -> None:
    assert verify_entries((e for e in ledger()), RING, workers=1).entries == N


def test_progress_reports_every_entry() -> None:
    seen: list[int] = []
    verify_entries(ledger(600), RING, progress=seen.append, workers=2)
    assert sum(seen) == 600


def test_rotated_keys_verify_within_their_ranges() -> None:
    entries = [canonical_bytes(fields_for(seq)) for seq in range(N)]
    sealed = seal(entries, [KEY] * 10 + [NEXT_KEY] * 10)
    ring = KeyRing([KeyRange(KEY.verifier, 0, 9), KeyRange(NEXT_KEY.verifier, 10)])
    assert verify_entries(sealed, ring).signatures_checked == N


# --- tampering: each caught at the right seq, with the right kind


@given(indexes)
def test_modified_entry_bytes_are_a_leaf_hash_mismatch(index: int) -> None:
    error = failure(replaced(ledger(), index, entry=modified_bytes(index)))
    assert (error.seq, error.kind) == (index, "leaf_hash_mismatch")


@given(indexes, st.integers(0, 31))
def test_modified_stored_leaf_hash_is_caught(index: int, byte: int) -> None:
    leaf = bytearray(ledger()[index].leaf_hash)
    leaf[byte] ^= 0x01
    error = failure(replaced(ledger(), index, leaf_hash=bytes(leaf)))
    assert (error.seq, error.kind) == (index, "leaf_hash_mismatch")


@given(indexes)
def test_modified_entry_with_matching_leaf_hash_breaks_the_chain(index: int) -> None:
    entry = modified_bytes(index)
    error = failure(replaced(ledger(), index, entry=entry, leaf_hash=leaf_hash(entry)))
    assert (error.seq, error.kind) == (index, "chain_hash_mismatch")


@given(indexes)
def test_modified_stored_chain_hash_is_caught(index: int) -> None:
    error = failure(replaced(ledger(), index, chain_hash=bytes(32)))
    assert (error.seq, error.kind) == (index, "chain_hash_mismatch")


@given(indexes)
def test_history_rewritten_with_recomputed_hashes_fails_the_old_signatures(index: int) -> None:
    rewritten = rewritten_from(index, KEY)
    # Re-hashed but keeping the signatures of the original history:
    stale = [dataclasses.replace(e, signature=o.signature) for e, o in zip(rewritten, ledger(), strict=True)]
    error = failure(stale)
    assert (error.seq, error.kind) == (index, "bad_signature")


@given(indexes)
def test_history_rewritten_and_signed_by_an_unknown_key_is_caught(index: int) -> None:
    error = failure(rewritten_from(index, ATTACKER))
    assert (error.seq, error.kind) == (index, "unknown_key")


@given(indexes)
def test_history_rewritten_and_left_unsigned_is_caught(index: int) -> None:
    # Every entry the daemon writes is signed; without this check anyone could rewrite
    # an export, recompute the hashes, drop the signatures and still pass `verify`.
    error = failure(rewritten_from(index, [None] * (N - index)))
    assert error.seq == index


@given(st.integers(0, N - 2))
def test_missing_entry_is_caught(index: int) -> None:
    entries = list(ledger())
    del entries[index]
    error = failure(entries)
    assert (error.seq, error.kind) == (index, "missing")


def test_a_truncated_ledger_verifies_only_up_to_a_different_head() -> None:
    # Dropping the newest entries leaves a valid prefix; what exposes it is that its
    # head differs from a head published earlier (checkpoints).
    report = verify_entries(ledger()[:-1], RING)
    assert report.entries == N - 1
    assert report.head_chain_hash != ledger()[-1].chain_hash


@given(st.lists(indexes, min_size=2, max_size=2, unique=True).map(sorted))
def test_swapped_entries_are_caught_at_the_first_swapped_seq(pair: list[int]) -> None:
    i, j = pair
    entries = list(ledger())
    entries[i], entries[j] = entries[j], entries[i]
    error = failure(entries)
    assert error.seq == i
    # A streaming verifier sees seq j where seq i should be: a gap or a reordering.
    assert error.kind in {"missing", "out_of_order"}


@given(st.lists(indexes, min_size=2, max_size=2, unique=True).map(sorted))
def test_entry_bytes_moved_to_another_seq_are_a_seq_mismatch(pair: list[int]) -> None:
    i, j = pair
    moved = [dataclasses.replace(e, seq=o.seq) for e, o in zip(
        [*ledger()[:i], ledger()[j], *ledger()[i + 1 : j], ledger()[i], *ledger()[j + 1 :]], ledger(), strict=True
    )]
    error = failure(moved)
    assert (error.seq, error.kind) == (i, "seq_mismatch")


@given(indexes)
def test_repeated_entry_is_out_of_order(index: int) -> None:
    entries = list(ledger())
    entries.insert(index + 1, entries[index])
    error = failure(entries)
    assert (error.seq, error.kind) == (index, "out_of_order")


@given(indexes, st.integers(0, 63))
def test_flipped_signature_bit_is_a_bad_signature(index: int, byte: int) -> None:
    signature = bytearray(ledger()[index].signature or b"")
    signature[byte] ^= 0x80
    error = failure(replaced(ledger(), index, signature=bytes(signature)))
    assert (error.seq, error.kind) == (index, "bad_signature")


@given(indexes)
def test_signature_of_another_entry_is_a_bad_signature(index: int) -> None:
    other = ledger()[(index + 1) % N]
    error = failure(replaced(ledger(), index, signature=other.signature))
    assert (error.seq, error.kind) == (index, "bad_signature")


@given(indexes)
def test_signature_over_the_chain_hash_without_the_context_prefix_is_bad(index: int) -> None:
    signature = KEY.sign(ledger()[index].chain_hash)
    error = failure(replaced(ledger(), index, signature=signature))
    assert (error.seq, error.kind) == (index, "bad_signature")


@given(indexes)
def test_unknown_key_id_is_caught(index: int) -> None:
    signature = ATTACKER.sign(entry_signed_message(ledger()[index].chain_hash))
    error = failure(replaced(ledger(), index, key_id=ATTACKER.key_id, signature=signature))
    assert (error.seq, error.kind) == (index, "unknown_key")


@given(indexes)
def test_key_used_after_its_range_is_caught(last_seq: int) -> None:
    if last_seq == N - 1:
        assert verify_entries(ledger(), KeyRing([KeyRange(KEY.verifier, 0, last_seq)])).entries == N
        return
    error = failure(ledger(), KeyRing([KeyRange(KEY.verifier, 0, last_seq)]))
    assert (error.seq, error.kind) == (last_seq + 1, "key_out_of_range")


@given(st.integers(1, N - 1))
def test_key_used_before_its_range_is_caught(first_seq: int) -> None:
    error = failure(ledger(), KeyRing([KeyRange(KEY.verifier, first_seq)]))
    assert (error.seq, error.kind) == (0, "key_out_of_range")


@given(indexes)
def test_retired_key_signing_after_rotation_is_caught(index: int) -> None:
    entries = [canonical_bytes(fields_for(seq)) for seq in range(N)]
    keys = [KEY] * 10 + [NEXT_KEY] * 10
    keys[index] = NEXT_KEY if index < 10 else KEY
    ring = KeyRing([KeyRange(KEY.verifier, 0, 9), KeyRange(NEXT_KEY.verifier, 10)])
    error = failure(seal(entries, keys), ring)
    assert (error.seq, error.kind) == (index, "key_out_of_range")


@given(indexes)
def test_stored_bytes_that_are_not_json_are_malformed(index: int) -> None:
    entries = [e.entry for e in ledger()]
    entries[index] = b'{"seq":' + str(index).encode() + b","
    sealed = seal(entries)
    error = failure(sealed)
    assert (error.seq, error.kind) == (index, "malformed_entry")


@pytest.mark.parametrize("entry", [b"[0]", b'{"seq":"0"}', b'{"v":1}', b'{"seq":1}'])
def test_stored_bytes_must_be_an_object_naming_its_seq(entry: bytes) -> None:
    error = failure(seal([entry]))
    assert (error.seq, error.kind) == (0, "seq_mismatch")


# --- several problems: the first seq wins


@given(st.lists(indexes, min_size=2, max_size=2, unique=True).map(sorted), st.booleans())
def test_the_lowest_bad_seq_is_reported(pair: list[int], signature_first: bool) -> None:
    first, second = pair
    bad_signature_at, missing_at = (first, second) if signature_first else (second, first)
    entries = replaced(ledger(), bad_signature_at, signature=bytes(64))
    del entries[missing_at]
    error = failure(entries)
    if signature_first:
        assert (error.seq, error.kind) == (first, "bad_signature")
    else:
        assert (error.seq, error.kind) == (first, "missing")


@pytest.mark.parametrize(
    ("bad_signature_at", "missing_at", "expected"),
    [
        (10, 590, (10, "bad_signature")),
        (530, 560, (530, "bad_signature")),
        (560, 530, (530, "missing")),
        (599, None, (599, "bad_signature")),
        (0, None, (0, "bad_signature")),
    ],
)
def test_first_bad_seq_across_signature_batches(
    bad_signature_at: int, missing_at: int | None, expected: tuple[int, str]
) -> None:
    # 600 entries: signatures are checked in batches of 512 on worker threads.
    entries = replaced(ledger(600), bad_signature_at, signature=bytes(64))
    if missing_at is not None:
        del entries[missing_at]
    error = failure(entries)
    assert (error.seq, error.kind) == expected
