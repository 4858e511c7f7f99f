"""Lean socket drivers: the benchmark client must cost the 2 shared cores as little as possible.

``pipeline`` sends pre-encoded request lines over one connection from one
thread (non-blocking socket, a selector), keeping at most ``window`` requests
unanswered, and only counts answer lines while the clock runs; answers are
parsed and checked after it stops. ``pipeline_many`` does the same over several
connections from the same one thread and selector (no thread per connection:
on 2 shared cores, threads would cost the daemon more CPU and add GIL hand-offs).
``open_loop`` sends lines at a fixed rate regardless of answers and stamps each
answer's arrival. ``paced`` sends them one at a time per connection, each after
the previous answer and not before it is due: an agent waiting for each
acknowledgement.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_RECV = 1 << 20


@dataclass
class PipelineRun:
    requests: int
    seconds: float
    answers: list[dict[str, Any]] = field(repr=False)


def pipeline(socket_path: Path, lines: list[bytes], *, window: int) -> PipelineRun:
    """Send every line, at most ``window`` unanswered at once; return when all are answered."""
    payload = memoryview(b"".join(lines))
    ends: list[int] = []
    offset = 0
    for line in lines:
        offset += len(line)
        ends.append(offset)
    total = len(lines)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(socket_path))
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    chunks: list[bytes] = []
    sent_bytes = 0
    received = 0
    writing = True
    started = time.perf_counter()
    try:
        while received < total:
            for _, events in selector.select():
                if events & selectors.EVENT_READ:
                    chunk = sock.recv(_RECV)
                    if not chunk:
                        raise ConnectionError(f"daemon closed the connection after {received} answers")
                    chunks.append(chunk)
                    received += chunk.count(b"\n")
                if events & selectors.EVENT_WRITE:
                    limit = ends[min(received + window, total) - 1]
                    if limit > sent_bytes:
                        sent_bytes += sock.send(payload[sent_bytes:limit])
            want_write = sent_bytes < len(payload) and sent_bytes < ends[min(received + window, total) - 1]
            if want_write != writing:
                writing = want_write
                selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0))
        seconds = time.perf_counter() - started
    finally:
        selector.close()
        sock.close()
    answers = [json.loads(line) for line in b"".join(chunks).splitlines()]
    return PipelineRun(total, seconds, answers)


class _Connection:
    """One socket of ``pipeline_many``: its share of the lines, as one buffer, and its progress."""

    def __init__(self, socket_path: Path, lines: list[bytes], window: int) -> None:
        self.payload = memoryview(b"".join(lines))
        self.ends: list[int] = []
        offset = 0
        for line in lines:
            offset += len(line)
            self.ends.append(offset)
        self.total = len(lines)
        self.window = window
        self.sent_bytes = 0
        self.received = 0
        self.chunks: list[bytes] = []
        self.writing = True
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.sock.setblocking(False)

    def send_limit(self) -> int:
        """Bytes that may be sent so far: up to the end of the last line the window allows."""
        return self.ends[min(self.received + self.window, self.total) - 1]


def pipeline_many(socket_path: Path, lines: list[bytes], *, connections: int, window: int) -> PipelineRun:
    """``pipeline`` over ``connections`` sockets at once, line i on connection i mod ``connections``,
    each keeping at most ``window`` requests unanswered; returns when every line is answered.

    The clock runs from the first send to the last answer, over every connection.
    """
    shares = [lines[i::connections] for i in range(connections)]
    conns = [_Connection(socket_path, share, window) for share in shares if share]
    selector = selectors.DefaultSelector()
    read_write = selectors.EVENT_READ | selectors.EVENT_WRITE
    for conn in conns:
        selector.register(conn.sock, read_write, conn)
    unfinished = len(conns)
    started = time.perf_counter()
    try:
        while unfinished:
            for key, events in selector.select():
                conn = key.data
                if events & selectors.EVENT_READ:
                    chunk = conn.sock.recv(_RECV)
                    if not chunk:
                        raise ConnectionError(f"daemon closed a connection after {conn.received} answers")
                    conn.chunks.append(chunk)
                    conn.received += chunk.count(b"\n")
                    if conn.received >= conn.total:
                        selector.unregister(conn.sock)
                        unfinished -= 1
                        continue
                limit = conn.send_limit()
                if events & selectors.EVENT_WRITE and limit > conn.sent_bytes:
                    conn.sent_bytes += conn.sock.send(conn.payload[conn.sent_bytes:limit])
                want_write = conn.sent_bytes < limit
                if want_write != conn.writing:
                    conn.writing = want_write
                    selector.modify(conn.sock, read_write if want_write else selectors.EVENT_READ, conn)
        seconds = time.perf_counter() - started
    finally:
        selector.close()
        for conn in conns:
            conn.sock.close()
    answers = [json.loads(line) for conn in conns for line in b"".join(conn.chunks).splitlines()]
    return PipelineRun(len(lines), seconds, answers)


@dataclass
class OpenLoopRun:
    rate: float
    scheduled: list[float] = field(repr=False)
    sent: list[float] = field(repr=False)
    received: list[float] = field(repr=False)
    answers: list[dict[str, Any]] = field(repr=False)

    def latencies_from_send(self) -> list[float]:
        return [r - s for r, s in zip(self.received, self.sent, strict=True)]

    def latencies_from_schedule(self) -> list[float]:
        return [r - s for r, s in zip(self.received, self.scheduled, strict=True)]


def open_loop(socket_path: Path, lines: list[bytes], *, rate: float) -> OpenLoopRun:
    """Send line i at ``start + i / rate`` (never waiting for answers); stamp every answer.

    Two threads: the sender sleeps until each line is due (time.sleep is finer than a
    selector's millisecond timeout); the receiver blocks in recv and stamps all the
    answer lines of a chunk with the chunk's arrival time.
    """
    total = len(lines)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(socket_path))
    sent = [0.0] * total
    received: list[float] = []
    chunks: list[bytes] = []
    failure: list[BaseException] = []

    def receive() -> None:
        try:
            while len(received) < total:
                chunk = sock.recv(_RECV)
                now = time.perf_counter()
                if not chunk:
                    raise ConnectionError(f"daemon closed the connection after {len(received)} answers")
                chunks.append(chunk)
                received.extend([now] * chunk.count(b"\n"))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            failure.append(exc)

    receiver = threading.Thread(target=receive, name="bench-receive", daemon=True)
    receiver.start()
    start = time.perf_counter() + 0.01
    scheduled = [start + i / rate for i in range(total)]
    try:
        sendall, perf_counter, sleep = sock.sendall, time.perf_counter, time.sleep
        for i, line in enumerate(lines):
            delay = scheduled[i] - perf_counter()
            if delay > 0:
                sleep(delay)
            sent[i] = perf_counter()
            sendall(line)
        receiver.join(timeout=60 + total / rate)
    finally:
        sock.close()
    if failure:
        raise failure[0]
    if len(received) < total:
        raise TimeoutError(f"only {len(received)} of {total} answers arrived")
    answers = [json.loads(line) for line in b"".join(chunks).splitlines()]
    return OpenLoopRun(rate, scheduled, sent, received, answers)


@dataclass
class PacedRun:
    rate: float
    connections: int
    seconds: float
    """From the first line's due time to the last answer."""
    latencies: list[float] = field(repr=False)
    """Seconds from each request's send to its answer."""
    answers: list[dict[str, Any]] = field(repr=False)

    @property
    def achieved_rate(self) -> float:
        return len(self.answers) / self.seconds


class _PacedConnection:
    """One socket of ``paced``: the global index of its next line, and the request in flight."""

    def __init__(self, socket_path: Path, first: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(socket_path))
        self.next = first
        self.sent_at = 0.0
        self.in_flight = False
        self.chunks: list[bytes] = []


def paced(
    socket_path: Path, lines: list[bytes], *, rate: float, connections: int = 1, seconds: float | None = None,
) -> PacedRun:
    """Line i is due at ``start + i / rate`` and goes on connection i mod ``connections``; a connection
    sends its next line once the previous one is answered and the line is due (never earlier), so the
    rate is exact while the daemon keeps up and otherwise as high as one-at-a-time allows. No line is
    sent after ``start + seconds``; returns when every sent line is answered.

    One thread and selector for every connection; while none has a request in flight, the thread
    sleeps until the next line is due (finer than a selector's millisecond timeout).
    """
    total = len(lines)
    conns = [_PacedConnection(socket_path, k) for k in range(min(connections, total))]
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    latencies: list[float] = []
    perf_counter, sleep = time.perf_counter, time.sleep
    start = perf_counter() + 0.01
    stop_at = start + seconds if seconds is not None else float("inf")
    last_answer = start
    try:
        while True:
            now = perf_counter()
            next_due = float("inf")
            for conn in conns:
                if conn.in_flight or conn.next >= total:
                    continue
                due = start + conn.next / rate
                if due > stop_at or now > stop_at:
                    conn.next = total  # the run is over: a line still unsent when it ends is left out
                elif due <= now:
                    conn.sent_at = perf_counter()
                    conn.sock.sendall(lines[conn.next])
                    conn.in_flight = True
                else:
                    next_due = min(next_due, due)
            waiting = sum(conn.in_flight for conn in conns)
            if not waiting:
                if next_due == float("inf"):
                    break
                sleep(max(0.0, next_due - perf_counter()))
                continue
            timeout = None if next_due == float("inf") else max(0.0, next_due - perf_counter())
            for key, _ in selector.select(timeout):
                conn = key.data
                chunk = conn.sock.recv(_RECV)
                if not chunk:
                    raise ConnectionError(f"daemon closed a connection after {len(latencies)} answers")
                conn.chunks.append(chunk)
                if b"\n" in chunk:
                    last_answer = perf_counter()
                    latencies.append(last_answer - conn.sent_at)
                    conn.in_flight = False
                    conn.next += len(conns)
    finally:
        selector.close()
        for conn in conns:
            conn.sock.close()
    answers = [json.loads(line) for conn in conns for line in b"".join(conn.chunks).splitlines()]
    return PacedRun(rate, len(conns), last_answer - start, latencies, answers)


def check_answers(answers: list[dict[str, Any]], expected_actions: int) -> int:
    """Every answer ok (every batch result too), one per action; returns the actions appended."""
    appended = 0
    for answer in answers:
        results = answer.get("results", [answer]) if answer.get("ok") else [answer]
        for result in results:
            if not result.get("ok"):
                raise AssertionError(f"error answer: {result}")
            appended += 1
    if appended != expected_actions:
        raise AssertionError(f"{appended} actions appended, expected {expected_actions}")
    return appended
