"""Metric aggregates: what each entry counts where (DESIGN.md, "Metric families")."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ccos_obsd.metrics.aggregates import (
    DEFAULT_DURATION_BUCKETS,
    EXEMPLAR_MAX_CHARS,
    OTHER,
    Aggregates,
    Histogram,
)
from tests.unit.metrics_helpers import action, entry, observed, result_of


def bucket_counts(histogram: Histogram) -> dict[str, float]:
    return dict(histogram.buckets())


# --- Histogram


def test_default_buckets_are_the_ccos_millisecond_buckets_in_seconds() -> None:
    assert DEFAULT_DURATION_BUCKETS == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def test_histogram_upper_bounds_are_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.1, 1.0, 0.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 3.0)]


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    histogram = Histogram((1.0, 2.0, 3.0))
    for value in (0.5, 1.5, 1.7, 2.5, 99.0):
        histogram.observe(value)
    assert histogram.buckets() == [("1.0", 1.0), ("2.0", 3.0), ("3.0", 4.0), ("+Inf", 5.0)]
    assert histogram.count == 5
    assert histogram.total == pytest.approx(0.5 + 1.5 + 1.7 + 2.5 + 99.0)


def test_histogram_copy_is_independent() -> None:
    histogram = Histogram((1.0,))
    histogram.observe(0.5)
    copy = histogram.copy()
    histogram.observe(0.5)
    assert copy.count == 1
    assert bucket_counts(copy) == {"1.0": 1.0, "+Inf": 1.0}


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_histogram_bucket_counts_are_values_at_or_below_each_bound(values: list[float]) -> None:
    histogram = Histogram(DEFAULT_DURATION_BUCKETS)
    for value in values:
        histogram.observe(value)
    buckets = histogram.buckets()
    for (label, count), bound in zip(buckets, (*DEFAULT_DURATION_BUCKETS, math.inf), strict=True):
        assert float(label) == bound
        assert count == sum(1 for v in values if v <= bound)
    assert histogram.count == len(values)


# --- Aggregates: what counts where


def test_every_entry_counts_by_action_type() -> None:
    snap = observed(action("PlanStarted"), action("PlanStarted"), action("CapabilityCall")).snapshot()
    assert snap.entries == 3
    assert snap.actions_by_type == {"PlanStarted": 2, "CapabilityCall": 1}


def test_capability_metrics_count_only_capability_calls() -> None:
    snap = observed(
        action("CapabilityCall", function_name="ccos.echo", success=True),
        action("CapabilityResult", function_name="ccos.echo", success=True),
        action("PlanStepStarted", function_name="ccos.echo"),
    ).snapshot()
    assert set(snap.capabilities) == {"ccos.echo"}
    assert snap.capabilities["ccos.echo"].to_wire()["calls"] == 1


def test_function_metrics_count_each_call_once_and_every_other_action_with_a_function_name() -> None:
    call = action("CapabilityCall", function_name="f")
    snap = observed(
        call,
        result_of(call, function_name="f", success=True),
        action("PlanStepStarted", function_name="g"),
        action("PlanStarted"),
    ).snapshot()
    assert {name: stats.to_wire()["calls"] for name, stats in snap.functions.items()} == {"f": 1, "g": 1}


def test_actions_without_function_name_are_in_no_call_metrics() -> None:
    snap = observed(action("CapabilityCall", cost=1.5, duration_ms=3)).snapshot()
    assert snap.capabilities == {}
    assert snap.functions == {}
    assert snap.capability_durations == {}
    assert snap.cost_total == 1.5


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        ({"success": True}, "success"),
        ({"success": False}, "failure"),
        ({"result": {"success": False}, "success": True}, "failure"),
    ],
)
def test_a_call_carrying_its_outcome_is_counted_by_it(fields: dict[str, Any], label: str) -> None:
    snap = observed(action("CapabilityCall", function_name="f", **fields)).snapshot()
    assert snap.capabilities["f"].by_outcome == {"success": 0, "failure": 0, "unknown": 0} | {label: 1}
    assert snap.functions["f"].by_outcome[label] == 1


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        ({"success": True}, "success"),
        ({"success": False}, "failure"),
        ({}, "unknown"),
        ({"result": {"success": False}, "success": True}, "failure"),
        ({"result": {"value": 1}}, "unknown"),
    ],
)
def test_a_call_completed_by_its_result_is_counted_by_the_results_outcome(fields: dict[str, Any], label: str) -> None:
    call = action("CapabilityCall", function_name="f")
    snap = observed(call, result_of(call, **fields)).snapshot()
    assert snap.capabilities["f"].by_outcome == {"success": 0, "failure": 0, "unknown": 0} | {label: 1}
    assert snap.functions["f"].by_outcome == {"success": 0, "failure": 0, "unknown": 0} | {label: 1}


@pytest.mark.parametrize(
    ("duration_ms", "le"),
    [
        (0, "0.005"),
        (5, "0.005"),
        (5.001, "0.01"),
        (10, "0.01"),
        (250, "0.25"),
        (1000, "1.0"),
        (10_000, "10.0"),
        (10_000.5, "+Inf"),
    ],
)
def test_durations_are_observed_in_seconds_with_inclusive_bounds(duration_ms: float, le: str) -> None:
    snap = observed(action(function_name="f", duration_ms=duration_ms)).snapshot()
    for histogram in (snap.capability_durations["f"], snap.function_durations["f"]):
        counts = bucket_counts(histogram)
        first_nonzero = next(label for label, count in counts.items() if count)
        assert first_nonzero == le
        assert counts["+Inf"] == 1
        assert histogram.total == pytest.approx(duration_ms / 1000)


def test_calls_without_duration_are_counted_but_not_timed() -> None:
    untimed = action(function_name="f")
    snap = observed(
        action(function_name="f", duration_ms=30),
        action(function_name="f", duration_ms=10),
        untimed,
        result_of(untimed, success=True),
    ).snapshot()
    assert snap.capability_durations["f"].count == 2
    wire = snap.capabilities["f"].to_wire()
    assert wire["calls"] == 3
    assert wire["total_duration_ms"] == 40
    assert wire["avg_duration_ms"] == 20


def test_custom_duration_buckets() -> None:
    snap = observed(action(function_name="f", duration_ms=1500), buckets=(1.0, 2.0)).snapshot()
    assert snap.function_durations["f"].buckets() == [("1.0", 0.0), ("2.0", 1.0), ("+Inf", 1.0)]


def test_costs_total_over_every_action_and_per_capability() -> None:
    first = action("CapabilityCall", function_name="a", cost=1.25)
    snap = observed(
        first,
        action("CapabilityCall", function_name="a", cost=0.5),
        action("CapabilityCall", function_name="b", cost=2),
        result_of(first, function_name="a", cost=4),
        action("CapabilityResult", function_name="a", parent_action_id="no-such-call", cost=16),
        action("PlanStarted", cost=8),
        action("PlanStarted"),
    ).snapshot()
    assert snap.cost_total == 31.75
    assert snap.capabilities["a"].cost == 5.75  # the calls' and the joined result's; not the orphan's
    assert snap.capabilities["b"].cost == 2
    assert snap.functions["a"].cost == 5.75


def test_stats_answer_body() -> None:
    snap = observed(
        action("CapabilityCall", function_name="a", success=True, cost=1, duration_ms=10),
        action("CapabilityCall", function_name="a", success=False, cost=2, duration_ms=30),
        open_call := action("CapabilityCall", function_name="a", cost=0.5),
        result_of(open_call, function_name="a", success=True),
        action("PlanStepStarted", function_name="b", duration_ms=7),
        action("PlanStarted", cost=100),
    ).snapshot()
    a_calls = {"calls": 3, "successes": 2, "failures": 1, "cost": 3.5, "total_duration_ms": 40, "avg_duration_ms": 20.0}
    assert snap.stats() == {
        "entries": 6,
        "total_cost": 103.5,
        "capabilities": {"a": a_calls},
        "functions": {
            "a": a_calls,
            "b": {"calls": 1, "successes": 0, "failures": 0, "cost": 0, "total_duration_ms": 7,
                  "avg_duration_ms": 7.0},
        },
    }
    assert snap.stats(capability="a")["capabilities"] == {"a": a_calls}
    assert snap.stats(capability="zzz")["capabilities"] == {}
    assert set(snap.stats(function="b")["functions"]) == {"b"}


def test_avg_duration_is_zero_without_timed_calls() -> None:
    snap = observed(action(function_name="f", success=True)).snapshot()
    assert snap.stats()["capabilities"]["f"]["avg_duration_ms"] == 0.0


def test_snapshot_is_a_copy() -> None:
    aggregates = observed(action(function_name="f", duration_ms=1, cost=1))
    snap = aggregates.snapshot()
    aggregates.observe_entries([action(function_name="f", duration_ms=1, cost=1), action("PlanStarted")])
    aggregates.observe_commit(0.001, 2)
    aggregates.count_request("append", "ok")
    assert snap.entries == 1
    assert snap.actions_by_type == {"CapabilityCall": 1}
    assert snap.capabilities["f"].to_wire()["calls"] == 1
    assert snap.capability_durations["f"].count == 1
    assert snap.commit_durations.count == 0
    assert snap.ingest_requests == {}


def test_commit_durations_and_requests() -> None:
    aggregates = Aggregates()
    aggregates.observe_commit(0.002, 1)
    aggregates.observe_commit(0.2, 1)
    aggregates.count_request("append", "ok")
    aggregates.count_request("append", "ok")
    aggregates.count_request("ping", "bad_json")
    snap = aggregates.snapshot()
    assert snap.commit_durations.count == 2
    assert snap.ingest_requests == {("append", "ok"): 2, ("ping", "bad_json"): 1}


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
        "ccos_capability_calls_started_total": 4,
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


# --- this process's counters


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
