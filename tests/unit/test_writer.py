"""The ledger writer in-process, on a real SQLite file: seqs, hashes, group commit, duplicates, rotation.

Every append is answered only after its commit; the entries it leaves behind are
exactly the canonical bytes and hashes of DESIGN.md, and the ledger verifies.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ccos_obsd.actions import validate_action
from ccos_obsd.errors import Conflict, InvalidAction
from ccos_obsd.ledger import store
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.entry import KEY_ROTATED, ValidatedAction
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import SigningKey, load_or_create_signing_key
from ccos_obsd.ledger.verify import CheckpointRecord, KeyRange, KeyRing, VerifyReport, verify_entries
from ccos_obsd.ledger.writer import (
    _PARALLEL_SIGN_MIN,
    _POOL_SIGN_MIN,
    AppendOutcome,
    AppendResult,
    CommittedEntry,
    LedgerWriter,
)

KEY_NAME = "test/ccos-obsd"
PEER = {"uid": 1000, "gid": 100, "pid": 4242}


class Commits:
    """The commit listener: every group the writer reports, in order (called on the writer thread)."""

    def __init__(self) -> None:
        self.groups: list[list[CommittedEntry]] = []
        self._lock = threading.Lock()

    def __call__(self, entries: Sequence[CommittedEntry], commit_seconds: float) -> None:
        assert commit_seconds >= 0
        with self._lock:
            self.groups.append(list(entries))


class Ledger:
    """A ledger file with its key file, and a writer on it (opened again after close)."""

    def __init__(self, state_dir: Path, **options: Any) -> None:
        self.db = state_dir / "ledger.db"
        self.key_path = state_dir / "signing.key"
        self.commits = Commits()
        self.options = options
        self.writer = self.open()

    def open(self) -> LedgerWriter:
        key, _ = load_or_create_signing_key(self.key_path, KEY_NAME)
        writer = LedgerWriter(self.db, key, asyncio.get_running_loop(), key_path=self.key_path, **self.options)
        writer.add_commit_listener(self.commits)
        return writer

    async def reopen(self) -> LedgerWriter:
        await asyncio.to_thread(self.writer.close)
        self.writer = self.open()
        self.writer.start()
        return self.writer

    async def append(self, *actions: ValidatedAction, peer: dict[str, int] | None = PEER) -> list[AppendOutcome]:
        return await self.writer.submit(actions, peer)

    def entries(self) -> list[store.StoredEntry]:
        conn = store.connect(self.db, readonly=True)
        try:
            return list(store.iter_entries(conn))
        finally:
            conn.close()

    def verify(self) -> VerifyReport:
        conn = store.connect(self.db, readonly=True)
        try:
            ring = KeyRing(KeyRange(key, first, last) for key, first, last in store.read_keys(conn))
            checkpoints = [CheckpointRecord(c.note, size=c.size) for c in store.read_checkpoints(conn)]
            return verify_entries(store.iter_entries(conn), ring, checkpoints=checkpoints, workers=1)
        finally:
            conn.close()


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = Ledger(tmp_path)
    opened.writer.start()
    yield opened
    await asyncio.to_thread(opened.writer.close)


def plan_started(plan_id: str, **fields: Any) -> ValidatedAction:
    return validate_action({"action_type": "PlanStarted", "plan_id": plan_id, **fields})


def appended(outcome: AppendOutcome) -> AppendResult:
    assert isinstance(outcome, AppendResult), outcome
    return outcome


# --- appends


async def test_appends_get_consecutive_seqs_and_the_hashes_of_their_canonical_bytes(ledger: Ledger) -> None:
    before_ms = int(time.time() * 1000)
    actions = [plan_started(f"p{n}") for n in range(5)]
    results = [appended(o) for o in await ledger.append(*actions)]
    after_ms = int(time.time() * 1000)

    assert [r.seq for r in results] == [0, 1, 2, 3, 4]
    assert [r.action_id for r in results] == [a.action_id for a in actions]
    assert not any(r.duplicate for r in results)
    previous = CHAIN_ROOT
    for action, result, stored in zip(actions, results, ledger.entries(), strict=True):
        fields = json.loads(stored.entry)
        assert before_ms <= fields["recorded_at_ms"] <= after_ms
        assert fields == {**action.fields, "v": 1, "seq": result.seq, "recorded_at_ms": fields["recorded_at_ms"],
                          "peer": PEER}
        assert stored.entry == canonical_bytes(fields)
        assert result.leaf_hash == stored.leaf_hash == leaf_hash(stored.entry)
        assert result.chain_hash == stored.chain_hash == chain_hash(previous, result.leaf_hash)
        previous = result.chain_hash
    assert ledger.writer.head == store.Head(5, previous)


async def test_each_entry_is_signed_over_its_chain_hash(ledger: Ledger) -> None:
    await ledger.append(plan_started("p"))
    [stored] = ledger.entries()
    verifier = ledger.writer.key.verifier
    assert stored.key_id == verifier.key_id
    assert stored.signature is not None
    assert verifier.verify(stored.signature, entry_signed_message(stored.chain_hash))


@pytest.mark.parametrize("size", [1, _POOL_SIGN_MIN - 1, _POOL_SIGN_MIN, _PARALLEL_SIGN_MIN + 1])
async def test_groups_of_every_size_are_signed_inline_or_on_the_pool_alike(tmp_path: Path, size: int) -> None:
    # Small groups are signed on the writer thread, larger ones on one or two signing threads.
    waiting = Ledger(tmp_path)
    futures = [waiting.writer.submit([plan_started(f"p{n}")], None) for n in range(size)]
    waiting.writer.start()
    try:
        await asyncio.gather(*futures)
        key_before = waiting.writer.key
        rotated = appended(await waiting.writer.rotate_key(None))
        [after] = await waiting.append(plan_started("after"))
    finally:
        await asyncio.to_thread(waiting.writer.close)
    assert [len(g) for g in waiting.commits.groups] == [size, 1, 1]
    entries = waiting.entries()
    assert len(entries) == size + 2
    for stored in entries[: size + 1]:
        assert stored.key_id == key_before.verifier.key_id
        assert stored.signature is not None
        assert key_before.verifier.verify(stored.signature, entry_signed_message(stored.chain_hash))
    assert entries[size].seq == rotated.seq
    last = entries[-1]
    assert last.seq == appended(after).seq
    assert last.key_id == waiting.writer.key.verifier.key_id != key_before.verifier.key_id
    assert last.signature is not None
    assert waiting.writer.key.verifier.verify(last.signature, entry_signed_message(last.chain_hash))
    report = waiting.verify()
    assert (report.entries, report.signatures_checked) == (size + 2, size + 2)


async def test_appends_queued_together_share_one_commit(tmp_path: Path) -> None:
    waiting = Ledger(tmp_path)
    futures = [waiting.writer.submit([plan_started(f"p{n}")], None) for n in range(50)]
    assert waiting.writer.pending_actions == 50
    waiting.writer.start()
    try:
        outcomes = await asyncio.gather(*futures)
    finally:
        await asyncio.to_thread(waiting.writer.close)
    assert [appended(o).seq for [o] in outcomes] == list(range(50))
    assert len(waiting.commits.groups) == 1
    assert [e.seq for e in waiting.commits.groups[0]] == list(range(50))
    assert waiting.writer.pending_actions == 0


async def test_the_commit_listener_gets_each_entry_with_its_fields_and_hashes(ledger: Ledger) -> None:
    [result] = await ledger.append(plan_started("p"), peer=None)
    [[committed]] = ledger.commits.groups
    assert committed.seq == appended(result).seq
    assert committed.leaf_hash == appended(result).leaf_hash
    assert committed.chain_hash == appended(result).chain_hash
    assert committed.fields["plan_id"] == "p"
    assert "peer" not in committed.fields


async def test_an_action_with_no_canonical_form_is_refused_and_takes_no_seq(ledger: Ledger) -> None:
    unencodable = ValidatedAction({"action_type": "PlanStarted", "action_id": "nan", "cost": float("nan")}, True)
    refused, accepted = await ledger.append(unencodable, plan_started("p"))
    assert isinstance(refused, InvalidAction)
    assert appended(accepted).seq == 0


# --- duplicates and conflicts


async def test_resending_an_action_answers_duplicate_with_its_existing_seq(ledger: Ledger) -> None:
    first = appended((await ledger.append(plan_started("p", action_id="a-1")))[0])
    await ledger.append(plan_started("q"))
    [resent] = await ledger.append(plan_started("p", action_id="a-1"), peer={"uid": 1, "gid": 1, "pid": 1})
    again = appended(resent)
    assert again.duplicate
    assert (again.seq, again.leaf_hash, again.chain_hash) == (first.seq, first.leaf_hash, first.chain_hash)
    assert len(ledger.entries()) == 2


async def test_a_duplicate_in_the_same_group_is_answered_with_the_first_ones_seq(ledger: Ledger) -> None:
    first, second = map(appended, await ledger.append(plan_started("p", action_id="a-1"),
                                                      plan_started("p", action_id="a-1")))
    assert not first.duplicate
    assert second.duplicate
    assert second.seq == first.seq
    assert len(ledger.entries()) == 1


async def test_the_same_action_id_with_other_content_is_a_conflict(ledger: Ledger) -> None:
    await ledger.append(plan_started("p", action_id="a-1"))
    [stored_conflict] = await ledger.append(plan_started("other", action_id="a-1"))
    same_group = await ledger.append(plan_started("x", action_id="a-2"), plan_started("y", action_id="a-2"))
    assert isinstance(stored_conflict, Conflict)
    assert stored_conflict.field == "action_id"
    assert "seq 0" in stored_conflict.message
    assert appended(same_group[0]).seq == 1
    assert isinstance(same_group[1], Conflict)
    assert len(ledger.entries()) == 2


# --- restarts


async def test_a_reopened_writer_continues_the_chain(ledger: Ledger) -> None:
    before = appended((await ledger.append(plan_started("p", action_id="a-1")))[0])
    writer = await ledger.reopen()
    assert writer.head == store.Head(1, before.chain_hash)
    after = appended((await ledger.append(plan_started("q")))[0])
    duplicate = appended((await ledger.append(plan_started("p", action_id="a-1")))[0])
    assert after.seq == 1
    assert after.chain_hash == chain_hash(before.chain_hash, after.leaf_hash)
    assert duplicate.duplicate and duplicate.seq == 0
    assert ledger.verify().entries == 2


async def test_close_leaves_a_checkpoint_over_every_entry(ledger: Ledger) -> None:
    await ledger.append(*(plan_started(f"p{n}") for n in range(3)))
    await ledger.reopen()
    assert ledger.writer.latest_checkpoint is not None
    assert ledger.writer.checkpoint_age() == 0.0
    report = ledger.verify()
    assert report.covered_size == 3


async def test_in_checkpoint_signing_mode_entries_are_unsigned_and_the_checkpoint_covers_them(tmp_path: Path) -> None:
    unsigned = Ledger(tmp_path, signing_mode="checkpoint")
    unsigned.writer.start()
    await unsigned.append(*(plan_started(f"p{n}") for n in range(4)))
    await asyncio.to_thread(unsigned.writer.close)
    assert all(e.signature is None for e in unsigned.entries())
    report = unsigned.verify()
    assert (report.entries, report.signatures_checked, report.covered_size) == (4, 0, 4)


# --- key rotation


async def test_key_rotation_appends_a_key_rotated_entry_signed_by_the_old_key(ledger: Ledger) -> None:
    await ledger.append(plan_started("p"))
    old = ledger.writer.key
    rotated = appended(await ledger.writer.rotate_key(PEER))
    new = ledger.writer.key
    [after] = await ledger.append(plan_started("q"))

    assert new.key_id != old.key_id
    assert rotated.seq == 1 and appended(after).seq == 2
    first, rotation, last = ledger.entries()
    fields = json.loads(rotation.entry)
    assert fields["action_type"] == KEY_ROTATED
    assert fields["action_id"] == rotated.action_id
    assert fields["metadata"] == {"old_key": old.verifier.vkey(), "new_key": new.verifier.vkey()}
    assert (fields["seq"], fields["peer"]) == (1, PEER)
    assert rotation.leaf_hash == rotated.leaf_hash == leaf_hash(rotation.entry)
    assert rotation.chain_hash == chain_hash(first.chain_hash, rotation.leaf_hash)
    assert rotation.key_id == old.key_id
    assert rotation.signature is not None
    assert old.verifier.verify(rotation.signature, entry_signed_message(rotation.chain_hash))
    assert last.key_id == new.key_id
    assert [e.seq for e in ledger.commits.groups[1]] == [1]


async def test_after_rotation_the_key_file_and_the_key_ring_hold_the_new_key(ledger: Ledger) -> None:
    old = ledger.writer.key
    appended(await ledger.writer.rotate_key(None))
    await ledger.append(plan_started("q"))
    on_disk, created = load_or_create_signing_key(ledger.key_path, KEY_NAME)
    assert not created
    assert on_disk.key_id == ledger.writer.key.key_id
    conn = store.connect(ledger.db, readonly=True)
    try:
        ring = [(key.key_id, first, last) for key, first, last in store.read_keys(conn)]
    finally:
        conn.close()
    assert ring == [(old.key_id, 0, 0), (ledger.writer.key.key_id, 1, None)]
    await ledger.reopen()
    assert ledger.verify().entries == 2


async def test_a_writer_without_a_key_file_refuses_to_rotate(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "ledger.db", SigningKey.generate(KEY_NAME), asyncio.get_running_loop())
    writer.start()
    try:
        outcome = await writer.rotate_key(None)
    finally:
        await asyncio.to_thread(writer.close)
    assert not isinstance(outcome, AppendResult)
    assert outcome.code == "unavailable"
    assert writer.head == store.Head(0, Hash(CHAIN_ROOT))
