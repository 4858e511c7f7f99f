"""The WM sink keeps its cursor in wm.db, moved in the transaction that adds the entries it covers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from ccos_obsd.ledger import store
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.sinks.base import SinkRunner
from ccos_obsd.sinks.wm import WmSink
from ccos_obsd.wm.derive import WmEntry
from ccos_obsd.wm.store import WmStore
from tests.integration.ledger_fill import write_ledger


def entry(seq: int) -> WmEntry:
    return WmEntry(id=f"wm:{seq}", title=f"title {seq}", content="content", tags=("a",), timestamp_s=float(seq),
                   approx_tokens=3, meta={"seq": seq})


def wm_seqs(path: Path) -> list[int]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [seq for (seq,) in conn.execute("SELECT seq FROM wm_entries ORDER BY seq")]
    finally:
        conn.close()


def wm_cursor(path: Path) -> int | None:
    with WmStore.open_readonly(path) as wm:
        return wm.cursor()


def cursor_so_far(path: Path) -> int:
    """The cursor of a store another process may still be creating (0 until it has one)."""
    try:
        return wm_cursor(path) or 0
    except (FileNotFoundError, sqlite3.DatabaseError):
        return 0


def ledger_cursor(db: Path, name: str) -> int:
    conn = store.connect(db, readonly=False)
    try:
        return store.read_sink_cursor(conn, name)
    finally:
        conn.close()


def test_the_cursor_commits_or_rolls_back_with_the_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with WmStore(tmp_path / "wm.db", durable=False) as wm:
        assert wm.cursor() is None
        wm.ingest([entry(0), entry(1), entry(2)], next_seq=3)
        assert (wm.cursor(), wm.count()) == (3, 3)

        def broken(*_: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(WmStore, "_insert", broken)
        with pytest.raises(sqlite3.OperationalError):
            wm.ingest([entry(3)], next_seq=4)
        assert (wm.cursor(), wm.count()) == (3, 3)  # neither moved
        monkeypatch.undo()
        wm.ingest([], next_seq=5)  # a delivery that derives nothing still moves the cursor
        assert wm.cursor() == 5
        wm.ingest([entry(1)], next_seq=2)  # a second, overlapping sink host behind: forward only
        assert (wm.cursor(), wm.count()) == (5, 3)
        wm.ingest([], next_seq=12)
        assert wm.cursor() == 12
        wm.clear()
        assert (wm.cursor(), wm.count()) == (0, 0)
        wm.set_cursor(9)
        assert wm.cursor() == 9


def test_a_wm_runner_resumes_from_the_cursor_in_wm_db_not_the_ledger_row(tmp_path: Path) -> None:
    db, wm_file = tmp_path / "ledger.db", tmp_path / "wm.db"
    write_ledger(db, 120)
    runner = SinkRunner(WmSink("wm", wm_file), db, lambda: 60, batch_size=25)
    runner.start()
    runner.stop(catch_up_s=30)
    assert wm_cursor(wm_file) == 60
    assert ledger_cursor(db, "wm") == 60  # the mirror, written at stop
    conn = store.connect(db, readonly=False)
    try:
        store.write_sink_cursor(conn, "wm", 10)  # a mirror left behind (the sink host was SIGKILLed)
    finally:
        conn.close()
    runner = SinkRunner(WmSink("wm", wm_file), db, lambda: 120, batch_size=25)
    runner.start()
    runner.stop(catch_up_s=30)
    assert runner.stats.delivered == 60  # from wm.db's 60, not the ledger's 10
    assert wm_seqs(wm_file) == list(range(120))
    assert wm_cursor(wm_file) == 120


_KILLED_RUNNER = """
import sys, threading
from pathlib import Path
from ccos_obsd.sinks.base import SinkRunner
from ccos_obsd.sinks.wm import WmSink
runner = SinkRunner(WmSink("wm", Path(sys.argv[2])), Path(sys.argv[1]), lambda: int(sys.argv[3]), batch_size=3)
runner.start()
threading.Event().wait()
"""


def test_sigkill_mid_delivery_leaves_the_cursor_saying_exactly_what_wm_holds(tmp_path: Path) -> None:
    db, wm_file = tmp_path / "ledger.db", tmp_path / "wm.db"
    total = 3000
    write_ledger(db, total)
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", _KILLED_RUNNER, str(db), str(wm_file), str(total)])
        try:
            deadline = time.monotonic() + 30
            before = cursor_so_far(wm_file)
            while cursor_so_far(wm_file) <= before:
                assert time.monotonic() < deadline, "the runner delivered nothing"
                assert process.poll() is None
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        cursor = wm_cursor(wm_file)
        assert cursor is not None and cursor < total, "killed after the end: nothing was mid-delivery"
        assert wm_seqs(wm_file) == list(range(cursor))  # every entry below the cursor, once; none above
    runner = SinkRunner(WmSink("wm", wm_file), db, lambda: total, batch_size=100)
    runner.start()
    runner.stop(catch_up_s=60)
    assert wm_seqs(wm_file) == list(range(total))
    assert wm_cursor(wm_file) == total


class RecordingSink:
    def __init__(self) -> None:
        self.name = "recording"
        self.batches: list[list[int]] = []
        self.delivered = threading.Condition()

    def open(self) -> None:
        pass

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        with self.delivered:
            self.batches.append([e.seq for e in entries])
            self.delivered.notify_all()

    def close(self) -> None:
        pass

    def wait_for(self, seq: int, deadline: float) -> float:
        """Block until ``seq`` was delivered; answers when (monotonic)."""
        with self.delivered:
            while not any(seq in batch for batch in self.batches):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"seq {seq} not delivered in time"
                self.delivered.wait(remaining)
        return time.monotonic()


def test_linger_batches_commits_and_delays_a_delivery_at_most_linger(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    write_ledger(db, 10)
    head = [1]
    sink = RecordingSink()
    linger_s = 0.5
    runner = SinkRunner(sink, db, lambda: head[0], batch_size=100, linger_s=linger_s)
    started = time.monotonic()
    runner.start()
    try:
        # After an idle spell the first commit goes at once: well within the linger.
        assert sink.wait_for(0, started + 30) - started < linger_s
        # Two commits right after a delivery: one transaction, within linger_s (plus slack) of the first.
        head[0] = 2
        runner.notify()
        committed = time.monotonic()
        head[0] = 3
        runner.notify()
        delivered = sink.wait_for(2, committed + 30)
        assert delivered - committed < linger_s + 0.5
        assert sink.batches == [[0], [1, 2]]
        # Somebody waits for the next commit (an ingest call): no linger, however long.
        runner.linger_s = 10.0
        head[0] = 4
        runner.notify()
        committed = time.monotonic()
        runner.hurry()
        assert sink.wait_for(3, committed + 30) - committed < 5.0
    finally:
        runner.stop()
