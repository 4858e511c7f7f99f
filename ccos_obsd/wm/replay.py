"""Replay: Working Memory rebuilt from the ledger (``ccos-obsd replay``, the ``replay`` op).

:func:`rebuild` replays the ledger through the same derivation the WM sink uses,
and ingests each chunk with the same budgets as the sink ingests each delivery
(``wm.max_entries`` / ``wm.max_tokens``: :class:`~ccos_obsd.wm.store.Budgets`,
whose result does not depend on batching), so a rebuilt WM has the same
digest as the incrementally built one; :class:`LiveReplay` runs it inside the daemon.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import structlog

from ccos_obsd.ledger import store
from ccos_obsd.wm.derive import derive_wm_entries
from ccos_obsd.wm.store import Budgets, PreparedEntry, WmStore, prepare

log = structlog.get_logger("ccos_obsd.wm")

REPLAY_BATCH = 10_000
"""Large batches: random ids make small WM transactions expensive."""
REPLAY_WORKERS = 2
REPLAY_INLINE = 20_000
"""Replays up to this many entries run in this process: starting workers would cost more."""


def derive_range(
    ledger_db: Path, start: int, stop: int, conn: sqlite3.Connection | None = None
) -> tuple[list[PreparedEntry], int]:
    """WM entries, encoded for the store, of the ledger entries ``start`` <= seq < ``stop``; and their count.

    Runs in replay's worker processes (the entries below the head never change, so
    no transaction is needed to read them consistently).
    """
    if conn is None:
        conn = _worker_connections.get(ledger_db)
    if conn is None:
        conn = _worker_connections[ledger_db] = store.connect(ledger_db, readonly=True)
    entries = list(store.iter_entries(conn, start, stop))
    return prepare([wm for entry in entries for wm in derive_wm_entries(entry)]), len(entries)


_worker_connections: dict[Path, sqlite3.Connection] = {}


def replay_range(
    wm: WmStore,
    ledger_db: Path,
    start: int,
    stop: int,
    progress: Callable[[int], None] | None = None,
    budgets: Budgets | None = None,
) -> tuple[int, int]:
    """Ingest the WM entries of ledger entries ``start`` <= seq < ``stop``, in seq order.

    Derivation and encoding (most of the work, all of it Python) run in worker
    processes, a chunk each, while this process ingests the chunks in order: on
    two cores that nearly doubles the rate. Returns (entries scanned, WM entries added).
    """
    scanned = added = 0
    if stop - start <= REPLAY_INLINE:
        conn = store.connect(ledger_db, readonly=True)
        try:
            for chunk_start in range(start, stop, REPLAY_BATCH):
                prepared, count = derive_range(ledger_db, chunk_start, min(stop, chunk_start + REPLAY_BATCH), conn)
                added += wm.ingest_prepared(prepared, budgets)
                scanned += count
                if progress is not None:
                    progress(count)
        finally:
            conn.close()
        return scanned, added
    chunks = iter(range(start, stop, REPLAY_BATCH))
    context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    with ProcessPoolExecutor(max_workers=REPLAY_WORKERS, mp_context=context) as pool:
        pending: deque[Future[tuple[list[PreparedEntry], int]]] = deque()

        def submit_next() -> None:
            chunk_start = next(chunks, None)
            if chunk_start is not None:
                pending.append(pool.submit(derive_range, ledger_db, chunk_start, min(stop, chunk_start + REPLAY_BATCH)))

        for _ in range(2 * REPLAY_WORKERS):
            submit_next()
        while pending:
            prepared, count = pending.popleft().result()
            submit_next()
            added += wm.ingest_prepared(prepared, budgets)
            scanned += count
            if progress is not None:
                progress(count)
    return scanned, added


def rebuild(
    ledger_db: Path,
    wm_file: Path,
    *,
    start: int = 0,
    sink_name: str = "wm",
    progress: Callable[[int], None] | None = None,
    budgets: Budgets | None = None,
) -> dict[str, int]:
    """Replay the ledger from ``start`` into the WM store (from scratch when ``start`` is 0), keeping ``budgets``.

    Moves the WM sink's cursor to the end (the store's own, and the ledger's mirror of
    it), so a daemon started afterwards continues from there. Returns how many ledger
    entries were scanned and WM entries added (entries the budgets evicted again count).
    """
    conn = store.connect(ledger_db, readonly=True)
    try:
        conn.execute("BEGIN")
        head = store.read_head(conn).size
        with WmStore(wm_file, durable=False) as wm:
            if start == 0:
                wm.clear()
                with wm.bulk_load(evicting=budgets is not None):
                    scanned, added = replay_range(wm, ledger_db, start, head, progress, budgets)
            else:
                scanned, added = replay_range(wm, ledger_db, start, head, progress, budgets)
            wm.set_cursor(head)  # the WM sink's own cursor, kept in the store (see WmSink)
        conn.execute("COMMIT")
    finally:
        conn.close()
    cursor_conn = store.connect(ledger_db, readonly=False)
    try:
        store.write_sink_cursor(cursor_conn, sink_name, head)
    finally:
        cursor_conn.close()
    return {"scanned_actions": scanned, "ingested": added, "head": head}


class LiveReplay:
    """:func:`rebuild` inside the running daemon: pause the sinks, replay, resume them.

    One replay runs at a time (a second waits for the first). ``progress`` is
    (ledger entries done, total) while one runs, else None: the ``replay_status``
    op reads it.
    """

    def __init__(
        self,
        ledger_db: Path,
        wm_file: Path,
        sink_name: str,
        head: Callable[[], int],
        *,
        pause_sinks: Callable[[], None],
        resume_sinks: Callable[[], None],
        budgets: Budgets | None = None,
    ) -> None:
        """``head`` gives the ledger's committed size; the sink callables block (they run in an executor).

        ``budgets``: the WM sink's (``wm.max_entries`` / ``wm.max_tokens``), so the rebuild keeps what it keeps.
        """
        self._ledger_db = ledger_db
        self._wm_file = wm_file
        self._sink_name = sink_name
        self._head = head
        self._pause_sinks = pause_sinks
        self._resume_sinks = resume_sinks
        self._budgets = budgets
        self._lock = asyncio.Lock()
        self.progress: tuple[int, int] | None = None

    async def run(self, start: int) -> dict[str, int]:
        """Replay from ``start`` (0: from scratch); answers :func:`rebuild`'s counts."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._pause_sinks)
            total = max(0, self._head() - start)  # about: rebuild reads the head again
            done = 0
            self.progress = (0, total)

            def advance(count: int) -> None:
                nonlocal done
                done += count
                self.progress = (done, max(total, done))  # from the executor thread: one tuple, swapped whole

            try:
                result = await loop.run_in_executor(
                    None,
                    lambda: rebuild(
                        self._ledger_db, self._wm_file, start=start, sink_name=self._sink_name, progress=advance,
                        budgets=self._budgets,
                    ),
                )
            finally:
                self.progress = None
                await loop.run_in_executor(None, self._resume_sinks)
            log.info("wm_replayed", **result)
            return result
