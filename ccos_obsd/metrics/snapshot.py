"""The one encoding of metric state, and the snapshot of it kept in the ledger database.

:func:`dump_aggregates` / :func:`load_aggregates` turn :class:`AggregatesSnapshot`
into JSON-ready data and back. The same encoding serves three readers:

- the persisted snapshot (table ``metrics_snapshot``, SQL in ``ledger.store``): the
  ledger-derived part only, so at start-up :class:`MetricsSnapshots` loads it and
  folds in only the entries after it;
- the renderer process (``metrics.render``): :func:`dump_state` adds this process's
  own counters and the live values around the aggregates;
- the sink host's reports (``sinks.host``): its histograms, with
  :func:`encode_histogram` / :func:`decode_histogram`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ccos_obsd.ledger import store
from ccos_obsd.metrics.aggregates import (
    COMMIT_BATCH_BUCKETS,
    COMMIT_BUCKETS,
    OUTCOMES,
    Aggregates,
    AggregatesSnapshot,
    CallStats,
    ExemplarRecord,
    Histogram,
    LiveGauges,
    MetricState,
    SinkView,
    WmView,
)

log = structlog.get_logger("ccos_obsd.metrics.snapshot")

SNAPSHOT_FORMAT = 2
"""Version of :func:`dump_aggregates`' layout; a stored snapshot of another version is rebuilt."""

RESTORE_BATCH = 4096
"""Entries folded into the aggregates per lock hold while restoring."""


# --- the encoding


def encode_histogram(histogram: Histogram) -> list[Any]:
    """``[counts, sum, count, exemplars]``; the bucket bounds are the reader's to know."""
    return [histogram.counts, histogram.total, histogram.count, histogram.exemplars]


def decode_histogram(bounds: tuple[float, ...], data: Any) -> Histogram:
    counts, total, count, exemplars = data
    if len(counts) != len(bounds) + 1 or not all(isinstance(n, int) for n in counts):
        raise ValueError("histogram counts do not match the buckets")
    records: list[ExemplarRecord | None] | None = None
    if exemplars is not None:
        if len(exemplars) != len(bounds) + 1:
            raise ValueError("histogram exemplars do not match the buckets")
        records = [None if e is None else (str(e[0]), int(e[1]), float(e[2]), float(e[3])) for e in exemplars]
    return Histogram(bounds, list(counts), float(total), int(count), records)


def _encode_call_stats(stats: CallStats) -> list[Any]:
    return [[stats.by_outcome[o] for o in OUTCOMES], stats.cost, stats.duration_ms, stats.timed_calls]


def _decode_call_stats(data: Any) -> CallStats:
    counts, cost, duration_ms, timed_calls = data
    if len(counts) != len(OUTCOMES):
        raise ValueError("call stats do not list every outcome")
    return CallStats(dict(zip(OUTCOMES, (int(n) for n in counts), strict=True)),
                     float(cost), float(duration_ms), int(timed_calls))


def dump_aggregates(snap: AggregatesSnapshot, *, process: bool = False) -> dict[str, Any]:
    """The ledger-derived aggregates as JSON-ready data; ``entries`` says what they cover.

    With ``process``, also this process's own counters (for a render elsewhere).
    """
    data: dict[str, Any] = {
        "entries": snap.entries,
        "cost_total": snap.cost_total,
        "actions_by_type": snap.actions_by_type,
        "capabilities": {k: _encode_call_stats(v) for k, v in snap.capabilities.items()},
        "capability_durations": {k: encode_histogram(v) for k, v in snap.capability_durations.items()},
        "functions": {k: _encode_call_stats(v) for k, v in snap.functions.items()},
        "function_durations": {k: encode_histogram(v) for k, v in snap.function_durations.items()},
        "calls_started": snap.calls_started,
        "orphan_results": snap.orphan_results,
        "label_overflow": snap.label_overflow,
        "unaggregatable": snap.unaggregatable,
    }
    if process:
        data["process"] = {
            "commit_durations": encode_histogram(snap.commit_durations),
            "commit_batches": encode_histogram(snap.commit_batches),
            "ingest_requests": [[op, result, n] for (op, result), n in snap.ingest_requests.items()],
            "refused": snap.refused,
            "redactions": snap.redactions,
        }
    return data


def load_aggregates(data: Mapping[str, Any], duration_buckets: tuple[float, ...]) -> AggregatesSnapshot:
    """A :func:`dump_aggregates` read back; ValueError if it is malformed.

    Without the ``process`` part, this process's counters are empty.
    """
    bounds = duration_buckets
    try:
        process = data.get("process")
        return AggregatesSnapshot(
            duration_buckets=bounds,
            entries=int(data["entries"]),
            cost_total=float(data["cost_total"]),
            actions_by_type={str(k): int(v) for k, v in data["actions_by_type"].items()},
            capabilities={str(k): _decode_call_stats(v) for k, v in data["capabilities"].items()},
            capability_durations={
                str(k): decode_histogram(bounds, v) for k, v in data["capability_durations"].items()
            },
            functions={str(k): _decode_call_stats(v) for k, v in data["functions"].items()},
            function_durations={str(k): decode_histogram(bounds, v) for k, v in data["function_durations"].items()},
            label_overflow={str(k): int(v) for k, v in data["label_overflow"].items()},
            unaggregatable=int(data["unaggregatable"]),
            calls_started={str(k): int(v) for k, v in data["calls_started"].items()},
            orphan_results=int(data["orphan_results"]),
            commit_durations=(Histogram(COMMIT_BUCKETS) if process is None
                              else decode_histogram(COMMIT_BUCKETS, process["commit_durations"])),
            commit_batches=(Histogram(COMMIT_BATCH_BUCKETS) if process is None
                            else decode_histogram(COMMIT_BATCH_BUCKETS, process["commit_batches"])),
            ingest_requests=({} if process is None
                             else {(str(op), str(result)): int(n) for op, result, n in process["ingest_requests"]}),
            refused={} if process is None else {str(k): int(v) for k, v in process["refused"].items()},
            redactions={} if process is None else {str(k): int(v) for k, v in process["redactions"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed metrics snapshot: {exc!r}") from None


def dump_state(state: MetricState) -> dict[str, Any]:
    """Everything a render reads, as JSON-ready data (what crosses the pipe to the renderer)."""
    gauges, wm = state.gauges, state.wm
    return {
        "aggregates": dump_aggregates(state.aggregates, process=True),
        "duration_buckets": list(state.aggregates.duration_buckets),
        "gauges": {"connections_open": gauges.connections_open, "bytes_received": gauges.bytes_received,
                   "ledger_bytes": gauges.ledger_bytes},
        "pending_appends": state.pending_appends,
        "sinks": [
            {"name": v.name, "lag": v.lag, "delivered": v.delivered, "errors": v.errors,
             "buckets": list(v.durations.bounds), "durations": encode_histogram(v.durations),
             "lag_seconds": v.lag_seconds}
            for v in state.sinks
        ],
        "wm": None if wm is None else {
            "entries": wm.entries, "buckets": list(wm.ingest_durations.bounds),
            "ingest_durations": encode_histogram(wm.ingest_durations),
        },
        "checkpoint_age": state.checkpoint_age,
        "created": None if state.created is None else list(state.created),
    }


def load_state(data: Mapping[str, Any]) -> MetricState:
    """A :func:`dump_state` read back: renders exactly as the state that was dumped."""
    sinks = [
        SinkView(v["name"], v["lag"], v["delivered"], v["errors"],
                 decode_histogram(tuple(v["buckets"]), v["durations"]), v["lag_seconds"])
        for v in data["sinks"]
    ]
    wm = data["wm"]
    created = data["created"]
    return MetricState(
        aggregates=load_aggregates(data["aggregates"], tuple(data["duration_buckets"])),
        gauges=LiveGauges(**data["gauges"]),
        pending_appends=data["pending_appends"],
        sinks=sinks,
        wm=None if wm is None else WmView(
            wm["entries"], decode_histogram(tuple(wm["buckets"]), wm["ingest_durations"])
        ),
        checkpoint_age=data["checkpoint_age"],
        created=None if created is None else (created[0], created[1]),
    )


def snapshot_params(duration_buckets: tuple[float, ...], max_label_values: int) -> str:
    """The aggregates' settings as stored beside a snapshot: a snapshot of other settings is rebuilt."""
    return json.dumps({"duration_buckets": list(duration_buckets), "max_label_values": max_label_values},
                      sort_keys=True)


# --- the snapshot in the ledger database


@dataclass(frozen=True, slots=True)
class Restored:
    from_snapshot: int
    """Entries the stored snapshot covered (0 when there was none or it was discarded)."""
    ledger_created: float
    """Unix seconds of the ledger's first entry (now, for an empty ledger): the ledger families' ``_created``."""


class MetricsSnapshots:
    """Loads the aggregates from the snapshot in the ledger ``db`` at start-up, and saves them back."""

    def __init__(self, db: Path, aggregates: Aggregates) -> None:
        self._db = db
        self._aggregates = aggregates
        self._params = snapshot_params(aggregates.duration_buckets, aggregates.max_label_values)
        self._saved_at = -1

    def restore(self) -> Restored:
        """Load the metrics snapshot, then fold in only the entries after it."""
        started = time.perf_counter()
        aggregates = self._aggregates
        conn = store.connect(self._db, readonly=True)
        try:
            first = store.get_entry(conn, seq=0)
            ledger_created = time.time() if first is None else json.loads(first.entry)["recorded_at_ms"] / 1000
            start = self._load(conn)
            batch: list[dict[str, Any]] = []
            for entry in store.iter_entries(conn, start=start):
                batch.append(json.loads(entry.entry))
                if len(batch) >= RESTORE_BATCH:
                    aggregates.observe_entries(batch)
                    batch.clear()
            aggregates.observe_entries(batch)
        finally:
            conn.close()
        self._saved_at = start
        log.info("metrics_restored", entries=aggregates.entries, from_snapshot=start,
                 folded_in=aggregates.entries - start, seconds=round(time.perf_counter() - started, 3))
        return Restored(start, ledger_created)

    def _load(self, conn: Any) -> int:
        """Entries the stored snapshot covers once loaded; 0 when there is none or it was discarded."""
        snapshot = store.load_metrics_snapshot(conn)
        if snapshot is None:
            return 0
        head = store.read_head(conn)
        reason = None
        if snapshot.format != SNAPSHOT_FORMAT:
            reason = f"format {snapshot.format}, expected {SNAPSHOT_FORMAT}"
        elif snapshot.entries > head.size:
            reason = f"covers {snapshot.entries} entries, the ledger has {head.size}"
        elif snapshot.entries and store.chain_hash_at(conn, snapshot.entries - 1) != snapshot.chain_hash:
            reason = f"its chain hash does not match the ledger's at seq {snapshot.entries - 1}"
        elif snapshot.params != self._params:
            reason = "metrics.duration_buckets or metrics.max_label_values changed"
        else:
            try:
                body = json.loads(snapshot.body)
                if body.get("entries") != snapshot.entries:
                    raise ValueError("its body covers a different number of entries")
                self._aggregates.restore(load_aggregates(body, self._aggregates.duration_buckets))
            except (ValueError, AttributeError) as exc:
                reason = f"unreadable: {exc}"
        if reason is not None:
            # Nothing was restored unless the whole snapshot parsed: the aggregates are still empty.
            log.warning("metrics_snapshot_discarded", reason=reason, action="rebuilding from the whole ledger")
            return 0
        return snapshot.entries

    def save(self) -> None:
        """Store the aggregates with the seq they cover (writer thread or not: its own connection)."""
        body = dump_aggregates(self._aggregates.snapshot())
        entries = body["entries"]
        if entries == self._saved_at:
            return
        try:
            conn = store.connect(self._db, readonly=False)
            try:
                chain = store.chain_hash_at(conn, entries - 1) if entries else None
                store.save_metrics_snapshot(conn, store.MetricsSnapshot(
                    SNAPSHOT_FORMAT, entries, chain, self._params,
                    json.dumps(body, separators=(",", ":")).encode(),
                ))
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("metrics_snapshot_failed", error=str(exc), entries=entries)
            return
        self._saved_at = entries
        log.debug("metrics_snapshot_saved", entries=entries)

    async def save_periodically(self, interval_s: float) -> None:
        """Save every ``interval_s`` (off the event loop) until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            await loop.run_in_executor(None, self.save)
