"""Structured JSON logs: one line per event on stdout, and a ring of recent lines.

journald (or whoever reads stdout) keeps the full stream; the ring keeps the
last ``log.ring_size`` lines in memory for the ``logs`` socket op and
``GET /v1/logs``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


class LogRing:
    """The most recent rendered log lines (thread-safe: deque append is atomic)."""

    def __init__(self, capacity: int) -> None:
        self._lines: deque[str] = deque(maxlen=capacity)

    def append(self, line: str) -> None:
        self._lines.append(line)

    def recent(self, n: int) -> list[str]:
        if n <= 0:
            return []
        lines = list(self._lines)
        return lines[-n:]

    def resize(self, capacity: int) -> None:
        self._lines = deque(self._lines, maxlen=capacity)


class _RingAndStreamLogger:
    """structlog's final logger: writes each rendered line to the stream and the ring."""

    def __init__(self, stream: TextIO, ring: LogRing, lock: threading.Lock) -> None:
        self._stream = stream
        self._ring = ring
        self._lock = lock

    def msg(self, message: str) -> None:
        self._ring.append(message)
        with self._lock:
            try:
                self._stream.write(message + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                # stdout gone (closed pipe): the ring still has the line.
                pass

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _dumps(obj: Any, **kwargs: Any) -> str:
    kwargs.setdefault("default", str)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), **kwargs)


def configure_logging(level: str, ring: LogRing, stream: TextIO | None = None) -> None:
    """Route structlog (and stdlib logging, e.g. aiohttp's) through the JSON renderer."""
    lock = threading.Lock()
    out = stream if stream is not None else sys.stdout
    final_logger = _RingAndStreamLogger(out, ring, lock)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
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
