"""A capability call and its result are one call: counted once, when it completes (CCOS's record_result)."""

from __future__ import annotations

from typing import Any

from ccos_obsd.metrics.aggregates import Aggregates
from ccos_obsd.metrics.calls import COMPLETED, OpenCall, OpenCalls, call_state, result_duration_ms
from tests.unit.metrics_helpers import action, observed, result_of


def call(name: str = "web.search", **fields: Any) -> dict[str, Any]:
    return action("CapabilityCall", function_name=name, **fields)


def outcomes(aggregates: Aggregates, kind: str = "capabilities") -> dict[str, dict[str, int]]:
    stats = getattr(aggregates.snapshot(), kind)
    return {name: {k: v for k, v in s.by_outcome.items() if v} for name, s in stats.items()}


def test_the_readme_pattern_counts_each_call_once_with_its_results_outcome_and_duration() -> None:
    entries = []
    for n in range(5):
        c = call(plan_id="p1", arguments=["ccos"], timestamp_ms=1_764_000_000_000 + n)
        entries += [c, result_of(c, function_name="web.search", duration_ms=42, success=n != 3)]
    aggregates = observed(*entries)
    snap = aggregates.snapshot()
    assert outcomes(aggregates) == {"web.search": {"success": 4, "failure": 1}}
    assert outcomes(aggregates, "functions") == {"web.search": {"success": 4, "failure": 1}}
    assert snap.capability_durations["web.search"].count == 5
    assert snap.function_durations["web.search"].count == 5
    assert snap.calls_started == {"web.search": 5}
    assert snap.orphan_results == 0


def test_a_call_is_completed_by_a_result_in_a_later_batch() -> None:
    aggregates = Aggregates()
    c = call()
    aggregates.observe_entries([c])
    assert outcomes(aggregates) == {"web.search": {}}  # started, in flight
    assert aggregates.snapshot().calls_started == {"web.search": 1}
    aggregates.observe_entries([action("PlanStarted"), result_of(c, success=False, duration_ms=7)])
    assert outcomes(aggregates) == {"web.search": {"failure": 1}}


def test_the_capability_name_comes_from_the_call_when_the_result_has_none() -> None:
    c = call("db.query")
    assert outcomes(observed(c, result_of(c, success=True))) == {"db.query": {"success": 1}}


def test_a_second_result_of_one_call_does_not_count_it_again() -> None:
    c = call()
    aggregates = observed(c, result_of(c, success=True), result_of(c, success=False, cost=3))
    assert outcomes(aggregates) == {"web.search": {"success": 1}}
    assert aggregates.snapshot().orphan_results == 0


def test_a_call_carrying_its_outcome_is_complete_and_its_later_result_is_not_counted() -> None:
    c = call(success=True, duration_ms=5)
    aggregates = observed(c, result_of(c, success=False))
    assert outcomes(aggregates) == {"web.search": {"success": 1}}


def test_results_without_a_known_call_are_orphans() -> None:
    plan = action("PlanStarted")
    result_first = action("CapabilityResult", function_name="web.search", parent_action_id="later-call", success=True)
    later = call(action_id="later-call")
    aggregates = observed(
        action("CapabilityResult", function_name="web.search", success=True),  # no parent at all
        action("CapabilityResult", parent_action_id="nowhere"),
        plan,
        result_of(plan, success=True),  # its parent is not a capability call
        result_first,
        later,
    )
    snap = aggregates.snapshot()
    assert snap.orphan_results == 4
    assert outcomes(aggregates) == {"web.search": {}}  # the later call stays open: its result came first
    assert snap.calls_started == {"web.search": 1}


def test_duration_falls_back_to_the_results_timestamp_minus_the_calls() -> None:
    c = call(timestamp_ms=1_000)
    snap = observed(c, result_of(c, success=True, timestamp_ms=1_250)).snapshot()
    assert snap.capability_durations["web.search"].total == 0.25
    backwards = call(timestamp_ms=2_000)
    snap = observed(backwards, result_of(backwards, success=True, timestamp_ms=1_000)).snapshot()
    assert "web.search" not in snap.capability_durations  # counted, not timed
    assert outcomes(observed(backwards, result_of(backwards, success=True))) == {"web.search": {"success": 1}}


def test_the_duration_exemplar_points_at_the_result() -> None:
    c = call(seq=0, recorded_at_ms=1_700_000_000_000)
    result = result_of(c, success=True, duration_ms=42, seq=1, recorded_at_ms=1_700_000_000_042)
    histogram = observed(c, result).snapshot().capability_durations["web.search"]
    exemplars = [b[2] for b in histogram.buckets() if len(b) == 3]
    assert [(e.labels, e.value) for e in exemplars] == [({"action_id": result["action_id"], "seq": "1"}, 0.042)]


def test_call_state_and_result_duration() -> None:
    assert call_state(call(timestamp_ms=5)) == OpenCall("web.search", 5)
    assert call_state(call(success=False)) == COMPLETED
    assert call_state(call(duration_ms=0)) == COMPLETED
    assert call_state(action("CapabilityCall")) is None  # no function_name: nothing to count it under
    assert call_state(action("PlanStarted", function_name="f")) is None
    assert result_duration_ms({"duration_ms": 3}, OpenCall("f", None)) == 3.0
    assert result_duration_ms({"timestamp_ms": 9}, OpenCall("f", 4)) == 5.0
    assert result_duration_ms({"timestamp_ms": 9}, OpenCall("f", None)) is None


def test_open_calls_are_bounded_and_evict_the_oldest() -> None:
    held = OpenCalls(capacity=2)
    held.remember("a", OpenCall("f", None))
    held.remember("b", OpenCall("f", None))
    held.remember("a", COMPLETED)  # touched: now the newest
    held.remember("c", OpenCall("f", None))
    assert len(held) == 2
    assert held.get("b") is None
    assert held.get("a") == COMPLETED
