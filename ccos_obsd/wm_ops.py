"""Working Memory reads shared by the socket op, the HTTP route and the CLI, and the rebuild.

Searches open the WM store read-only (their own connection); the WM sink keeps
writing beside them. ``rebuild`` replays the ledger through the same derivation
the sink uses, so a rebuilt WM has the same digest as the incrementally built one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ccos_obsd.errors import InvalidRequest, NotFound
from ccos_obsd.ingestor import derive_wm_entries
from ccos_obsd.ledger import store
from ccos_obsd.sinks.base import write_cursor
from ccos_obsd.wm_store import WmStore

SEARCH_FIELDS = frozenset({"text", "tags", "since", "until", "plan_id", "intent_id", "session_id", "limit"})
REPLAY_BATCH = 10_000
"""Large batches: random ids make small WM transactions expensive."""


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
    scanned = added = 0
    try:
        conn.execute("BEGIN")
        head = store.read_head(conn).size
        with WmStore(wm_file, durable=False) as wm:
            if start == 0:
                wm.clear()
            batch = []
            for entry in store.iter_entries(conn, start, head):
                batch.extend(derive_wm_entries(entry))
                scanned += 1
                if len(batch) >= REPLAY_BATCH:
                    added += wm.ingest(batch)
                    if progress is not None:
                        progress(len(batch))
                    batch = []
            added += wm.ingest(batch)
            if progress is not None:
                progress(len(batch))
        conn.execute("COMMIT")
    finally:
        conn.close()
    cursor_conn = store.connect(ledger_db, readonly=False)
    try:
        write_cursor(cursor_conn, sink_name, head)
    finally:
        cursor_conn.close()
    return {"scanned_actions": scanned, "ingested": added, "head": head}
