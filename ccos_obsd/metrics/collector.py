"""The Prometheus collector: the ccos_* metric families of a :class:`MetricState`.

:class:`LedgerCollector` reads the daemon's live sources (the aggregates, the
gauges, the writer's queue, the sinks) into a :class:`MetricState` and yields
its families; :class:`StateCollector` yields those of a state that was taken
elsewhere (the renderer's, as it crossed the pipe). Neither does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ccos_obsd.metrics.aggregates import (
    OTHER,
    OUTCOMES,
    Aggregates,
    AggregatesSnapshot,
    CallStats,
    Histogram,
    LiveGauges,
    MetricState,
    SinkView,
    WmView,
)

LEDGER_FAMILIES = frozenset({
    "ccos_actions", "ccos_capability_calls", "ccos_capability_duration_seconds", "ccos_capability_cost",
    "ccos_function_calls", "ccos_function_duration_seconds", "ccos_cost", "ccos_metrics_label_overflow",
    "ccos_capability_calls_started", "ccos_capability_orphan_results",
})
"""Families folded from the whole ledger: they began with its first entry, not with this process."""


class LedgerCollector(Collector):
    """Yields the ccos_* families from a copy of the daemon's live sources."""

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

    def state(self) -> MetricState:
        """Everything :meth:`collect` reads, copied now."""
        gauges = self._gauges
        return MetricState(
            aggregates=self._aggregates.snapshot(),
            gauges=LiveGauges(gauges.connections_open, gauges.bytes_received, gauges.ledger_bytes),
            pending_appends=self._pending_appends(),
            sinks=self._sinks(),
            wm=self._wm(),
            checkpoint_age=self._checkpoint_age(),
            created=self._created,
        )

    def collect(self) -> Iterator[Metric]:
        return metric_families(self.state())


class StateCollector(Collector):
    """Yields the families of one :class:`MetricState`, as the collector that took it would have."""

    def __init__(self, state: MetricState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        return metric_families(self._state)


def metric_families(state: MetricState) -> Iterator[Metric]:
    """Every ccos_* family of ``state``, with ``_created`` series when it has creation times."""
    snap = state.aggregates
    families = (
        *_ledger_families(snap, state.gauges, state.checkpoint_age),
        *_commit_families(snap),
        *_request_families(snap, state.gauges, state.pending_appends),
        _overflow_family(snap),
        _redaction_family(snap),
        *_sink_families(state.sinks, state.wm),
        _sink_lag_seconds_family(state.sinks),
    )
    if state.created is None:
        yield from families
        return
    ledger_created, started = state.created
    for family in families:
        if family.type in ("counter", "histogram"):
            _add_created(family, ledger_created if family.name in LEDGER_FAMILIES else started)
        yield family


def _add_created(family: Metric, created: float) -> None:
    """A ``_created`` sample after each series' last sample (``_total``, or a histogram's ``_sum``)."""
    last = "_total" if family.type == "counter" else "_sum"
    samples = []
    for sample in family.samples:
        samples.append(sample)
        if sample.name == family.name + last:
            samples.append(Sample(family.name + "_created", sample.labels, created))
    family.samples = samples


def _ledger_families(snap: AggregatesSnapshot, gauges: LiveGauges, checkpoint_age: float | None) -> Iterator[Metric]:
    yield _counter("ccos_actions", "Actions appended to the causal chain, by action type.", "action_type",
                   snap.actions_by_type)
    yield from _call_families(
        "capability", "capability",
        "capability calls (CapabilityCall), counted once as they complete: by their own outcome or duration, "
        "or by their CapabilityResult",
        snap.capabilities, snap.capability_durations,
    )
    yield from _call_families(
        "function", "function",
        "calls of a function_name, counted once as they complete (a capability call with its result)",
        snap.functions, snap.function_durations,
    )
    yield from _call_progress_families(snap)
    yield CounterMetricFamily("ccos_cost", "Sum of the cost of every appended action (the actions' own unit).",
                              value=snap.cost_total)
    yield GaugeMetricFamily("ccos_ledger_entries", "Entries in the causal chain ledger.", value=snap.entries)
    yield GaugeMetricFamily("ccos_ledger_size_bytes",
                            "Size of the ledger database on disk (main file and write-ahead log), in bytes.",
                            value=gauges.ledger_bytes)
    if checkpoint_age is not None:
        yield GaugeMetricFamily(
            "ccos_checkpoint_age_seconds",
            "Seconds the oldest entry not covered by a signed checkpoint has waited for one; "
            "0 when the latest checkpoint covers the whole ledger.",
            value=checkpoint_age,
        )


def _call_progress_families(snap: AggregatesSnapshot) -> Iterator[Metric]:
    yield _counter(
        "ccos_capability_calls_started",
        "CapabilityCall actions appended, by capability: started minus completed calls are in flight.",
        "capability", snap.calls_started,
    )
    yield CounterMetricFamily(
        "ccos_capability_orphan_results",
        "CapabilityResult actions whose parent_action_id names no CapabilityCall earlier in the ledger.",
        value=snap.orphan_results,
    )


def _call_families(
    kind: str,
    label: str,
    what: str,
    stats: dict[str, CallStats],
    durations: dict[str, Histogram],
) -> Iterator[Metric]:
    calls = CounterMetricFamily(
        f"ccos_{kind}_calls", f"Completed {what}; by {label} and outcome.", labels=[label, "outcome"]
    )
    for name, entry in sorted(stats.items()):
        for result in OUTCOMES:
            if entry.by_outcome[result]:
                calls.add_metric([name, result], entry.by_outcome[result])
    yield calls
    histogram = HistogramMetricFamily(
        f"ccos_{kind}_duration_seconds",
        f"Duration of completed {what}; in seconds.",
        labels=[label],
    )
    for name, hist in sorted(durations.items()):
        histogram.add_metric([name], hist.buckets(), hist.total)
    yield histogram
    if kind == "capability":
        cost = CounterMetricFamily(
            "ccos_capability_cost", "Sum of the cost of capability calls and their results, by capability.",
            labels=[label],
        )
        for name, entry in sorted(stats.items()):
            cost.add_metric([name], entry.cost)
        yield cost


def _commit_families(snap: AggregatesSnapshot) -> Iterator[Metric]:
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


def _request_families(snap: AggregatesSnapshot, gauges: LiveGauges, pending_appends: int) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "ccos_ingest_requests",
        "Socket requests answered, by op and result (ok or the error code).",
        labels=["op", "result"],
    )
    for (op, result), n in sorted(snap.ingest_requests.items()):
        requests.add_metric([op, result], n)
    yield requests
    yield _counter(
        "ccos_refused_frames",
        "Socket requests (lines) answered with an error instead of being carried out, by error code.",
        "code", snap.refused,
    )
    yield CounterMetricFamily("ccos_received_bytes", "Bytes read from socket clients, in bytes.",
                              value=gauges.bytes_received)
    yield GaugeMetricFamily("ccos_connections_open", "Socket connections open now.",
                            value=gauges.connections_open)
    yield GaugeMetricFamily(
        "ccos_pending_appends",
        "Actions received and waiting for their commit.",
        value=pending_appends,
    )


def _overflow_family(snap: AggregatesSnapshot) -> Metric:
    return _counter(
        "ccos_metrics_label_overflow",
        f"Observations counted under the label value {OTHER} because their family already had "
        "metrics.max_label_values distinct values, by family.",
        "family", snap.label_overflow,
    )


def _redaction_family(snap: AggregatesSnapshot) -> Metric:
    return _counter(
        "ccos_redactions",
        "Values (or matched spans) replaced by a [[redact]] rule in the actions this daemon process received "
        "since it started (counted at append time, before validation), by rule.",
        "rule", snap.redactions,
    )


def _counter(name: str, documentation: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one label, a series per value, in label order."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


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
    ingest = HistogramMetricFamily(
        "ccos_wm_ingest_duration_seconds",
        "Duration of each observability.ingestor:v1.ingest call, from the request until its records were "
        "committed and delivered to Working Memory, in seconds.",
    )
    if wm is not None:
        ingest.add_metric([], wm.ingest_durations.buckets(), wm.ingest_durations.total)
    yield ingest
    entries = GaugeMetricFamily("ccos_wm_entries", "Entries in the Working Memory store.")
    if wm is not None:
        entries.add_metric([], wm.entries)
    yield entries


def _sink_lag_seconds_family(sinks: list[SinkView]) -> Metric:
    lag = GaugeMetricFamily(
        "ccos_sink_lag_seconds",
        "Age of the oldest committed entry the sink has not delivered, in seconds; 0 when caught up.",
        labels=["sink"],
    )
    for view in sinks:
        lag.add_metric([view.name], view.lag_seconds)
    return lag
