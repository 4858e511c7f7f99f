"""The Working Memory store: derived entries in their own SQLite file, searchable.

Layout (``wm.db`` under the state dir by default, WAL mode, 8 KiB pages):

- ``wm_entries``: one row per entry. ``record`` holds the entry's canonical JSON
  (what searches return and what the digest covers); the other columns index it.
  ``doc`` is the full-text document id; it grows with every entry added.
- ``wm_fts``: a contentless FTS5 table over title, content and tags (the text is
  stored once, in ``record``). A contentless table forgets a document only when
  given its exact original text, which eviction reads back from the record.
- ``wm_tags``: one row per (tag, entry), keyed ``(tag, timestamp_s, seq, doc)`` so
  a tag filter reads its newest entries straight off the key. The three tags
  every derived entry carries (``derive.BASE_TAGS``) are bits of
  ``wm_entries.base_tags`` instead: three million rows that say nothing per
  million entries would double the tag index and its write cost.
- ``wm_stats``: the entry count, the token total, the digest sum and the
  largest lateness of an arrival (see :meth:`WmStore._text_docs`), updated in
  the same transaction as every change, so ``count()``, ``digest()`` and the
  budget check never scan.
- ``wm_meta``: the format version, once budgets evicted an entry the
  eviction mark (:class:`Budgets`), and the WM sink's cursor: the next ledger
  seq it is to be given, written in the same transaction as the entries it
  covers (:meth:`WmStore.cursor`), so what the file holds and where delivery
  resumes never disagree, whatever a crash or a power loss cut off.

Only this class writes the file: the tables must change together. The
socket op, the HTTP route and the CLI read through :func:`search` and
:func:`digest`, which open the file read-only for one read (their own
connection), so the WM sink keeps writing beside them.

Ingest is idempotent: an entry whose id is already stored is skipped (the first
delivery wins; within one ledger an id names one entry, so this only matters
when entries from different ledgers meet).

Digest: each entry's hash is SHA-256 of its canonical record; the store keeps
their sum modulo 2^256 (a multiset hash: independent of insertion order and
batching; eviction subtracts). ``digest()`` is SHA-256 over a domain tag, the
entry count and that sum. It tells whether two stores hold the same entries;
it is not a security commitment (the ledger's signatures are).

Search order is newest first: ``timestamp_s`` descending, then ``seq``, then
``doc``. Each query reads one index in that order and stops at ``limit``: the
plan, intent or session index when one of those is given, else the full-text
index (see :meth:`WmStore._text_docs`), else the tag index, else the time index.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from ccos_obsd.errors import NotFound, WmQueryError, WmReadOnlyError
from ccos_obsd.wm.derive import BASE_TAGS, WmEntry

FORMAT_VERSION = 1
DEFAULT_SEARCH_LIMIT = 50
MAX_SEARCH_LIMIT = 10_000
MAX_QUERY_TAGS = 64
MAX_QUERY_WORDS = 64
PAGE_SIZE = 8192
"""Rows are about 1 KiB: 8 KiB pages waste less of each page than 4 KiB ones."""

_BASE_TAG_BITS = {tag: 1 << bit for bit, tag in enumerate(BASE_TAGS)}
_DIGEST_MODULUS = 1 << 256
_DIGEST_CONTEXT = b"ccos-obsd/wm-digest/v1\x00"
_STREAM_CHUNK = 256
_MARK_KEY = "evicted_through"
"""``wm_meta`` key of the eviction mark (see :class:`Budgets`)."""
_CURSOR_KEY = "next_seq"
"""``wm_meta`` key of the WM sink's cursor (see :meth:`WmStore.cursor`)."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS wm_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT""",
    # max_lateness: how far below the ts_bound of the rows before it any row's
    # timestamp_s has been (0 when entries arrive in time order); see _text_docs.
    """CREATE TABLE IF NOT EXISTS wm_stats (
        singleton    INTEGER PRIMARY KEY CHECK (singleton = 0),
        entries      INTEGER NOT NULL,
        tokens       INTEGER NOT NULL,
        digest_sum   BLOB NOT NULL,
        max_lateness REAL NOT NULL
    ) STRICT""",
    """INSERT OR IGNORE INTO wm_stats (singleton, entries, tokens, digest_sum, max_lateness)
        VALUES (0, 0, 0, zeroblob(32), 0.0)""",
    # ts_bound: the largest timestamp_s of this row and of every row with a smaller
    # doc (when it was added). It never decreases with doc, which lets a full-text
    # search walk docs from the newest added and stop early (WmStore._text_docs).
    # id_key: 64 bits of SHA-256(id). Its index is a fifth the size of one over the
    # ids themselves, which matters because ids (random UUIDs inside) land at random
    # places in it: it stays in the page cache at a million entries. The ids
    # themselves are compared in the records (WmStore.ingest).
    """CREATE TABLE IF NOT EXISTS wm_entries (
        doc           INTEGER PRIMARY KEY,
        id_key        INTEGER NOT NULL,
        seq           INTEGER NOT NULL,
        timestamp_s   REAL NOT NULL,
        ts_bound      REAL NOT NULL,
        plan_id       TEXT,
        intent_id     TEXT,
        session_id    TEXT,
        base_tags     INTEGER NOT NULL,
        approx_tokens INTEGER NOT NULL,
        record        TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS wm_by_id_key ON wm_entries (id_key)",
    "CREATE INDEX IF NOT EXISTS wm_by_time ON wm_entries (timestamp_s, seq)",
    "CREATE INDEX IF NOT EXISTS wm_by_plan ON wm_entries (plan_id, timestamp_s, seq) WHERE plan_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS wm_by_intent ON wm_entries (intent_id, timestamp_s, seq) WHERE intent_id IS NOT NULL",
    """CREATE INDEX IF NOT EXISTS wm_by_session ON wm_entries (session_id, timestamp_s, seq)
        WHERE session_id IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS wm_tags (
        tag         TEXT NOT NULL,
        timestamp_s REAL NOT NULL,
        seq         INTEGER NOT NULL,
        doc         INTEGER NOT NULL,
        PRIMARY KEY (tag, timestamp_s, seq, doc)
    ) STRICT, WITHOUT ROWID""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS wm_fts USING fts5(
        title, content, tags, content='', columnsize=0, tokenize='unicode61 remove_diacritics 2'
    )""",
)
_TABLES = ("wm_entries", "wm_tags", "wm_fts", "wm_stats")
_TIME_INDEX = "wm_by_time"
_SEARCH_INDEXES = (_TIME_INDEX, "wm_by_plan", "wm_by_intent", "wm_by_session")
FTS_AUTOMERGE = 4
"""FTS5's default: merge segments as they accumulate (off only during a bulk load)."""
_INSERT_ENTRY = (
    "INSERT INTO wm_entries (doc, id_key, seq, timestamp_s, ts_bound, plan_id, intent_id, session_id, base_tags,"
    " approx_tokens, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Search:
    """A checked Working Memory search: :meth:`checked` makes one, :meth:`WmStore.find` runs it.

    ``match`` is the full-text expression of the text (:func:`fts_match_expression`);
    ``tags`` are lower case and distinct.
    """

    match: str | None
    tags: tuple[str, ...]
    since: float | None
    until: float | None
    plan_id: str | None
    intent_id: str | None
    session_id: str | None
    limit: int

    @classmethod
    def checked(
        cls,
        text: Any = None,
        tags: Any = None,
        since: Any = None,
        until: Any = None,
        plan_id: Any = None,
        intent_id: Any = None,
        session_id: Any = None,
        limit: Any = DEFAULT_SEARCH_LIMIT,
    ) -> Search:
        """The search the arguments of :meth:`WmStore.search` ask for; :class:`WmQueryError` names a bad one."""
        match = None if text is None else fts_match_expression(text)
        tag_list: tuple[str, ...] = ()
        if tags is not None:
            if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
                raise WmQueryError("tags must be a list of strings", field="tags")
            names = []
            for tag in tags:
                if not isinstance(tag, str) or not tag:
                    raise WmQueryError("each tag must be a non-empty string", field="tags")
                names.append(_checked(tag, "tags").lower())  # stored tags are lower case (WmEntry)
            if not names:
                raise WmQueryError("tags must name at least one tag", field="tags")
            tag_list = tuple(dict.fromkeys(names))
            if len(tag_list) > MAX_QUERY_TAGS:
                raise WmQueryError(f"at most {MAX_QUERY_TAGS} tags", field="tags")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise WmQueryError(f"limit must be an integer from 1 to {MAX_SEARCH_LIMIT}", field="limit")
        return cls(
            match=match,
            tags=tag_list,
            since=_seconds(since, "since"),
            until=_seconds(until, "until"),
            plan_id=None if plan_id is None else _checked(plan_id, "plan_id"),
            intent_id=None if intent_id is None else _checked(intent_id, "intent_id"),
            session_id=None if session_id is None else _checked(session_id, "session_id"),
            limit=limit,
        )

    @property
    def id_filters(self) -> list[tuple[str, str]]:
        """(column, value) of the plan, intent and session filters given."""
        named = (("plan_id", self.plan_id), ("intent_id", self.intent_id), ("session_id", self.session_id))
        return [(column, value) for column, value in named if value is not None]


@dataclass(frozen=True, slots=True)
class Budgets:
    """How much Working Memory keeps: at most ``max_entries`` entries and ``max_tokens`` approx tokens.

    ``None`` means no limit. :meth:`WmStore.ingest` keeps them after adding a
    batch, evicting the oldest entries first (by ``timestamp_s``, then ``seq``),
    and remembers the newest evicted (timestamp_s, seq) as the *eviction mark*;
    later entries at or below the mark are not added. With the mark, what a
    store holds does not depend on how its entries were batched: after any
    sequence of batches it holds the newest entries of all those delivered
    (first copy of each id), as many as fit, which is exactly what one batch of
    them all keeps. (Without it, an old entry arriving after newer ones were
    evicted would come back when the token budget has room; so would an evicted
    entry delivered again.) So the live WM sink, which ingests each delivery,
    and a replay, which ingests the ledger in chunks, hold the same entries.

    One case is left: the same record ingested by two calls (one WM id at two
    seqs) whose first copy was evicted while the mark sat on exactly its
    ``timestamp_s``, between its two seqs, comes back as its second copy.
    Changing the budgets also changes what a rebuild keeps; ``replay`` after a
    change makes the store equal to one.
    """

    max_entries: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, budget in (("max_entries", self.max_entries), ("max_tokens", self.max_tokens)):
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
                raise ValueError(f"{name} must be a non-negative integer or None")

    @classmethod
    def from_settings(cls, max_entries: int, max_tokens: int) -> Budgets | None:
        """The budgets ``wm.max_entries`` / ``wm.max_tokens`` set (0: no limit); None when neither does."""
        if not max_entries and not max_tokens:
            return None
        return cls(max_entries or None, max_tokens or None)


class WmStore:
    """One Working Memory database. Use it from one thread at a time."""

    def __init__(self, path: Path | str, *, durable: bool = True) -> None:
        """Open (creating if needed) a read-write store at ``path``.

        ``durable=False`` relaxes fsync to SQLite's ``synchronous=NORMAL``: a power
        loss may then drop the last commits (never a process crash: WAL). That is
        safe when the cursor lives here (:meth:`cursor`, as the WM sink keeps it):
        a lost tail takes its cursor with it and is delivered again from the
        ledger. Keep the default when a cursor is kept in another file, which
        could then point past entries this one lost.

        A file that holds other tables than a store's is refused
        (``sqlite3.DatabaseError``), and so is a store of another format.
        """
        self.path = Path(path)
        self.readonly = False
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes effect on a new file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            # Checkpoint every 128 MiB of WAL rather than 8: index pages that several
            # batches touch (the id keys land anywhere) are written back once, not each time.
            conn.execute("PRAGMA wal_autocheckpoint=16384")
            _tune(conn)
            conn.execute("BEGIN IMMEDIATE")
            _check_format(conn, self.path)
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO wm_fts (wm_fts, rank) VALUES ('automerge', ?)", (FTS_AUTOMERGE,))
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    @classmethod
    def open_readonly(cls, path: Path | str) -> WmStore:
        """Open an existing store for reading only (SQLite refuses writes too)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no Working Memory store at {path}")
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
        try:
            _tune(conn)
            conn.execute("PRAGMA query_only=ON")
            try:
                row = conn.execute("SELECT value FROM wm_meta WHERE key = 'format'").fetchone()
            except sqlite3.OperationalError:
                row = None
            if row is None or row[0] != str(FORMAT_VERSION):
                raise sqlite3.DatabaseError(f"{path} is not a Working Memory store of format {FORMAT_VERSION}")
        except BaseException:
            conn.close()
            raise
        store = cls.__new__(cls)
        store.path = path
        store.readonly = True
        store._conn = conn
        return store

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> WmStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- writes

    def ingest(
        self, entries: Sequence[WmEntry], budgets: Budgets | None = None, *, next_seq: int | None = None
    ) -> int:
        """Add the entries whose ids are not stored yet and keep ``budgets``, in one transaction.

        ``next_seq``: also move the cursor (:meth:`cursor`) there, in the same transaction.
        Returns how many entries were added (an entry evicted in the same call counts).
        """
        return self.ingest_prepared(prepare(entries), budgets, next_seq=next_seq)

    def ingest_prepared(
        self, prepared: Sequence[PreparedEntry], budgets: Budgets | None = None, *, next_seq: int | None = None
    ) -> int:
        """:meth:`ingest` for entries :func:`prepare` (possibly in another process) already encoded.

        With budgets, an entry at or below the eviction mark is not added (see :class:`Budgets`).
        """
        self._check_writable()
        batch: dict[str, PreparedEntry] = {}
        for entry in prepared:
            batch.setdefault(entry.id, entry)
        if not batch and budgets is None and next_seq is None:
            return 0
        with self._transaction() as conn:
            if next_seq is not None:
                _advance_cursor(conn, next_seq)
            # Entries whose id_key matches, then their actual ids: exact whatever the keys collide.
            known = {
                row[0]
                for row in conn.execute(
                    "SELECT record ->> '$.id' FROM wm_entries WHERE id_key IN (SELECT value FROM json_each(?))",
                    (json.dumps([entry.id_key for entry in batch.values()]),),
                )
            }
            mark = None if budgets is None else _eviction_mark(conn)
            added = [
                entry for entry in batch.values()
                if entry.id not in known and (mark is None or (entry.timestamp_s, entry.seq) > mark)
            ]
            self._insert(conn, added)
            if budgets is not None:
                self._evict(conn, budgets)
        return len(added)

    def _insert(self, conn: sqlite3.Connection, entries: Sequence[PreparedEntry]) -> None:
        """Write new entries (ids not stored yet) into every table, doc numbers continuing from the last."""
        last = conn.execute("SELECT doc, ts_bound FROM wm_entries ORDER BY doc DESC LIMIT 1").fetchone()
        doc, bound = (0, -math.inf) if last is None else (int(last[0]), float(last[1]))
        entry_rows = []
        text_rows = []
        tag_rows = []
        added_sum = 0
        added_tokens = 0
        lateness = 0.0
        for entry in entries:
            doc += 1
            timestamp_s = entry.timestamp_s
            if timestamp_s < bound:
                lateness = max(lateness, bound - timestamp_s)
            else:
                bound = timestamp_s
            for tag in entry.other_tags:
                tag_rows.append((tag, timestamp_s, entry.seq, doc))
            entry_rows.append((
                doc, entry.id_key, entry.seq, timestamp_s, bound, entry.plan_id, entry.intent_id,
                entry.session_id, entry.base_tags, entry.approx_tokens, entry.record,
            ))
            text_rows.append((doc, entry.title, entry.content, entry.tag_text))
            added_sum += entry.digest
            added_tokens += entry.approx_tokens
        conn.executemany(_INSERT_ENTRY, entry_rows)
        conn.executemany("INSERT INTO wm_fts (rowid, title, content, tags) VALUES (?, ?, ?, ?)", text_rows)
        conn.executemany("INSERT INTO wm_tags (tag, timestamp_s, seq, doc) VALUES (?, ?, ?, ?)", tag_rows)
        self._add_stats(conn, len(entry_rows), added_tokens, added_sum, lateness)

    def _evict(self, conn: sqlite3.Connection, budgets: Budgets) -> None:
        """Delete the oldest entries (timestamp_s, then seq, then doc) until both budgets hold; move the mark."""
        entries, tokens, _ = self._stats()
        excess_entries = 0 if budgets.max_entries is None else max(0, entries - budgets.max_entries)
        excess_tokens = 0 if budgets.max_tokens is None else max(0, tokens - budgets.max_tokens)
        if not excess_entries and not excess_tokens:
            return
        victims: list[tuple[int, float, int, str]] = []
        freed_tokens = 0
        oldest = conn.execute(
            "SELECT doc, timestamp_s, seq, approx_tokens, record FROM wm_entries ORDER BY timestamp_s, seq, doc"
        )
        for doc, timestamp_s, seq, entry_tokens, record in _rows(oldest):
            if len(victims) >= excess_entries and freed_tokens >= excess_tokens:
                break
            victims.append((doc, timestamp_s, seq, record))
            freed_tokens += entry_tokens
        oldest.close()
        removed_sum = self._delete(conn, victims)
        self._add_stats(conn, -len(victims), -freed_tokens, -removed_sum)
        _, timestamp_s, seq, _ = victims[-1]  # the newest victim: eviction went in key order
        conn.execute(
            "INSERT OR REPLACE INTO wm_meta (key, value) VALUES (?, ?)", (_MARK_KEY, json.dumps([timestamp_s, seq]))
        )

    @contextmanager
    def bulk_load(self, *, evicting: bool = False) -> Iterator[None]:
        """For a rebuild into an empty store: the search indexes and FTS5 merging wait for the end.

        Inside, the plan, intent, session and time indexes do not exist (ingest needs
        only the id index) and FTS5 does not merge its segments as it goes; at the end
        the indexes are built once, sorted, and the full-text index is optimized into
        one segment. ``evicting`` (the load keeps budgets) keeps the time index:
        each eviction walks it from the oldest entry. A crash inside leaves a store
        that the next open repairs (the schema creates missing indexes; automerge is
        set at every open).
        """
        self._check_writable()
        conn = self._conn
        conn.execute("INSERT INTO wm_fts (wm_fts, rank) VALUES ('automerge', 0)")
        for name in _SEARCH_INDEXES:
            if not (evicting and name == _TIME_INDEX):
                conn.execute(f"DROP INDEX IF EXISTS {name}")
        try:
            yield
        finally:
            with self._transaction() as txn:
                for statement in _SCHEMA:
                    txn.execute(statement)
                txn.execute("INSERT INTO wm_fts (wm_fts) VALUES ('optimize')")
                txn.execute("INSERT INTO wm_fts (wm_fts, rank) VALUES ('automerge', ?)", (FTS_AUTOMERGE,))

    def clear(self) -> None:
        """Remove every entry and the eviction mark (before a rebuild from the ledger); the cursor goes to 0."""
        self._check_writable()
        with self._transaction() as conn:
            conn.execute("DELETE FROM wm_meta WHERE key = ?", (_MARK_KEY,))
            _write_cursor(conn, 0)  # an interrupted rebuild leaves an empty store that the sink refills from 0
            # Dropping truncates; deleting a million rows one by one does not.
            for table in _TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _SCHEMA:
                conn.execute(statement)

    def set_cursor(self, next_seq: int) -> None:
        """Move the cursor (:meth:`cursor`) on its own, e.g. after a rebuild ingested through ``next_seq``."""
        self._check_writable()
        with self._transaction() as conn:
            _write_cursor(conn, next_seq)

    # --- reads

    def cursor(self) -> int | None:
        """The next ledger seq the WM sink is to deliver: every entry below it is in this store (or was
        evicted), none above it. None when no sink wrote one (a store from before the cursor moved here)."""
        row = self._conn.execute("SELECT value FROM wm_meta WHERE key = ?", (_CURSOR_KEY,)).fetchone()
        return None if row is None else int(row[0])

    def count(self) -> int:
        return self._stats()[0]

    def total_tokens(self) -> int:
        return self._stats()[1]

    def digest(self) -> str:
        """Digest of the stored entries, independent of the order they arrived in (O(1))."""
        entries, _, digest_sum = self._stats()
        return _digest(entries, digest_sum)

    def recompute_digest(self) -> str:
        """The digest recomputed from every stored record (O(entries)); equals :meth:`digest`."""
        total = 0
        entries = 0
        for (record,) in self._conn.execute("SELECT record FROM wm_entries"):
            total += int.from_bytes(hashlib.sha256(record.encode("utf-8")).digest(), "big")
            entries += 1
        return _digest(entries, total % _DIGEST_MODULUS)

    def search(
        self,
        text: str | None = None,
        tags: Iterable[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        plan_id: str | None = None,
        intent_id: str | None = None,
        session_id: str | None = None,
        limit: int = DEFAULT_SEARCH_LIMIT,
    ) -> list[dict[str, Any]]:
        """Entries matching every given filter, newest first, at most ``limit``.

        ``text``: every whitespace-separated word must occur (as a phrase of its
        tokens; case and diacritics ignored) in the title, content or tags. User
        text never reaches FTS5 as syntax. ``tags``: the entry carries any of them.
        ``since`` (inclusive) and ``until`` (exclusive) bound ``timestamp_s``.
        Raises :class:`WmQueryError` for unusable arguments.
        """
        return self.find(Search.checked(text, tags, since, until, plan_id, intent_id, session_id, limit))

    def find(self, query: Search) -> list[dict[str, Any]]:
        """:meth:`search` for a search already checked."""
        with self._snapshot():  # one read transaction: a concurrent eviction cannot split the answer
            if query.match is not None:
                docs = self._text_docs(query)
            elif query.tags and not query.id_filters:
                docs = self._tag_docs(query)
            else:
                docs = self._filtered_docs(query)
            return self._records(docs)

    # --- internals

    def _filtered_docs(self, query: Search) -> list[int]:
        """Read an index of wm_entries in (timestamp_s, seq) order; SQLite picks the index."""
        where, params = _entry_filters(query)
        sql = "SELECT e.doc FROM wm_entries AS e"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY e.timestamp_s DESC, e.seq DESC, e.doc DESC LIMIT ?"
        return [doc for (doc,) in self._conn.execute(sql, (*params, query.limit))]

    def _tag_docs(self, query: Search) -> list[int]:
        """Each tag's newest entries straight off an index, merged (an entry may carry several tags)."""
        window = ""
        params: list[Any] = []
        if query.since is not None:
            window += " AND timestamp_s >= ?"
            params.append(query.since)
        if query.until is not None:
            window += " AND timestamp_s < ?"
            params.append(query.until)
        order = " ORDER BY timestamp_s DESC, seq DESC, doc DESC LIMIT ?"
        streams = []
        mask = _base_tag_mask(query.tags)
        if mask:
            sql = f"SELECT timestamp_s, seq, doc FROM wm_entries WHERE (base_tags & ?) != 0{window}{order}"  # noqa: S608 -- constant SQL fragments; values are bound
            streams.append(self._conn.execute(sql, (mask, *params, query.limit)).fetchall())
        sql = f"SELECT timestamp_s, seq, doc FROM wm_tags WHERE tag = ?{window}{order}"  # noqa: S608 -- constant SQL fragments; values are bound
        for tag in query.tags:
            if tag not in _BASE_TAG_BITS:
                streams.append(self._conn.execute(sql, (tag, *params, query.limit)).fetchall())
        docs: list[int] = []
        seen: set[int] = set()
        for _, _, doc in heapq.merge(*streams, reverse=True):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
                if len(docs) == query.limit:
                    break
        return docs

    def _text_docs(self, query: Search) -> list[int]:
        """The newest ``limit`` full-text matches, without sorting every match.

        FTS5 yields matches by doc, and docs follow arrival order, not time. The
        walk goes from the highest doc down keeping the best ``limit`` hits, and
        stops once a row's ``ts_bound`` (an upper bound on the timestamp of that row
        and of every lower doc) is older than the worst kept hit: nothing further
        can enter. Entries arriving roughly in time order (as a ledger replay
        does) make that a walk of about ``limit`` rows.

        Filters narrow the walk to a doc range first. ``since``: no doc below the
        first whose ts_bound reaches it qualifies. ``until``: every row's timestamp
        is at least its ts_bound minus the store's ``max_lateness``, so no doc from
        the first whose ts_bound reaches ``until + max_lateness`` qualifies. A plan,
        intent or session: only docs between its first and last entry.
        """
        where, params = _entry_filters(query)
        where.insert(0, "wm_fts MATCH ?")
        params.insert(0, query.match)
        low: int | None = 0
        high: int | None = None
        if query.since is not None:
            low = self._first_doc_reaching(query.since)
        if query.until is not None:
            lateness = self._conn.execute("SELECT max_lateness FROM wm_stats WHERE singleton = 0").fetchone()[0]
            # One millisecond of slack for the rounding of the subtraction behind max_lateness.
            beyond = self._first_doc_reaching(query.until + lateness + 0.001)
            high = None if beyond is None else beyond - 1
        if query.id_filters:
            terms = " AND ".join(f"{column} = ?" for column, _ in query.id_filters)
            span_sql = f"SELECT min(doc), max(doc) FROM wm_entries WHERE {terms}"  # noqa: S608 -- constant column names; values are bound
            first, last = self._conn.execute(span_sql, [value for _, value in query.id_filters]).fetchone()
            if first is None:
                return []
            low = None if low is None else max(low, first)
            high = last if high is None else min(high, last)
        if low is None:
            return []
        where.append("wm_fts.rowid >= ?")
        params.append(low)
        if high is not None:
            where.append("wm_fts.rowid <= ?")
            params.append(high)
        conditions = " AND ".join(where)
        sql = f"""SELECT e.timestamp_s, e.seq, e.doc, e.ts_bound
            FROM wm_fts JOIN wm_entries AS e ON e.doc = wm_fts.rowid
            WHERE {conditions} ORDER BY wm_fts.rowid DESC"""  # noqa: S608 -- constant SQL fragments; values are bound
        best: list[tuple[float, int, int]] = []  # min-heap of the best `limit` keys
        cursor = self._conn.execute(sql, params)
        try:
            for timestamp_s, seq, doc, ts_bound in _rows(cursor):
                if len(best) == query.limit and ts_bound < best[0][0]:
                    break
                key = (timestamp_s, seq, doc)
                if len(best) < query.limit:
                    heapq.heappush(best, key)
                elif key > best[0]:
                    heapq.heapreplace(best, key)
        finally:
            cursor.close()
        return [doc for _, _, doc in sorted(best, reverse=True)]

    def _first_doc_reaching(self, timestamp_s: float) -> int | None:
        """A doc d such that docs below d have ts_bound < ``timestamp_s`` and docs from d have it >= (None: no doc).

        ts_bound never decreases with doc, so this is a binary search, probing
        "the first doc at or after x" (docs have gaps where entries were evicted).
        """
        top = self._conn.execute("SELECT doc, ts_bound FROM wm_entries ORDER BY doc DESC LIMIT 1").fetchone()
        if top is None or top[1] < timestamp_s:
            return None
        bottom = self._conn.execute("SELECT doc FROM wm_entries ORDER BY doc LIMIT 1").fetchone()
        probe = "SELECT ts_bound FROM wm_entries WHERE doc >= ? ORDER BY doc LIMIT 1"
        low, high = int(bottom[0]), int(top[0])
        while low < high:
            middle = (low + high) // 2
            if self._conn.execute(probe, (middle,)).fetchone()[0] >= timestamp_s:
                high = middle
            else:
                low = middle + 1
        return low

    def _records(self, docs: list[int]) -> list[dict[str, Any]]:
        """The records of ``docs``, in that order."""
        if not docs:
            return []
        rows = self._conn.execute(
            "SELECT doc, record FROM wm_entries WHERE doc IN (SELECT value FROM json_each(?))", (json.dumps(docs),)
        )
        records = dict(rows.fetchall())
        return [json.loads(records[doc]) for doc in docs]

    @staticmethod
    def _delete(conn: sqlite3.Connection, victims: list[tuple[int, float, int, str]]) -> int:
        """Delete rows (doc, timestamp_s, seq, record) from every table; return the sum of their hashes."""
        text_rows: list[tuple[str, int, str, str, str]] = []
        tag_rows: list[tuple[str, float, int, int]] = []
        removed_sum = 0
        for doc, timestamp_s, seq, record in victims:
            fields = json.loads(record)
            tags = fields["tags"]
            # The exact text that was indexed, or the contentless index goes wrong.
            text_rows.append(("delete", doc, fields["title"], fields["content"], " ".join(tags)))
            tag_rows.extend((tag, timestamp_s, seq, doc) for tag in tags if tag not in _BASE_TAG_BITS)
            removed_sum += int.from_bytes(hashlib.sha256(record.encode("utf-8")).digest(), "big")
        conn.executemany("INSERT INTO wm_fts (wm_fts, rowid, title, content, tags) VALUES (?, ?, ?, ?, ?)", text_rows)
        conn.executemany("DELETE FROM wm_tags WHERE tag = ? AND timestamp_s = ? AND seq = ? AND doc = ?", tag_rows)
        conn.executemany("DELETE FROM wm_entries WHERE doc = ?", [(victim[0],) for victim in victims])
        return removed_sum

    def _stats(self) -> tuple[int, int, int]:
        entries, tokens, digest_sum = self._conn.execute(
            "SELECT entries, tokens, digest_sum FROM wm_stats WHERE singleton = 0"
        ).fetchone()
        return int(entries), int(tokens), int.from_bytes(digest_sum, "big")

    def _add_stats(
        self, conn: sqlite3.Connection, entries: int, tokens: int, digest_delta: int, lateness: float = 0.0
    ) -> None:
        _, _, digest_sum = self._stats()
        conn.execute(
            "UPDATE wm_stats SET entries = entries + ?, tokens = tokens + ?, digest_sum = ?,"
            " max_lateness = max(max_lateness, ?) WHERE singleton = 0",
            (entries, tokens, ((digest_sum + digest_delta) % _DIGEST_MODULUS).to_bytes(32, "big"), lateness),
        )

    def _check_writable(self) -> None:
        if self.readonly:
            raise WmReadOnlyError(f"Working Memory store {self.path} is open read-only")

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            if self._conn.in_transaction:
                self._conn.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


def _eviction_mark(conn: sqlite3.Connection) -> tuple[float, int] | None:
    """(timestamp_s, seq) of the newest entry budgets evicted so far, or None."""
    row = conn.execute("SELECT value FROM wm_meta WHERE key = ?", (_MARK_KEY,)).fetchone()
    if row is None:
        return None
    timestamp_s, seq = json.loads(row[0])
    return float(timestamp_s), int(seq)


def _write_cursor(conn: sqlite3.Connection, next_seq: int) -> None:
    conn.execute("INSERT OR REPLACE INTO wm_meta (key, value) VALUES (?, ?)", (_CURSOR_KEY, str(next_seq)))


def _advance_cursor(conn: sqlite3.Connection, next_seq: int) -> None:
    """Move the cursor forward only: two sink hosts that briefly overlap (a daemon was killed and
    restarted) each deliver in order, and a cursor either wrote was true when written."""
    conn.execute(
        "INSERT INTO wm_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
        " SET value = CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
        (_CURSOR_KEY, str(next_seq)),
    )


def _tune(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA busy_timeout=5000")
    # A bigger page cache keeps the index pages of a million-entry store in memory.
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA temp_store=MEMORY")


def _check_format(conn: sqlite3.Connection, path: Path) -> None:
    """Create the format mark in a new file; refuse other files and other formats."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if tables and "wm_meta" not in tables:
        raise sqlite3.DatabaseError(f"{path} is not a Working Memory store (it holds other tables)")
    conn.execute(_SCHEMA[0])
    row = conn.execute("SELECT value FROM wm_meta WHERE key = 'format'").fetchone()
    if row is None:
        conn.execute("INSERT INTO wm_meta (key, value) VALUES ('format', ?)", (str(FORMAT_VERSION),))
    elif row[0] != str(FORMAT_VERSION):
        raise sqlite3.DatabaseError(
            f"{path}: Working Memory format {row[0]} is not supported (this version reads {FORMAT_VERSION}); "
            "remove the file and replay the ledger"
        )


class PreparedEntry(NamedTuple):
    """A WM entry encoded for the store: everything :meth:`WmStore.ingest_prepared` writes but the doc id."""

    id: str
    id_key: int
    seq: int
    timestamp_s: float
    plan_id: str | None
    intent_id: str | None
    session_id: str | None
    base_tags: int
    other_tags: tuple[str, ...]
    approx_tokens: int
    record: str
    digest: int
    title: str
    content: str
    tag_text: str


def prepare(entries: Iterable[WmEntry]) -> list[PreparedEntry]:
    """Encode entries for :meth:`WmStore.ingest_prepared`: pure, so it can run in a worker process."""
    out = []
    for entry in entries:
        record = entry.canonical_bytes()
        base_tags = 0
        other_tags = []
        for tag in entry.tags:
            bit = _BASE_TAG_BITS.get(tag)
            if bit is None:
                other_tags.append(tag)
            else:
                base_tags |= bit
        out.append(PreparedEntry(
            entry.id, _id_key(entry.id), entry.seq, entry.timestamp_s, entry.plan_id, entry.intent_id,
            entry.session_id, base_tags, tuple(other_tags), entry.approx_tokens, record.decode("utf-8"),
            int.from_bytes(hashlib.sha256(record).digest(), "big"), entry.title, entry.content, " ".join(entry.tags),
        ))
    return out


def _id_key(entry_id: str) -> int:
    return int.from_bytes(hashlib.sha256(entry_id.encode("utf-8")).digest()[:8], "big", signed=True)


def _digest(entries: int, digest_sum: int) -> str:
    return hashlib.sha256(_DIGEST_CONTEXT + entries.to_bytes(8, "big") + digest_sum.to_bytes(32, "big")).hexdigest()


def _rows(cursor: sqlite3.Cursor) -> Iterator[tuple[Any, ...]]:
    while chunk := cursor.fetchmany(_STREAM_CHUNK):
        yield from chunk


def _entry_filters(query: Search) -> tuple[list[str], list[Any]]:
    """WHERE terms over ``wm_entries AS e`` for the id filters, the time window and the tags."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in query.id_filters:
        where.append(f"e.{column} = ?")
        params.append(value)
    if query.since is not None:
        where.append("e.timestamp_s >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("e.timestamp_s < ?")
        params.append(query.until)
    if query.tags:
        any_of = []
        mask = _base_tag_mask(query.tags)
        if mask:
            any_of.append("(e.base_tags & ?) != 0")
            params.append(mask)
        others = [tag for tag in query.tags if tag not in _BASE_TAG_BITS]
        if others:
            marks = ", ".join("?" * len(others))
            any_of.append(
                f"EXISTS (SELECT 1 FROM wm_tags AS t WHERE t.tag IN ({marks}) AND t.timestamp_s = e.timestamp_s"  # noqa: S608 -- placeholders only
                " AND t.seq = e.seq AND t.doc = e.doc)"
            )
            params.extend(others)
        where.append("(" + " OR ".join(any_of) + ")")
    return where, params


def _base_tag_mask(tags: Iterable[str]) -> int:
    mask = 0
    for tag in tags:
        mask |= _BASE_TAG_BITS.get(tag, 0)
    return mask


def fts_match_expression(text: str) -> str:
    """An FTS5 query that matches ``text`` as plain words (every word, as a phrase of its tokens).

    Each whitespace-separated word is wrapped in double quotes (inner quotes
    doubled), so FTS5 operators, column filters, ``*``, ``^`` and parentheses in
    user text are only ever characters to tokenize. Words without a token
    character (letters, digits, private-use characters: the unicode61 tokenizer's
    defaults) are dropped; text left with no word raises :class:`WmQueryError`.
    """
    text = _checked(text, "text")
    # NUL ends an FTS5 string literal; it is a separator anyway.
    words = [word for word in text.replace("\x00", " ").split() if any(map(_is_token_char, word))]
    if not words:
        raise WmQueryError("text has no word to search for (only spaces or punctuation)", field="text")
    if len(words) > MAX_QUERY_WORDS:
        raise WmQueryError(f"text has more than {MAX_QUERY_WORDS} words", field="text")
    return " ".join('"' + word.replace('"', '""') + '"' for word in words)


def _is_token_char(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] in "LN" or category == "Co"


_checked = WmQueryError.check_string
"""A string SQLite can bind and FTS5 can read (UTF-8 encodable), or :class:`WmQueryError`."""


def _seconds(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WmQueryError(f"{field} must be a number of seconds", field=field)
    try:
        seconds = float(value)
    except OverflowError:
        raise WmQueryError(f"{field} is out of range", field=field) from None
    if not math.isfinite(seconds):
        raise WmQueryError(f"{field} must be finite", field=field)
    return seconds


# --- one read of a store file (the socket op, the HTTP route and the CLI)

SEARCH_FIELDS = frozenset({"text", "tags", "since", "until", "plan_id", "intent_id", "session_id", "limit"})
"""The arguments of :meth:`Search.checked`, as a request names them."""


def search(path: Path, query: Search) -> list[dict[str, Any]]:
    """The entries of the store at ``path`` that ``query`` finds."""
    with _open(path) as wm:
        return wm.find(query)


def digest(path: Path) -> dict[str, Any]:
    """The digest and entry count of the store at ``path``."""
    with _open(path) as wm:
        return {"digest": wm.digest(), "entries": wm.count()}


def _open(path: Path) -> WmStore:
    if not path.exists():
        raise NotFound(f"no Working Memory at {path} (is wm.enabled on, or has it been rebuilt?)")
    return WmStore.open_readonly(path)
