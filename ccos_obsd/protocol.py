"""The socket protocol: NDJSON framing, ordered answers and back-pressure.

Each connection is an ``asyncio.Protocol``. Complete lines are parsed and handed
to the op table (``ccos_obsd.ops``) as they arrive; appends go straight to the
ledger writer's queue, so pipelined requests from one client share group
commits. Answers are written in request order: a connection keeps a queue of
pending answers and writes the longest ready prefix whenever one completes.

This is the one place the socket's roles are enforced: each op's role (``ops.TABLE``)
against the roles the peer's kernel credentials hold (``ccos_obsd.access``), before
the op sees its arguments.

Limits keep every client's cost bounded: a line longer than
``socket.max_line_bytes`` is answered ``frame_too_large`` and skipped up to its
newline; a client with ``socket.max_inflight`` unanswered requests, or one that
does not read its answers, is not read from until it catches up.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ccos_obsd.access import ALL_ROLES, ROLE_KEYS, AccessPolicy, PeerCredentials, Role, peer_credentials
from ccos_obsd.config import Config
from ccos_obsd.errors import (
    BadJson,
    Busy,
    Forbidden,
    FrameTooLarge,
    Internal,
    InvalidRequest,
    RequestError,
    UnknownOp,
)
from ccos_obsd.metrics.aggregates import LiveGauges
from ccos_obsd.ops import TABLE, Answer, Caller, Later, Ops, Reply, error_answer

log = structlog.get_logger("ccos_obsd.protocol")

Transform = Callable[[Any], Answer]
_SCALARS = (str, int, float, bool, type(None))


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


@dataclass(slots=True)
class _Pending:
    """One answer in request order: ready now (``answer``) or later (``future``)."""

    op: str
    request_id: Any
    has_id: bool
    answer: Answer | None = None
    future: asyncio.Future[Any] | None = None
    transform: Transform | None = None
    later: Callable[[], Reply] | None = None
    """Run once every earlier request on the connection is answered (read-your-writes)."""


def _pending(op: str, request_id: Any, has_id: bool, reply: Reply) -> _Pending:
    if isinstance(reply, Later):
        return _Pending(op, request_id, has_id, future=reply.future, transform=reply.transform)
    return _Pending(op, request_id, has_id, reply)


def _ignore_refusal(op: str, role: Role) -> None:
    pass


def dispatch_line(
    ops: Ops,
    line: bytes,
    peer: dict[str, int] | None,
    roles: frozenset[Role] = ALL_ROLES,
    refused: Callable[[str, Role], None] = _ignore_refusal,
) -> _Pending:
    """Parse one request line and start its op (or hold it until earlier answers are out).

    An op whose role is not among the peer's ``roles`` is answered ``forbidden``
    before its arguments are even looked at, and ``refused(op, role)`` is told.
    """
    try:
        request = parse_frame(line, ops.config.socket.max_depth)
    except RequestError as error:
        return _Pending("invalid", None, False, error_answer(error))
    has_id = "id" in request
    request_id = request.pop("id", None)
    if not isinstance(request_id, _SCALARS):
        return _Pending("invalid", None, False, error_answer(InvalidRequest("id must be a scalar", field="id")))
    name = request.pop("op", None)
    caller = Caller(peer, line)
    if name is None:
        if "write" not in roles:
            return _forbidden("append", "write", request_id, has_id, peer, refused)
        try:
            return _pending("append", request_id, has_id, ops.append_bare(request, caller))
        except RequestError as error:
            return _Pending("append", request_id, has_id, error_answer(error))
    op = ops.lookup(name) if isinstance(name, str) else None
    if op is None:
        shown = name[:64] if isinstance(name, str) else repr(name)[:64]
        unknown = UnknownOp(f"unknown op {shown!r} (ops: {', '.join(sorted(TABLE))})", field="op")
        return _Pending("unknown", request_id, has_id, error_answer(unknown))
    role = op.role_for(request)
    if role not in roles:
        return _forbidden(op.name, role, request_id, has_id, peer, refused)
    if op.in_order:
        return _Pending(op.name, request_id, has_id, later=lambda: ops.run(op, request, caller))
    try:
        return _pending(op.name, request_id, has_id, ops.run(op, request, caller))
    except RequestError as error:
        return _Pending(op.name, request_id, has_id, error_answer(error))


def _forbidden(
    op: str, role: Role, request_id: Any, has_id: bool, peer: dict[str, int] | None,
    refused: Callable[[str, Role], None],
) -> _Pending:
    refused(op, role)
    who = "this peer" if peer is None else f"uid {peer['uid']}"
    uids, gids = ROLE_KEYS[role]
    error = Forbidden(f"{who} does not have the {role} role that op {op!r} needs ({uids}, {gids})")
    return _Pending(op, request_id, has_id, error_answer(error))


class Connection(asyncio.Protocol):
    """One client: framing, ordered answers, backpressure."""

    def __init__(self, server: ConnectionRegistry) -> None:
        self._server = server
        self._ops = server.ops
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
        self._policy: AccessPolicy | None = None
        self._roles: frozenset[Role] = frozenset()
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
        roles = self._current_roles()
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
                    self._pending.append(dispatch_line(self._ops, line, self.peer, roles, self._refused))
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

    def _current_roles(self) -> frozenset[Role]:
        """The peer's roles: worked out at its first read, and again after a reload replaced the lists."""
        access = self._server.access
        if access is not self._policy:
            self._policy, self._roles = access, access.roles(self.credentials)
        return self._roles

    def _refused(self, op: str, role: Role) -> None:
        self._server.note_forbidden(self.credentials, op, role)

    def _too_large(self) -> None:
        error = FrameTooLarge(
            f"line longer than socket.max_line_bytes ({self._max_line} bytes); it was skipped"
        )
        self._pending.append(_Pending("invalid", None, False, error_answer(error)))

    def _flush(self, _: object = None) -> None:
        """Write the longest prefix of ready answers; start held-back reads as their turn comes."""
        chunks: list[bytes] = []
        pending = self._pending
        count = self._ops.aggregates.count_request
        while pending:
            head = pending[0]
            if head.later is not None:
                # A read runs only while its client takes its answers: otherwise a client
                # that pipelines large reads and never reads would have them all buffered.
                if chunks and self._transport is not None:
                    self._transport.write(b"".join(chunks))
                    chunks.clear()
                if self._write_paused:
                    self._wait_for_writes()
                    break
                self._start_later(head)
            if head.answer is None and not self._settle(head):
                break
            pending.popleft()
            answer = head.answer
            assert answer is not None  # noqa: S101 - settled just above
            if head.op != "invalid" or not answer.get("ok", True):
                count(head.op, "ok" if answer.get("ok") else answer["error"]["code"])
            chunks.append(self._encode(head, answer))
        if chunks and self._transport is not None:
            self._transport.write(b"".join(chunks))
        if self._eof and not pending and self._transport is not None:
            self._transport.close()
        self._update_reading()

    def _wait_for_writes(self) -> None:
        if self._write_resumed is None:
            self._write_resumed = asyncio.get_running_loop().create_future()
        self._waiting_on = self._write_resumed

    @staticmethod
    def _start_later(head: _Pending) -> None:
        later, head.later = head.later, None
        assert later is not None  # noqa: S101 - checked by the caller
        try:
            reply = later()
        except RequestError as error:
            reply = error_answer(error)
        if isinstance(reply, Later):
            head.future, head.transform = reply.future, reply.transform
        else:
            head.answer = reply

    def _settle(self, head: _Pending) -> bool:
        """Turn a finished future into the answer; False (and wait for it) while it runs."""
        future, transform = head.future, head.transform
        if future is None or transform is None:
            raise RuntimeError("pending answer without a future")
        if not future.done():
            if self._waiting_on is not future:
                self._waiting_on = future
                future.add_done_callback(self._flush)
            return False
        try:
            head.answer = transform(future.result())
        except RequestError as error:
            head.answer = error_answer(error)
        except Exception:
            log.exception("request_failed", op=head.op)
            head.answer = error_answer(RequestError("internal error; see the daemon log"))
        return True

    @staticmethod
    def _encode(head: _Pending, answer: Answer) -> bytes:
        if head.has_id:
            answer = {"id": head.request_id, **answer}
        try:
            return encode_answer(answer)
        except (ValueError, TypeError):
            log.exception("answer_not_encodable", op=head.op)
            return encode_answer(error_answer(Internal("answer could not be encoded; see the daemon log")))

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

    def __init__(self, config: Config, ops: Ops, gauges: LiveGauges) -> None:
        self.config = config
        self.ops = ops
        self.gauges = gauges
        self._connections: set[Connection] = set()
        self.access = AccessPolicy.from_config(config.socket)
        """Who holds which role on the socket; a configuration reload replaces it whole."""
        self._forbidden: set[tuple[int | None, Role]] = set()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration: its limits and role lists hold from the next request on."""
        self.config = config
        self.access = AccessPolicy.from_config(config.socket)
        self.ops.reconfigure(config)

    def protocol_factory(self) -> Connection:
        return Connection(self)

    def admit(self, connection: Connection) -> bool:
        if len(self._connections) >= self.config.socket.max_connections:
            log.warning("connection_refused", reason="max_connections", peer=connection.peer)
            self.ops.aggregates.count_request("connect", "busy")
            return False
        self._connections.add(connection)
        self.gauges.connections_open = len(self._connections)
        return True

    def note_forbidden(self, credentials: PeerCredentials | None, op: str, role: Role) -> None:
        """Log a peer refused an op, once per uid and role for the daemon's lifetime (the counter has the rate)."""
        uid = None if credentials is None else credentials.uid
        if (uid, role) in self._forbidden:
            return
        self._forbidden.add((uid, role))
        if credentials is None:
            log.warning("peer_forbidden", role=role, op=op, uid=None, gid=None, pid=None,
                        reason="no peer credentials")
        else:
            log.warning("peer_forbidden", role=role, op=op, uid=credentials.uid, gid=credentials.gid,
                        pid=credentials.pid, groups=sorted(credentials.groups))

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
