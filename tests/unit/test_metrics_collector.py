"""The Prometheus collector over the aggregates: families, samples, exemplars, HELP and TYPE."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ccos_obsd.metrics.aggregates import Aggregates, LiveGauges
from ccos_obsd.metrics.collector import LedgerCollector
from tests.unit.metrics_helpers import action, entry, observed, openmetrics, result_of

LEDGER_FAMILIES = {
    # name in the exposition: TYPE
    "ccos_actions_total": "counter",
    "ccos_capability_calls_total": "counter",
    "ccos_capability_duration_seconds": "histogram",
    "ccos_function_calls_total": "counter",
    "ccos_function_duration_seconds": "histogram",
    "ccos_cost_total": "counter",
    "ccos_capability_cost_total": "counter",
    "ccos_ledger_entries": "gauge",
    "ccos_commit_duration_seconds": "histogram",
    "ccos_ingest_requests_total": "counter",
}
"""DESIGN.md's families that the ledger collector owns. (The sink and Working Memory
families, ccos_sink_* and ccos_wm_ingest_duration_seconds, belong to the sinks.)"""


@pytest.fixture
def aggregates() -> Aggregates:
    aggregates = observed(
        action("CapabilityCall", function_name="ccos.echo", success=True, cost=0.5, duration_ms=5),
        action("CapabilityCall", function_name="ccos.echo", success=False, cost=0.25, duration_ms=120),
        open_call := action("CapabilityCall", function_name="ccos.echo"),
        result_of(open_call, function_name="ccos.echo", result={"value": "no success flag"}),
        action("PlanStarted", cost=1),
    )
    aggregates.observe_commit(0.003, 1)
    aggregates.count_request("append", "ok")
    aggregates.count_request("append", "invalid_action")
    return aggregates


@pytest.fixture
def registry(aggregates: Aggregates) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(aggregates, LiveGauges(connections_open=3), lambda: 7))
    return registry


def test_collector_samples(registry: CollectorRegistry) -> None:
    value = registry.get_sample_value
    assert value("ccos_actions_total", {"action_type": "CapabilityCall"}) == 3
    assert value("ccos_actions_total", {"action_type": "CapabilityResult"}) == 1
    assert value("ccos_actions_total", {"action_type": "PlanStarted"}) == 1
    assert value("ccos_capability_calls_total", {"capability": "ccos.echo", "outcome": "success"}) == 1
    assert value("ccos_capability_calls_total", {"capability": "ccos.echo", "outcome": "failure"}) == 1
    assert value("ccos_capability_calls_total", {"capability": "ccos.echo", "outcome": "unknown"}) == 1
    assert value("ccos_function_calls_total", {"function": "ccos.echo", "outcome": "success"}) == 1
    assert value("ccos_function_calls_total", {"function": "ccos.echo", "outcome": "unknown"}) == 1
    assert value("ccos_capability_calls_started_total", {"capability": "ccos.echo"}) == 3
    assert value("ccos_capability_orphan_results_total") == 0
    assert value("ccos_cost_total") == 1.75
    assert value("ccos_capability_cost_total", {"capability": "ccos.echo"}) == 0.75
    assert value("ccos_ledger_entries") == 5
    assert value("ccos_ingest_requests_total", {"op": "append", "result": "ok"}) == 1
    assert value("ccos_ingest_requests_total", {"op": "append", "result": "invalid_action"}) == 1
    assert value("ccos_connections_open") == 3
    assert value("ccos_pending_appends") == 7


def test_collector_histograms(registry: CollectorRegistry) -> None:
    value = registry.get_sample_value
    labels = {"capability": "ccos.echo"}
    assert value("ccos_capability_duration_seconds_bucket", labels | {"le": "0.005"}) == 1
    assert value("ccos_capability_duration_seconds_bucket", labels | {"le": "0.1"}) == 1
    assert value("ccos_capability_duration_seconds_bucket", labels | {"le": "0.25"}) == 2
    assert value("ccos_capability_duration_seconds_bucket", labels | {"le": "+Inf"}) == 2
    assert value("ccos_capability_duration_seconds_count", labels) == 2
    assert value("ccos_capability_duration_seconds_sum", labels) == pytest.approx(0.125)
    assert value("ccos_function_duration_seconds_count", {"function": "ccos.echo"}) == 2
    assert value("ccos_commit_duration_seconds_count") == 1
    assert value("ccos_commit_duration_seconds_bucket", {"le": "0.0025"}) == 0
    assert value("ccos_commit_duration_seconds_bucket", {"le": "0.005"}) == 1


def test_no_zero_outcome_series_are_invented(registry: CollectorRegistry) -> None:
    assert registry.get_sample_value(
        "ccos_function_calls_total", {"function": "ccos.echo", "outcome": "failure"}
    ) == 1
    assert registry.get_sample_value(
        "ccos_capability_calls_total", {"capability": "nope", "outcome": "success"}
    ) is None


def test_collector_reflects_entries_observed_after_registration(
    registry: CollectorRegistry, aggregates: Aggregates
) -> None:
    aggregates.observe_entries([action("PlanStarted")])
    assert registry.get_sample_value("ccos_ledger_entries") == 6
    assert registry.get_sample_value("ccos_actions_total", {"action_type": "PlanStarted"}) == 2


@pytest.mark.parametrize("populated", [True, False])
def test_exposition_has_help_and_type_for_every_family(populated: bool, aggregates: Aggregates) -> None:
    registry = CollectorRegistry()
    source = aggregates if populated else Aggregates()
    registry.register(LedgerCollector(source, LiveGauges(), lambda: 0))
    text = generate_latest(registry).decode("utf-8")
    lines = text.splitlines()
    for name, kind in LEDGER_FAMILIES.items():
        assert any(line.startswith(f"# HELP {name} ") and len(line) > len(f"# HELP {name} ") for line in lines), name
        assert f"# TYPE {name} {kind}" in lines, name


def test_exemplars_are_rendered_in_openmetrics_only_on_duration_buckets() -> None:
    aggregates = Aggregates()
    aggregates.observe_entries([entry(7, duration_ms=30)])
    text = openmetrics(aggregates)
    bucket = 'ccos_capability_duration_seconds_bucket{capability="web.search",le="0.05"}'
    line = next(x for x in text.splitlines() if x.startswith(bucket))
    assert line.endswith(' # {action_id="a-7",seq="7"} 0.03 1700000000.007')
    assert sum(" # {" in x for x in text.splitlines()) == 2  # the capability and the function histogram
    assert text.endswith("# EOF\n")


def test_overflow_counter_is_exposed() -> None:
    aggregates = Aggregates(max_label_values=1)
    aggregates.observe_entries([entry(0, function_name="a"), entry(1, function_name="b")])
    text = openmetrics(aggregates)
    assert 'ccos_metrics_label_overflow_total{family="ccos_capability_calls_total"} 1.0' in text
    assert 'ccos_capability_calls_total{capability="__other__",outcome="unknown"} 1.0' in text
