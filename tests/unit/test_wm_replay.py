"""Replay (ccos_obsd.wm.replay): Working Memory rebuilt from a real ledger equals the one built as entries came.

Ledgers are written by the real ``LedgerWriter``; the incrementally built store
is filled by the real WM sink, batch by batch, as the sink runner would.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ccos_obsd.actions import validate_action
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import SigningKey
from ccos_obsd.ledger.writer import LedgerWriter
from ccos_obsd.sinks.wm import WmSink
from ccos_obsd.wm import replay
from ccos_obsd.wm.capability import call_action, normalize_record, result_action
from ccos_obsd.wm.replay import LiveReplay, rebuild
from ccos_obsd.wm.store import Budgets, WmStore

INGESTED_RECORDS = 3


def actions(count: int) -> list[dict[str, Any]]:
    """``count`` plain actions, then an ingest call carrying records and its result (two more)."""
    plain: list[dict[str, Any]] = [
        {"action_type": "CapabilityCall", "function_name": f"tool.{n % 4}", "plan_id": f"p{n // 10}",
         "timestamp_ms": 1_700_000_000_000 + n * 1000, "cost": n / 10}
        if n % 3 else {"action_type": "PlanStarted", "plan_id": f"p{n // 10}"}
        for n in range(count)
    ]
    records = [normalize_record({"summary": f"insight {n}", "provider": "Acme"}, 1_700_000_000.0)
               for n in range(INGESTED_RECORDS)]
    call = call_action("batch", records)
    result = result_action(call["action_id"], {"mode": "batch", "ingested": INGESTED_RECORDS, "errors": []}, 1.0, True)
    return [*plain, call, result]


async def write_ledger(db: Path, fields: list[dict[str, Any]]) -> None:
    writer = LedgerWriter(db, SigningKey.generate("test/ccos-obsd"), asyncio.get_running_loop())
    writer.start()
    try:
        await writer.submit([validate_action(action) for action in fields], None)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, writer.close)


def ledger(tmp_path: Path, count: int = 40) -> Path:
    db = tmp_path / "ledger.db"
    asyncio.run(write_ledger(db, actions(count)))
    return db


def incremental_digest(db: Path, wm_file: Path, batch: int = 7, budgets: Budgets | None = None) -> str:
    """The digest of a store the WM sink filled ``batch`` entries at a time."""
    sink = WmSink("wm", wm_file, budgets)
    sink.open()
    conn = store.connect(db, readonly=True)
    try:
        entries = list(store.iter_entries(conn, 0))
        for start in range(0, len(entries), batch):
            sink.deliver(entries[start:start + batch])
    finally:
        conn.close()
        sink.close()
    return digest_of(wm_file)


def digest_of(wm_file: Path) -> str:
    with WmStore.open_readonly(wm_file) as wm:
        return wm.digest()


def cursor(db: Path, name: str) -> int:
    conn = store.connect(db, readonly=True)
    try:
        return store.read_sink_cursor(conn, name)
    finally:
        conn.close()


def head(db: Path) -> int:
    conn = store.connect(db, readonly=True)
    try:
        return store.read_head(conn).size
    finally:
        conn.close()


# --- rebuild


def test_a_rebuild_from_scratch_equals_the_incrementally_built_store(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    expected = incremental_digest(db, tmp_path / "incremental.db")
    result = rebuild(db, tmp_path / "wm.db")
    assert result == {"scanned_actions": 42, "ingested": 42 + INGESTED_RECORDS, "head": 42}
    assert digest_of(tmp_path / "wm.db") == expected


def test_a_rebuild_moves_the_sink_cursor_to_the_head(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    rebuild(db, tmp_path / "wm.db", sink_name="memory")
    assert cursor(db, "memory") == head(db) == 42
    assert cursor(db, "wm") == 0  # other sinks keep their cursors


def test_a_rebuild_from_scratch_drops_what_the_store_held(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    (tmp_path / "other").mkdir()
    rebuild(ledger(tmp_path / "other"), tmp_path / "wm.db")
    rebuild(db, tmp_path / "wm.db")
    assert digest_of(tmp_path / "wm.db") == incremental_digest(db, tmp_path / "incremental.db")


def test_a_rebuild_from_a_seq_adds_the_rest_to_what_the_store_holds(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    wm_file = tmp_path / "wm.db"
    sink = WmSink("wm", wm_file)
    sink.open()
    conn = store.connect(db, readonly=True)
    try:
        sink.deliver(list(store.iter_entries(conn, 0, 25)))
    finally:
        conn.close()
        sink.close()
    result = rebuild(db, wm_file, start=25)
    assert result == {"scanned_actions": 17, "ingested": 17 + INGESTED_RECORDS, "head": 42}
    assert digest_of(wm_file) == incremental_digest(db, tmp_path / "incremental.db")
    assert cursor(db, "wm") == 42


def test_a_second_rebuild_from_a_seq_adds_nothing_new(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    rebuild(db, tmp_path / "wm.db")
    before = digest_of(tmp_path / "wm.db")
    assert rebuild(db, tmp_path / "wm.db", start=10)["ingested"] == 0
    assert digest_of(tmp_path / "wm.db") == before


def test_progress_counts_every_ledger_entry_scanned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = ledger(tmp_path)
    monkeypatch.setattr(replay, "REPLAY_BATCH", 10)
    counts: list[int] = []
    rebuild(db, tmp_path / "wm.db", progress=counts.append)
    assert counts == [10, 10, 10, 10, 2]


def test_an_empty_ledger_rebuilds_an_empty_store(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    asyncio.run(write_ledger(db, []))
    assert rebuild(db, tmp_path / "wm.db") == {"scanned_actions": 0, "ingested": 0, "head": 0}
    with WmStore.open_readonly(tmp_path / "wm.db") as wm:
        assert wm.count() == 0
    assert cursor(db, "wm") == 0


def test_worker_processes_rebuild_the_same_store_as_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = ledger(tmp_path, count=100)
    monkeypatch.setattr(replay, "REPLAY_INLINE", 0)  # past it, chunks are derived in worker processes
    monkeypatch.setattr(replay, "REPLAY_BATCH", 16)
    counts: list[int] = []
    result = rebuild(db, tmp_path / "wm.db", progress=counts.append)
    assert result["scanned_actions"] == 102 and sum(counts) == 102
    assert digest_of(tmp_path / "wm.db") == incremental_digest(db, tmp_path / "incremental.db")


@pytest.mark.parametrize("sink_batch", [1, 7, 50])
@pytest.mark.parametrize("replay_batch", [3, 16, 10_000])
@pytest.mark.parametrize("budgets", [Budgets(max_entries=10), Budgets(max_tokens=60), Budgets(12, 90)])
def test_a_rebuild_keeps_the_budgets_as_the_sink_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink_batch: int, replay_batch: int, budgets: Budgets
) -> None:
    db = ledger(tmp_path, count=80)  # clients' timestamps, out of seq order for the ingested records
    expected = incremental_digest(db, tmp_path / "incremental.db", sink_batch, budgets)
    monkeypatch.setattr(replay, "REPLAY_BATCH", replay_batch)
    rebuild(db, tmp_path / "wm.db", budgets=budgets)
    assert digest_of(tmp_path / "wm.db") == expected
    with WmStore.open_readonly(tmp_path / "wm.db") as wm:
        assert 0 < wm.count() < 82 + INGESTED_RECORDS  # the budgets did evict
        assert budgets.max_entries is None or wm.count() <= budgets.max_entries
    assert digest_of(tmp_path / "wm.db") != incremental_digest(db, tmp_path / "unlimited.db", sink_batch)


def test_worker_processes_keep_the_budgets_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = ledger(tmp_path, count=100)
    monkeypatch.setattr(replay, "REPLAY_INLINE", 0)
    monkeypatch.setattr(replay, "REPLAY_BATCH", 16)
    budgets = Budgets(max_entries=25)
    rebuild(db, tmp_path / "wm.db", budgets=budgets)
    assert digest_of(tmp_path / "wm.db") == incremental_digest(db, tmp_path / "incremental.db", 9, budgets)


# --- the replay inside the daemon


class Sinks:
    """Stands in for the sink host: records pauses and resumes."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pause(self) -> None:
        self.events.append("pause")

    def resume(self) -> None:
        self.events.append("resume")


def live(db: Path, wm_file: Path, sinks: Sinks) -> LiveReplay:
    return LiveReplay(db, wm_file, "wm", lambda: head(db), pause_sinks=sinks.pause, resume_sinks=sinks.resume)


async def test_a_live_replay_pauses_the_sinks_rebuilds_and_resumes_them(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write_ledger(db, actions(20))
    sinks = Sinks()
    replayer = live(db, tmp_path / "wm.db", sinks)
    result = await replayer.run(0)
    assert result == {"scanned_actions": 22, "ingested": 22 + INGESTED_RECORDS, "head": 22}
    assert sinks.events == ["pause", "resume"]
    assert replayer.progress is None
    assert cursor(db, "wm") == 22


async def test_a_live_replay_keeps_the_budgets_it_was_given(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write_ledger(db, actions(60))
    budgets = Budgets(max_entries=20)
    replayer = LiveReplay(db, tmp_path / "wm.db", "wm", lambda: head(db), pause_sinks=lambda: None,
                          resume_sinks=lambda: None, budgets=budgets)
    await replayer.run(0)
    assert digest_of(tmp_path / "wm.db") == incremental_digest(db, tmp_path / "incremental.db", 5, budgets)


async def test_a_live_replay_reports_progress_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int] | None] = []
    replayer = LiveReplay(tmp_path / "ledger.db", tmp_path / "wm.db", "wm", lambda: 50,
                          pause_sinks=lambda: seen.append(replayer.progress), resume_sinks=lambda: None)

    def fake_rebuild(ledger_db: Path, wm_file: Path, *, start: int, sink_name: str,
                     progress: Callable[[int], None], budgets: Budgets | None) -> dict[str, int]:
        seen.append(replayer.progress)
        for count in (20, 20, 25):  # more than the head read before: the total follows
            progress(count)
            seen.append(replayer.progress)
        return {"scanned_actions": 65, "ingested": 65, "head": 65}

    monkeypatch.setattr(replay, "rebuild", fake_rebuild)
    assert (await replayer.run(10))["head"] == 65
    assert seen == [None, (0, 40), (20, 40), (40, 40), (65, 65)]
    assert replayer.progress is None


async def test_a_failed_live_replay_still_resumes_the_sinks(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    await write_ledger(db, actions(5))
    sinks = Sinks()
    conn = sqlite3.connect(tmp_path / "not-a-store.db")
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    replayer = live(db, tmp_path / "not-a-store.db", sinks)
    with pytest.raises(sqlite3.DatabaseError, match="not a Working Memory store"):
        await replayer.run(0)
    assert sinks.events == ["pause", "resume"]
    assert replayer.progress is None
    assert cursor(db, "wm") == 0


async def test_live_replays_run_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sinks = Sinks()

    def fake_rebuild(*args: Any, **kwargs: Any) -> dict[str, int]:
        sinks.events.append("rebuild")
        return {"scanned_actions": 0, "ingested": 0, "head": 0}

    monkeypatch.setattr(replay, "rebuild", fake_rebuild)
    replayer = LiveReplay(tmp_path / "ledger.db", tmp_path / "wm.db", "wm", lambda: 0,
                          pause_sinks=sinks.pause, resume_sinks=sinks.resume)
    await asyncio.gather(replayer.run(0), replayer.run(0), replayer.run(0))
    assert sinks.events == ["pause", "rebuild", "resume"] * 3
