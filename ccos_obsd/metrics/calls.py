"""Joining a capability call to its result: which calls are open, and the ledger as the fallback.

CCOS records a call as a ``CapabilityCall`` and, when it returns, a
``CapabilityResult`` whose ``parent_action_id`` is the call (``record_result``).
The metric families count each call once, when it completes: at the call itself
when it carries its own outcome or ``duration_ms``, else at its first result.

Which calls are open is a function of the ledger up to a seq, so the totals are
the same whether they were folded live, restored from a snapshot plus the entries
after it, or rebuilt from the ledger alone. :class:`OpenCalls` remembers the
recent calls (bounded: memory stays flat with millions of open calls); a call it
no longer holds (evicted, or from before a restart) is looked up in the ledger by
:class:`LedgerCalls`, asking the same question of the entries before the result.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from ccos_obsd.ledger import store
from ccos_obsd.ledger.entry import RESULT_TYPES, outcome

CALL_TYPE: Final = "CapabilityCall"

DEFAULT_MAX_OPEN_CALLS = 65_536


@dataclass(frozen=True, slots=True)
class OpenCall:
    """A capability call waiting for its result: what the result needs of it."""

    name: str
    timestamp_ms: int | None


COMPLETED: Final = "completed"
"""A call already counted (it carried its outcome, or a result completed it)."""

CallState = OpenCall | Literal["completed"]
CallLookup = Callable[[str, int], "CallState | None"]
"""(parent action_id, the result's seq) -> the call's state before that seq; None: no such call."""


def completes_itself(fields: Mapping[str, Any]) -> bool:
    """Whether a ``CapabilityCall`` carries its own outcome or duration (and so completes at once)."""
    return outcome(fields) != "unknown" or fields.get("duration_ms") is not None


def call_state(fields: Mapping[str, Any]) -> CallState | None:
    """The state of the call whose entry has ``fields``, as appended; None when it is not a capability call."""
    name = fields.get("function_name")
    if fields.get("action_type") != CALL_TYPE or not isinstance(name, str):
        return None
    if completes_itself(fields):
        return COMPLETED
    timestamp = fields.get("timestamp_ms")
    return OpenCall(name, timestamp if isinstance(timestamp, int) else None)


def result_duration_ms(result: Mapping[str, Any], call: OpenCall) -> float | None:
    """The result's ``duration_ms``; else its ``timestamp_ms`` minus the call's, when both are there and in order."""
    duration = result.get("duration_ms")
    if duration is not None:
        return float(duration)
    ended = result.get("timestamp_ms")
    if isinstance(ended, int) and call.timestamp_ms is not None and ended >= call.timestamp_ms:
        return float(ended - call.timestamp_ms)
    return None


class OpenCalls:
    """The most recent calls' states by action_id, oldest evicted first."""

    def __init__(self, capacity: int = DEFAULT_MAX_OPEN_CALLS) -> None:
        self._capacity = capacity
        self._calls: dict[str, CallState] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, action_id: str) -> CallState | None:
        return self._calls.get(action_id)

    def remember(self, action_id: str, state: CallState) -> None:
        calls = self._calls
        calls.pop(action_id, None)  # re-inserted last: the newest survives eviction longest
        if len(calls) >= self._capacity:
            del calls[next(iter(calls))]
        calls[action_id] = state

    def clear(self) -> None:
        self._calls.clear()


class LedgerCalls:
    """The fallback: a call's state before a seq, read from the ledger (one connection per thread)."""

    def __init__(self, db: Path) -> None:
        self._db = db
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def __call__(self, action_id: str, before_seq: int) -> CallState | None:
        conn = self._connection()
        fields = store.entry_before(conn, action_id, before_seq)
        if fields is None:
            return None
        state = call_state(fields)
        # Only a result after the call completes it (one appended before its call is an orphan).
        if isinstance(state, OpenCall) and store.has_child_between(conn, action_id, RESULT_TYPES,
                                                                   fields["seq"], before_seq):
            return COMPLETED
        return state

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = store.connect(self._db, readonly=True)
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
