"""Working Memory reads shared by the socket op, the HTTP route and the CLI, and the rebuild.

Searches open the WM store read-only (their own connection); the WM sink keeps
writing beside them. ``rebuild`` replays the ledger through the same derivation
the sink uses, so a rebuilt WM has the same digest as the incrementally built one.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ccos_obsd.errors import InvalidRequest, NotFound
from ccos_obsd.ingestor import derive_wm_entries
from ccos_obsd.ledger import store
from ccos_obsd.sinks.base import write_cursor
from ccos_obsd.wm_store import PreparedEntry, WmStore, prepare

SEARCH_FIELDS = frozenset({"text", "tags", "since", "until", "plan_id", "intent_id", "session_id", "limit"})
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
    wm: WmStore, ledger_db: Path, start: int, stop: int, progress: Callable[[int], None] | None = None
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
                added += wm.ingest_prepared(prepared)
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
            added += wm.ingest_prepared(prepared)
            scanned += count
            if progress is not None:
                progress(count)
    return scanned, added


def search(path: Path, filters: Mapping[str, Any]) -> list[dict[str, Any]]:
    for key in filters:
        if key not in SEARCH_FIELDS:
            raise InvalidRequest(f"unknown search field {key!r}", field=key)
    tags = filters.get("tags")
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t]
    with _open(path) as wm:
        return wm.search(
            text=filters.get("text"), tags=tags, since=filters.get("since"), until=filters.get("until"),
            plan_id=filters.get("plan_id"), intent_id=filters.get("intent_id"),
            session_id=filters.get("session_id"), limit=filters.get("limit", 50),
        )


def digest(path: Path) -> dict[str, Any]:
    with _open(path) as wm:
        return {"digest": wm.digest(), "entries": wm.count()}


def _open(path: Path) -> WmStore:
    if not path.exists():
        raise NotFound(f"no Working Memory at {path} (is wm.enabled on, or has it been rebuilt?)")
    return WmStore.open_readonly(path)


def rebuild(
    ledger_db: Path,
    wm_file: Path,
    *,
    start: int = 0,
    sink_name: str = "wm",
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Replay the ledger from ``start`` into the WM store (from scratch when ``start`` is 0).

    Moves the WM sink's cursor to the end, so a daemon started afterwards continues
    from there. Returns how many ledger entries were scanned and WM entries added.
    """
    conn = store.connect(ledger_db, readonly=True)
    try:
        conn.execute("BEGIN")
        head = store.read_head(conn).size
        with WmStore(wm_file, durable=False) as wm:
            if start == 0:
                wm.clear()
                with wm.bulk_load():
                    scanned, added = replay_range(wm, ledger_db, start, head, progress)
            else:
                scanned, added = replay_range(wm, ledger_db, start, head, progress)
        conn.execute("COMMIT")
    finally:
        conn.close()
    cursor_conn = store.connect(ledger_db, readonly=False)
    try:
        write_cursor(cursor_conn, sink_name, head)
    finally:
        cursor_conn.close()
    return {"scanned_actions": scanned, "ingested": added, "head": head}
