"""Structured JSON logs: one line per event on stdout, and a ring of recent lines.

journald (or whoever reads stdout) keeps the full stream; the ring keeps the
last ``log.ring_size`` lines in memory for the ``logs`` socket op and
``GET /v1/logs``, numbered so that a reader that polls (``ccos-obsd logs
--follow``) can ask for the lines after the last one it saw.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def _dumps(obj: Any, **_: Any) -> str:
    # One encoder for every line: json.dumps with options builds a new one per call,
    # which costs more than the encoding on the per-action hot path.
    return _ENCODER.encode(obj)


@dataclass(frozen=True, slots=True)
class RingPage:
    """Lines read from a :class:`LogRing`, oldest first."""

    lines: list[str]
    last: int
    """The number of the newest line this page covers: ask for the lines ``after`` it next."""
    missed: int = 0
    """Lines after the reader's ``after`` that the ring no longer holds."""


class LogRing:
    """The most recent rendered log lines, numbered 1, 2, ... in the order they were added.

    The numbers tell a polling reader which lines are new: identical lines, or many
    lines with one ``ts``, stay distinct. Lines come from the event loop and from the
    ledger writer's thread; one lock keeps numbers and order in step.
    """

    def __init__(self, capacity: int) -> None:
        self._lines: deque[str] = deque(maxlen=capacity)
        self._newest = 0
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            self._newest += 1

    def extend(self, lines: list[str]) -> None:
        with self._lock:
            self._lines.extend(lines)
            self._newest += len(lines)

    def read(self, n: int, after: int | None = None) -> RingPage:
        """The newest ``n`` lines; or, ``after`` a line number, the oldest ``n`` lines that follow it."""
        with self._lock:
            lines, newest = list(self._lines), self._newest
        if after is None:
            return RingPage(lines[-n:] if n > 0 else [], newest)
        first = newest - len(lines) + 1  # the number of lines[0]
        start = max(0, after + 1 - first)
        page = lines[start:start + n]
        return RingPage(page, first + start + len(page) - 1 if page else after, max(0, first - after - 1))


class _RingAndStreamLogger:
    """structlog's final logger: writes each rendered line to the stream and the ring."""

    def __init__(self, stream: TextIO, ring: LogRing, lock: threading.Lock) -> None:
        self._stream = stream
        self._ring = ring
        self._lock = lock

    def msg(self, message: str) -> None:
        self.write_lines([message])

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    def write_lines(self, lines: list[str]) -> None:
        self._ring.extend(lines)
        with self._lock:
            try:
                self._stream.write("".join(line + "\n" for line in lines))
                self._stream.flush()
            except (OSError, ValueError):
                # stdout gone (closed pipe): the ring still has the lines.
                pass


class ActionLog:
    """The per-action log lines (one per committed entry), written once per group commit.

    The hot path of the daemon logs every action; these lines are encoded by
    the same JSON encoder as every other line (what structlog's renderer calls),
    directly: the caller passes one ``ts`` for the whole group, and the group's
    lines are written with one system call.
    """

    def __init__(self, enabled: bool, out: _RingAndStreamLogger | None) -> None:
        self.enabled = enabled and out is not None
        self._out = out

    def write_group(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if not self.enabled or self._out is None:
            return
        ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        encode = _ENCODER.encode
        lines = []
        for event, fields in events:
            fields["event"] = event
            fields["level"] = "info"
            fields["ts"] = ts
            lines.append(encode(fields))
        self._out.write_lines(lines)


_action_log = ActionLog(False, None)


class Committed(Protocol):
    """What the action log reads of a committed entry (``ledger.writer.CommittedEntry``)."""

    @property
    def seq(self) -> int: ...

    @property
    def fields(self) -> dict[str, Any]: ...


_LOGGED_FIELDS = ("action_type", "action_id", "function_name", "intent_id", "plan_id", "step_id", "session_id")


def action_log_event(action_type: str, fields: dict[str, Any]) -> str:
    """CCOS's structured-log event name for an appended action."""
    if action_type == "CapabilityResult":
        return "capability_result_recorded"
    if action_type.startswith("Plan"):
        return "plan_event"
    if action_type.startswith("Delegation"):
        return "delegation_event"
    if "result" in fields:
        return "action_result_recorded"
    return "action_appended"


def log_committed(entries: Sequence[Committed]) -> None:
    """One action log line per committed entry, the group's lines in one write (a commit listener)."""
    actions_log = _action_log
    if not actions_log.enabled:
        return
    events = []
    for entry in entries:
        fields = entry.fields
        context = {key: fields[key] for key in _LOGGED_FIELDS if key in fields}
        context["seq"] = entry.seq
        context["timestamp"] = fields["timestamp_ms"] if "timestamp_ms" in fields else fields["recorded_at_ms"]
        events.append((action_log_event(fields["action_type"], fields), context))
    actions_log.write_group(events)


_lifecycle_log: Any = structlog.get_logger("ccos_obsd.lifecycle")


def lifecycle_log() -> Any:
    """The logger for the daemon's lifecycle lines, which no log level filters out."""
    return _lifecycle_log


def action_log() -> ActionLog:
    """The per-action logger configured by the last ``configure_logging``."""
    return _action_log


def configure_logging(level: str, ring: LogRing, stream: TextIO | None = None) -> None:
    """Route structlog (and stdlib logging, e.g. aiohttp's) through the JSON renderer."""
    global _action_log, _lifecycle_log
    lock = threading.Lock()
    out = stream if stream is not None else sys.stdout
    final_logger = _RingAndStreamLogger(out, ring, lock)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    _action_log = ActionLog(numeric <= logging.INFO, final_logger)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]
    # Start, ready, reload and stop lines are written at every level: operators and
    # supervisors wait for them even when routine lines are off.
    _lifecycle_log = structlog.wrap_logger(
        final_logger, processors=processors, wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: final_logger,
        cache_logger_on_first_use=False,
    )
    handler = _StdlibToStructlog()
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))


class _StdlibToStructlog(logging.Handler):
    """Third-party libraries log through stdlib logging; re-emit as JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = structlog.get_logger(record.name)
        logger.log(record.levelno, "library_log", logger_name=record.name, message=record.getMessage())
