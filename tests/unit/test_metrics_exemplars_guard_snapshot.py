"""Exemplars, the cardinality guard and the persisted snapshot of the metric aggregates."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from structlog.testing import capture_logs

from ccos_obsd.metrics import (
    EXEMPLAR_MAX_CHARS,
    OTHER,
    Aggregates,
    LedgerCollector,
    LiveGauges,
)


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


# --- exemplars


def test_each_bucket_keeps_the_latest_observation_as_its_exemplar() -> None:
    aggregates = Aggregates()
    aggregates.observe_entries([entry(0, duration_ms=30), entry(1, duration_ms=40), entry(2, duration_ms=700)])
    histogram = aggregates.snapshot().capability_durations["web.search"]
    by_le = {b[0]: b for b in histogram.buckets()}
    assert by_le["0.05"][2].labels == {"action_id": "a-1", "seq": "1"}  # 40 ms replaced 30 ms
    assert by_le["0.05"][2].value == pytest.approx(0.040)
    assert by_le["0.05"][2].timestamp == pytest.approx(1_700_000_000.001)
    assert by_le["1.0"][2].labels == {"action_id": "a-2", "seq": "2"}
    assert len(by_le["0.005"]) == 2  # a bucket nothing fell in has no exemplar


def test_exemplars_are_rendered_in_openmetrics_only_on_duration_buckets() -> None:
    aggregates = Aggregates()
    aggregates.observe_entries([entry(7, duration_ms=30)])
    text = openmetrics(aggregates)
    bucket = 'ccos_capability_duration_seconds_bucket{capability="web.search",le="0.05"}'
    line = next(x for x in text.splitlines() if x.startswith(bucket))
    assert line.endswith(' # {action_id="a-7",seq="7"} 0.03 1700000000.007')
    assert sum(" # {" in x for x in text.splitlines()) == 2  # the capability and the function histogram
    assert text.endswith("# EOF\n")


def test_an_exemplar_never_exceeds_the_openmetrics_limit() -> None:
    long_id = "x" * 200
    aggregates = Aggregates()
    aggregates.observe_entries([entry(3, action_id=long_id)])
    exemplar = aggregates.snapshot().capability_durations["web.search"].buckets()[3][2]
    assert exemplar.labels == {"seq": "3"}
    fitting_id = "y" * (EXEMPLAR_MAX_CHARS - len("action_id") - len("seq") - 1)
    aggregates.observe_entries([entry(4, action_id=fitting_id)])
    exemplar = aggregates.snapshot().capability_durations["web.search"].buckets()[3][2]
    assert exemplar.labels == {"action_id": fitting_id, "seq": "4"}


# --- cardinality guard


def test_values_beyond_the_limit_are_counted_under_other() -> None:
    aggregates = Aggregates(max_label_values=3)
    with capture_logs() as logs:
        aggregates.observe_entries(entry(i, function_name=f"cap.{i % 5}") for i in range(10))
    snap = aggregates.snapshot()
    assert sorted(snap.capabilities) == sorted(["cap.0", "cap.1", "cap.2", OTHER])
    assert sum(s.by_outcome["unknown"] for s in snap.capabilities.values()) == 10
    assert snap.capabilities[OTHER].by_outcome["unknown"] == 4  # cap.3 and cap.4, twice each
    assert sorted(snap.capability_durations) == sorted(snap.capabilities)
    assert snap.label_overflow == {
        "ccos_capability_calls_total": 4,
        "ccos_capability_cost_total": 4,
        "ccos_capability_duration_seconds": 4,
        "ccos_function_calls_total": 4,
        "ccos_function_duration_seconds": 4,
    }
    warnings = [x for x in logs if x["event"] == "metrics_label_overflow"]
    assert sorted(x["family"] for x in warnings) == sorted(snap.label_overflow)  # one per family


def test_action_types_are_guarded_too() -> None:
    aggregates = Aggregates(max_label_values=2)
    kinds = ("PlanStarted", "PlanCompleted", "PlanAborted", "PlanStarted")
    aggregates.observe_entries({"action_type": kind} for kind in kinds)
    snap = aggregates.snapshot()
    assert snap.actions_by_type == {"PlanStarted": 2, "PlanCompleted": 1, OTHER: 1}
    assert snap.label_overflow == {"ccos_actions_total": 1}
    assert snap.entries == 4


def test_overflow_counter_is_exposed() -> None:
    aggregates = Aggregates(max_label_values=1)
    aggregates.observe_entries([entry(0, function_name="a"), entry(1, function_name="b")])
    text = openmetrics(aggregates)
    assert 'ccos_metrics_label_overflow_total{family="ccos_capability_calls_total"} 1.0' in text
    assert 'ccos_capability_calls_total{capability="__other__",outcome="unknown"} 1.0' in text


# --- snapshot: dump, load, and folding in only what came after


entries_strategy = st.lists(
    st.builds(
        lambda name, duration, cost, success, kind: {
            "action_type": kind, "function_name": name, "duration_ms": duration, "cost": cost, "success": success,
        },
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.none() | st.floats(min_value=0, max_value=20_000, allow_nan=False),
        st.floats(min_value=0, max_value=1e6, allow_nan=False),
        st.none() | st.booleans(),
        st.sampled_from(["CapabilityCall", "CapabilityResult", "PlanStarted"]),
    ),
    max_size=40,
)


def numbered(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for seq, fields in enumerate(raw):
        e = {k: v for k, v in fields.items() if v is not None}
        e.update(seq=seq, action_id=f"a-{seq}", recorded_at_ms=1_700_000_000_000 + seq)
        out.append(e)
    return out


@given(entries_strategy, st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=4))
def test_snapshot_then_the_rest_equals_folding_in_everything(
    raw: list[dict[str, Any]], cut: int, max_labels: int
) -> None:
    ledger = numbered(raw)
    cut = min(cut, len(ledger))
    whole = Aggregates(max_label_values=max_labels)
    whole.observe_entries(ledger)

    before = Aggregates(max_label_values=max_labels)
    before.observe_entries(ledger[:cut])
    stored = json.dumps(before.dump())  # what the daemon writes into the ledger database
    restarted = Aggregates(max_label_values=max_labels)
    restarted.load(json.loads(stored))
    restarted.observe_entries(ledger[cut:])

    assert restarted.dump() == whole.dump()
    assert openmetrics(restarted) == openmetrics(whole)


def test_load_rejects_a_malformed_snapshot_and_keeps_what_it_had() -> None:
    aggregates = Aggregates()
    aggregates.observe_entries([entry(0)])
    good = aggregates.dump()
    for broken in (
        {},
        {**good, "entries": "many"},
        {**good, "capability_durations": {"web.search": [[1, 2], 0.1, 3, None]}},  # wrong bucket count
        {**good, "capabilities": {"web.search": [[1], 0, 0, 0]}},
    ):
        with pytest.raises(ValueError, match="malformed metrics snapshot"):
            aggregates.load(broken)
    assert aggregates.dump() == good


def test_process_counters_are_not_part_of_the_snapshot() -> None:
    aggregates = Aggregates()
    aggregates.count_request("append", "bad_json")
    aggregates.observe_commit(0.01, 5)
    restarted = Aggregates()
    restarted.load(aggregates.dump())
    snap = restarted.snapshot()
    assert snap.ingest_requests == {} and snap.refused == {} and snap.commit_batches.count == 0


def test_errors_are_counted_as_refused_frames_by_code() -> None:
    aggregates = Aggregates()
    answers = (("append", "ok"), ("invalid", "bad_json"), ("append", "invalid_action"), ("invalid", "bad_json"))
    for op, result in answers:
        aggregates.count_request(op, result)
    assert aggregates.snapshot().refused == {"bad_json": 2, "invalid_action": 1}


def test_commit_batch_sizes_are_a_histogram() -> None:
    aggregates = Aggregates()
    for size in (1, 3, 500):
        aggregates.observe_commit(0.001, size)
    batches = aggregates.snapshot().commit_batches
    assert dict((b[0], b[1]) for b in batches.buckets())["5.0"] == 2.0
    assert batches.total == 504
