"""Metric aggregates, updated as entries commit: pure in-memory state, no I/O.

Nothing reads the ledger at scrape time: the writer thread folds each committed
entry into :class:`Aggregates` (O(1) per entry). A render takes a copy
(:class:`AggregatesSnapshot`, with the live values beside it in a
:class:`MetricState`); ``metrics.collector`` turns that into metric families and
``metrics.snapshot`` encodes it, for the ledger database and for the renderer process.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.samples import Exemplar

from ccos_obsd.ledger.entry import RESULT_TYPES, outcome
from ccos_obsd.metrics.calls import (
    CALL_TYPE,
    COMPLETED,
    DEFAULT_MAX_OPEN_CALLS,
    CallLookup,
    CallState,
    OpenCall,
    OpenCalls,
    call_state,
    result_duration_ms,
)

if TYPE_CHECKING:
    from ccos_obsd.ledger.writer import CommittedEntry

log = structlog.get_logger("ccos_obsd.metrics")

DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Seconds; the CCOS millisecond buckets (5 ms .. 10 s) in base units."""

COMMIT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)

OUTCOMES = ("success", "failure", "unknown")


ExemplarRecord = tuple[str, int, float, float]
"""(action_id, seq, observed value, unix seconds): the latest observation in a bucket."""

EXEMPLAR_MAX_CHARS = 128
"""OpenMetrics: label names and values of one exemplar, together, at most 128 characters."""


@dataclass(slots=True)
class Histogram:
    """Cumulative-at-render histogram state: per-bucket counts (not cumulative), sum.

    With ``exemplars`` (a list, one slot per bucket) each bucket remembers the latest
    observation that fell in it, so a dashboard spike leads back to a ledger entry.
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0
    exemplars: list[ExemplarRecord | None] | None = None

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @classmethod
    def with_exemplars(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, exemplars=[None] * (len(bounds) + 1))

    def observe(self, value: float, exemplar: ExemplarRecord | None = None) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        index = bisect_left(self.bounds, value)
        self.counts[index] += 1
        self.total += value
        self.count += 1
        if exemplar is not None and self.exemplars is not None:
            self.exemplars[index] = exemplar

    def buckets(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        cumulative = 0
        out: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        exemplars = self.exemplars
        for index, (bound, n) in enumerate(zip((*self.bounds, float("inf")), self.counts, strict=True)):
            cumulative += n
            record = exemplars[index] if exemplars is not None else None
            if record is None:
                out.append((_le(bound), float(cumulative)))
            else:
                out.append((_le(bound), float(cumulative), _exemplar(record)))
        return out

    def copy(self) -> Histogram:
        exemplars = None if self.exemplars is None else list(self.exemplars)
        return Histogram(self.bounds, list(self.counts), self.total, self.count, exemplars)



def _exemplar(record: ExemplarRecord) -> Exemplar:
    action_id, seq, value, timestamp = record
    seq_text = str(seq)
    labels = {"action_id": action_id, "seq": seq_text}
    if len("action_id") + len(action_id) + len("seq") + len(seq_text) > EXEMPLAR_MAX_CHARS:
        labels = {"seq": seq_text}  # the seq alone still finds the entry
    return Exemplar(labels, value, timestamp)


def _exemplar_of(fields: Mapping[str, Any], duration_ms: float | None) -> ExemplarRecord | None:
    """The exemplar pointing at the entry ``fields`` (a result, for a joined call) for a duration observation."""
    seq = fields.get("seq")
    if duration_ms is None or seq is None:
        return None
    return (fields["action_id"], seq, duration_ms / 1000.0, fields["recorded_at_ms"] / 1000.0)


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


@dataclass(slots=True)
class CallStats:
    """Per capability or function: CCOS's get_capability_metrics / get_function_metrics."""

    by_outcome: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    cost: float = 0.0
    duration_ms: float = 0.0
    timed_calls: int = 0

    def to_wire(self) -> dict[str, Any]:
        calls = sum(self.by_outcome.values())
        return {
            "calls": calls,
            "successes": self.by_outcome["success"],
            "failures": self.by_outcome["failure"],
            "cost": self.cost,
            "total_duration_ms": self.duration_ms,
            "avg_duration_ms": self.duration_ms / self.timed_calls if self.timed_calls else 0.0,
        }

    def copy(self) -> CallStats:
        return CallStats(dict(self.by_outcome), self.cost, self.duration_ms, self.timed_calls)



OTHER = "__other__"
"""The label value that stands for every value beyond ``metrics.max_label_values``."""

COMMIT_BATCH_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

# The families each label domain feeds, for ccos_metrics_label_overflow_total{family}.
_ACTION_FAMILIES = ("ccos_actions_total",)
_CALL_FAMILIES = {
    "capability": ("ccos_capability_calls_total", "ccos_capability_cost_total"),
    "function": ("ccos_function_calls_total",),
}
_STARTED_FAMILIES = ("ccos_capability_calls_started_total",)
_BOTH = ("capability", "function")
_FUNCTION = ("function",)


class Aggregates:
    """Everything /metrics and the ``stats`` op report, kept up to date per entry.

    Updated by the ledger writer thread, read by renders on other threads: every
    access holds ``_lock``, and readers take copies. The ledger-derived part
    (everything but request counts and commit timings, which describe this process)
    can be restored from a snapshot, so start-up folds in only the entries after it.
    """

    def __init__(
        self,
        duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
        max_label_values: int = 1000,
        max_open_calls: int = DEFAULT_MAX_OPEN_CALLS,
    ) -> None:
        self._lock = threading.Lock()
        self._buckets = tuple(duration_buckets)
        self._max_labels = max_label_values
        self.entries = 0
        self.cost_total = 0.0
        self.actions_by_type: dict[str, int] = {}
        self.capabilities: dict[str, CallStats] = {}
        self.capability_durations: dict[str, Histogram] = {}
        self.functions: dict[str, CallStats] = {}
        self.function_durations: dict[str, Histogram] = {}
        self.calls_started: dict[str, int] = {}
        self.orphan_results = 0
        self.label_overflow: dict[str, int] = {}
        self.unaggregatable = 0
        self._open_calls = OpenCalls(max_open_calls)
        self.call_lookup: CallLookup | None = None
        """The ledger fallback for calls ``_open_calls`` does not hold (set before entries are observed)."""
        # Of this process only:
        self.commit_durations = Histogram(COMMIT_BUCKETS)
        self.commit_batches = Histogram(COMMIT_BATCH_BUCKETS)
        self.ingest_requests: dict[tuple[str, str], int] = {}
        self.refused: dict[str, int] = {}
        self.redactions: dict[str, int] = {}
        self._overflow_warned: set[str] = set()

    @property
    def duration_buckets(self) -> tuple[float, ...]:
        return self._buckets

    @property
    def max_label_values(self) -> int:
        return self._max_labels

    def observe_entries(self, entries: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            for fields in entries:
                try:
                    self._observe(fields)
                except (TypeError, ValueError, OverflowError, KeyError) as exc:
                    # Only an entry written before today's validation rules can get
                    # here; it stays in the ledger, it just cannot be counted.
                    self.unaggregatable += 1
                    if self.unaggregatable == 1:
                        log.warning("entry_not_aggregated", seq=fields.get("seq"), error=str(exc))

    def on_commit(self, entries: Sequence[CommittedEntry], commit_seconds: float) -> None:
        """The commit listener: count a durable group's entries and the commit itself."""
        self.observe_entries(entry.fields for entry in entries)
        self.observe_commit(commit_seconds, len(entries))

    def observe_commit(self, seconds: float, entries: int) -> None:
        with self._lock:
            self.commit_durations.observe(seconds)
            self.commit_batches.observe(entries)

    def count_request(self, op: str, result: str) -> None:
        key = (op, result)
        with self._lock:
            self.ingest_requests[key] = self.ingest_requests.get(key, 0) + 1
            if result != "ok":
                self.refused[result] = self.refused.get(result, 0) + 1

    def count_redactions(self, counts: Mapping[str, int]) -> None:
        """Values (or spans) a ``[[redact]]`` rule replaced in one request's actions, by rule name."""
        with self._lock:
            for rule, n in counts.items():
                self.redactions[rule] = self.redactions.get(rule, 0) + n

    def _observe(self, fields: Mapping[str, Any]) -> None:
        self.entries += 1
        action_type = fields["action_type"]
        cost = fields.get("cost", 0)
        self.cost_total += cost
        by_type = self.actions_by_type
        if action_type not in by_type and len(by_type) >= self._max_labels:
            action_type = self._overflow(_ACTION_FAMILIES)
        by_type[action_type] = by_type.get(action_type, 0) + 1
        if action_type == CALL_TYPE:
            self._observe_call(fields, cost)
        elif action_type in RESULT_TYPES:
            self._observe_result(fields, cost)
        elif (name := fields.get("function_name")) is not None:
            duration_ms = fields.get("duration_ms")
            self._complete(_FUNCTION, name, outcome(fields), cost, duration_ms, _exemplar_of(fields, duration_ms))

    def _observe_call(self, fields: Mapping[str, Any], cost: float) -> None:
        """A ``CapabilityCall``: started now; complete now if it carries its own outcome or duration."""
        state = call_state(fields)
        if state is None:  # no function_name: no capability to count it under
            return
        name = fields["function_name"]
        started = self.calls_started
        if name not in started and len(started) >= self._max_labels:
            name = self._overflow(_STARTED_FAMILIES)
        started[name] = started.get(name, 0) + 1
        if state == COMPLETED:
            duration_ms = fields.get("duration_ms")
            self._complete(_BOTH, fields["function_name"], outcome(fields), cost, duration_ms,
                           _exemplar_of(fields, duration_ms))
        else:
            self._complete(_BOTH, fields["function_name"], None, cost, None, None)
        self._open_calls.remember(fields["action_id"], state)

    def _observe_result(self, fields: Mapping[str, Any], cost: float) -> None:
        """A result: completes its parent call (once), or is an orphan when there is no such call."""
        parent = fields.get("parent_action_id")
        call = None if parent is None else self._find_call(parent, fields.get("seq"))
        if call is None:
            self.orphan_results += 1
            return
        if call == COMPLETED:  # a second result of one call: the call is counted once
            return
        assert isinstance(call, OpenCall) and parent is not None  # noqa: S101 - narrowed above
        self._open_calls.remember(parent, COMPLETED)
        duration_ms = result_duration_ms(fields, call)
        name = fields.get("function_name") or call.name
        self._complete(_BOTH, name, outcome(fields), cost, duration_ms, _exemplar_of(fields, duration_ms))

    def _find_call(self, action_id: str, seq: int | None) -> CallState | None:
        state = self._open_calls.get(action_id)
        if state is None and self.call_lookup is not None and seq is not None:
            state = self.call_lookup(action_id, seq)
        return state

    def _complete(
        self,
        kinds: tuple[str, ...],
        name: str,
        result: str | None,
        cost: float,
        duration_ms: float | None,
        exemplar: ExemplarRecord | None,
    ) -> None:
        """Count a completed call (``result`` None: only add ``cost``) in the capability and/or function families."""
        for kind in kinds:
            if kind == "capability":
                stats, durations = self.capabilities, self.capability_durations
            else:
                stats, durations = self.functions, self.function_durations
            label = name
            entry = stats.get(label)
            if entry is None:
                if len(stats) >= self._max_labels:
                    families = _CALL_FAMILIES[kind]
                    if duration_ms is not None:
                        families = (*families, f"ccos_{kind}_duration_seconds")
                    label = self._overflow(families)
                    entry = stats.get(label)
                if entry is None:
                    entry = stats[label] = CallStats()
            entry.cost += cost
            if result is None:
                continue
            entry.by_outcome[result] += 1
            if duration_ms is not None:
                entry.duration_ms += duration_ms
                entry.timed_calls += 1
                histogram = durations.get(label)
                if histogram is None:
                    histogram = durations[label] = Histogram.with_exemplars(self._buckets)
                histogram.observe(duration_ms / 1000.0, exemplar)

    def _overflow(self, families: Sequence[str]) -> str:
        for family in families:
            self.label_overflow[family] = self.label_overflow.get(family, 0) + 1
            if family not in self._overflow_warned:
                self._overflow_warned.add(family)
                log.warning("metrics_label_overflow", family=family, max_label_values=self._max_labels,
                            counted_as=OTHER)
        return OTHER

    def restore(self, snap: AggregatesSnapshot) -> None:
        """Replace the ledger-derived part with ``snap``'s; this process's own counters stay."""
        with self._lock:
            self.entries = snap.entries
            self.cost_total = snap.cost_total
            self.actions_by_type = dict(snap.actions_by_type)
            self.capabilities = {k: v.copy() for k, v in snap.capabilities.items()}
            self.capability_durations = {k: v.copy() for k, v in snap.capability_durations.items()}
            self.functions = {k: v.copy() for k, v in snap.functions.items()}
            self.function_durations = {k: v.copy() for k, v in snap.function_durations.items()}
            self.calls_started = dict(snap.calls_started)
            self.orphan_results = snap.orphan_results
            self.label_overflow = dict(snap.label_overflow)
            self.unaggregatable = snap.unaggregatable
            self._open_calls.clear()  # held calls are from before the snapshot's moment: ask the ledger

    def snapshot(self) -> AggregatesSnapshot:
        with self._lock:
            return AggregatesSnapshot(
                duration_buckets=self._buckets,
                entries=self.entries,
                cost_total=self.cost_total,
                actions_by_type=dict(self.actions_by_type),
                capabilities={k: v.copy() for k, v in self.capabilities.items()},
                capability_durations={k: v.copy() for k, v in self.capability_durations.items()},
                functions={k: v.copy() for k, v in self.functions.items()},
                function_durations={k: v.copy() for k, v in self.function_durations.items()},
                calls_started=dict(self.calls_started),
                orphan_results=self.orphan_results,
                commit_durations=self.commit_durations.copy(),
                commit_batches=self.commit_batches.copy(),
                ingest_requests=dict(self.ingest_requests),
                refused=dict(self.refused),
                redactions=dict(self.redactions),
                label_overflow=dict(self.label_overflow),
                unaggregatable=self.unaggregatable,
            )


@dataclass(frozen=True, slots=True)
class AggregatesSnapshot:
    """A copy of :class:`Aggregates` at one moment, for a render or a snapshot."""

    duration_buckets: tuple[float, ...]
    entries: int
    cost_total: float
    actions_by_type: dict[str, int]
    capabilities: dict[str, CallStats]
    capability_durations: dict[str, Histogram]
    functions: dict[str, CallStats]
    function_durations: dict[str, Histogram]
    commit_durations: Histogram
    commit_batches: Histogram
    ingest_requests: dict[tuple[str, str], int]
    refused: dict[str, int]
    label_overflow: dict[str, int]
    unaggregatable: int
    calls_started: dict[str, int] = field(default_factory=dict)
    orphan_results: int = 0
    redactions: dict[str, int] = field(default_factory=dict)
    """Of this process: values replaced by each ``[[redact]]`` rule."""

    def stats(self, *, capability: str | None = None, function: str | None = None) -> dict[str, Any]:
        """The ``stats`` op's answer body (CCOS's capability and function metrics)."""
        capabilities = self.capabilities
        functions = self.functions
        if capability is not None:
            capabilities = {k: v for k, v in capabilities.items() if k == capability}
        if function is not None:
            functions = {k: v for k, v in functions.items() if k == function}
        return {
            "entries": self.entries,
            "total_cost": self.cost_total,
            "capabilities": {k: v.to_wire() for k, v in sorted(capabilities.items())},
            "functions": {k: v.to_wire() for k, v in sorted(functions.items())},
        }


@dataclass(slots=True)
class LiveGauges:
    """Values that belong to the running daemon rather than the ledger.

    Each field has a single writer (the event loop, or the writer thread for
    ``ledger_bytes``); renders read them without a lock, as whole values.
    """

    connections_open: int = 0
    bytes_received: int = 0
    ledger_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SinkView:
    """What /metrics shows of one sink (taken from its runner's in-memory counters)."""

    name: str
    lag: int
    delivered: int
    errors: int
    durations: Histogram
    lag_seconds: float = 0.0
    """Age of the oldest committed entry the sink has not delivered (0: caught up); see ``sinks.lag``."""


@dataclass(frozen=True, slots=True)
class WmView:
    entries: int
    ingest_durations: Histogram


@dataclass(frozen=True, slots=True)
class MetricState:
    """Everything /metrics shows, at one moment: what the collector renders and the renderer receives."""

    aggregates: AggregatesSnapshot
    gauges: LiveGauges
    pending_appends: int
    sinks: list[SinkView] = field(default_factory=list)
    wm: WmView | None = None
    checkpoint_age: float | None = None
    created: tuple[float, float] | None = None
    """(ledger's first entry, daemon start) in unix seconds: adds ``_created`` series when set."""
