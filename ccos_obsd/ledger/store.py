"""SQLite storage of the ledger: schema, connections, and every SQL statement about it.

One writer (``ledger.writer``) owns a read-write connection and calls the write
functions here; every reader opens its own connection, so exports, verification
and queries run beside a live daemon. Entries are stored as their exact
canonical bytes; the other columns are indexes derived from them. The sink
runners keep their cursors here too, and the daemon its metrics snapshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ccos_obsd.ledger.entry import RESULT_TYPES, NewEntry
from ccos_obsd.ledger.hashing import CHAIN_ROOT, HASH_SIZE, Hash
from ccos_obsd.ledger.keys import KeyId, VerifierKey
from ccos_obsd.ledger.merkle import TILE_WIDTH, TileAppend, TiledHashReader, TileId

LEDGER_FILE = "ledger.db"
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS entries (
    seq              INTEGER PRIMARY KEY,
    action_id        TEXT NOT NULL UNIQUE,
    entry            BLOB NOT NULL,
    leaf_hash        BLOB NOT NULL,
    chain_hash       BLOB NOT NULL,
    key_id           TEXT NOT NULL,
    signature        BLOB,
    action_type      TEXT NOT NULL,
    parent_action_id TEXT,
    session_id       TEXT,
    plan_id          TEXT,
    intent_id        TEXT,
    function_name    TEXT,
    cost             REAL,
    time_ms          INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS entries_by_intent   ON entries (intent_id, seq) WHERE intent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_plan     ON entries (plan_id, seq) WHERE plan_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_session  ON entries (session_id, seq) WHERE session_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_parent   ON entries (parent_action_id, seq)
    WHERE parent_action_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_function ON entries (function_name, seq)
    WHERE function_name IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_by_type     ON entries (action_type, seq);
CREATE INDEX IF NOT EXISTS entries_by_time     ON entries (time_ms, seq);
CREATE TABLE IF NOT EXISTS tiles (
    level  INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size          INTEGER PRIMARY KEY,
    root_hash     BLOB NOT NULL,
    note          TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS sink_cursors (
    name     TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS metrics_snapshot (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    format        INTEGER NOT NULL,
    entries       INTEGER NOT NULL,
    chain_hash    BLOB,
    params        TEXT NOT NULL,
    body          BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS keys (
    key_id       TEXT PRIMARY KEY,
    vkey         TEXT NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER,
    added_at_ms  INTEGER NOT NULL
) STRICT;
"""

ENTRY_COLUMNS = "seq, entry, leaf_hash, chain_hash, key_id, signature"


def ledger_path(state_dir: Path) -> Path:
    return state_dir / LEDGER_FILE


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open the ledger database; read-only connections never create or change it."""
    if readonly:
        if not path.exists():
            raise FileNotFoundError(f"no ledger at {path}")
        uri = f"{path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged append survives
        # power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        _check_format(conn)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _check_format(conn: sqlite3.Connection) -> None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('format', ?)", (str(FORMAT_VERSION),))
    elif row[0] != str(FORMAT_VERSION):
        raise sqlite3.DatabaseError(
            f"ledger format {row[0]} is not supported (this version reads {FORMAT_VERSION})"
        )


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One ledger row as verifiers and exports see it."""

    seq: int
    entry: bytes
    leaf_hash: Hash
    chain_hash: Hash
    key_id: KeyId
    signature: bytes | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> StoredEntry:
        seq, entry, leaf, chain, key_id, signature = row
        return cls(seq, bytes(entry), Hash(bytes(leaf)), Hash(bytes(chain)), KeyId(key_id),
                   None if signature is None else bytes(signature))

    def export_record(self) -> dict[str, Any]:
        """The DESIGN.md export record (``entry`` is the stored bytes as a JSON string)."""
        return {
            "seq": self.seq,
            "entry": self.entry.decode("utf-8"),
            "leaf_hash": self.leaf_hash.hex(),
            "chain_hash": self.chain_hash.hex(),
            "key_id": self.key_id,
            "signature": None if self.signature is None else base64.b64encode(self.signature).decode("ascii"),
        }

    def export_line(self) -> str:
        """The export record as one line of ``ccos-obsd export`` (without its newline): the one serialisation
        that the export, the JSONL sink and the NATS sink's message bodies share."""
        return json.dumps(self.export_record(), separators=(",", ":"))

    def query_record(self) -> dict[str, Any]:
        """Like the export record, with the entry parsed into an object for readers."""
        record = self.export_record()
        record["entry"] = json.loads(self.entry)
        return record


@dataclass(frozen=True, slots=True)
class Head:
    """Where the chain stands: the next seq and the last chain hash."""

    size: int
    chain_hash: Hash


def read_head(conn: sqlite3.Connection) -> Head:
    row = conn.execute("SELECT seq, chain_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return Head(0, CHAIN_ROOT)
    return Head(row[0] + 1, Hash(bytes(row[1])))


def read_keys(conn: sqlite3.Connection) -> list[tuple[VerifierKey, int, int | None]]:
    """Every key in the key ring with the seq range it signed (last_seq None: current)."""
    rows = conn.execute("SELECT vkey, first_seq, last_seq FROM keys ORDER BY first_seq, key_id")
    return [(VerifierKey.from_vkey(vkey), first, last) for vkey, first, last in rows]


def iter_entries(
    conn: sqlite3.Connection, start: int = 0, stop: int | None = None, chunk: int = 4096
) -> Iterator[StoredEntry]:
    """Entries in seq order from ``start`` (inclusive) to ``stop`` (exclusive)."""
    cursor_seq = start - 1
    while True:
        limit = chunk if stop is None else min(chunk, stop - cursor_seq - 1)
        if limit <= 0:
            return
        rows = conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE seq > ? ORDER BY seq LIMIT ?",
            (cursor_seq, limit),
        ).fetchall()
        if not rows:
            return
        for row in rows:
            yield StoredEntry.from_row(row)
        cursor_seq = rows[-1][0]


def get_entry(
    conn: sqlite3.Connection, *, seq: int | None = None, action_id: str | None = None
) -> StoredEntry | None:
    if seq is not None:
        row = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE seq = ?", (seq,)).fetchone()
    else:
        row = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE action_id = ?", (action_id,)).fetchone()
    return None if row is None else StoredEntry.from_row(row)


def entry_before(conn: sqlite3.Connection, action_id: str, before_seq: int) -> dict[str, Any] | None:
    """The fields of the entry ``action_id`` if it is in the ledger before ``before_seq``."""
    row = conn.execute("SELECT entry FROM entries WHERE action_id = ? AND seq < ?", (action_id, before_seq)).fetchone()
    if row is None:
        return None
    fields: dict[str, Any] = json.loads(row[0])
    return fields


def has_child_between(
    conn: sqlite3.Connection, parent_id: str, types: Iterable[str], after_seq: int, before_seq: int
) -> bool:
    """Whether an entry of one of ``types`` with parent ``parent_id`` lies strictly between the two seqs."""
    wanted = sorted(types)
    marks = ",".join("?" * len(wanted))
    row = conn.execute(
        "SELECT 1 FROM entries WHERE parent_action_id = ? AND seq > ? AND seq < ? "
        f"AND action_type IN ({marks}) LIMIT 1",
        (parent_id, after_seq, before_seq, *wanted),
    ).fetchone()
    return row is not None


MAX_QUERY_LIMIT = 10_000
DEFAULT_QUERY_LIMIT = 100

T = TypeVar("T")

EQUALITY_FILTERS = frozenset({
    "intent_id", "plan_id", "session_id", "action_type", "parent_action_id", "function_name",
})
"""Query filters that match one indexed column (of the same name) exactly."""
QUERY_FILTERS = EQUALITY_FILTERS | {
    "function_prefix", "since_ms", "until_ms", "after_seq", "limit", "order", "run_id", "step_id",
}
QueryOrder = Literal["asc", "desc", "time"]


@dataclass(frozen=True, slots=True)
class EntryQuery:
    """CCOS's chain query, already checked (``ccos_obsd.ops.parse_entry_query``)."""

    equal: Mapping[str, str] = field(default_factory=dict)
    function_prefix: str | None = None
    run_id: str | None = None
    step_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    after_seq: int | None = None
    limit: int = DEFAULT_QUERY_LIMIT
    order: QueryOrder = "asc"


_RUN_ID = "? IN (json_extract({t}.entry, '$.metadata.run_id'), json_extract({t}.entry, '$.result.metadata.run_id'))"
_STEP_ID = "? = json_extract({t}.entry, '$.step_id')"
_ORDER_BY = {"asc": "seq ASC", "desc": "seq DESC", "time": "time_ms ASC, seq ASC"}


def _with_results(condition: str, value: str) -> tuple[str, list[Any]]:
    """``condition`` (with ``value``) on an entry (``{t}`` is its table), or on the call a result records.

    CCOS's results inherit ``run_id`` and ``step_id`` from their call, so a result
    matches when its parent matches. The parent is found through the unique
    ``action_id`` index: one lookup per result row, on top of the scan the
    condition itself needs (neither field has an index).
    """
    types = ", ".join("?" * len(RESULT_TYPES))
    sql = (f"({condition.format(t='entries')} OR (action_type IN ({types}) AND EXISTS ("
           f"SELECT 1 FROM entries AS parent WHERE parent.action_id = entries.parent_action_id"
           f" AND {condition.format(t='parent')})))")
    return sql, [value, *sorted(RESULT_TYPES), value]


def query_entries(conn: sqlite3.Connection, query: EntryQuery) -> list[StoredEntry]:
    """CCOS's chain queries: any combination of the filters, oldest or newest first, or by time.

    ``since_ms``/``until_ms`` bound ``timestamp_ms`` (the recording time where the
    client gave none), inclusive and exclusive. ``after_seq`` pages forward (for
    ``order: "asc"``) or backward (``"desc"``). ``order: "time"`` is CCOS's
    execution trace: by ``timestamp_ms``, then seq. ``run_id`` and ``step_id`` also
    match the results of a matching call (see ``_with_results``).
    """
    where: list[str] = []
    params: list[Any] = []
    for column in sorted(EQUALITY_FILTERS & query.equal.keys()):
        where.append(f"{column} = ?")
        params.append(query.equal[column])
    if query.function_prefix is not None:
        where.append("function_name >= ? AND function_name < ?")
        params += [query.function_prefix, query.function_prefix + "\U0010ffff"]
    # Not indexed: CCOS keeps run_id in free-form metadata, and step_id is not a column.
    for condition, value in ((_RUN_ID, query.run_id), (_STEP_ID, query.step_id)):
        if value is not None:
            clause, clause_params = _with_results(condition, value)
            where.append(clause)
            params += clause_params
    for bound, op in ((query.since_ms, ">="), (query.until_ms, "<")):
        if bound is not None:
            where.append(f"time_ms {op} ?")
            params.append(bound)
    if query.after_seq is not None:
        # order "time" does not page by seq: ops.parse_entry_query refuses that combination.
        where.append("seq < ?" if query.order == "desc" else "seq > ?")
        params.append(query.after_seq)
    sql = f"SELECT {ENTRY_COLUMNS} FROM entries"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {_ORDER_BY[query.order]} LIMIT ?"
    params.append(query.limit)
    return [StoredEntry.from_row(row) for row in conn.execute(sql, params)]


class ReaderPool:
    """Read-only ledger connections on worker threads, one per thread, for reads off the event loop."""

    def __init__(self, db: Path, workers: int = 2) -> None:
        self._db = db
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ccos-read")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(conn)`` on a reader thread; the future resolves on the running loop."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self._db, readonly=True)
            with self._lock:
                self._connections.append(conn)
        return fn(conn)

    def close(self) -> None:
        self._executor.shutdown()
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def database_bytes(db: Path) -> int:
    """The ledger's size on disk: the database file and its write-ahead log."""
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def snapshot(conn: sqlite3.Connection, read: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``read(conn, ...)`` inside one read transaction, so every row it reads is from one moment."""
    conn.execute("BEGIN")
    try:
        return read(conn, *args, **kwargs)
    finally:
        conn.execute("COMMIT")


def cost_where(conn: sqlite3.Connection, column: str, value: str) -> float:
    """Total cost of the entries whose ``column`` (plan_id or intent_id) is ``value``."""
    if column not in ("plan_id", "intent_id"):
        raise ValueError(column)
    row = conn.execute(f"SELECT TOTAL(cost) FROM entries WHERE {column} = ?", (value,)).fetchone()
    return float(row[0])


class LedgerTileReader:
    """tlog-tiles over the ledger: level-0 tiles from the entries' leaf hashes, the rest from ``tiles``.

    Only tiles at levels 8, 16, ... of the tree are stored (about 1/255 of the leaf
    hashes); level 0 is served from ``entries.leaf_hash``, so the tree costs almost
    no space beyond the leaves.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def read_tiles(self, tiles: Sequence[TileId]) -> list[bytes]:
        out: list[bytes] = []
        for tile in tiles:
            if tile.level == 0:
                first = tile.index * TILE_WIDTH
                rows = self._conn.execute(
                    "SELECT leaf_hash FROM entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (first, first + TILE_WIDTH),
                ).fetchall()
                out.append(b"".join(bytes(row[0]) for row in rows))
            else:
                out.append(_stored_tile(self._conn, tile))
        return out


def _stored_tile(conn: sqlite3.Connection, tile: TileId) -> bytes:
    row = conn.execute("SELECT data FROM tiles WHERE level = ? AND idx = ?", (tile.level, tile.index)).fetchone()
    return b"" if row is None else bytes(row[0])


def hash_reader(conn: sqlite3.Connection) -> TiledHashReader:
    return TiledHashReader(LedgerTileReader(conn))


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    root_hash: Hash
    note: str
    key_id: KeyId
    created_at_ms: int


def read_checkpoints(conn: sqlite3.Connection) -> list[StoredCheckpoint]:
    rows = conn.execute("SELECT size, root_hash, note, key_id, created_at_ms FROM checkpoints ORDER BY size")
    return [StoredCheckpoint(size, Hash(bytes(root)), note, KeyId(key_id), at) for size, root, note, key_id, at in rows]


def read_checkpoints_at(conn: sqlite3.Connection, sizes: Sequence[int]) -> list[StoredCheckpoint]:
    marks = ", ".join("?" for _ in sizes)
    rows = conn.execute(
        f"SELECT size, root_hash, note, key_id, created_at_ms FROM checkpoints WHERE size IN ({marks})", tuple(sizes)
    )
    return [StoredCheckpoint(size, Hash(bytes(root)), note, KeyId(key_id), at) for size, root, note, key_id, at in rows]


def read_checkpoints_between(
    conn: sqlite3.Connection, after_size: int, through_size: int, limit: int
) -> list[StoredCheckpoint]:
    """The first ``limit`` checkpoints with ``after_size < size <= through_size``, by size."""
    rows = conn.execute(
        "SELECT size, root_hash, note, key_id, created_at_ms FROM checkpoints WHERE size > ? AND size <= ?"
        " ORDER BY size LIMIT ?", (after_size, through_size, limit)
    )
    return [StoredCheckpoint(size, Hash(bytes(root)), note, KeyId(key_id), at) for size, root, note, key_id, at in rows]


def latest_checkpoint(conn: sqlite3.Connection) -> StoredCheckpoint | None:
    row = conn.execute(
        "SELECT size, root_hash, note, key_id, created_at_ms FROM checkpoints ORDER BY size DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    size, root, note, key_id, at = row
    return StoredCheckpoint(size, Hash(bytes(root)), note, KeyId(key_id), at)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The metric aggregates as of ``entries`` entries (the last of them has ``chain_hash``)."""

    format: int
    entries: int
    chain_hash: bytes | None
    params: str
    body: bytes


def save_metrics_snapshot(conn: sqlite3.Connection, snapshot: MetricsSnapshot) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO metrics_snapshot (id, format, entries, chain_hash, params, body, created_at_ms)"
        " VALUES (1, ?, ?, ?, ?, ?, ?)",
        (snapshot.format, snapshot.entries, snapshot.chain_hash, snapshot.params, snapshot.body,
         int(time.time() * 1000)),
    )


def load_metrics_snapshot(conn: sqlite3.Connection) -> MetricsSnapshot | None:
    """The stored snapshot, or None (also for a ledger from before snapshots existed)."""
    try:
        row = conn.execute(
            "SELECT format, entries, chain_hash, params, body FROM metrics_snapshot WHERE id = 1"
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    if row is None:
        return None
    fmt, entries, chain, params, body = row
    return MetricsSnapshot(fmt, entries, None if chain is None else bytes(chain), params, bytes(body))


def chain_hash_at(conn: sqlite3.Connection, seq: int) -> bytes | None:
    row = conn.execute("SELECT chain_hash FROM entries WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else bytes(row[0])


def leaf_hashes(conn: sqlite3.Connection) -> Iterator[bytes]:
    """Every entry's leaf hash, in seq order."""
    for row in conn.execute("SELECT leaf_hash FROM entries ORDER BY seq"):
        yield bytes(row[0])


# --- writes: the ledger writer's thread, and sink runners for their cursors


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back when the body or the commit fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # The body's error is the one to report; if the rollback fails too, the
        # connection is still in a transaction and its owner's rollback logs it.
        with contextlib.suppress(sqlite3.Error):
            rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if there is one."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def insert_entries(conn: sqlite3.Connection, key_id: KeyId, entries: Iterable[tuple[NewEntry, bytes | None]]) -> None:
    """Store new entries with their signatures (None: unsigned) by key ``key_id``."""
    rows = []
    for new, signature in entries:
        f = new.fields
        rows.append((
            new.seq, f["action_id"], new.entry, new.leaf_hash, new.chain_hash, key_id, signature, f["action_type"],
            f.get("parent_action_id"), f.get("session_id"), f.get("plan_id"), f.get("intent_id"),
            f.get("function_name"), f.get("cost"), f.get("timestamp_ms", f["recorded_at_ms"]),
        ))
    conn.executemany(
        "INSERT INTO entries (seq, action_id, entry, leaf_hash, chain_hash, key_id, signature,"
        " action_type, parent_action_id, session_id, plan_id, intent_id,"
        " function_name, cost, time_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def write_tiles(conn: sqlite3.Connection, tiles: Mapping[TileId, TileAppend]) -> None:
    """Extend (or start) the stored tiles with the hashes the tree just completed."""
    for tile, append in tiles.items():
        kept = _stored_tile(conn, tile)[: append.offset * HASH_SIZE]
        conn.execute(
            "INSERT OR REPLACE INTO tiles (level, idx, data) VALUES (?, ?, ?)",
            (tile.level, tile.index, kept + append.hashes),
        )


def replace_tiles(conn: sqlite3.Connection, tiles: Mapping[TileId, TileAppend]) -> None:
    """Drop every stored tile and store these (a tree rebuilt from the leaf hashes)."""
    conn.execute("DELETE FROM tiles")
    write_tiles(conn, tiles)


def insert_checkpoint(conn: sqlite3.Connection, checkpoint: StoredCheckpoint) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO checkpoints (size, root_hash, note, key_id, created_at_ms) VALUES (?, ?, ?, ?, ?)",
        (checkpoint.size, checkpoint.root_hash, checkpoint.note, checkpoint.key_id, checkpoint.created_at_ms),
    )


def register_key(conn: sqlite3.Connection, key_id: KeyId, vkey: str, first_seq: int, added_at_ms: int) -> None:
    """Add a key the ring does not hold yet, signing from ``first_seq`` on (its own transaction).

    The key that was current until then signed up to ``first_seq - 1``. A key the
    ring already holds is left as it is.
    """
    if conn.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone() is not None:
        return
    with write_transaction(conn):
        conn.execute("UPDATE keys SET last_seq = ? WHERE last_seq IS NULL", (first_seq - 1,))
        conn.execute(
            "INSERT INTO keys (key_id, vkey, first_seq, last_seq, added_at_ms) VALUES (?, ?, ?, NULL, ?)",
            (key_id, vkey, first_seq, added_at_ms),
        )


def record_key_rotation(
    conn: sqlite3.Connection, old_key_id: KeyId, new_key_id: KeyId, new_vkey: str, rotation_seq: int, at_ms: int
) -> None:
    """The old key signed up to ``rotation_seq`` (the KeyRotated entry); the new one signs after it."""
    conn.execute("UPDATE keys SET last_seq = ? WHERE key_id = ?", (rotation_seq, old_key_id))
    conn.execute(
        "INSERT OR REPLACE INTO keys (key_id, vkey, first_seq, last_seq, added_at_ms) VALUES (?, ?, ?, NULL, ?)",
        (new_key_id, new_vkey, rotation_seq + 1, at_ms),
    )


def read_sink_cursor(conn: sqlite3.Connection, name: str) -> int:
    """The next seq sink ``name`` is to be given (0 for a sink never run)."""
    row = conn.execute("SELECT next_seq FROM sink_cursors WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def write_sink_cursor(conn: sqlite3.Connection, name: str, next_seq: int) -> None:
    """Durably move sink ``name``'s cursor (its own transaction)."""
    with write_transaction(conn):
        conn.execute(
            "INSERT INTO sink_cursors (name, next_seq) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET next_seq = excluded.next_seq",
            (name, next_seq),
        )
