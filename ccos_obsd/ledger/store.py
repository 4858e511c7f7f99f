"""SQLite storage of the ledger: schema, connections and read queries.

One writer (``ledger.writer``) owns a read-write connection; every reader opens
its own connection, so exports, verification and queries run beside a live
daemon. Entries are stored as their exact canonical bytes; the other columns are
indexes derived from them.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccos_obsd.errors import InvalidRequest
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash
from ccos_obsd.ledger.keys import KeyId, VerifierKey
from ccos_obsd.ledger.merkle import TILE_WIDTH, TiledHashReader, TileId

LEDGER_FILE = "ledger.db"
FORMAT_VERSION = 1
ENTRY_FORMAT_VERSION = 1

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


MAX_QUERY_LIMIT = 10_000
DEFAULT_QUERY_LIMIT = 100

_EQUALITY_FILTERS = {
    "intent_id": "intent_id",
    "plan_id": "plan_id",
    "session_id": "session_id",
    "action_type": "action_type",
    "parent_action_id": "parent_action_id",
    "function_name": "function_name",
}
QUERY_FILTERS = frozenset(_EQUALITY_FILTERS) | {
    "function_prefix", "since_ms", "until_ms", "after_seq", "limit", "order", "run_id",
}


def query_entries(conn: sqlite3.Connection, filters: Mapping[str, Any]) -> list[StoredEntry]:
    """CCOS's chain queries: any combination of the filters, newest or oldest first.

    ``since_ms``/``until_ms`` bound ``timestamp_ms`` (the recording time where the
    client gave none), inclusive and exclusive. ``after_seq`` pages forward (for
    ``order: "asc"``) or backward (``"desc"``).
    """
    for key in filters:
        if key not in QUERY_FILTERS:
            raise InvalidRequest(f"unknown query filter {key!r}", field=key)
    where: list[str] = []
    params: list[Any] = []
    for key, column in _EQUALITY_FILTERS.items():
        if key in filters:
            where.append(f"{column} = ?")
            params.append(_query_string(filters, key))
    if "function_prefix" in filters:
        prefix = _query_string(filters, "function_prefix")
        where.append("function_name >= ? AND function_name < ?")
        params += [prefix, prefix + "\U0010ffff"]
    if "run_id" in filters:
        # Not indexed: CCOS keeps run_id in free-form metadata.
        where.append(
            "(json_extract(entry, '$.metadata.run_id') = ? OR json_extract(entry, '$.result.metadata.run_id') = ?)"
        )
        run_id = _query_string(filters, "run_id")
        params += [run_id, run_id]
    order = filters.get("order", "asc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", field="order")
    for key, op in (("since_ms", ">="), ("until_ms", "<")):
        if key in filters:
            where.append(f"time_ms {op} ?")
            params.append(_query_int(filters, key))
    if "after_seq" in filters:
        where.append("seq > ?" if order == "asc" else "seq < ?")
        params.append(_query_int(filters, "after_seq"))
    limit = _query_int(filters, "limit") if "limit" in filters else DEFAULT_QUERY_LIMIT
    if not 1 <= limit <= MAX_QUERY_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_QUERY_LIMIT}", field="limit")
    sql = f"SELECT {ENTRY_COLUMNS} FROM entries"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY seq {order.upper()} LIMIT ?"
    params.append(limit)
    return [StoredEntry.from_row(row) for row in conn.execute(sql, params)]


def cost_where(conn: sqlite3.Connection, column: str, value: str) -> float:
    """Total cost of the entries whose ``column`` (plan_id or intent_id) is ``value``."""
    if column not in ("plan_id", "intent_id"):
        raise ValueError(column)
    row = conn.execute(f"SELECT TOTAL(cost) FROM entries WHERE {column} = ?", (value,)).fetchone()
    return float(row[0])


def _query_string(filters: Mapping[str, Any], key: str) -> str:
    return checked_string(filters[key], key)


def _query_int(filters: Mapping[str, Any], key: str) -> int:
    return checked_int(filters[key], key)


def checked_string(value: Any, key: str) -> str:
    """A request string SQLite can bind (UTF-8 encodable), or ``InvalidRequest``."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string", field=key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{key} is not valid Unicode (lone surrogate)", field=key) from None
    return value


def checked_int(value: Any, key: str) -> int:
    """A request integer SQLite can bind (64-bit signed), or ``InvalidRequest``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer", field=key)
    if not -(2**63) <= value < 2**63:
        raise InvalidRequest(f"{key} is out of range", field=key)
    return value


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
                row = self._conn.execute(
                    "SELECT data FROM tiles WHERE level = ? AND idx = ?", (tile.level, tile.index)
                ).fetchone()
                out.append(b"" if row is None else bytes(row[0]))
        return out


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
