"""The operations: one table that the socket protocol and the HTTP API both call.

Each :class:`Op` names its role (who may call it: ``write``, ``read`` or
``admin``), whether it runs in request order (reads see the connection's own
earlier writes), and its handler. A handler takes the request's fields, checks
them (this module is the one place that parses request arguments) and answers
either at once (a dict) or later (:class:`Later`: a future and the function that
turns its result into the answer).

Appends go to the ledger writer as soon as they are read, so pipelined appends
share group commits; reads run off the event loop on a reader connection.
Background work an op starts (a replay, a backup, an ingestor replay) is owned
here: :meth:`Ops.close` cancels and awaits it at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ccos_obsd.access import Role
from ccos_obsd.actions import validate_action
from ccos_obsd.backup import backup_state_dir
from ccos_obsd.config import Config
from ccos_obsd.errors import (
    BackupError,
    Busy,
    Forbidden,
    InvalidRequest,
    NotFound,
    RequestError,
    Unavailable,
)
from ccos_obsd.ledger import proofs, store
from ccos_obsd.ledger.entry import ValidatedAction
from ccos_obsd.ledger.writer import AppendOutcome, AppendResult, LedgerWriter
from ccos_obsd.log import LogRing
from ccos_obsd.metrics.aggregates import Aggregates, Histogram
from ccos_obsd.redact import Redactor
from ccos_obsd.wm import capability
from ccos_obsd.wm import store as wm_store
from ccos_obsd.wm.replay import LiveReplay

log = structlog.get_logger("ccos_obsd.ops")

Answer = dict[str, Any]
ReadFn = Callable[[Callable[[Any], Any]], "asyncio.Future[Any]"]
"""Runs a function of a read-only ledger connection off the event loop."""
WmDeliveredFn = Callable[[int, float], Awaitable[bool]]
"""``(through, timeout_s)``: waits until Working Memory took every entry below seq ``through``; False on timeout."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the socket peer's credentials (None over HTTP), and the raw line."""

    peer: dict[str, int] | None = None
    line: bytes = b""


HTTP_CALLER = Caller()


@dataclass(slots=True)
class Later:
    """An answer that is not ready yet: ``transform(future.result())`` once it is."""

    future: asyncio.Future[Any]
    transform: Callable[[Any], Answer]


Reply = Answer | Later
Handler = Callable[["Ops", dict[str, Any], Caller], Reply]


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    role: Role
    handler: Handler
    in_order: bool
    """Run only once every earlier request on the connection is answered (read-your-writes)."""
    admin_if: Callable[[dict[str, Any]], bool] | None = None
    """Requests of this op that need the admin role instead of ``role`` (the ingestor's replay)."""

    def role_for(self, request: dict[str, Any]) -> Role:
        """The role this request needs."""
        return "admin" if self.admin_if is not None and self.admin_if(request) else self.role


def error_answer(error: RequestError) -> Answer:
    return {"ok": False, "error": error.to_wire()}


class Ops:
    """The operations, shared by every socket connection and the HTTP API."""

    def __init__(
        self,
        config: Config,
        writer: LedgerWriter,
        read: ReadFn,
        aggregates: Aggregates,
        log_ring: LogRing,
        replay: LiveReplay | None = None,
        wm_delivered: WmDeliveredFn | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        """``replay`` and ``wm_delivered`` are None when Working Memory is off; ``redactor`` without rules."""
        self._config = config
        self._writer = writer
        self._read = read
        self.aggregates = aggregates
        self._log_ring = log_ring
        self._replay = replay
        self._wm_delivered = wm_delivered
        self.redactor = redactor
        """The ``[[redact]]`` rules every action goes through first (replaced on reload)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ingest_lock = threading.Lock()
        self._ingest_durations = Histogram(capability.DURATION_BUCKETS)
        self.accepting_writes = True

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration (see ``ccos_obsd.reload``) to the next requests."""
        self._config = config

    @property
    def config(self) -> Config:
        return self._config

    def ingest_durations(self) -> Histogram:
        """``ccos_wm_ingest_duration_seconds``: each ingest call's whole duration (a copy, for renders)."""
        with self._ingest_lock:
            return self._ingest_durations.copy()

    @staticmethod
    def lookup(name: str) -> Op | None:
        return TABLE.get(name)

    def run(self, op: Op, request: dict[str, Any], caller: Caller) -> Reply:
        """Parse ``request`` for ``op`` and start it; ``RequestError`` says what is wrong."""
        return op.handler(self, request, caller)

    async def call(self, name: str, request: dict[str, Any], caller: Caller = HTTP_CALLER) -> Answer:
        """Run an op to its answer (the HTTP API's way in); error answers come back as answers."""
        try:
            reply = self.run(TABLE[name], request, caller)
            if isinstance(reply, Later):
                return reply.transform(await reply.future)
            return reply
        except RequestError as error:
            return error_answer(error)

    async def close(self) -> None:
        """Cancel and await the background work ops started (replays, backups)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Each task's outcome was its request's answer; here only its end matters (a
        # cancellation of close() itself still goes through).
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- helpers

    def _start(self, work: Coroutine[Any, Any, Answer]) -> Later:
        """Run ``work`` as a task this object owns, answering its result."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Later(task, _identity)

    def _deferred(self, read: Callable[[Any], Answer]) -> Later:
        return Later(self._read(read), _identity)

    def _check_writable(self, pending: int = 0) -> None:
        if not self.accepting_writes:
            raise Unavailable("the daemon is shutting down; retry against the restarted daemon")
        limit = self._config.ledger.max_pending
        if pending and self._writer.pending_actions + pending > limit:
            raise Busy(f"more than {limit} actions are waiting for commit; retry shortly")

    def _redacted(self, raw_actions: Sequence[Any]) -> Sequence[Any]:
        """The actions with the ``[[redact]]`` rules applied, counted in ``ccos_redactions_total``.

        Before validation, so that neither the ledger nor an error answer (nor a log
        line made of one) ever holds the secret; without rules, the actions as they are.
        """
        redactor = self.redactor
        if redactor is None:
            return raw_actions
        redacted: list[Any] = []
        counts: dict[str, int] = {}
        for raw in raw_actions:
            action, found = redactor.redact(raw)
            redacted.append(action)
            for name, n in found.items():
                counts[name] = counts.get(name, 0) + n
        if counts:
            self.aggregates.count_redactions(counts)
        return redacted

    def _wm_file(self) -> Path:
        path = self._config.wm_path
        if path is None:
            raise Unavailable("Working Memory is off (wm.enabled = false)")
        return path

    # --- writes

    def append(self, request: dict[str, Any], caller: Caller) -> Reply:
        _only(request, {"action"})
        if "action" not in request:
            raise InvalidRequest("append needs an 'action' object", field="action")
        return self._append([request["action"]], caller, single=True)

    def append_bare(self, action: dict[str, Any], caller: Caller) -> Reply:
        """A line without ``op``: the line is the action."""
        return self._append([action], caller, single=True)

    def append_batch(self, request: dict[str, Any], caller: Caller) -> Reply:
        _only(request, {"actions"})
        actions = request.get("actions")
        if not isinstance(actions, list):
            raise InvalidRequest("append_batch needs an 'actions' list", field="actions")
        if len(actions) > self._config.socket.max_batch:
            raise InvalidRequest(
                f"batch of {len(actions)} actions exceeds socket.max_batch ({self._config.socket.max_batch})",
                field="actions",
            )
        return self._append(actions, caller, single=False)

    def _append(self, raw_actions: Sequence[Any], caller: Caller, *, single: bool) -> Reply:
        allow_custom = self._config.actions.allow_custom_types
        # NaN and Infinity cannot survive the frame parser; lone surrogates only come from
        # \uD800-\uDFFF escapes, so the canonical-JSON check runs only when one is there
        # (or when there is no raw line to look at).
        check = not caller.line or _SURROGATE_ESCAPE.search(caller.line) is not None
        valid: list[ValidatedAction] = []
        slots: list[RequestError | None] = []
        for raw in self._redacted(raw_actions):
            try:
                valid.append(validate_action(raw, allow_custom_types=allow_custom, check_encodable=check))
                slots.append(None)
            except RequestError as error:
                slots.append(error)
        if single and slots[0] is not None:
            raise slots[0]
        if not valid:
            return _batch_answer(slots, [])
        self._check_writable(len(valid))
        future = self._writer.submit(valid, caller.peer)
        if single:
            return Later(future, _single_answer)
        return Later(future, lambda outcomes: _batch_answer(slots, outcomes))

    def capability_call(self, request: dict[str, Any], caller: Caller) -> Reply:
        """A local capability call; ``observability.ingestor:v1.ingest`` is the one there is.

        The call is recorded as CCOS records one: its CapabilityCall (carrying the
        records) is appended now, in request order; once that is committed and
        Working Memory has taken it (:meth:`_complete_call`), its CapabilityResult
        carries the duration of the whole call.
        """
        _only(request, {"capability", "args"})
        name = request.get("capability")
        if name != capability.CAPABILITY:
            shown = name[:80] if isinstance(name, str) else repr(name)[:80]
            raise InvalidRequest(f"unknown capability {shown!r} (known: {capability.CAPABILITY})", field="capability")
        started = time.perf_counter()
        mode, raw_records = capability.parse_call(request.get("args"))
        if mode == "replay" and self._replay is None:
            raise Unavailable("Working Memory is off (wm.enabled = false)")
        records: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        now = time.time()
        for index, raw in enumerate(raw_records):
            try:
                records.append(capability.normalize_record(raw, now))
            except ValueError as exc:
                errors.append({"index": index, "reason": str(exc)})
        if mode == "single" and errors:
            raise InvalidRequest(f"record: {errors[0]['reason']}", field="args")
        self._check_writable(1)
        call = validate_action(self._redacted([capability.call_action(mode, records)])[0])
        committed = self._writer.submit([call], caller.peer)
        result = {"mode": mode, "ingested": len(records), "errors": errors}
        return self._start(self._complete_call(call.action_id, committed, result, started, caller))

    async def _complete_call(
        self, call_id: str, committed: asyncio.Future[list[AppendOutcome]], result: dict[str, Any],
        started: float, caller: Caller,
    ) -> Answer:
        """Wait for the call's commit, then Working Memory (a replay, or the WM sink's delivery); record the result.

        With Working Memory off the records are on the ledger all the same, and the
        duration ends at the commit. ``result["delivered"]`` tells whether Working
        Memory had the records when the call answered (False after
        ``WM_DELIVERY_TIMEOUT_S``: they arrive later, from the sink's cursor).
        """
        appended = (await committed)[0]
        if not isinstance(appended, AppendResult):
            return error_answer(appended)
        try:
            if result["mode"] == "replay" and self._replay is not None:
                replayed = await self._replay.run(0)
                result.update(ingested=replayed["ingested"], scanned_actions=replayed["scanned_actions"])
            result["delivered"] = self._wm_delivered is not None and await self._wm_delivered(
                appended.seq + 1, capability.WM_DELIVERY_TIMEOUT_S)
        except Exception as exc:
            await self._record_result(call_id, result, started, caller, error=f"{type(exc).__name__}: {exc}")
            raise
        return await self._record_result(call_id, result, started, caller)

    async def _record_result(
        self, call_id: str, result: dict[str, Any], started: float, caller: Caller, error: str | None = None
    ) -> Answer:
        """Append the CapabilityResult of call ``call_id`` with the duration so far; answer once it is committed."""
        seconds = time.perf_counter() - started
        with self._ingest_lock:
            self._ingest_durations.observe(seconds)
        ok = error is None and (bool(result["ingested"]) or not result["errors"])
        outcome = capability.result_action(call_id, result, round(seconds * 1000, 3), ok, error)
        # Not refused while shutting down: the drain waits for this call, and the writer takes appends until then.
        recorded = (await self._writer.submit([validate_action(self._redacted([outcome])[0])], caller.peer))[0]
        if not isinstance(recorded, AppendResult):
            return error_answer(recorded)
        return {"ok": True, "result": result}

    # --- reads

    def ping(self, request: dict[str, Any], caller: Caller) -> Reply:
        return {"ok": True, "head": self._writer.head.size}

    def get(self, request: dict[str, Any], caller: Caller) -> Reply:
        seq, action_id = _seq_or_action_id(request, "get")

        def read(conn: Any) -> Answer:
            entry = store.get_entry(conn, seq=seq, action_id=action_id)
            if entry is None:
                what = f"seq {seq}" if seq is not None else f"action_id {action_id!r}"
                raise NotFound(f"no entry with {what}")
            return {"ok": True, "record": entry.query_record()}

        return self._deferred(read)

    def query(self, request: dict[str, Any], caller: Caller) -> Reply:
        query = parse_entry_query(request)
        return self._deferred(
            lambda conn: {"ok": True, "records": [e.query_record() for e in store.query_entries(conn, query)]}
        )

    def logs(self, request: dict[str, Any], caller: Caller) -> Reply:
        """The newest ``n`` log lines; with ``after`` (a line number), the oldest ``n`` lines after it."""
        _only(request, {"n", "after"})
        n, after = request.get("n", 50), request.get("after")
        for key, value in (("n", n), ("after", after)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidRequest(f"{key} must be a non-negative integer", field=key)
        page = self._log_ring.read(n, after)
        answer: Answer = {"ok": True, "lines": [json.loads(line) for line in page.lines], "last": page.last}
        if after is not None:
            answer["missed"] = page.missed
        return answer

    def stats(self, request: dict[str, Any], caller: Caller) -> Reply:
        _only(request, {"capability", "function", "plan_id", "intent_id"})
        for key, value in request.items():
            checked_string(value, key)
        plan_id, intent_id = request.get("plan_id"), request.get("intent_id")
        body = {"ok": True, **self.aggregates.snapshot().stats(
            capability=request.get("capability"), function=request.get("function"))}
        if plan_id is None and intent_id is None:
            return body

        def read(conn: Any) -> Answer:
            if plan_id is not None:
                body["plan_cost"] = store.cost_where(conn, "plan_id", plan_id)
            if intent_id is not None:
                body["intent_cost"] = store.cost_where(conn, "intent_id", intent_id)
            return body

        return self._deferred(read)

    def checkpoint(self, request: dict[str, Any], caller: Caller) -> Reply:
        _only(request, set())
        return self._deferred(lambda conn: {"ok": True, "checkpoint": proofs.latest_checkpoint_note(conn)})

    def prove_inclusion(self, request: dict[str, Any], caller: Caller) -> Reply:
        seq, action_id = _seq_or_action_id(request, "prove_inclusion")
        return self._deferred(
            lambda conn: {"ok": True, **store.snapshot(conn, proofs.inclusion, seq=seq, action_id=action_id)}
        )

    def prove_consistency(self, request: dict[str, Any], caller: Caller) -> Reply:
        _only(request, {"size1", "size2"})
        size1 = checked_int(request.get("size1"), "size1")
        size2 = None if request.get("size2") is None else checked_int(request["size2"], "size2")
        return self._deferred(lambda conn: {"ok": True, **store.snapshot(conn, proofs.consistency, size1, size2)})

    def wm_search(self, request: dict[str, Any], caller: Caller) -> Reply:
        """Working Memory search: text, tags (any of), since/until (seconds), plan/intent/session, limit."""
        path, search = self._wm_file(), parse_wm_search(request)
        return self._deferred(lambda conn: {"ok": True, "entries": wm_store.search(path, search)})

    def wm_digest(self, request: dict[str, Any], caller: Caller) -> Reply:
        _only(request, set())
        path = self._wm_file()
        return self._deferred(lambda conn: {"ok": True, **wm_store.digest(path)})

    # --- admin

    def rotate_key(self, request: dict[str, Any], caller: Caller) -> Reply:
        """A new signing key from the next entry on; answers the KeyRotated entry and the new vkey.

        An admin op: the socket serves it to root, the daemon's own user and
        ``socket.admin_uids``/``admin_gids`` only (``ccos_obsd.protocol``).
        """
        _only(request, set())
        if not self.accepting_writes:
            raise Unavailable("the daemon is shutting down")
        writer = self._writer

        def answer(outcome: AppendOutcome) -> Answer:
            if not isinstance(outcome, AppendResult):
                return error_answer(outcome)
            return {**outcome.to_wire(), "vkey": writer.key.verifier.vkey()}

        return Later(writer.rotate_key(caller.peer), answer)

    def replay(self, request: dict[str, Any], caller: Caller) -> Reply:
        """Rebuild Working Memory from ``from`` (default 0: from scratch) inside the running daemon."""
        _only(request, {"from"})
        start = checked_int(request.get("from", 0), "from")
        if start < 0:
            raise InvalidRequest("from must be >= 0", field="from")
        replay = self._replay
        if replay is None:
            raise Unavailable("Working Memory is off (wm.enabled = false)")

        async def run() -> Answer:
            return {"ok": True, "mode": "replay", **(await replay.run(start))}

        return self._start(run())

    def replay_status(self, request: dict[str, Any], caller: Caller) -> Reply:
        """How far a running replay got (for progress bars): ledger entries done of total."""
        _only(request, set())
        progress = None if self._replay is None else self._replay.progress
        body: Answer = {"ok": True, "running": progress is not None}
        if progress is not None:
            body.update(done=progress[0], total=progress[1])
        return body

    def backup(self, request: dict[str, Any], caller: Caller) -> Reply:
        """A consistent copy of the state dir, written by the daemon into ``dest`` (see ``ccos_obsd.backup``).

        Off unless ``backup.allow_socket``: it makes the daemon create files, as its own
        user, where the peer says. It starts once every earlier request on the
        connection is answered, so the copy holds the connection's own appends.
        """
        _only(request, {"dest"})
        if not self._config.backup.allow_socket:
            raise Forbidden("backup over the socket is off (backup.allow_socket = false); "
                            "`ccos-obsd backup --state-dir` copies the state dir directly")
        dest = checked_string(request.get("dest"), "dest")
        if "\x00" in dest or not os.path.isabs(dest):
            raise InvalidRequest("dest must be an absolute path", field="dest")
        state_dir = self._config.state_dir

        async def run() -> Answer:
            try:
                summary = await asyncio.to_thread(backup_state_dir, state_dir, Path(dest))
            except BackupError as exc:
                raise InvalidRequest(exc.message, field=exc.field) from None
            log.info("backup_written", peer=caller.peer, **summary.to_json())
            return {"ok": True, **summary.to_json()}

        return self._start(run())


def _op(
    name: str, role: Role, handler: Handler, *, in_order: bool = True,
    admin_if: Callable[[dict[str, Any]], bool] | None = None,
) -> tuple[str, Op]:
    return name, Op(name, role, handler, in_order, admin_if)


def _is_replay_call(request: dict[str, Any]) -> bool:
    """``call`` with mode ``replay`` rebuilds Working Memory: the replay op's (admin) work, not a write."""
    args = request.get("args")
    return isinstance(args, list) and bool(args) and args[0] == "replay"


TABLE: dict[str, Op] = dict([
    _op("append", "write", Ops.append, in_order=False),
    _op("append_batch", "write", Ops.append_batch, in_order=False),
    _op("call", "write", Ops.capability_call, in_order=False, admin_if=_is_replay_call),
    _op("ping", "read", Ops.ping),
    _op("get", "read", Ops.get),
    _op("query", "read", Ops.query),
    _op("logs", "read", Ops.logs),
    _op("stats", "read", Ops.stats),
    _op("checkpoint", "read", Ops.checkpoint),
    _op("wm_search", "read", Ops.wm_search),
    _op("wm_digest", "read", Ops.wm_digest),
    _op("prove_inclusion", "read", Ops.prove_inclusion),
    _op("prove_consistency", "read", Ops.prove_consistency),
    _op("rotate_key", "admin", Ops.rotate_key, in_order=False),
    _op("replay", "admin", Ops.replay, in_order=False),
    _op("replay_status", "admin", Ops.replay_status, in_order=False),
    _op("backup", "admin", Ops.backup),
])
"""Every op the socket serves; the HTTP API serves the reads among them."""


# --- argument parsing: the one place request fields are checked


def _only(request: dict[str, Any], allowed: set[str]) -> None:
    for key in request:
        if key not in allowed:
            raise InvalidRequest(f"unknown request field {key!r}", field=key)


checked_string = InvalidRequest.check_string


def checked_int(value: Any, key: str) -> int:
    """A request integer SQLite can bind (64-bit signed), or ``InvalidRequest``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer", field=key)
    if not -(2**63) <= value < 2**63:
        raise InvalidRequest(f"{key} is out of range", field=key)
    return value


def _seq_or_action_id(request: dict[str, Any], op: str) -> tuple[int | None, str | None]:
    _only(request, {"seq", "action_id"})
    seq, action_id = request.get("seq"), request.get("action_id")
    if (seq is None) == (action_id is None):
        raise InvalidRequest(f"{op} needs exactly one of 'seq' or 'action_id'")
    if seq is not None:
        checked_int(seq, "seq")
    if action_id is not None:
        checked_string(action_id, "action_id")
    return seq, action_id


def parse_entry_query(request: dict[str, Any]) -> store.EntryQuery:
    """CCOS's chain query filters, checked: see ``store.query_entries``."""
    for key in request:
        if key not in store.QUERY_FILTERS:
            raise InvalidRequest(f"unknown query filter {key!r}", field=key)
    order = request.get("order", "asc")
    if order not in ("asc", "desc", "time"):
        raise InvalidRequest("order must be 'asc', 'desc' or 'time'", field="order")
    if order == "time" and "after_seq" in request:
        # A time-ordered trace is not in seq order, so "after this seq" is no page boundary.
        raise InvalidRequest("after_seq pages in seq order; it does not apply to order 'time'", field="after_seq")
    limit = checked_int(request["limit"], "limit") if "limit" in request else store.DEFAULT_QUERY_LIMIT
    if not 1 <= limit <= store.MAX_QUERY_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {store.MAX_QUERY_LIMIT}", field="limit")

    def optional_int(key: str) -> int | None:
        return checked_int(request[key], key) if key in request else None

    def optional_string(key: str) -> str | None:
        return checked_string(request[key], key) if key in request else None

    return store.EntryQuery(
        equal={key: checked_string(request[key], key) for key in store.EQUALITY_FILTERS if key in request},
        function_prefix=optional_string("function_prefix"),
        run_id=optional_string("run_id"),
        step_id=optional_string("step_id"),
        since_ms=optional_int("since_ms"),
        until_ms=optional_int("until_ms"),
        after_seq=optional_int("after_seq"),
        limit=limit,
        order=order,
    )


def parse_wm_search(request: dict[str, Any]) -> wm_store.Search:
    """Working Memory search filters, checked: see ``WmStore.search``."""
    for key in request:
        if key not in wm_store.SEARCH_FIELDS:
            raise InvalidRequest(f"unknown search field {key!r}", field=key)
    tags = request.get("tags")
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t]
    return wm_store.Search.checked(
        text=request.get("text"), tags=tags, since=request.get("since"), until=request.get("until"),
        plan_id=request.get("plan_id"), intent_id=request.get("intent_id"),
        session_id=request.get("session_id"), limit=request.get("limit", 50),
    )


# --- answers


def _identity(answer: Answer) -> Answer:
    return answer


def _single_answer(outcomes: list[AppendOutcome]) -> Answer:
    outcome = outcomes[0]
    if isinstance(outcome, AppendResult):
        return outcome.to_wire()
    return error_answer(outcome)


def _batch_answer(slots: list[RequestError | None], outcomes: list[AppendOutcome]) -> Answer:
    results: list[Answer] = []
    committed = iter(outcomes)
    for slot in slots:
        if slot is not None:
            results.append(error_answer(slot))
        else:
            outcome = next(committed)
            results.append(outcome.to_wire() if isinstance(outcome, AppendResult) else error_answer(outcome))
    return {"ok": True, "results": results}

