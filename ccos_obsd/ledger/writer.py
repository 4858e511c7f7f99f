"""The single ledger writer: group commit on its own thread.

Appends from every connection go into one queue. The writer thread takes all
that is waiting (up to ``max_group`` actions), turns each action into entry
bytes, leaf hash, chain hash and signature, inserts the lot in one SQLite
transaction, commits (fsync), and only then resolves the callers' futures on the
event loop. While it commits, the next group accumulates: the more load, the
larger the groups, the fewer fsyncs per action.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ccos_obsd.actions import ValidatedAction
from ccos_obsd.errors import Conflict, Internal, RequestError, Unavailable
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import Hash, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import SigningKey
from ccos_obsd.ledger.store import ENTRY_FORMAT_VERSION, Head, connect, read_head

log = structlog.get_logger("ccos_obsd.ledger")

_PARALLEL_SIGN_MIN = 64
"""Groups at least this large are signed on two threads (Ed25519 signing releases the GIL)."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    seq: int
    action_id: str
    leaf_hash: Hash
    chain_hash: Hash
    duplicate: bool

    def to_wire(self) -> dict[str, Any]:
        return {
            "ok": True,
            "seq": self.seq,
            "action_id": self.action_id,
            "leaf_hash": self.leaf_hash.hex(),
            "chain_hash": self.chain_hash.hex(),
            "duplicate": self.duplicate,
        }


AppendOutcome = AppendResult | RequestError


@dataclass(frozen=True, slots=True)
class CommittedEntry:
    """An entry just made durable, handed to the commit listeners (metrics, logs)."""

    seq: int
    fields: dict[str, Any]
    leaf_hash: Hash
    chain_hash: Hash


@dataclass(slots=True)
class _Request:
    actions: Sequence[ValidatedAction]
    peer: dict[str, int] | None
    future: asyncio.Future[list[AppendOutcome]]


@dataclass(slots=True)
class _NewEntry:
    index: tuple[int, int]
    action: ValidatedAction
    fields: dict[str, Any]
    entry: bytes
    leaf: Hash
    chain: Hash
    seq: int
    signature: bytes | None = None


CommitListener = Callable[[Sequence[CommittedEntry], float], None]


class LedgerWriter:
    """Owns the read-write ledger connection and the thread that uses it."""

    def __init__(
        self,
        db_path: Path,
        signing_key: SigningKey,
        loop: asyncio.AbstractEventLoop,
        *,
        max_group: int = 4096,
        on_commit: CommitListener | None = None,
    ) -> None:
        self._conn = connect(db_path, readonly=False)
        self._key = signing_key
        self._loop = loop
        self._max_group = max_group
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._head = read_head(self._conn)
        self._last_recorded_ms = 0
        self._sign_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccos-sign")
        self._thread = threading.Thread(target=self._run, name="ccos-ledger-writer", daemon=True)
        self.pending_actions = 0
        """Actions submitted and not yet answered (read and written on the event loop)."""
        self._register_key()

    @property
    def head(self) -> Head:
        """The committed head (entries in the ledger, last chain hash)."""
        return self._head

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, actions: Sequence[ValidatedAction], peer: dict[str, int] | None
    ) -> asyncio.Future[list[AppendOutcome]]:
        """Queue ``actions`` for the next group; the future resolves after the commit."""
        future: asyncio.Future[list[AppendOutcome]] = self._loop.create_future()
        self.pending_actions += len(actions)
        self._queue.put(_Request(actions, peer, future))
        return future

    def close(self) -> None:
        """Commit what is queued, then stop the thread and close the database."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._sign_pool.shutdown()
        self._conn.close()

    def _register_key(self) -> None:
        row = self._conn.execute("SELECT 1 FROM keys WHERE key_id = ?", (self._key.key_id,)).fetchone()
        if row is None:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    "UPDATE keys SET last_seq = ? WHERE last_seq IS NULL", (self._head.size - 1,)
                )
                self._conn.execute(
                    "INSERT INTO keys (key_id, vkey, first_seq, last_seq, added_at_ms) VALUES (?, ?, ?, NULL, ?)",
                    (self._key.key_id, self._key.verifier.vkey(), self._head.size, int(time.time() * 1000)),
                )

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            count = len(first.actions)
            while count < self._max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                group.append(item)
                count += len(item.actions)
            try:
                outcomes = self._commit_group(group)
            except Exception as exc:
                log.exception("ledger_write_internal_error")
                error = Internal(f"internal error while writing: {type(exc).__name__}")
                outcomes = [[error] * len(request.actions) for request in group]
            self._loop.call_soon_threadsafe(self._resolve, group, outcomes)

    def _resolve(self, group: list[_Request], outcomes: list[list[AppendOutcome]]) -> None:
        for request, result in zip(group, outcomes, strict=True):
            self.pending_actions -= len(request.actions)
            if not request.future.done():
                request.future.set_result(result)

    def _commit_group(self, group: list[_Request]) -> list[list[AppendOutcome]]:
        outcomes: list[list[AppendOutcome | None]] = [[None] * len(r.actions) for r in group]
        new_entries: list[_NewEntry] = []
        in_group: dict[str, _NewEntry] = {}
        head = self._head
        next_seq, previous = head.size, head.chain_hash
        now_ms = max(int(time.time() * 1000), self._last_recorded_ms)
        lookup = self._conn.execute
        for r_index, request in enumerate(group):
            for a_index, action in enumerate(request.actions):
                if action.client_action_id:
                    earlier = in_group.get(action.action_id)
                    if earlier is not None:
                        outcomes[r_index][a_index] = _duplicate_or_conflict(
                            action, earlier.action.content, earlier.seq, earlier.leaf, earlier.chain
                        )
                        continue
                    row = lookup(
                        "SELECT seq, content_hash, leaf_hash, chain_hash FROM entries WHERE action_id = ?",
                        (action.action_id,),
                    ).fetchone()
                    if row is not None:
                        outcomes[r_index][a_index] = _stored_duplicate_or_conflict(action, row)
                        continue
                fields = dict(action.fields)
                fields["v"] = ENTRY_FORMAT_VERSION
                fields["seq"] = next_seq
                fields["recorded_at_ms"] = now_ms
                if request.peer is not None:
                    fields["peer"] = request.peer
                entry = canonical_bytes(fields)
                leaf = leaf_hash(entry)
                previous = chain_hash(previous, leaf)
                new = _NewEntry((r_index, a_index), action, fields, entry, leaf, previous, next_seq)
                new_entries.append(new)
                in_group[action.action_id] = new
                next_seq += 1
        if new_entries:
            started = time.perf_counter()
            try:
                self._sign(new_entries)
                self._insert(new_entries)
            except sqlite3.Error as exc:
                self._rollback()
                log.error("ledger_write_failed", error=str(exc), entries=len(new_entries))
                failure = Unavailable(f"ledger write failed ({exc}); the action was not appended")
                for new in new_entries:
                    outcomes[new.index[0]][new.index[1]] = failure
                # Later duplicates of a failed entry must fail too, not point at it.
                return [[failure if o is None or _points_into(o, new_entries) else o for o in row]
                        for row in outcomes]
            commit_seconds = time.perf_counter() - started
            self._head = Head(next_seq, previous)
            self._last_recorded_ms = now_ms
            for new in new_entries:
                outcomes[new.index[0]][new.index[1]] = AppendResult(
                    new.seq, new.action.action_id, new.leaf, new.chain, False
                )
            if self._on_commit is not None:
                committed = [CommittedEntry(n.seq, n.fields, n.leaf, n.chain) for n in new_entries]
                self._on_commit(committed, commit_seconds)
        return [[o if o is not None else Internal("no outcome") for o in row] for row in outcomes]

    def _sign(self, new_entries: list[_NewEntry]) -> None:
        sign = self._key.sign
        if len(new_entries) >= _PARALLEL_SIGN_MIN:
            half = len(new_entries) // 2
            first_half = self._sign_pool.submit(
                lambda: [sign(entry_signed_message(n.chain)) for n in new_entries[:half]]
            )
            for new in new_entries[half:]:
                new.signature = sign(entry_signed_message(new.chain))
            for new, signature in zip(new_entries[:half], first_half.result(), strict=True):
                new.signature = signature
        else:
            for new in new_entries:
                new.signature = sign(entry_signed_message(new.chain))

    def _insert(self, new_entries: list[_NewEntry]) -> None:
        key_id = self._key.key_id
        rows = []
        for new in new_entries:
            f = new.fields
            rows.append((
                new.seq, f["action_id"], new.entry, new.leaf, new.chain, key_id, new.signature,
                hashlib.sha256(new.action.content).digest(), f["action_type"],
                f.get("parent_action_id"), f.get("session_id"), f.get("plan_id"), f.get("intent_id"),
                f.get("function_name"), f.get("cost"), f.get("timestamp_ms", f["recorded_at_ms"]),
            ))
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.executemany(
            "INSERT INTO entries (seq, action_id, entry, leaf_hash, chain_hash, key_id, signature,"
            " content_hash, action_type, parent_action_id, session_id, plan_id, intent_id,"
            " function_name, cost, time_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("ledger_rollback_failed", error=str(exc))


def _duplicate_or_conflict(
    action: ValidatedAction, content: bytes, seq: int, leaf: Hash, chain: Hash
) -> AppendOutcome:
    if action.content == content:
        return AppendResult(seq, action.action_id, leaf, chain, True)
    return Conflict(
        f"action_id {action.action_id!r} is already in the ledger (seq {seq}) with different content",
        field="action_id",
    )


def _stored_duplicate_or_conflict(action: ValidatedAction, row: tuple[Any, ...]) -> AppendOutcome:
    seq, content_hash, leaf, chain = row
    if hashlib.sha256(action.content).digest() == bytes(content_hash):
        return AppendResult(seq, action.action_id, Hash(bytes(leaf)), Hash(bytes(chain)), True)
    return Conflict(
        f"action_id {action.action_id!r} is already in the ledger (seq {seq}) with different content",
        field="action_id",
    )


def _points_into(outcome: AppendOutcome, failed: list[_NewEntry]) -> bool:
    return isinstance(outcome, AppendResult) and outcome.duplicate and outcome.seq >= failed[0].seq
