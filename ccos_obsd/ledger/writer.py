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
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ccos_obsd.actions import KEY_ROTATED, ValidatedAction, content_of_entry, new_action_id
from ccos_obsd.errors import Conflict, Internal, InvalidAction, RequestError, Unavailable
from ccos_obsd.ledger.canonical import NotCanonicalizable, canonical_bytes
from ccos_obsd.ledger.hashing import HASH_SIZE, Hash, chain_hash, entry_signed_message, leaf_hash
from ccos_obsd.ledger.keys import SigningKey, replace_signing_key
from ccos_obsd.ledger.merkle import TileAppend, TileId, TreeBuilder, root_from_reader, tile_appends
from ccos_obsd.ledger.note import Checkpoint, sign_checkpoint
from ccos_obsd.ledger.store import ENTRY_FORMAT_VERSION, Head, connect, hash_reader, latest_checkpoint, read_head

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
class _RotateKey:
    peer: dict[str, int] | None
    future: asyncio.Future[AppendOutcome]


def _set_result(future: asyncio.Future[AppendOutcome], outcome: AppendOutcome) -> None:
    if not future.done():
        future.set_result(outcome)


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


@dataclass(slots=True)
class _Group:
    """Requests taken from the queue together: prepared, being signed, then committed."""

    requests: list[_Request]
    outcomes: list[list[AppendOutcome | None]]
    new_entries: list[_NewEntry]
    head_after: Head
    recorded_ms: int
    signing: Future[None] | None = None


class LedgerWriter:
    """Owns the read-write ledger connection and the thread that uses it.

    The writer thread pipelines two groups: while group N is inserted and
    committed (SQLite and fsync, mostly without the GIL), group N+1 is already
    encoded, hashed and being signed on the signing threads. Group N+1 is
    prepared on top of N's uncommitted head; if N's commit fails, N+1 fails with
    it and the head falls back to the last committed entry.
    """

    def __init__(
        self,
        db_path: Path,
        signing_key: SigningKey,
        loop: asyncio.AbstractEventLoop,
        *,
        max_group: int = 4096,
        on_commit: CommitListener | None = None,
        signing_mode: str = "entry",
        checkpoint_interval_s: float = 1.0,
        key_path: Path | None = None,
    ) -> None:
        self._conn = connect(db_path, readonly=False)
        self._key = signing_key
        self._loop = loop
        self._max_group = max_group
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Request | _RotateKey | None] = queue.SimpleQueue()
        self._key_path = key_path
        self._rotation: _RotateKey | None = None
        self._head = read_head(self._conn)
        self._prepared_head = self._head
        self._last_recorded_ms = 0
        self._uncommitted: dict[str, _NewEntry] = {}
        self._sign_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ccos-sign")
        self._thread = threading.Thread(target=self._run, name="ccos-ledger-writer", daemon=True)
        self.pending_actions = 0
        """Actions submitted and not yet answered (read and written on the event loop)."""
        self._register_key()
        self._sign_entries = signing_mode == "entry"
        self._checkpoint_interval_s = checkpoint_interval_s
        self._tree = self._open_tree()
        latest = latest_checkpoint(self._conn)
        self._checkpointed_size = 0 if latest is None else latest.size
        self._last_checkpoint_at = float("-inf")
        self.latest_checkpoint: str | None = None if latest is None else latest.note
        """The latest signed checkpoint note (read from other threads: one reference, swapped whole)."""
        self._uncovered_since: float | None = None
        if self._head.size > self._checkpointed_size:
            self._uncovered_since = time.time() if latest is None else latest.created_at_ms / 1000

    def checkpoint_age(self) -> float:
        """Seconds the oldest entry no signed checkpoint covers has waited (0: all covered)."""
        since = self._uncovered_since
        return 0.0 if since is None else max(0.0, time.time() - since)

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

    def rotate_key(self, peer: dict[str, int] | None) -> asyncio.Future[AppendOutcome]:
        """Switch to a new signing key after every append queued before this call.

        The future resolves to the rotation entry's append result (or an error).
        """
        future: asyncio.Future[AppendOutcome] = self._loop.create_future()
        self._queue.put(_RotateKey(peer, future))
        return future

    @property
    def key(self) -> SigningKey:
        return self._key

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

    # --- the writer thread

    def _run(self) -> None:
        in_flight: _Group | None = None
        stopping = False
        while True:
            block = in_flight is None and not stopping
            requests = self._take(block=block, timeout=self._checkpoint_wait() if block else None)
            if requests is None:
                stopping = True
                requests = []
            prepared = self._prepare(requests) if requests else None
            if in_flight is not None:
                committed = self._finish(in_flight)
                if not committed and prepared is not None:
                    self._fail(prepared, Unavailable("an earlier commit failed; the action was not appended"))
                    prepared = None
            in_flight = prepared
            if self._rotation is not None:
                if in_flight is not None:
                    self._finish(in_flight)
                    in_flight = None
                rotation, self._rotation = self._rotation, None
                self._rotate(rotation)
            if in_flight is None and (stopping or self._checkpoint_wait() == 0.0):
                self._write_checkpoint()
            if stopping and in_flight is None:
                return

    def _checkpoint_wait(self) -> float | None:
        """Seconds until the pending checkpoint is due (0: now); None when none is pending."""
        if self._tree.size <= self._checkpointed_size:
            return None
        due = self._last_checkpoint_at + self._checkpoint_interval_s
        return max(0.0, due - time.monotonic())

    def _take(self, *, block: bool, timeout: float | None = None) -> list[_Request] | None:
        """Up to ``max_group`` actions' worth of requests; None once close() was called."""
        requests: list[_Request] = []
        count = 0
        try:
            item = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
        except queue.Empty:
            return requests
        while True:
            if item is None:
                return None if not requests else self._put_back_stop(requests)
            if isinstance(item, _RotateKey):
                self._rotation = item  # handled once everything taken before it is committed
                return requests
            requests.append(item)
            count += len(item.actions)
            if count >= self._max_group:
                return requests
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return requests

    def _put_back_stop(self, requests: list[_Request]) -> list[_Request]:
        self._queue.put(None)  # seen again on the next take, after these are written
        return requests

    def _prepare(self, requests: list[_Request]) -> _Group:
        """Assign seqs, encode, hash and start signing; answer duplicates and conflicts."""
        outcomes: list[list[AppendOutcome | None]] = [[None] * len(r.actions) for r in requests]
        new_entries: list[_NewEntry] = []
        uncommitted = self._uncommitted
        next_seq, previous = self._prepared_head.size, self._prepared_head.chain_hash
        now_ms = max(int(time.time() * 1000), self._last_recorded_ms)
        self._last_recorded_ms = now_ms
        lookup = self._conn.execute
        for r_index, request in enumerate(requests):
            for a_index, action in enumerate(request.actions):
                if action.client_action_id:
                    earlier = uncommitted.get(action.action_id)
                    if earlier is not None:
                        outcomes[r_index][a_index] = _duplicate_or_conflict(
                            action, earlier.action.content(), earlier.seq, earlier.leaf, earlier.chain
                        )
                        continue
                    row = lookup(
                        "SELECT seq, entry, leaf_hash, chain_hash FROM entries WHERE action_id = ?",
                        (action.action_id,),
                    ).fetchone()
                    if row is not None:
                        seq, stored, leaf, chain = row
                        outcomes[r_index][a_index] = _duplicate_or_conflict(
                            action, content_of_entry(json.loads(stored)), seq, Hash(bytes(leaf)), Hash(bytes(chain))
                        )
                        continue
                fields = dict(action.fields)
                fields["v"] = ENTRY_FORMAT_VERSION
                fields["seq"] = next_seq
                fields["recorded_at_ms"] = now_ms
                if request.peer is not None:
                    fields["peer"] = request.peer
                try:
                    entry = canonical_bytes(fields, keys_checked=True)
                except NotCanonicalizable as exc:
                    outcomes[r_index][a_index] = InvalidAction(f"action is not representable as canonical JSON: {exc}")
                    continue
                leaf = leaf_hash(entry)
                previous = chain_hash(previous, leaf)
                new = _NewEntry((r_index, a_index), action, fields, entry, leaf, previous, next_seq)
                new_entries.append(new)
                uncommitted[action.action_id] = new
                next_seq += 1
        head_after = Head(next_seq, previous)
        self._prepared_head = head_after
        group = _Group(requests, outcomes, new_entries, head_after, now_ms)
        if new_entries and self._sign_entries:
            group.signing = self._start_signing(new_entries)
        return group

    def _start_signing(self, new_entries: list[_NewEntry]) -> Future[None]:
        sign = self._key.sign

        def sign_all(chunk: list[_NewEntry]) -> None:
            for new in chunk:
                new.signature = sign(entry_signed_message(new.chain))

        if len(new_entries) < _PARALLEL_SIGN_MIN:
            return self._sign_pool.submit(sign_all, new_entries)
        half = len(new_entries) // 2
        first = self._sign_pool.submit(sign_all, new_entries[:half])
        second = self._sign_pool.submit(sign_all, new_entries[half:])
        done: Future[None] = Future()

        def both(_: Future[None]) -> None:
            if first.done() and second.done() and not done.done():
                error = first.exception() or second.exception()
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

        first.add_done_callback(both)
        second.add_done_callback(both)
        return done

    def _finish(self, group: _Group) -> bool:
        """Wait for the signatures, commit, notify, answer. False if the commit failed."""
        try:
            if group.new_entries:
                started = time.perf_counter()
                if group.signing is not None:
                    group.signing.result()
                try:
                    nodes = self._tree.extend_stored(n.leaf for n in group.new_entries)
                    checkpoint = self._sign_checkpoint() if self._checkpoint_wait() == 0.0 else None
                    self._insert(group.new_entries, tile_appends(nodes, skip_leaf_tiles=True), checkpoint)
                except sqlite3.Error as exc:
                    self._rollback()
                    log.error("ledger_write_failed", error=str(exc), entries=len(group.new_entries))
                    cause = _describe(exc)
                    self._fail(group, Unavailable(f"ledger write failed ({cause}); the action was not appended"))
                    self._resync_head()
                    return False
                if checkpoint is not None:
                    self._checkpoint_written(checkpoint)
                elif self._uncovered_since is None:
                    self._uncovered_since = time.time()
                commit_seconds = time.perf_counter() - started
                self._head = group.head_after
                for new in group.new_entries:
                    group.outcomes[new.index[0]][new.index[1]] = AppendResult(
                        new.seq, new.action.action_id, new.leaf, new.chain, False
                    )
                    self._uncommitted.pop(new.action.action_id, None)
                if self._on_commit is not None:
                    entries = [CommittedEntry(n.seq, n.fields, n.leaf, n.chain) for n in group.new_entries]
                    self._on_commit(entries, commit_seconds)
        except Exception as exc:
            log.exception("ledger_write_internal_error")
            self._rollback()
            self._fail(group, Internal(f"internal error while writing: {type(exc).__name__}"))
            self._resync_head()
            return False
        self._answer(group)
        return True

    def _fail(self, group: _Group, error: RequestError) -> None:
        """Answer ``error`` for the group's new entries (and duplicates of them); reset the head."""
        failed_seqs = {n.seq for n in group.new_entries}
        for new in group.new_entries:
            group.outcomes[new.index[0]][new.index[1]] = error
        for row in group.outcomes:
            for i, outcome in enumerate(row):
                if isinstance(outcome, AppendResult) and outcome.duplicate and outcome.seq >= self._head.size:
                    row[i] = error
        self._uncommitted = {k: v for k, v in self._uncommitted.items() if v.seq not in failed_seqs}
        if not self._uncommitted:
            self._prepared_head = self._head
        self._answer(group)

    def _answer(self, group: _Group) -> None:
        outcomes = [[o if o is not None else Internal("no outcome") for o in row] for row in group.outcomes]
        self._loop.call_soon_threadsafe(self._resolve, group.requests, outcomes)

    def _resolve(self, requests: list[_Request], outcomes: list[list[AppendOutcome]]) -> None:
        for request, result in zip(requests, outcomes, strict=True):
            self.pending_actions -= len(request.actions)
            if not request.future.done():
                request.future.set_result(result)

    def _insert(
        self,
        new_entries: list[_NewEntry],
        tiles: dict[TileId, TileAppend],
        checkpoint: tuple[int, Hash, str] | None,
    ) -> None:
        """One transaction: the entries, the tree tiles they complete, and maybe a checkpoint."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        self._insert_rows(new_entries)
        self._write_tiles(tiles)
        if checkpoint is not None:
            self._insert_checkpoint(checkpoint)
        conn.execute("COMMIT")

    def _insert_rows(self, new_entries: list[_NewEntry]) -> None:
        key_id = self._key.key_id
        rows = []
        for new in new_entries:
            f = new.fields
            rows.append((
                new.seq, f["action_id"], new.entry, new.leaf, new.chain, key_id, new.signature, f["action_type"],
                f.get("parent_action_id"), f.get("session_id"), f.get("plan_id"), f.get("intent_id"),
                f.get("function_name"), f.get("cost"), f.get("timestamp_ms", f["recorded_at_ms"]),
            ))
        self._conn.executemany(
            "INSERT INTO entries (seq, action_id, entry, leaf_hash, chain_hash, key_id, signature,"
            " action_type, parent_action_id, session_id, plan_id, intent_id,"
            " function_name, cost, time_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def _write_tiles(self, tiles: dict[TileId, TileAppend]) -> None:
        for tile, append in tiles.items():
            row = self._conn.execute(
                "SELECT data FROM tiles WHERE level = ? AND idx = ?", (tile.level, tile.index)
            ).fetchone()
            kept = b"" if row is None else bytes(row[0])[: append.offset * HASH_SIZE]
            self._conn.execute(
                "INSERT OR REPLACE INTO tiles (level, idx, data) VALUES (?, ?, ?)",
                (tile.level, tile.index, kept + append.hashes),
            )

    # --- key rotation

    def _rotate(self, rotation: _RotateKey) -> None:
        """Append a KeyRotated entry signed by the old key; the new key signs from the next seq.

        The new key file is in place (fsynced) before the ledger commit: after a crash
        at any point, start-up registers whichever key the file holds from the head on,
        so the key ring's ranges always match the signatures.
        """
        outcome: AppendOutcome
        try:
            outcome = self._rotate_or_raise(rotation)
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            log.error("key_rotation_failed", error=str(exc))
            outcome = Unavailable(f"key rotation failed ({exc})")
            self._resync_head()
        except Exception as exc:
            log.exception("key_rotation_internal_error")
            self._rollback()
            outcome = Internal(f"internal error during key rotation: {type(exc).__name__}")
            self._resync_head()
        self._loop.call_soon_threadsafe(_set_result, rotation.future, outcome)

    def _rotate_or_raise(self, rotation: _RotateKey) -> AppendOutcome:
        if self._key_path is None:
            return Unavailable("this writer has no key file to rotate")
        old = self._key
        new = SigningKey.generate(old.verifier.name)
        replace_signing_key(self._key_path, new)
        seq = self._head.size
        now_ms = max(int(time.time() * 1000), self._last_recorded_ms)
        fields: dict[str, Any] = {
            "action_type": KEY_ROTATED,
            "action_id": new_action_id(),
            "metadata": {"old_key": old.verifier.vkey(), "new_key": new.verifier.vkey()},
            "v": ENTRY_FORMAT_VERSION,
            "seq": seq,
            "recorded_at_ms": now_ms,
        }
        if rotation.peer is not None:
            fields["peer"] = rotation.peer
        entry = canonical_bytes(fields, keys_checked=True)
        leaf = leaf_hash(entry)
        chain = chain_hash(self._head.chain_hash, leaf)
        new_entry = _NewEntry((0, 0), ValidatedAction(fields, True), fields, entry, leaf, chain, seq)
        new_entry.signature = old.sign(entry_signed_message(chain)) if self._sign_entries else None
        started = time.perf_counter()
        nodes = self._tree.extend_stored([leaf])
        # The old key's last act: a checkpoint over everything through the rotation entry.
        checkpoint = self._sign_checkpoint()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._insert_rows([new_entry])
            self._write_tiles(tile_appends(nodes, skip_leaf_tiles=True))
            self._insert_checkpoint(checkpoint)
            self._conn.execute("UPDATE keys SET last_seq = ? WHERE key_id = ?", (seq, old.key_id))
            self._conn.execute(
                "INSERT OR REPLACE INTO keys (key_id, vkey, first_seq, last_seq, added_at_ms)"
                " VALUES (?, ?, ?, NULL, ?)",
                (new.key_id, new.verifier.vkey(), seq + 1, now_ms),
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._key = new
        self._head = self._prepared_head = Head(seq + 1, chain)
        self._checkpoint_written(checkpoint)
        self._last_recorded_ms = now_ms
        log.warning("signing_key_rotated", seq=seq, old_key=old.verifier.vkey(), new_key=new.verifier.vkey())
        if self._on_commit is not None:
            self._on_commit([CommittedEntry(seq, fields, leaf, chain)], time.perf_counter() - started)
        return AppendResult(seq, fields["action_id"], leaf, chain, False)

    # --- Merkle tree and checkpoints

    def _open_tree(self) -> TreeBuilder:
        """Resume the tree from its stored tiles, or rebuild them (a ledger from before tiles)."""
        size = self._head.size
        try:
            reader = hash_reader(self._conn)
            tree = TreeBuilder.from_reader(size, reader)
            latest = latest_checkpoint(self._conn)
            if latest is None or latest.size > size or root_from_reader(latest.size, reader) == latest.root_hash:
                return tree
            log.warning("merkle_tiles_disagree_with_checkpoint", checkpoint_size=latest.size)
        except ValueError:
            log.warning("merkle_tiles_unreadable", entries=size)
        tree = TreeBuilder()
        nodes = tree.extend_stored(
            bytes(row[0]) for row in self._conn.execute("SELECT leaf_hash FROM entries ORDER BY seq")
        )
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("DELETE FROM tiles")
            self._write_tiles(tile_appends(nodes, skip_leaf_tiles=True))
        log.info("merkle_tree_rebuilt", entries=size)
        return tree

    def _sign_checkpoint(self) -> tuple[int, Hash, str]:
        size, root = self._tree.size, self._tree.root()
        note = sign_checkpoint(Checkpoint(self._key.verifier.name, size, root), self._key)
        return size, root, note

    def _insert_checkpoint(self, checkpoint: tuple[int, Hash, str]) -> None:
        size, root, note = checkpoint
        self._conn.execute(
            "INSERT OR REPLACE INTO checkpoints (size, root_hash, note, key_id, created_at_ms) VALUES (?, ?, ?, ?, ?)",
            (size, root, note, self._key.key_id, int(time.time() * 1000)),
        )

    def _checkpoint_written(self, checkpoint: tuple[int, Hash, str]) -> None:
        self._checkpointed_size = checkpoint[0]
        self._uncovered_since = None if checkpoint[0] >= self._tree.size else time.time()
        self._last_checkpoint_at = time.monotonic()
        self.latest_checkpoint = checkpoint[2]

    def _write_checkpoint(self) -> None:
        """A checkpoint on its own (the interval ran out after the last commit, or shutdown)."""
        if self._tree.size <= self._checkpointed_size or self._tree.size != self._head.size:
            return
        checkpoint = self._sign_checkpoint()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._insert_checkpoint(checkpoint)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.error("checkpoint_write_failed", error=str(exc), size=checkpoint[0])
            self._last_checkpoint_at = time.monotonic()  # retry after another interval
            return
        self._checkpoint_written(checkpoint)

    def _resync_head(self) -> None:
        """After a failed commit, take the head from the database, not from memory.

        A commit whose fsync reported an error may still have reached the disk; its
        entries were not acknowledged, and a client that retries them gets
        ``duplicate`` answers rather than a second copy.
        """
        try:
            head = read_head(self._conn)
        except sqlite3.Error as exc:
            log.error("ledger_head_unreadable", error=str(exc))
            return
        if head != self._head:
            log.warning("ledger_head_resynced", entries=head.size, expected=self._head.size)
        self._head = head
        if not self._uncommitted:
            self._prepared_head = head
        try:
            self._tree = self._open_tree()
        except sqlite3.Error as exc:
            log.error("merkle_tree_unreadable", error=str(exc))

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("ledger_rollback_failed", error=str(exc))


def _duplicate_or_conflict(
    action: ValidatedAction, content: bytes, seq: int, leaf: Hash, chain: Hash
) -> AppendOutcome:
    if action.content() == content:
        return AppendResult(seq, action.action_id, leaf, chain, True)
    return Conflict(
        f"action_id {action.action_id!r} is already in the ledger (seq {seq}) with different content",
        field="action_id",
    )


def _describe(exc: sqlite3.Error) -> str:
    """SQLite's message, with its extended code when it says more (SQLITE_IOERR_WRITE: EFBIG, EIO...)."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc}, {name}" if name else str(exc)
