"""The single ledger writer: group commit on its own thread.

Appends from every connection go into one queue. The writer thread takes all
that is waiting (up to ``max_group`` actions), turns each action into entry
bytes, leaf hash and chain hash (``entry.build_entry``) and a signature, inserts
the lot in one SQLite transaction (``store``), commits (fsync), and only then
resolves the callers' futures on the event loop. While it commits, the next group accumulates: the more load, the
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

from ccos_obsd.errors import Conflict, Internal, InvalidAction, NotCanonicalizable, RequestError, Unavailable
from ccos_obsd.ledger import store
from ccos_obsd.ledger.entry import NewEntry, ValidatedAction, build_entry, content_of_entry, key_rotated_action
from ccos_obsd.ledger.hashing import Hash, entry_signed_message
from ccos_obsd.ledger.keys import SigningKey, replace_signing_key
from ccos_obsd.ledger.merkle import TileAppend, TileId, TreeBuilder, root_from_reader, tile_appends
from ccos_obsd.ledger.note import Checkpoint, sign_checkpoint
from ccos_obsd.ledger.store import Head, StoredCheckpoint

log = structlog.get_logger("ccos_obsd.ledger")

_PARALLEL_SIGN_MIN = 64
"""Groups at least this large are signed on two threads (Ed25519 signing releases the GIL)."""
_POOL_SIGN_MIN = 8
"""Smaller groups are signed inline on the writer thread, just before their commit,
unless another group's commit is in flight (then the signing threads overlap it).

At agent rates (one action at a time, nothing in flight) the hand-off to a signing
thread and back (a queue, a wake-up, a future) costs more CPU than the signature
itself, and the writer would only wait for it."""


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


CommittedEntry = NewEntry
"""An entry just made durable, as the commit listeners (metrics, logs, sinks' wake-up) see it."""


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
class _Prepared:
    """A new entry on its way to the ledger: where its answer goes, and its signature once made."""

    index: tuple[int, int]
    """(request, action) position in the group."""
    action: ValidatedAction
    entry: NewEntry
    signature: bytes | None = None


CommitListener = Callable[[Sequence[CommittedEntry], float], None]


@dataclass(slots=True)
class _Group:
    """Requests taken from the queue together: prepared, being signed, then committed."""

    requests: list[_Request]
    outcomes: list[list[AppendOutcome | None]]
    prepared: list[_Prepared]
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
        signing_mode: str = "entry",
        checkpoint_interval_s: float = 1.0,
        key_path: Path | None = None,
    ) -> None:
        self.db_path = db_path
        self._conn = store.connect(db_path, readonly=False)
        self._key = signing_key
        self._loop = loop
        self._max_group = max_group
        self._listeners: list[CommitListener] = []
        self._queue: queue.SimpleQueue[_Request | _RotateKey | None] = queue.SimpleQueue()
        self._key_path = key_path
        self._rotation: _RotateKey | None = None
        self._head = store.read_head(self._conn)
        self._prepared_head = self._head
        self._last_recorded_ms = 0
        self._uncommitted: dict[str, _Prepared] = {}
        self._sign_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ccos-sign")
        self._thread = threading.Thread(target=self._run, name="ccos-ledger-writer", daemon=True)
        self.pending_actions = 0
        """Actions submitted and not yet answered (read and written on the event loop)."""
        self._register_key()
        self._sign_entries = signing_mode == "entry"
        self._checkpoint_interval_s = checkpoint_interval_s
        self._tree = self._open_tree()
        latest = store.latest_checkpoint(self._conn)
        self._checkpointed_size = 0 if latest is None else latest.size
        self._last_checkpoint_at = float("-inf")
        self.latest_checkpoint: str | None = None if latest is None else latest.note
        """The latest signed checkpoint note (read from other threads: one reference, swapped whole)."""
        self._uncovered_since: float | None = None
        if self._head.size > self._checkpointed_size:
            self._uncovered_since = time.time() if latest is None else latest.created_at_ms / 1000

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(entries, commit_seconds)`` on the writer thread after each durable commit.

        Register listeners before :meth:`start`; they must be quick (the next group waits).
        """
        self._listeners.append(listener)

    def _tell_listeners(self, entries: list[CommittedEntry], commit_seconds: float) -> None:
        for listener in self._listeners:
            listener(entries, commit_seconds)

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
        """A key the ring does not know yet (first start, or a rotation cut short) signs from the head on."""
        store.register_key(
            self._conn, self._key.key_id, self._key.verifier.vkey(), self._head.size, int(time.time() * 1000)
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
            prepared = self._prepare(requests, overlapped=in_flight is not None) if requests else None
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

    def _prepare(self, requests: list[_Request], *, overlapped: bool) -> _Group:
        """Assign seqs, build the entries and start signing; answer duplicates and conflicts.

        ``overlapped``: a group is in flight, whose commit the signing can overlap.
        """
        outcomes: list[list[AppendOutcome | None]] = [[None] * len(r.actions) for r in requests]
        prepared: list[_Prepared] = []
        next_seq, previous = self._prepared_head.size, self._prepared_head.chain_hash
        now_ms = max(int(time.time() * 1000), self._last_recorded_ms)
        self._last_recorded_ms = now_ms
        for r_index, request in enumerate(requests):
            for a_index, action in enumerate(request.actions):
                if action.client_action_id:
                    earlier = self._earlier_outcome(action)
                    if earlier is not None:
                        outcomes[r_index][a_index] = earlier
                        continue
                try:
                    new = build_entry(
                        action.fields, seq=next_seq, recorded_at_ms=now_ms, peer=request.peer,
                        previous_chain_hash=previous,
                    )
                except NotCanonicalizable as exc:
                    outcomes[r_index][a_index] = InvalidAction(f"action is not representable as canonical JSON: {exc}")
                    continue
                pending = _Prepared((r_index, a_index), action, new)
                prepared.append(pending)
                self._uncommitted[action.action_id] = pending
                previous = new.chain_hash
                next_seq += 1
        head_after = Head(next_seq, previous)
        self._prepared_head = head_after
        group = _Group(requests, outcomes, prepared, head_after, now_ms)
        if prepared and self._sign_entries and (overlapped or len(prepared) >= _POOL_SIGN_MIN):
            group.signing = self._start_signing(prepared)
        return group

    def _earlier_outcome(self, action: ValidatedAction) -> AppendOutcome | None:
        """The answer for an action_id already prepared or stored (duplicate or conflict); None if new."""
        earlier = self._uncommitted.get(action.action_id)
        if earlier is not None:
            new = earlier.entry
            return _duplicate_or_conflict(action, earlier.action.content(), new.seq, new.leaf_hash, new.chain_hash)
        stored = store.get_entry(self._conn, action_id=action.action_id)
        if stored is None:
            return None
        return _duplicate_or_conflict(
            action, content_of_entry(json.loads(stored.entry)), stored.seq, stored.leaf_hash, stored.chain_hash
        )

    def _sign_inline(self, prepared: list[_Prepared]) -> None:
        """Sign a small group on this thread, with the key it was prepared under (a rotation waits for it)."""
        sign = self._key.sign
        for pending in prepared:
            pending.signature = sign(entry_signed_message(pending.entry.chain_hash))

    def _start_signing(self, prepared: list[_Prepared]) -> Future[None]:
        sign = self._key.sign

        def sign_all(chunk: list[_Prepared]) -> None:
            for pending in chunk:
                pending.signature = sign(entry_signed_message(pending.entry.chain_hash))

        if len(prepared) < _PARALLEL_SIGN_MIN:
            return self._sign_pool.submit(sign_all, prepared)
        half = len(prepared) // 2
        first = self._sign_pool.submit(sign_all, prepared[:half])
        second = self._sign_pool.submit(sign_all, prepared[half:])
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
            if group.prepared:
                started = time.perf_counter()
                if group.signing is not None:
                    group.signing.result()
                elif self._sign_entries:
                    self._sign_inline(group.prepared)
                try:
                    nodes = self._tree.extend_stored(p.entry.leaf_hash for p in group.prepared)
                    checkpoint = self._sign_checkpoint() if self._checkpoint_wait() == 0.0 else None
                    self._insert(group.prepared, tile_appends(nodes, skip_leaf_tiles=True), checkpoint)
                except sqlite3.Error as exc:
                    self._rollback()
                    log.error("ledger_write_failed", error=str(exc), entries=len(group.prepared))
                    cause = _describe(exc)
                    self._fail(group, Unavailable(f"ledger write failed ({cause}); the action was not appended"))
                    self._resync_head()
                    return False
                if checkpoint is not None:
                    self._checkpoint_written(checkpoint)
                elif self._uncovered_since is None:
                    self._uncovered_since = time.time()
                self._committed(group, time.perf_counter() - started)
        except Exception as exc:
            log.exception("ledger_write_internal_error")
            self._rollback()
            self._fail(group, Internal(f"internal error while writing: {type(exc).__name__}"))
            self._resync_head()
            return False
        self._answer(group)
        return True

    def _committed(self, group: _Group, commit_seconds: float) -> None:
        """The group is durable: move the head, fill in the answers, tell the commit listener."""
        self._head = group.head_after
        for pending in group.prepared:
            new = pending.entry
            group.outcomes[pending.index[0]][pending.index[1]] = AppendResult(
                new.seq, pending.action.action_id, new.leaf_hash, new.chain_hash, False
            )
            self._uncommitted.pop(pending.action.action_id, None)
        self._tell_listeners([p.entry for p in group.prepared], commit_seconds)

    def _fail(self, group: _Group, error: RequestError) -> None:
        """Answer ``error`` for the group's new entries (and duplicates of them); reset the head."""
        failed_seqs = {p.entry.seq for p in group.prepared}
        for pending in group.prepared:
            group.outcomes[pending.index[0]][pending.index[1]] = error
        for row in group.outcomes:
            for i, outcome in enumerate(row):
                if isinstance(outcome, AppendResult) and outcome.duplicate and outcome.seq >= self._head.size:
                    row[i] = error
        self._uncommitted = {k: v for k, v in self._uncommitted.items() if v.entry.seq not in failed_seqs}
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
        prepared: list[_Prepared],
        tiles: dict[TileId, TileAppend],
        checkpoint: tuple[int, Hash, str] | None,
    ) -> None:
        """One transaction: the entries, the tree tiles they complete, and maybe a checkpoint."""
        with store.write_transaction(self._conn):
            store.insert_entries(self._conn, self._key.key_id, ((p.entry, p.signature) for p in prepared))
            store.write_tiles(self._conn, tiles)
            if checkpoint is not None:
                self._insert_checkpoint(checkpoint)

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
        new_key = SigningKey.generate(old.verifier.name)
        replace_signing_key(self._key_path, new_key)
        now_ms = max(int(time.time() * 1000), self._last_recorded_ms)
        action = key_rotated_action(old.verifier.vkey(), new_key.verifier.vkey())
        new = build_entry(
            action.fields, seq=self._head.size, recorded_at_ms=now_ms, peer=rotation.peer,
            previous_chain_hash=self._head.chain_hash,
        )
        signature = old.sign(entry_signed_message(new.chain_hash)) if self._sign_entries else None
        started = time.perf_counter()
        nodes = self._tree.extend_stored([new.leaf_hash])
        # The old key's last act: a checkpoint over everything through the rotation entry.
        checkpoint = self._sign_checkpoint()
        with store.write_transaction(self._conn):
            store.insert_entries(self._conn, old.key_id, [(new, signature)])
            store.write_tiles(self._conn, tile_appends(nodes, skip_leaf_tiles=True))
            self._insert_checkpoint(checkpoint)
            store.record_key_rotation(
                self._conn, old.key_id, new_key.key_id, new_key.verifier.vkey(), new.seq, now_ms
            )
        self._key = new_key
        self._head = self._prepared_head = Head(new.seq + 1, new.chain_hash)
        self._checkpoint_written(checkpoint)
        self._last_recorded_ms = now_ms
        log.warning(
            "signing_key_rotated", seq=new.seq, old_key=old.verifier.vkey(), new_key=new_key.verifier.vkey()
        )
        self._tell_listeners([new], time.perf_counter() - started)
        return AppendResult(new.seq, action.action_id, new.leaf_hash, new.chain_hash, False)

    # --- Merkle tree and checkpoints

    def _open_tree(self) -> TreeBuilder:
        """Resume the tree from its stored tiles, or rebuild them (a ledger from before tiles)."""
        size = self._head.size
        try:
            reader = store.hash_reader(self._conn)
            tree = TreeBuilder.from_reader(size, reader)
            latest = store.latest_checkpoint(self._conn)
            if latest is None or latest.size > size or root_from_reader(latest.size, reader) == latest.root_hash:
                return tree
            log.warning("merkle_tiles_disagree_with_checkpoint", checkpoint_size=latest.size)
        except ValueError:
            log.warning("merkle_tiles_unreadable", entries=size)
        tree = TreeBuilder()
        nodes = tree.extend_stored(store.leaf_hashes(self._conn))
        with store.write_transaction(self._conn):
            store.replace_tiles(self._conn, tile_appends(nodes, skip_leaf_tiles=True))
        log.info("merkle_tree_rebuilt", entries=size)
        return tree

    def _sign_checkpoint(self) -> tuple[int, Hash, str]:
        size, root = self._tree.size, self._tree.root()
        note = sign_checkpoint(Checkpoint(self._key.verifier.name, size, root), self._key)
        return size, root, note

    def _insert_checkpoint(self, checkpoint: tuple[int, Hash, str]) -> None:
        size, root, note = checkpoint
        store.insert_checkpoint(
            self._conn, StoredCheckpoint(size, root, note, self._key.key_id, int(time.time() * 1000))
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
            with store.write_transaction(self._conn):
                self._insert_checkpoint(checkpoint)
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
            head = store.read_head(self._conn)
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
            store.rollback(self._conn)
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
