"""The sink runner against a real ledger written by the real writer: retries, no loss, no duplicate."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from ccos_obsd.ledger import store
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.sinks.base import SinkRunner
from tests.integration.ledger_fill import write_ledger


class FlakySink:
    """Fails its first ``failures`` deliveries, then records every seq it is given."""

    def __init__(self, failures: int) -> None:
        self.name = "flaky"
        self.failures = failures
        self.attempts = 0
        self.seqs: list[int] = []
        self.done = threading.Event()

    def open(self) -> None:
        pass

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError("disk on fire")
        self.seqs.extend(e.seq for e in entries)

    def close(self) -> None:
        pass


def test_a_sink_that_fails_n_times_catches_up_with_no_loss_and_no_duplicate(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    write_ledger(db, 250)
    sink = FlakySink(failures=3)
    runner = SinkRunner(sink, db, lambda: 250, batch_size=100)
    runner.start()
    runner.stop(catch_up_s=30)  # returns once the lag is 0 (or the deadline passed)
    assert sink.seqs == list(range(250))
    assert runner.stats.errors == 3
    assert runner.stats.delivered == 250
    conn = store.connect(db, readonly=False)
    try:
        assert store.read_sink_cursor(conn, "flaky") == 250
    finally:
        conn.close()


def test_a_restarted_runner_continues_from_its_durable_cursor(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    write_ledger(db, 120)
    first = FlakySink(failures=0)
    runner = SinkRunner(first, db, lambda: 60, batch_size=50)
    runner.start()
    runner.stop(catch_up_s=30)
    assert first.seqs == list(range(60))
    second = FlakySink(failures=0)
    runner = SinkRunner(second, db, lambda: 120, batch_size=50)
    runner.start()
    runner.stop(catch_up_s=30)
    assert second.seqs == list(range(60, 120))
