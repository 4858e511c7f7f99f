"""The sink framework: a Protocol for sinks and the runner that feeds one.

A sink never sees the append path. Its runner (one thread per sink) pulls
committed entries from the ledger starting at the sink's durable cursor (table
``sink_cursors`` in the ledger database), hands them over in order and in
batches, and advances the cursor only after the sink returned: delivery is at
least once, so sinks are idempotent. A failing sink is retried with exponential
backoff; appends never wait for it, and when it recovers it catches up from its
cursor. A crash anywhere loses nothing: the cursor is behind or at what was
delivered.

A sink may keep its own cursor (``owns_cursor = True`` and a ``cursor()``
method, as the Working Memory sink does): it stores it with what each delivery
wrote, in one transaction, and the runner resumes from it. The ledger's row is
then a mirror, written at most every ``CURSOR_MIRROR_S`` and at stop (for the
daemon's lag figures when it starts), with no fsync of its own.

``linger_s``: after a delivery, the runner waits up to that long for more
entries before the next one (unless a full batch is waiting), so at modest rates
one transaction covers several commits. A commit's entries wait at most
``linger_s`` beyond the moment the runner sees them; after an idle spell the
first commit is delivered at once, and :meth:`SinkRunner.hurry` (somebody waits
for the delivery) cuts a linger short.
"""

from __future__ import annotations

import math
import sqlite3
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
CURSOR_MIRROR_S = 1.0
"""How often the ledger's copy of a self-kept cursor is refreshed (at most)."""


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
        linger_s: float = 0.0,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        """``on_delivered`` is called (on the runner's thread) whenever the counters changed: after each
        delivery, each failure, and once the sink is open (its own cursor read). ``on_idle`` is called
        right before the runner waits for :meth:`notify` (it has delivered everything below the head)."""
        self.sink = sink
        self.stats = SinkStats()
        self._db_path = db_path
        self._head = head
        self.batch_size = batch_size
        self.linger_s = linger_s
        self._on_delivered = on_delivered
        self._on_idle = on_idle
        self._owns_cursor = bool(getattr(sink, "owns_cursor", False))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._hurry = threading.Event()
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

    def hurry(self) -> None:
        """Somebody waits for a delivery: cut the current (or next) linger short."""
        self._hurry.set()

    def stop(self, catch_up_s: float = 0.0) -> None:
        """Stop after delivering what is committed, waiting at most ``catch_up_s`` for it."""
        deadline = time.monotonic() + catch_up_s
        while self.lag and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            self._thread.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        self._stop.set()
        self._wake.set()
        self._hurry.set()
        if self._thread.is_alive():
            self._thread.join()

    def _changed(self) -> None:
        if self._on_delivered is not None:
            self._on_delivered()

    def _own_cursor(self) -> None:
        """Resume from the cursor the sink keeps, when it keeps one (else the ledger's row stays)."""
        stored: int | None = self.sink.cursor()  # type: ignore[attr-defined]
        if stored is None:
            return  # a store from before it kept its cursor: the ledger's row says where it is
        head = self._head()
        if stored > head:
            log.warning("sink_cursor_ahead", sink=self.sink.name, cursor=stored, head=head,
                        using=self.stats.cursor)  # a store kept beside another ledger
            return
        with self.stats.lock:
            self.stats.cursor = stored

    def _run(self) -> None:
        try:
            self.sink.open()
            if self._owns_cursor:
                self._own_cursor()
        except Exception:
            log.exception("sink_open_failed", sink=self.sink.name)
            with self.stats.lock:
                self.stats.errors += 1
            self._changed()
            return
        self._changed()
        reader = store.connect(self._db_path, readonly=True)
        cursor_conn = store.connect(self._db_path, readonly=False)
        if self._owns_cursor:
            cursor_conn.execute("PRAGMA synchronous=NORMAL")  # a mirror: the sink's own copy is the truth
        mirrored = self.stats.cursor
        mirrored_at = time.monotonic()
        delivered_at = -math.inf
        backoff = BACKOFF_FIRST_S
        failing_since: int | None = None
        try:
            while not self._stop.is_set():
                head = self._head()
                start = self.stats.cursor
                if start >= head:
                    if self._on_idle is not None:
                        self._on_idle()
                    self._wake.wait()  # notify() or stop() sets it: no timer runs while idle
                    self._wake.clear()
                    continue
                if self.linger_s > 0 and head - start < self.batch_size:
                    remaining = delivered_at + self.linger_s - time.monotonic()
                    if remaining > 0:
                        self._hurry.wait(remaining)
                        if not self._stop.is_set():
                            self._hurry.clear()  # before reading the head: a later hurry stays set
                        head = self._head()
                batch = list(store.iter_entries(reader, start, min(head, start + self.batch_size)))
                if not batch:
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                try:
                    self.sink.deliver(batch)
                    if not self._owns_cursor:
                        store.write_sink_cursor(cursor_conn, self.sink.name, batch[-1].seq + 1)
                except Exception as exc:  # noqa: BLE001 - any failure of a sink is retried, never fatal
                    with self.stats.lock:
                        self.stats.errors += 1
                    if failing_since is None:
                        failing_since = start
                        log.warning("sink_delivery_failed", sink=self.sink.name, seq=start, error=str(exc),
                                    retry_in_s=backoff)
                    self._changed()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                elapsed = time.perf_counter() - started
                delivered_at = time.monotonic()
                if failing_since is not None:
                    log.info("sink_recovered", sink=self.sink.name, from_seq=failing_since)
                    failing_since = None
                backoff = BACKOFF_FIRST_S
                with self.stats.lock:
                    self.stats.cursor = batch[-1].seq + 1
                    self.stats.delivered += len(batch)
                    self.stats.durations.observe(elapsed)
                self._changed()
                if self._owns_cursor and delivered_at - mirrored_at >= CURSOR_MIRROR_S:
                    mirrored = self._mirror(cursor_conn, mirrored)
                    mirrored_at = delivered_at
            if self._owns_cursor:
                self._mirror(cursor_conn, mirrored)
        finally:
            reader.close()
            cursor_conn.close()
            try:
                self.sink.close()
            except Exception:
                log.exception("sink_close_failed", sink=self.sink.name)

    def _mirror(self, cursor_conn: sqlite3.Connection, mirrored: int) -> int:
        """Copy a self-kept cursor to the ledger's row if it moved; answers the cursor now mirrored."""
        cursor = self.stats.cursor
        if cursor != mirrored:
            try:
                store.write_sink_cursor(cursor_conn, self.sink.name, cursor)
            except sqlite3.Error as exc:  # only a mirror: the next one catches up
                log.warning("sink_cursor_mirror_failed", sink=self.sink.name, error=str(exc))
                return mirrored
        return cursor
