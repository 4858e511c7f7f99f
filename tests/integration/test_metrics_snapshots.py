"""The metrics snapshot in a real ledger database: restore, save, and the snapshots that are discarded."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from structlog.testing import capture_logs

from ccos_obsd.ledger import store
from ccos_obsd.metrics.aggregates import Aggregates
from ccos_obsd.metrics.snapshot import MetricsSnapshots, dump_aggregates
from tests.integration.ledger_fill import write_actions


def calls(start: int, count: int) -> list[dict[str, object]]:
    return [{"action_type": "CapabilityCall", "function_name": f"cap.{n % 3}", "duration_ms": n % 700,
             "cost": 0.5, "success": n % 4 != 0} for n in range(start, start + count)]


def folded_from_scratch(db: Path) -> Aggregates:
    aggregates = Aggregates()
    conn = store.connect(db, readonly=True)
    try:
        aggregates.observe_entries(json.loads(e.entry) for e in store.iter_entries(conn, start=0))
    finally:
        conn.close()
    return aggregates


def test_a_saved_snapshot_is_restored_and_only_later_entries_are_folded_in(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    write_actions(db, calls(0, 30))
    first = Aggregates()
    restored = MetricsSnapshots(db, first).restore()
    assert restored.from_snapshot == 0  # no snapshot yet
    conn = store.connect(db, readonly=True)
    try:
        first_entry = store.get_entry(conn, seq=0)
    finally:
        conn.close()
    assert first_entry is not None
    assert restored.ledger_created == json.loads(first_entry.entry)["recorded_at_ms"] / 1000
    MetricsSnapshots(db, first).save()
    write_actions(db, calls(30, 12))

    second = Aggregates()
    with capture_logs() as logs:
        assert MetricsSnapshots(db, second).restore().from_snapshot == 30
    [line] = [x for x in logs if x["event"] == "metrics_restored"]
    assert (line["from_snapshot"], line["folded_in"], line["entries"]) == (30, 12, 42)
    assert dump_aggregates(second.snapshot()) == dump_aggregates(folded_from_scratch(db).snapshot())


def test_a_snapshot_of_other_buckets_is_discarded(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    write_actions(db, calls(0, 5))
    saved = Aggregates()
    snapshots = MetricsSnapshots(db, saved)
    snapshots.restore()
    snapshots.save()
    with capture_logs() as logs:
        assert MetricsSnapshots(db, Aggregates((0.1, 1.0))).restore().from_snapshot == 0
    [line] = [x for x in logs if x["event"] == "metrics_snapshot_discarded"]
    assert line["reason"] == "metrics.duration_buckets or metrics.max_label_values changed"
    assert line["action"] == "rebuilding from the whole ledger"


def test_save_writes_only_when_entries_were_added_since(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    write_actions(db, calls(0, 5))
    snapshots = MetricsSnapshots(db, Aggregates())
    snapshots.restore()  # nothing stored: the first save writes
    snapshots.save()
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE metrics_snapshot SET format = 99")
        snapshots.save()  # still 5 entries: the row stays as it is
        assert conn.execute("SELECT format, entries FROM metrics_snapshot").fetchone() == (99, 5)
    finally:
        conn.close()
