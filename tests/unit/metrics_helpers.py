"""Entries and renders shared by the metrics unit tests."""

from __future__ import annotations

import itertools
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from ccos_obsd.metrics.aggregates import DEFAULT_DURATION_BUCKETS, Aggregates, Histogram, LiveGauges, SinkView, WmView
from ccos_obsd.metrics.collector import LedgerCollector
from ccos_obsd.sinks.base import DELIVERY_BUCKETS
from ccos_obsd.wm.capability import DURATION_BUCKETS as WM_INGEST_BUCKETS

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


_ids = itertools.count()


def action(action_type: str = "CapabilityCall", **fields: Any) -> dict[str, Any]:
    """An action's fields with a fresh ``action_id`` (a result names its call with ``parent_action_id``)."""
    return {"action_type": action_type, "action_id": f"id-{next(_ids)}", **fields}


def result_of(call: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The ``CapabilityResult`` of ``call``, as CCOS's record_result appends it."""
    return action("CapabilityResult", parent_action_id=call["action_id"], **fields)


def observed(*entries: dict[str, Any], buckets: tuple[float, ...] = DEFAULT_DURATION_BUCKETS) -> Aggregates:
    aggregates = Aggregates(buckets)
    aggregates.observe_entries(entries)
    return aggregates


def entry(
    seq: int, function_name: str = "web.search", duration_ms: float | None = 30.0, **fields: Any
) -> dict[str, Any]:
    """A committed entry's fields, as the writer hands them to the aggregates."""
    out: dict[str, Any] = {
        "action_type": "CapabilityCall",
        "action_id": f"a-{seq}",
        "seq": seq,
        "recorded_at_ms": 1_700_000_000_000 + seq,
        "function_name": function_name,
        **fields,
    }
    if duration_ms is not None:
        out["duration_ms"] = duration_ms
    return out


def openmetrics(aggregates: Aggregates) -> str:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(aggregates, LiveGauges(), lambda: 0))
    return openmetrics_latest(registry).decode()


def collector(created: tuple[float, float] | None = None) -> LedgerCollector:
    """A daemon's collector with something in every family: calls, overflow, requests, sinks, WM."""
    aggregates = Aggregates(max_label_values=3)
    entries: list[dict[str, Any]] = [
        {"action_type": "CapabilityCall", "function_name": f"cap.{n % 5}", "action_id": f"a-{n}", "seq": n,
         "recorded_at_ms": 1_700_000_000_000 + n, "duration_ms": n * 7.5, "cost": 0.5, "success": n % 3 != 0}
        for n in range(40)
    ]
    aggregates.observe_entries(entries)
    aggregates.observe_commit(0.004, 40)
    aggregates.count_request("append", "ok")
    aggregates.count_request("invalid", "bad_json")
    durations = Histogram(DELIVERY_BUCKETS)
    durations.observe(0.003)
    ingest = Histogram(WM_INGEST_BUCKETS)
    ingest.observe(0.002)
    return LedgerCollector(
        aggregates, LiveGauges(connections_open=2, bytes_received=999, ledger_bytes=4096), lambda: 7,
        lambda: [SinkView("wm", 3, 37, 1, durations, lag_seconds=2.5)], lambda: WmView(37, ingest), lambda: 1.5,
        created,
    )
