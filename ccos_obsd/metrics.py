"""Metric aggregates, updated as entries commit, and the Prometheus collector over them.

Nothing here reads the ledger at scrape time: the writer thread folds each
committed entry into :class:`Aggregates` (O(1) per entry), and
:class:`LedgerCollector` turns a copy of that in-memory state into metric
families (in the renderer process, ``ccos_obsd.render``, from
:meth:`LedgerCollector.state`). The ledger-derived part is snapshotted into the
ledger database (:meth:`Aggregates.dump`), so at start-up the daemon loads the
snapshot and folds in only the entries after it.
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
from prometheus_client.samples import Exemplar, Sample

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

    def to_json(self) -> list[Any]:
        return [self.counts, self.total, self.count, self.exemplars]

    @classmethod
    def from_json(cls, bounds: tuple[float, ...], data: Any) -> Histogram:
        counts, total, count, exemplars = data
        if len(counts) != len(bounds) + 1 or not all(isinstance(n, int) for n in counts):
            raise ValueError("histogram counts do not match the buckets")
        records: list[ExemplarRecord | None] | None = None
        if exemplars is not None:
            if len(exemplars) != len(bounds) + 1:
                raise ValueError("histogram exemplars do not match the buckets")
            records = [None if e is None else (str(e[0]), int(e[1]), float(e[2]), float(e[3])) for e in exemplars]
        return cls(bounds, list(counts), float(total), int(count), records)


def _exemplar(record: ExemplarRecord) -> Exemplar:
    action_id, seq, value, timestamp = record
    seq_text = str(seq)
    labels = {"action_id": action_id, "seq": seq_text}
    if len("action_id") + len(action_id) + len("seq") + len(seq_text) > EXEMPLAR_MAX_CHARS:
        labels = {"seq": seq_text}  # the seq alone still finds the entry
    return Exemplar(labels, value, timestamp)


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

    def to_json(self) -> list[Any]:
        return [[self.by_outcome[o] for o in OUTCOMES], self.cost, self.duration_ms, self.timed_calls]

    @classmethod
    def from_json(cls, data: Any) -> CallStats:
        counts, cost, duration_ms, timed_calls = data
        if len(counts) != len(OUTCOMES):
            raise ValueError("call stats do not list every outcome")
        return cls(dict(zip(OUTCOMES, (int(n) for n in counts), strict=True)),
                   float(cost), float(duration_ms), int(timed_calls))


OTHER = "__other__"
"""The label value that stands for every value beyond ``metrics.max_label_values``."""

COMMIT_BATCH_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

SNAPSHOT_FORMAT = 1
"""Version of :meth:`Aggregates.dump`'s layout; a snapshot of another version is rebuilt."""

# The families each label domain feeds, for ccos_metrics_label_overflow_total{family}.
_ACTION_FAMILIES = ("ccos_actions_total",)
_CALL_FAMILIES = {
    "capability": ("ccos_capability_calls_total", "ccos_capability_cost_total"),
    "function": ("ccos_function_calls_total",),
}


class Aggregates:
    """Everything /metrics and the ``stats`` op report, kept up to date per entry.

    Updated by the ledger writer thread, read by renders on other threads: every
    access holds ``_lock``, and readers take copies. The ledger-derived part
    (everything but request counts and commit timings, which describe this process)
    can be dumped and loaded, so start-up folds in only the entries after a snapshot.
    """

    def __init__(
        self,
        duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
        max_label_values: int = 1000,
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
        self.label_overflow: dict[str, int] = {}
        self.unaggregatable = 0
        # Of this process only:
        self.commit_durations = Histogram(COMMIT_BUCKETS)
        self.commit_batches = Histogram(COMMIT_BATCH_BUCKETS)
        self.ingest_requests: dict[tuple[str, str], int] = {}
        self.refused: dict[str, int] = {}
        self._overflow_warned: set[str] = set()

    @property
    def params(self) -> dict[str, Any]:
        """What a snapshot must have been built with to be loadable."""
        return {"duration_buckets": list(self._buckets), "max_label_values": self._max_labels}

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

    def _observe(self, fields: Mapping[str, Any]) -> None:
        self.entries += 1
        action_type = fields["action_type"]
        cost = fields.get("cost", 0)
        self.cost_total += cost
        by_type = self.actions_by_type
        if action_type not in by_type and len(by_type) >= self._max_labels:
            action_type = self._overflow(_ACTION_FAMILIES)
        by_type[action_type] = by_type.get(action_type, 0) + 1
        name = fields.get("function_name")
        if name is None:
            return
        result = outcome(fields)
        duration_ms = fields.get("duration_ms")
        exemplar = None
        seq = fields.get("seq")
        if duration_ms is not None and seq is not None:
            exemplar = (fields["action_id"], seq, duration_ms / 1000.0, fields["recorded_at_ms"] / 1000.0)
        call = (name, result, cost, duration_ms, exemplar)
        self._record_call("function", self.functions, self.function_durations, *call)
        if action_type == "CapabilityCall":
            self._record_call("capability", self.capabilities, self.capability_durations, *call)

    def _record_call(
        self,
        kind: str,
        stats: dict[str, CallStats],
        durations: dict[str, Histogram],
        name: str,
        result: str,
        cost: float,
        duration_ms: float | None,
        exemplar: ExemplarRecord | None,
    ) -> None:
        entry = stats.get(name)
        if entry is None:
            if len(stats) >= self._max_labels:
                families = _CALL_FAMILIES[kind]
                if duration_ms is not None:
                    families = (*families, f"ccos_{kind}_duration_seconds")
                name = self._overflow(families)
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
                histogram = durations[name] = Histogram.with_exemplars(self._buckets)
            histogram.observe(duration_ms / 1000.0, exemplar)

    def _overflow(self, families: Sequence[str]) -> str:
        for family in families:
            self.label_overflow[family] = self.label_overflow.get(family, 0) + 1
            if family not in self._overflow_warned:
                self._overflow_warned.add(family)
                log.warning("metrics_label_overflow", family=family, max_label_values=self._max_labels,
                            counted_as=OTHER)
        return OTHER

    # --- persistence of the ledger-derived part

    def dump(self, *, process: bool = False) -> dict[str, Any]:
        """The ledger-derived aggregates as JSON-ready data; ``entries`` says what they cover.

        With ``process``, also this process's own counters (for a render elsewhere).
        Copies are taken under the lock; the conversion runs outside it.
        """
        snap = self.snapshot()
        data: dict[str, Any] = {
            "entries": snap.entries,
            "cost_total": snap.cost_total,
            "actions_by_type": snap.actions_by_type,
            "capabilities": {k: v.to_json() for k, v in snap.capabilities.items()},
            "capability_durations": {k: v.to_json() for k, v in snap.capability_durations.items()},
            "functions": {k: v.to_json() for k, v in snap.functions.items()},
            "function_durations": {k: v.to_json() for k, v in snap.function_durations.items()},
            "label_overflow": snap.label_overflow,
            "unaggregatable": snap.unaggregatable,
        }
        if process:
            data["process"] = {
                "commit_durations": snap.commit_durations.to_json(),
                "commit_batches": snap.commit_batches.to_json(),
                "ingest_requests": [[op, result, n] for (op, result), n in snap.ingest_requests.items()],
                "refused": snap.refused,
            }
        return data

    def load(self, data: Mapping[str, Any]) -> None:
        """Replace the ledger-derived aggregates with a :meth:`dump`; ValueError if it is malformed."""
        try:
            bounds = self._buckets
            loaded = {
                "entries": int(data["entries"]),
                "cost_total": float(data["cost_total"]),
                "actions_by_type": {str(k): int(v) for k, v in data["actions_by_type"].items()},
                "capabilities": {str(k): CallStats.from_json(v) for k, v in data["capabilities"].items()},
                "capability_durations": {
                    str(k): Histogram.from_json(bounds, v) for k, v in data["capability_durations"].items()
                },
                "functions": {str(k): CallStats.from_json(v) for k, v in data["functions"].items()},
                "function_durations": {
                    str(k): Histogram.from_json(bounds, v) for k, v in data["function_durations"].items()
                },
                "label_overflow": {str(k): int(v) for k, v in data["label_overflow"].items()},
                "unaggregatable": int(data["unaggregatable"]),
            }
            process = data.get("process")
            if process is not None:
                loaded.update({
                    "commit_durations": Histogram.from_json(COMMIT_BUCKETS, process["commit_durations"]),
                    "commit_batches": Histogram.from_json(COMMIT_BATCH_BUCKETS, process["commit_batches"]),
                    "ingest_requests": {(str(op), str(result)): int(n) for op, result, n in process["ingest_requests"]},
                    "refused": {str(k): int(v) for k, v in process["refused"].items()},
                })
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed metrics snapshot: {exc!r}") from None
        with self._lock:
            for key, value in loaded.items():
                setattr(self, key, value)

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
                commit_batches=self.commit_batches.copy(),
                ingest_requests=dict(self.ingest_requests),
                refused=dict(self.refused),
                label_overflow=dict(self.label_overflow),
                unaggregatable=self.unaggregatable,
            )


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
    commit_batches: Histogram
    ingest_requests: dict[tuple[str, str], int]
    refused: dict[str, int]
    label_overflow: dict[str, int]
    unaggregatable: int

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
        checkpoint_age: Callable[[], float | None] = lambda: None,
        created: tuple[float, float] | None = None,
    ) -> None:
        self._aggregates = aggregates
        self._gauges = gauges
        self._pending_appends = pending_appends
        self._sinks = sinks
        self._wm = wm
        self._checkpoint_age = checkpoint_age
        self._created = created
        """(ledger's first entry, daemon start) in unix seconds: adds ``_created`` series when set."""

    def state(self) -> dict[str, Any]:
        """Everything :meth:`collect` reads, as JSON-ready data (for a render in another process)."""
        gauges = self._gauges
        wm = self._wm()
        return {
            "aggregates": self._aggregates.dump(process=True),
            "buckets": list(self._aggregates.params["duration_buckets"]),
            "gauges": [gauges.connections_open, gauges.bytes_received, gauges.ledger_bytes],
            "pending_appends": self._pending_appends(),
            "sinks": [[v.name, v.lag, v.delivered, v.errors, v.durations.to_json()] for v in self._sinks()],
            "wm": None if wm is None else [wm.entries, wm.ingest_durations.to_json()],
            "checkpoint_age": self._checkpoint_age(),
            "created": self._created,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], sink_buckets: tuple[float, ...],
                   wm_buckets: tuple[float, ...]) -> LedgerCollector:
        """A collector that yields what the collector that made ``state`` would have yielded then."""
        aggregates = Aggregates(tuple(state["buckets"]))
        aggregates.load(state["aggregates"])
        gauges = LiveGauges(*state["gauges"])
        pending, age = state["pending_appends"], state["checkpoint_age"]
        sinks = [SinkView(name, lag, delivered, errors, Histogram.from_json(sink_buckets, durations))
                 for name, lag, delivered, errors, durations in state["sinks"]]
        wm = None if state["wm"] is None else WmView(state["wm"][0], Histogram.from_json(wm_buckets, state["wm"][1]))
        created = None if state["created"] is None else tuple(state["created"])
        return cls(aggregates, gauges, lambda: pending, lambda: sinks, lambda: wm, lambda: age, created)

    def collect(self) -> Iterator[Metric]:
        if self._created is None:
            yield from self._families()
            return
        ledger_created, started = self._created
        for family in self._families():
            if family.type in ("counter", "histogram"):
                _add_created(family, ledger_created if family.name in LEDGER_FAMILIES else started)
            yield family

    def _families(self) -> Iterator[Metric]:
        snap = self._aggregates.snapshot()
        gauges = self._gauges
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
        yield CounterMetricFamily("ccos_cost", "Sum of the cost of every appended action (the actions' own unit).",
                                  value=snap.cost_total)
        yield GaugeMetricFamily("ccos_ledger_entries", "Entries in the causal chain ledger.", value=snap.entries)
        yield GaugeMetricFamily("ccos_ledger_size_bytes",
                                "Size of the ledger database on disk (main file and write-ahead log), in bytes.",
                                value=gauges.ledger_bytes)
        age = self._checkpoint_age()
        if age is not None:
            yield GaugeMetricFamily(
                "ccos_checkpoint_age_seconds",
                "Seconds the oldest entry not covered by a signed checkpoint has waited for one; "
                "0 when the latest checkpoint covers the whole ledger.",
                value=age,
            )
        commit = HistogramMetricFamily(
            "ccos_commit_duration_seconds",
            "Time to sign, insert and durably commit one group of entries, in seconds.",
        )
        commit.add_metric([], snap.commit_durations.buckets(), snap.commit_durations.total)
        yield commit
        batch = HistogramMetricFamily(
            "ccos_commit_batch_entries", "Entries written by one group commit (one fsync), in entries."
        )
        batch.add_metric([], snap.commit_batches.buckets(), snap.commit_batches.total)
        yield batch
        requests = CounterMetricFamily(
            "ccos_ingest_requests",
            "Socket requests answered, by op and result (ok or the error code).",
            labels=["op", "result"],
        )
        for (op, result), n in sorted(snap.ingest_requests.items()):
            requests.add_metric([op, result], n)
        yield requests
        refused = CounterMetricFamily(
            "ccos_refused_frames",
            "Socket requests (lines) answered with an error instead of being carried out, by error code.",
            labels=["code"],
        )
        for code, n in sorted(snap.refused.items()):
            refused.add_metric([code], n)
        yield refused
        yield CounterMetricFamily("ccos_received_bytes", "Bytes read from socket clients, in bytes.",
                                  value=gauges.bytes_received)
        yield GaugeMetricFamily("ccos_connections_open", "Socket connections open now.",
                                value=gauges.connections_open)
        yield GaugeMetricFamily(
            "ccos_pending_appends",
            "Actions received and waiting for their commit.",
            value=self._pending_appends(),
        )
        overflow = CounterMetricFamily(
            "ccos_metrics_label_overflow",
            f"Observations counted under the label value {OTHER} because their family already had "
            "metrics.max_label_values distinct values, by family.",
            labels=["family"],
        )
        for family, n in sorted(snap.label_overflow.items()):
            overflow.add_metric([family], n)
        yield overflow
        yield from _sink_families(self._sinks(), self._wm())


LEDGER_FAMILIES = frozenset({
    "ccos_actions", "ccos_capability_calls", "ccos_capability_duration_seconds", "ccos_capability_cost",
    "ccos_function_calls", "ccos_function_duration_seconds", "ccos_cost", "ccos_metrics_label_overflow",
})
"""Families folded from the whole ledger: they began with its first entry, not with this process."""


def _add_created(family: Metric, created: float) -> None:
    """A ``_created`` sample after each series' last sample (``_total``, or a histogram's ``_sum``)."""
    last = "_total" if family.type == "counter" else "_sum"
    samples = []
    for sample in family.samples:
        samples.append(sample)
        if sample.name == family.name + last:
            samples.append(Sample(family.name + "_created", sample.labels, created))
    family.samples = samples


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
