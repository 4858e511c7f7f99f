"""The sink framework: a Protocol for sinks and the runner that feeds one.

A sink never sees the append path. Its runner (one thread per sink) pulls
committed entries from the ledger starting at the sink's durable cursor (table
``sink_cursors`` in the ledger database), hands them over in order and in
batches, and advances the cursor only after the sink returned: delivery is at
least once, so sinks are idempotent. A failing sink is retried with exponential
backoff; appends never wait for it, and when it recovers it catches up from its
cursor. A crash anywhere loses nothing: the cursor is behind or at what was
delivered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from ccos_obsd.ledger import store
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.metrics.aggregates import Histogram

log = structlog.get_logger("ccos_obsd.sinks")

DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 30.0


class Sink(Protocol):
    """One destination for committed entries. Methods run on the sink's own thread."""

    name: str

    def open(self) -> None:
        """Acquire resources (files, connections) on the runner's thread."""

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        """Take these entries (in seq order); raise to have the batch retried later."""

    def close(self) -> None:
        """Release resources."""


@dataclass
class SinkStats:
    """Per-sink counters for /metrics, written by the runner thread, read by renders."""

    cursor: int = 0
    delivered: int = 0
    errors: int = 0
    durations: Histogram = field(default_factory=lambda: Histogram(DELIVERY_BUCKETS))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> tuple[int, int, int, Histogram]:
        with self.lock:
            return self.cursor, self.delivered, self.errors, self.durations.copy()


class SinkRunner:
    """Feeds one sink from the ledger on its own thread."""

    def __init__(
        self,
        sink: Sink,
        db_path: Path,
        head: Callable[[], int],
        *,
        batch_size: int = 1000,
        on_delivered: Callable[[], None] | None = None,
    ) -> None:
        """``on_delivered`` is called (on the runner's thread) after each delivery's counters are updated."""
        self.sink = sink
        self.stats = SinkStats()
        self._db_path = db_path
        self._head = head
        self.batch_size = batch_size
        self._on_delivered = on_delivered
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ccos-sink-{sink.name}", daemon=True)
        cursor_conn = store.connect(db_path, readonly=False)
        try:
            self.stats.cursor = store.read_sink_cursor(cursor_conn, sink.name)
        finally:
            cursor_conn.close()

    @property
    def lag(self) -> int:
        return max(0, self._head() - self.stats.cursor)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """New entries were committed (called from the writer thread: just sets an event)."""
        self._wake.set()

    def stop(self, catch_up_s: float = 0.0) -> None:
        """Stop after delivering what is committed, waiting at most ``catch_up_s`` for it."""
        deadline = time.monotonic() + catch_up_s
        while self.lag and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            self._thread.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            self.sink.open()
        except Exception:
            log.exception("sink_open_failed", sink=self.sink.name)
            self.stats.errors += 1
            return
        reader = store.connect(self._db_path, readonly=True)
        cursor_conn = store.connect(self._db_path, readonly=False)
        backoff = BACKOFF_FIRST_S
        failing_since: int | None = None
        try:
            while not self._stop.is_set():
                head = self._head()
                start = self.stats.cursor
                if start >= head:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                batch = list(store.iter_entries(reader, start, min(head, start + self.batch_size)))
                if not batch:
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                try:
                    self.sink.deliver(batch)
                    store.write_sink_cursor(cursor_conn, self.sink.name, batch[-1].seq + 1)
                except Exception as exc:  # noqa: BLE001 - any failure of a sink is retried, never fatal
                    with self.stats.lock:
                        self.stats.errors += 1
                    if failing_since is None:
                        failing_since = start
                        log.warning("sink_delivery_failed", sink=self.sink.name, seq=start, error=str(exc),
                                    retry_in_s=backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                elapsed = time.perf_counter() - started
                if failing_since is not None:
                    log.info("sink_recovered", sink=self.sink.name, from_seq=failing_since)
                    failing_since = None
                backoff = BACKOFF_FIRST_S
                with self.stats.lock:
                    self.stats.cursor = batch[-1].seq + 1
                    self.stats.delivered += len(batch)
                    self.stats.durations.observe(elapsed)
                if self._on_delivered is not None:
                    self._on_delivered()
        finally:
            reader.close()
            cursor_conn.close()
            try:
                self.sink.close()
            except Exception:
                log.exception("sink_close_failed", sink=self.sink.name)
