"""The socket protocol: NDJSON framing, request parsing and the ops.

Each connection is an ``asyncio.Protocol``. Complete lines are parsed and
dispatched as they arrive; appends go straight to the ledger writer's queue, so
pipelined requests from one client share group commits. Answers are written in
request order: a connection keeps a queue of pending answers and writes the
longest ready prefix whenever one completes.

Limits keep every client's cost bounded: a line longer than
``socket.max_line_bytes`` is answered ``frame_too_large`` and skipped up to its
newline; a client with ``socket.max_inflight`` unanswered requests, or one that
does not read its answers, is not read from until it catches up.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ccos_obsd import ingestor, wm_ops
from ccos_obsd.access import AccessPolicy, PeerCredentials, peer_credentials
from ccos_obsd.actions import ValidatedAction, validate_action
from ccos_obsd.backup import backup_state_dir
from ccos_obsd.config import Config
from ccos_obsd.errors import (
    BackupError,
    BadJson,
    Busy,
    Forbidden,
    FrameTooLarge,
    Internal,
    InvalidRequest,
    NotFound,
    RequestError,
    Unavailable,
    UnknownOp,
)
from ccos_obsd.ledger import proofs, store
from ccos_obsd.ledger.writer import AppendOutcome, AppendResult, LedgerWriter
from ccos_obsd.log import LogRing
from ccos_obsd.metrics import Aggregates, LiveGauges

log = structlog.get_logger("ccos_obsd.protocol")

Answer = dict[str, Any]
Transform = Callable[[Any], Answer]
_SCALARS = (str, int, float, bool, type(None))
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_frame(line: bytes, max_depth: int) -> dict[str, Any]:
    """One request line to a JSON object, or ``BadJson`` saying what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"request is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise BadJson(f"JSON is nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise BadJson(f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadJson("a request must be a JSON object")
    if line.count(b"[") + line.count(b"{") > max_depth and _nested_deeper_than(line, max_depth):
        raise BadJson(f"JSON is nested deeper than {max_depth} levels")
    return value


_ESCAPE = re.compile(rb"\\.")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'{}[]"')
_EMPTY_CONTAINER = re.compile(rb"\{\}|\[\]")


def _nested_deeper_than(line: bytes, max_depth: int) -> bool:
    """Whether the (valid) JSON text nests containers deeper than ``max_depth``.

    Works on the bytes at C speed: drop escapes, keep only brackets and quotes,
    drop string contents, then peel empty containers layer by layer.
    """
    kept = _ESCAPE.sub(b"", line).translate(None, _NOT_STRUCTURE)
    brackets = b"".join(kept.split(b'"')[::2])
    # Fast pass: each round removes at least one layer and at most two.
    for rounds in range(1, max_depth + 1):
        brackets = brackets.replace(b"{}", b"").replace(b"[]", b"")
        if not brackets:
            if 2 * rounds <= max_depth:
                return False
            break
    else:
        return True
    # Between max_depth/2 and max_depth rounds: peel exactly one layer per round.
    brackets = b"".join(kept.split(b'"')[::2])
    for _ in range(max_depth):
        brackets = _EMPTY_CONTAINER.sub(b"", brackets)
        if not brackets:
            return False
    return True


def encode_answer(answer: Answer) -> bytes:
    return json.dumps(answer, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def error_answer(error: RequestError, request_id: Any = None, *, has_id: bool = False) -> Answer:
    answer: Answer = {"ok": False, "error": error.to_wire()}
    if has_id:
        answer = {"id": request_id, **answer}
    return answer


@dataclass(frozen=True, slots=True)
class _Context:
    """Who sent a request, and its raw line."""

    peer: dict[str, int] | None
    line: bytes


@dataclass(slots=True)
class _Pending:
    """One answer in request order: ready now (``answer``) or later (``future``)."""

    op: str
    request_id: Any
    has_id: bool
    answer: Answer | None = None
    future: asyncio.Future[Any] | None = None
    transform: Transform | None = None
    later: Callable[[], Answer | asyncio.Future[Any]] | None = None
    """Run once every earlier request on the connection is answered (read-your-writes)."""


class Dispatcher:
    """The ops, shared by every connection (and by the HTTP read API)."""

    def __init__(
        self,
        config: Config,
        writer: LedgerWriter,
        read: Callable[[Callable[[Any], Any]], Any],
        aggregates: Aggregates,
        log_ring: LogRing,
    ) -> None:
        self._config = config
        self._writer = writer
        self._read = read
        self.aggregates = aggregates
        self._log_ring = log_ring
        self.accepting_writes = True
        self.replay_wm: Callable[[int], Awaitable[dict[str, Any]]] | None = None
        self.replay_progress: tuple[int, int] | None = None
        """(ledger entries replayed, to replay) while a replay runs (set by the daemon)."""
        """Rebuild Working Memory from a seq (set by the daemon when WM is on)."""
        self._ops: dict[str, Callable[[dict[str, Any], _Context], _Pending]] = {
            "append": self._op_append,
            "append_batch": self._op_append_batch,
            "ping": self._op_ping,
            "get": self._op_get,
            "query": self._op_query,
            "logs": self._op_logs,
            "stats": self._op_stats,
            "checkpoint": self._op_checkpoint,
            "rotate_key": self._op_rotate_key,
            "wm_search": self._op_wm_search,
            "call": self._op_call,
            "replay": self._op_replay,
            "replay_status": self._op_replay_status,
            "wm_digest": self._op_wm_digest,
            "prove_inclusion": self._op_prove_inclusion,
            "prove_consistency": self._op_prove_consistency,
            "backup": self._op_backup,
        }

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration (see ``ccos_obsd.reload``) to the next requests."""
        self._config = config

    def dispatch_line(self, line: bytes, peer: dict[str, int] | None) -> _Pending:
        try:
            request = parse_frame(line, self._config.socket.max_depth)
        except RequestError as error:
            return _Pending("invalid", None, False, error_answer(error))
        has_id = "id" in request
        request_id = request.pop("id", None)
        if not isinstance(request_id, _SCALARS):
            return _Pending("invalid", None, False, error_answer(InvalidRequest("id must be a scalar", field="id")))
        op = request.pop("op", None)
        handler = self._bare_append if op is None else self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            shown = op[:64] if isinstance(op, str) else repr(op)[:64]
            unknown = UnknownOp(f"unknown op {shown!r} (ops: {', '.join(sorted(self._ops))})", field="op")
            return _Pending("unknown", request_id, has_id, error_answer(unknown))
        if op is None:
            op = "append"
        try:
            pending = handler(request, _Context(peer, line))
        except RequestError as error:
            pending = _Pending(op, request_id, has_id, error_answer(error))
        pending.op = op
        pending.request_id = request_id
        pending.has_id = has_id
        return pending

    def refuse_line(self, line: bytes, credentials: PeerCredentials | None) -> _Pending:
        """The answer to a peer outside the allow-lists: ``forbidden``, whatever the line asks.

        The line is parsed only to echo its ``id`` and to count the answer under its op.
        """
        who = "this peer" if credentials is None else f"uid {credentials.uid}"
        answer = error_answer(Forbidden(
            f"{who} may not use this socket (socket.allowed_uids, socket.allowed_gids)"
        ))
        try:
            request = parse_frame(line, self._config.socket.max_depth)
        except RequestError:
            return _Pending("invalid", None, False, answer)
        op = request.get("op", "append")
        request_id = request.get("id")
        has_id = "id" in request and isinstance(request_id, _SCALARS)
        label = op if isinstance(op, str) and op in self._ops else "unknown"
        return _Pending(label, request_id if has_id else None, has_id, answer)

    # --- writes

    def _bare_append(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        return self._append([request], ctx, single=True)

    def _op_append(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"action"})
        if "action" not in request:
            raise InvalidRequest("append needs an 'action' object", field="action")
        return self._append([request["action"]], ctx, single=True)

    def _op_append_batch(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"actions"})
        actions = request.get("actions")
        if not isinstance(actions, list):
            raise InvalidRequest("append_batch needs an 'actions' list", field="actions")
        if len(actions) > self._config.socket.max_batch:
            raise InvalidRequest(
                f"batch of {len(actions)} actions exceeds socket.max_batch ({self._config.socket.max_batch})",
                field="actions",
            )
        return self._append(actions, ctx, single=False)

    def _append(self, raw_actions: Sequence[Any], ctx: _Context, *, single: bool) -> _Pending:
        allow_custom = self._config.actions.allow_custom_types
        # NaN and Infinity cannot survive parse_frame; lone surrogates only come from
        # \uD800-\uDFFF escapes, so the canonical-JSON check runs only when one is there.
        check = _SURROGATE_ESCAPE.search(ctx.line) is not None
        valid: list[ValidatedAction] = []
        slots: list[RequestError | None] = []
        for raw in raw_actions:
            try:
                valid.append(validate_action(raw, allow_custom_types=allow_custom, check_encodable=check))
                slots.append(None)
            except RequestError as error:
                slots.append(error)
        if single and slots[0] is not None:
            raise slots[0]
        if not valid:
            return _Pending("", None, False, _batch_answer(slots, []))
        if not self.accepting_writes:
            raise Unavailable("the daemon is shutting down; retry against the restarted daemon")
        if self._writer.pending_actions + len(valid) > self._config.ledger.max_pending:
            raise Busy(f"more than {self._config.ledger.max_pending} actions are waiting for commit; retry shortly")
        future = self._writer.submit(valid, ctx.peer)
        if single:
            return _Pending("", None, False, future=future, transform=_single_answer)
        return _Pending("", None, False, future=future, transform=lambda outcomes: _batch_answer(slots, outcomes))

    # --- reads

    def _op_ping(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        return _Pending("", None, False, later=lambda: {"ok": True, "head": self._writer.head.size})

    def _op_get(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"seq", "action_id"})
        seq, action_id = request.get("seq"), request.get("action_id")
        if (seq is None) == (action_id is None):
            raise InvalidRequest("get needs exactly one of 'seq' or 'action_id'")
        if seq is not None:
            store.checked_int(seq, "seq")
        if action_id is not None:
            store.checked_string(action_id, "action_id")

        def read(conn: Any) -> Answer:
            entry = store.get_entry(conn, seq=seq, action_id=action_id)
            if entry is None:
                what = f"seq {seq}" if seq is not None else f"action_id {action_id!r}"
                raise NotFound(f"no entry with {what}")
            return {"ok": True, "record": entry.query_record()}

        return self._deferred(read)

    def _op_query(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        filters = dict(request)

        def read(conn: Any) -> Answer:
            return {"ok": True, "records": [e.query_record() for e in store.query_entries(conn, filters)]}

        return self._deferred(read)

    def _op_logs(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"n"})
        n = request.get("n", 50)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidRequest("n must be a non-negative integer", field="n")
        return _Pending("", None, False, later=lambda: {
            "ok": True, "lines": [json.loads(line) for line in self._log_ring.recent(n)]})

    def _op_stats(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"capability", "function", "plan_id", "intent_id"})
        for key, value in request.items():
            store.checked_string(value, key)
        plan_id, intent_id = request.get("plan_id"), request.get("intent_id")

        def answer() -> Answer | asyncio.Future[Any]:
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

            future: asyncio.Future[Any] = self._read(read)
            return future

        return _Pending("", None, False, later=answer)

    def _op_rotate_key(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        """A new signing key from the next entry on; answers the KeyRotated entry and the new vkey.

        Only root and the daemon's own user may ask: a writer may append, not re-key the ledger.
        """
        _only(request, set())
        uid = None if ctx.peer is None else ctx.peer.get("uid")
        if uid not in (0, os.getuid()):
            raise Forbidden("only root or the daemon's own user may rotate the signing key")
        if not self.accepting_writes:
            raise Unavailable("the daemon is shutting down")
        writer = self._writer

        def answer(outcome: AppendOutcome) -> Answer:
            if not isinstance(outcome, AppendResult):
                return error_answer(outcome)
            return {**outcome.to_wire(), "vkey": writer.key.verifier.vkey()}

        return _Pending("", None, False, future=writer.rotate_key(ctx.peer), transform=answer)

    def _op_call(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        """A local capability call; ``observability.ingestor:v1.ingest`` is the one there is."""
        _only(request, {"capability", "args"})
        capability = request.get("capability")
        if capability != ingestor.CAPABILITY:
            shown = capability[:80] if isinstance(capability, str) else repr(capability)[:80]
            raise InvalidRequest(f"unknown capability {shown!r} (known: {ingestor.CAPABILITY})", field="capability")
        started = time.perf_counter()
        mode, raw_records = ingestor.parse_call(request.get("args"))
        if mode == "replay":
            return _Pending("", None, False, future=asyncio.ensure_future(self._replay_call(started, ctx)),
                            transform=_identity)
        records: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        now = ingestor.now_s()
        for index, raw in enumerate(raw_records):
            try:
                records.append(ingestor.normalize_record(raw, now))
            except ValueError as exc:
                errors.append({"index": index, "reason": str(exc)})
        if mode == "single" and errors:
            raise InvalidRequest(f"record: {errors[0]['reason']}", field="args")
        result = {"mode": mode, "ingested": len(records), "errors": errors}
        return self._record_call(mode, records, result, started, ctx)

    def _record_call(
        self, mode: str, records: list[dict[str, Any]], result: dict[str, Any], started: float, ctx: _Context
    ) -> _Pending:
        ok = bool(records) or not result.get("errors")
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        call, outcome = ingestor.call_actions(mode, records, result, duration_ms, ok)
        actions = [validate_action(call), validate_action(outcome)]
        if not self.accepting_writes:
            raise Unavailable("the daemon is shutting down; retry against the restarted daemon")
        future = self._writer.submit(actions, ctx.peer)

        def answer(outcomes: list[AppendOutcome]) -> Answer:
            for appended in outcomes:
                if not isinstance(appended, AppendResult):
                    return error_answer(appended)
            return {"ok": True, "result": result}

        return _Pending("", None, False, future=future, transform=answer)

    async def _replay_call(self, started: float, ctx: _Context) -> Answer:
        if self.replay_wm is None:
            return error_answer(Unavailable("Working Memory is off (wm.enabled = false)"))
        replayed = await self.replay_wm(0)
        result = {"mode": "replay", "ingested": replayed["ingested"], "errors": [],
                  "scanned_actions": replayed["scanned_actions"]}
        pending = self._record_call("replay", [], result, started, ctx)
        assert pending.future is not None and pending.transform is not None  # noqa: S101 - set just above
        return pending.transform(await pending.future)

    def _op_replay_status(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        """How far a running replay got (for progress bars): ledger entries done of total."""
        _only(request, set())
        progress = self.replay_progress
        body: Answer = {"ok": True, "running": progress is not None}
        if progress is not None:
            body.update(done=progress[0], total=progress[1])
        return _Pending("", None, False, body)

    def _op_replay(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        """Rebuild Working Memory from ``from`` (default 0: from scratch) inside the running daemon."""
        _only(request, {"from"})
        start = store.checked_int(request.get("from", 0), "from")
        if start < 0:
            raise InvalidRequest("from must be >= 0", field="from")
        if self.replay_wm is None:
            raise Unavailable("Working Memory is off (wm.enabled = false)")
        replay = self.replay_wm

        async def run() -> Answer:
            return {"ok": True, "mode": "replay", **(await replay(start))}

        return _Pending("", None, False, future=asyncio.ensure_future(run()), transform=_identity)

    def _wm_file(self) -> Path:
        for sink in self._config.sinks:
            if sink.type == "wm":
                return sink.path
        raise Unavailable("Working Memory is off (wm.enabled = false)")

    def _op_wm_search(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        """Working Memory search: text, tags (any of), since/until (seconds), plan/intent/session, limit."""
        path, filters = self._wm_file(), dict(request)
        return self._deferred(lambda conn: {"ok": True, "entries": wm_ops.search(path, filters)})

    def _op_wm_digest(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, set())
        path = self._wm_file()
        return self._deferred(lambda conn: {"ok": True, **wm_ops.digest(path)})

    def _op_checkpoint(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, set())
        return self._deferred(lambda conn: {"ok": True, "checkpoint": proofs.latest_checkpoint_note(conn)})

    def _op_prove_inclusion(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"seq", "action_id"})
        seq, action_id = request.get("seq"), request.get("action_id")
        if (seq is None) == (action_id is None):
            raise InvalidRequest("prove_inclusion needs exactly one of 'seq' or 'action_id'")
        if seq is not None:
            store.checked_int(seq, "seq")
        if action_id is not None:
            store.checked_string(action_id, "action_id")
        return self._deferred(
            lambda conn: {"ok": True, **snapshot(conn, proofs.inclusion, seq=seq, action_id=action_id)}
        )

    def _op_prove_consistency(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        _only(request, {"size1", "size2"})
        size1 = store.checked_int(request.get("size1"), "size1")
        size2 = None if request.get("size2") is None else store.checked_int(request["size2"], "size2")
        return self._deferred(lambda conn: {"ok": True, **snapshot(conn, proofs.consistency, size1, size2)})

    def _op_backup(self, request: dict[str, Any], ctx: _Context) -> _Pending:
        """A consistent copy of the state dir, written by the daemon into ``dest`` (see ``ccos_obsd.backup``).

        Off unless ``backup.allow_socket``: it makes the daemon create files, as its own
        user, where the peer says. It starts once every earlier request on the
        connection is answered, so the copy holds the connection's own appends.
        """
        _only(request, {"dest"})
        if not self._config.backup.allow_socket:
            raise Forbidden("backup over the socket is off (backup.allow_socket = false); "
                            "`ccos-obsd backup --state-dir` copies the state dir directly")
        dest = store.checked_string(request.get("dest"), "dest")
        if "\x00" in dest or not os.path.isabs(dest):
            raise InvalidRequest("dest must be an absolute path", field="dest")
        state_dir = self._config.state_dir

        async def run() -> Answer:
            try:
                summary = await asyncio.to_thread(backup_state_dir, state_dir, Path(dest))
            except BackupError as exc:
                raise InvalidRequest(exc.message, field=exc.field) from None
            log.info("backup_written", peer=ctx.peer, **summary.to_json())
            return {"ok": True, **summary.to_json()}

        return _Pending("", None, False, later=lambda: asyncio.ensure_future(run()))

    def _deferred(self, read: Callable[[Any], Answer]) -> _Pending:
        return _Pending("", None, False, later=lambda: self._read(read))


def snapshot(conn: Any, read: Callable[..., Answer], *args: Any, **kwargs: Any) -> Answer:
    """Run ``read`` inside one read transaction, so every row it reads is from one moment."""
    conn.execute("BEGIN")
    try:
        return read(conn, *args, **kwargs)
    finally:
        conn.execute("COMMIT")


def _identity(answer: Answer) -> Answer:
    return answer


def _only(request: dict[str, Any], allowed: set[str]) -> None:
    for key in request:
        if key not in allowed:
            raise InvalidRequest(f"unknown request field {key!r}", field=key)


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


class Connection(asyncio.Protocol):
    """One client: framing, ordered answers, backpressure."""

    def __init__(self, server: ConnectionRegistry) -> None:
        self._server = server
        self._dispatcher = server.dispatcher
        self._max_line = server.config.socket.max_line_bytes
        self._max_inflight = server.config.socket.max_inflight
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._discarding = False
        self._pending: deque[_Pending] = deque()
        self._waiting_on: asyncio.Future[Any] | None = None
        self._paused_reading = False
        self._write_paused = False
        self._write_resumed: asyncio.Future[None] | None = None
        """Resolved when writing resumes: what drain() waits on while reads are held back."""
        self._stopped = False
        self.peer: dict[str, int] | None = None
        self.credentials: PeerCredentials | None = None
        self.closed = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("the socket protocol needs a stream transport")
        self._transport = transport
        self.credentials = _peer_credentials(transport)
        self.peer = None if self.credentials is None else self.credentials.stamp()
        if not self._server.admit(self):
            transport.write(encode_answer(error_answer(
                Busy(f"too many connections (socket.max_connections = {self._server.config.socket.max_connections})")
            )))
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._server.gauges.bytes_received += len(data)
        buffer = self._buffer
        buffer += data
        start = 0
        # Checked per read, not per connection: a reload that changes the allow-lists
        # applies to connections already open.
        dispatch = self._dispatcher.dispatch_line if self._server.access.allows(self.credentials) else self._refuse
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                line = bytes(buffer[start:newline]).rstrip(b"\r")
                if newline - start > self._max_line:
                    self._too_large()
                elif line.strip():
                    self._pending.append(dispatch(line, self.peer))
            start = newline + 1
        del buffer[:start]
        if len(buffer) > self._max_line:
            if not self._discarding:
                self._discarding = True
                self._too_large()
            buffer.clear()
        self._flush()

    def eof_received(self) -> bool:
        # Half-close: answer what was read, then close (see _flush).
        self._buffer.clear()
        self._eof = True
        self._flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.forget(self)
        self._transport = None
        self._wake_writer_waiters()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer_waiters()
        self._flush()  # runs the reads held back while paused, then resumes reading

    def _wake_writer_waiters(self) -> None:
        resumed, self._write_resumed = self._write_resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    # --- answers in order

    _eof = False

    def _refuse(self, line: bytes, peer: dict[str, int] | None) -> _Pending:
        self._server.note_forbidden(self.credentials)
        return self._dispatcher.refuse_line(line, self.credentials)

    def _too_large(self) -> None:
        error = FrameTooLarge(
            f"line longer than socket.max_line_bytes ({self._max_line} bytes); it was skipped"
        )
        self._pending.append(_Pending("invalid", None, False, error_answer(error)))

    def _flush(self, _: object = None) -> None:
        chunks: list[bytes] = []
        pending = self._pending
        count = self._dispatcher.aggregates.count_request
        while pending:
            head = pending[0]
            if head.later is not None:
                # A read runs only while its client takes its answers: otherwise a client
                # that pipelines large reads and never reads would have them all buffered.
                if chunks and self._transport is not None:
                    self._transport.write(b"".join(chunks))
                    chunks.clear()
                if self._write_paused:
                    if self._write_resumed is None:
                        self._write_resumed = asyncio.get_running_loop().create_future()
                    self._waiting_on = self._write_resumed
                    break
                later, head.later = head.later, None
                try:
                    result = later()
                except RequestError as error:
                    result = error_answer(error)
                if isinstance(result, dict):
                    head.answer = result
                else:
                    head.future, head.transform = result, _identity
            if head.answer is None:
                future, transform = head.future, head.transform
                if future is None or transform is None:
                    raise RuntimeError("pending answer without a future")
                if not future.done():
                    if self._waiting_on is not future:
                        self._waiting_on = future
                        future.add_done_callback(self._flush)
                    break
                try:
                    head.answer = transform(future.result())
                except RequestError as error:
                    head.answer = error_answer(error)
                except Exception:
                    log.exception("request_failed", op=head.op)
                    head.answer = error_answer(RequestError("internal error; see the daemon log"))
            pending.popleft()
            answer = head.answer
            if head.op != "invalid" or not answer.get("ok", True):
                count(head.op, "ok" if answer.get("ok") else answer["error"]["code"])
            if head.has_id:
                answer = {"id": head.request_id, **answer}
            try:
                chunks.append(encode_answer(answer))
            except (ValueError, TypeError):
                log.exception("answer_not_encodable", op=head.op)
                chunks.append(encode_answer(error_answer(Internal("answer could not be encoded; see the daemon log"))))
        if chunks and self._transport is not None:
            self._transport.write(b"".join(chunks))
        if self._eof and not pending and self._transport is not None:
            self._transport.close()
        self._update_reading()

    def _update_reading(self) -> None:
        if self._transport is None:
            return
        should_pause = self._stopped or self._write_paused or len(self._pending) >= self._max_inflight
        if should_pause and not self._paused_reading:
            self._transport.pause_reading()
            self._paused_reading = True
        elif not should_pause and self._paused_reading:
            self._transport.resume_reading()
            self._paused_reading = False

    @property
    def idle(self) -> bool:
        return not self._pending

    @property
    def waiting_on(self) -> asyncio.Future[Any] | None:
        return self._waiting_on

    def stop_reading(self) -> None:
        """For shutdown: read no further requests (those read are still answered)."""
        self._stopped = True
        self._update_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _peer_credentials(transport: asyncio.BaseTransport) -> PeerCredentials | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    return peer_credentials(sock)


class ConnectionRegistry:
    """The set of open connections, with the connection limit and drain support."""

    def __init__(self, config: Config, dispatcher: Dispatcher, gauges: LiveGauges) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.gauges = gauges
        self._connections: set[Connection] = set()
        self.access = AccessPolicy.from_config(config.socket)
        """Who may use the socket; a configuration reload replaces it whole."""
        self._forbidden_uids: set[int | None] = set()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration: its limits and allow-lists hold from the next request on."""
        self.config = config
        self.access = AccessPolicy.from_config(config.socket)
        self.dispatcher.reconfigure(config)

    def protocol_factory(self) -> Connection:
        return Connection(self)

    def admit(self, connection: Connection) -> bool:
        if len(self._connections) >= self.config.socket.max_connections:
            log.warning("connection_refused", reason="max_connections", peer=connection.peer)
            self.dispatcher.aggregates.count_request("connect", "busy")
            return False
        self._connections.add(connection)
        self.gauges.connections_open = len(self._connections)
        return True

    def note_forbidden(self, credentials: PeerCredentials | None) -> None:
        """Log a refused peer, once per uid for the daemon's lifetime."""
        uid = None if credentials is None else credentials.uid
        if uid in self._forbidden_uids:
            return
        self._forbidden_uids.add(uid)
        if credentials is None:
            log.warning("peer_forbidden", uid=None, gid=None, pid=None, reason="no peer credentials")
        else:
            log.warning("peer_forbidden", uid=credentials.uid, gid=credentials.gid, pid=credentials.pid,
                        groups=sorted(credentials.groups))

    def forget(self, connection: Connection) -> None:
        self._connections.discard(connection)
        self.gauges.connections_open = len(self._connections)

    def stop_reading(self) -> None:
        for connection in self._connections:
            connection.stop_reading()

    async def drain(self, within_s: float) -> None:
        """Answer every request already read (within ``within_s``), then close every connection."""
        deadline = time.monotonic() + within_s
        for connection in list(self._connections):
            while not connection.idle and time.monotonic() < deadline:
                waiter = connection.waiting_on
                if waiter is None:
                    break
                await asyncio.wait([waiter], timeout=deadline - time.monotonic())
                await asyncio.sleep(0)  # let the done-callback write the answers
            connection.close()
        closing = [c.closed for c in self._connections]
        if closing:
            await asyncio.wait(closing, timeout=max(0.1, deadline - time.monotonic()))
