"""Metric aggregates, updated as entries commit, and the Prometheus collector over them.

Nothing here reads the ledger at scrape time: the writer thread folds each
committed entry into :class:`Aggregates` (O(1) per entry), and
:class:`LedgerCollector` turns a copy of that in-memory state into metric
families. At start-up the daemon folds the existing ledger in once, so totals
survive restarts.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ccos_obsd.actions import outcome

log = structlog.get_logger("ccos_obsd.metrics")

DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Seconds; the CCOS millisecond buckets (5 ms .. 10 s) in base units."""

COMMIT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)

OUTCOMES = ("success", "failure", "unknown")


@dataclass(slots=True)
class Histogram:
    """Cumulative-at-render histogram state: per-bucket counts (not cumulative), sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is inclusive).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            out.append((_le(bound), float(cumulative)))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)


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


class Aggregates:
    """Everything /metrics and the ``stats`` op report, kept up to date per entry.

    Updated by the ledger writer thread, read by renders on other threads: every
    access holds ``_lock``, and readers take copies.
    """

    def __init__(self, duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._buckets = tuple(duration_buckets)
        self.entries = 0
        self.cost_total = 0.0
        self.actions_by_type: dict[str, int] = {}
        self.capabilities: dict[str, CallStats] = {}
        self.capability_durations: dict[str, Histogram] = {}
        self.functions: dict[str, CallStats] = {}
        self.function_durations: dict[str, Histogram] = {}
        self.commit_durations = Histogram(COMMIT_BUCKETS)
        self.ingest_requests: dict[tuple[str, str], int] = {}
        self.unaggregatable = 0

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

    def observe_commit(self, seconds: float) -> None:
        with self._lock:
            self.commit_durations.observe(seconds)

    def count_request(self, op: str, result: str) -> None:
        key = (op, result)
        with self._lock:
            self.ingest_requests[key] = self.ingest_requests.get(key, 0) + 1

    def _observe(self, fields: Mapping[str, Any]) -> None:
        self.entries += 1
        action_type = fields["action_type"]
        self.actions_by_type[action_type] = self.actions_by_type.get(action_type, 0) + 1
        cost = fields.get("cost", 0)
        self.cost_total += cost
        name = fields.get("function_name")
        if name is None:
            return
        result = outcome(fields)
        duration_ms = fields.get("duration_ms")
        _record_call(self.functions, self.function_durations, self._buckets, name, result, cost, duration_ms)
        if action_type == "CapabilityCall":
            _record_call(
                self.capabilities, self.capability_durations, self._buckets, name, result, cost, duration_ms
            )

    def snapshot(self) -> AggregatesSnapshot:
        with self._lock:
            return AggregatesSnapshot(
                entries=self.entries,
                cost_total=self.cost_total,
                actions_by_type=dict(self.actions_by_type),
                capabilities={k: v.copy() for k, v in self.capabilities.items()},
                capability_durations={k: v.copy() for k, v in self.capability_durations.items()},
                functions={k: v.copy() for k, v in self.functions.items()},
                function_durations={k: v.copy() for k, v in self.function_durations.items()},
                commit_durations=self.commit_durations.copy(),
                ingest_requests=dict(self.ingest_requests),
            )


def _record_call(
    stats: dict[str, CallStats],
    durations: dict[str, Histogram],
    bounds: tuple[float, ...],
    name: str,
    result: str,
    cost: float,
    duration_ms: float | None,
) -> None:
    entry = stats.get(name)
    if entry is None:
        entry = stats[name] = CallStats()
    entry.by_outcome[result] += 1
    entry.cost += cost
    if duration_ms is not None:
        entry.duration_ms += duration_ms
        entry.timed_calls += 1
        histogram = durations.get(name)
        if histogram is None:
            histogram = durations[name] = Histogram(bounds)
        histogram.observe(duration_ms / 1000.0)


@dataclass(frozen=True, slots=True)
class AggregatesSnapshot:
    entries: int
    cost_total: float
    actions_by_type: dict[str, int]
    capabilities: dict[str, CallStats]
    capability_durations: dict[str, Histogram]
    functions: dict[str, CallStats]
    function_durations: dict[str, Histogram]
    commit_durations: Histogram
    ingest_requests: dict[tuple[str, str], int]

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
    """Values that belong to the running daemon rather than the ledger."""

    connections_open: int = 0


@dataclass(frozen=True, slots=True)
class SinkView:
    """What /metrics shows of one sink (taken from its runner's in-memory counters)."""

    name: str
    lag: int
    delivered: int
    errors: int
    durations: Histogram


@dataclass(frozen=True, slots=True)
class WmView:
    entries: int
    ingest_durations: Histogram


class LedgerCollector(Collector):
    """Yields the ccos_* families from a snapshot of the aggregates; never does I/O."""

    def __init__(
        self,
        aggregates: Aggregates,
        gauges: LiveGauges,
        pending_appends: Callable[[], int],
        sinks: Callable[[], list[SinkView]] = list,
        wm: Callable[[], WmView | None] = lambda: None,
    ) -> None:
        self._aggregates = aggregates
        self._gauges = gauges
        self._pending_appends = pending_appends
        self._sinks = sinks
        self._wm = wm

    def collect(self) -> Iterator[Metric]:
        snap = self._aggregates.snapshot()
        actions = CounterMetricFamily(
            "ccos_actions", "Actions appended to the causal chain, by action type.", labels=["action_type"]
        )
        for action_type, n in sorted(snap.actions_by_type.items()):
            actions.add_metric([action_type], n)
        yield actions
        yield from _call_families(
            "capability", "capability", "CapabilityCall actions", snap.capabilities, snap.capability_durations
        )
        yield from _call_families(
            "function", "function", "actions with a function_name", snap.functions, snap.function_durations
        )
        yield CounterMetricFamily("ccos_cost", "Sum of the cost of every appended action.", value=snap.cost_total)
        yield GaugeMetricFamily("ccos_ledger_entries", "Entries in the causal chain ledger.", value=snap.entries)
        commit = HistogramMetricFamily(
            "ccos_commit_duration_seconds",
            "Time to sign, insert and durably commit one group of entries, in seconds.",
        )
        commit.add_metric([], snap.commit_durations.buckets(), snap.commit_durations.total)
        yield commit
        requests = CounterMetricFamily(
            "ccos_ingest_requests",
            "Socket requests answered, by op and result (ok or the error code).",
            labels=["op", "result"],
        )
        for (op, result), n in sorted(snap.ingest_requests.items()):
            requests.add_metric([op, result], n)
        yield requests
        yield GaugeMetricFamily(
            "ccos_connections_open", "Socket connections open now.", value=self._gauges.connections_open
        )
        yield GaugeMetricFamily(
            "ccos_pending_appends",
            "Actions received and waiting for their commit.",
            value=self._pending_appends(),
        )
        yield from _sink_families(self._sinks(), self._wm())


def _sink_families(sinks: list[SinkView], wm: WmView | None) -> Iterator[Metric]:
    lag = GaugeMetricFamily("ccos_sink_lag_entries", "Committed entries the sink has not confirmed yet.",
                            labels=["sink"])
    delivered = CounterMetricFamily("ccos_sink_delivered", "Entries delivered to the sink and confirmed.",
                                    labels=["sink"])
    errors = CounterMetricFamily("ccos_sink_errors", "Failed delivery attempts (each is retried).", labels=["sink"])
    durations = HistogramMetricFamily("ccos_sink_delivery_duration_seconds",
                                      "Time to deliver one batch to the sink, in seconds.", labels=["sink"])
    for view in sinks:
        lag.add_metric([view.name], view.lag)
        delivered.add_metric([view.name], view.delivered)
        errors.add_metric([view.name], view.errors)
        durations.add_metric([view.name], view.durations.buckets(), view.durations.total)
    yield from (lag, delivered, errors, durations)
    ingest = HistogramMetricFamily("ccos_wm_ingest_duration_seconds",
                                   "Time to derive and store one batch of Working Memory entries, in seconds.")
    if wm is not None:
        ingest.add_metric([], wm.ingest_durations.buckets(), wm.ingest_durations.total)
    yield ingest
    entries = GaugeMetricFamily("ccos_wm_entries", "Entries in the Working Memory store.")
    if wm is not None:
        entries.add_metric([], wm.entries)
    yield entries


def _call_families(
    kind: str,
    label: str,
    what: str,
    stats: dict[str, CallStats],
    durations: dict[str, Histogram],
) -> Iterator[Metric]:
    calls = CounterMetricFamily(
        f"ccos_{kind}_calls", f"Calls recorded as {what}, by {label} and outcome.", labels=[label, "outcome"]
    )
    for name, entry in sorted(stats.items()):
        for result in OUTCOMES:
            if entry.by_outcome[result]:
                calls.add_metric([name, result], entry.by_outcome[result])
    yield calls
    histogram = HistogramMetricFamily(
        f"ccos_{kind}_duration_seconds",
        f"Duration (duration_ms) of {what}, in seconds.",
        labels=[label],
    )
    for name, hist in sorted(durations.items()):
        histogram.add_metric([name], hist.buckets(), hist.total)
    yield histogram
    if kind == "capability":
        cost = CounterMetricFamily(
            "ccos_capability_cost", "Sum of the cost of CapabilityCall actions, by capability.", labels=[label]
        )
        for name, entry in sorted(stats.items()):
            cost.add_metric([name], entry.cost)
        yield cost
