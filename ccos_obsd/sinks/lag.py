"""How long the entries a sink has not delivered have waited: ``ccos_sink_lag_seconds``.

The collector never does I/O, so the age of a sink's oldest undelivered entry
cannot be read from the ledger at scrape time. Instead :class:`CommitTimes`
notes, at each group commit (a commit listener, on the writer thread), the
group's first seq and the ``recorded_at_ms`` of its first entry. A sink whose
cursor is ``c`` (every entry below ``c`` delivered) with ``c`` below the head
has waited since the time of the last group that starts at or below ``c``.

Bound: points that every sink's cursor has passed are dropped as the sinks
report, so while the sinks keep up the record holds a few groups. While one
falls behind it grows by one point per group commit up to ``max_points``
(4,096: 64 KiB); past that every second point is dropped, the oldest
always kept, so the record still spans the whole backlog at a coarser grain.
The age it then gives is that of a group at or before the cursor: never less
than the truth, more by at most the time between the points left around it.
"""

from __future__ import annotations

import bisect
import threading
import time
from array import array
from collections.abc import Callable

MAX_POINTS = 4096


class CommitTimes:
    """(first seq, recorded time) of recent commit groups; thread-safe."""

    def __init__(self, max_points: int = MAX_POINTS, clock: Callable[[], float] = time.time) -> None:
        self._max_points = max_points
        self._clock = clock
        self._lock = threading.Lock()
        self._seqs = array("q")
        """First seq of each group noted, increasing."""
        self._times = array("d")
        """Unix seconds each group's first entry was recorded."""

    def note(self, first_seq: int, recorded_s: float) -> None:
        """A group starting at ``first_seq`` committed (or, at start-up, the oldest entry a sink still owes)."""
        with self._lock:
            if self._seqs and first_seq <= self._seqs[-1]:
                return  # already covered: seqs only grow
            self._seqs.append(first_seq)
            self._times.append(recorded_s)
            if len(self._seqs) > self._max_points:
                self._seqs = self._seqs[::2]
                self._times = self._times[::2]

    def forget_below(self, cursor: int) -> None:
        """Drop the points no cursor at or above ``cursor`` needs (all sinks have delivered that far)."""
        with self._lock:
            needed = bisect.bisect_right(self._seqs, cursor) - 1  # the last point at or below the cursor
            if needed > 0:
                del self._seqs[:needed]
                del self._times[:needed]

    def age(self, cursor: int, head: int) -> float:
        """Seconds the oldest entry at or after ``cursor`` has waited (0 when ``cursor`` reached ``head``)."""
        if cursor >= head:
            return 0.0
        with self._lock:
            at = bisect.bisect_right(self._seqs, cursor) - 1
            # No point at or below the cursor: entries older than anything noted; the oldest noted is a lower bound.
            recorded = self._times[max(at, 0)] if self._times else None
        if recorded is None:
            return 0.0
        return max(0.0, self._clock() - recorded)
