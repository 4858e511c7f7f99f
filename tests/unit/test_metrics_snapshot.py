"""The one encoding of metric state: the persisted snapshot, and the state the renderer receives."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from ccos_obsd.metrics.aggregates import Aggregates
from ccos_obsd.metrics.collector import StateCollector
from ccos_obsd.metrics.snapshot import dump_aggregates, dump_state, load_aggregates, load_state
from tests.unit.metrics_helpers import collector, entry, openmetrics

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
    stored = json.dumps(dump_aggregates(before.snapshot()))  # what the daemon writes into the ledger database
    restarted = Aggregates(max_label_values=max_labels)
    restarted.restore(load_aggregates(json.loads(stored), restarted.duration_buckets))
    restarted.observe_entries(ledger[cut:])

    assert dump_aggregates(restarted.snapshot()) == dump_aggregates(whole.snapshot())
    assert openmetrics(restarted) == openmetrics(whole)


def test_load_rejects_a_malformed_snapshot_and_keeps_what_it_had() -> None:
    aggregates = Aggregates()
    aggregates.observe_entries([entry(0)])
    good = dump_aggregates(aggregates.snapshot())
    for broken in (
        {},
        {**good, "entries": "many"},
        {**good, "capability_durations": {"web.search": [[1, 2], 0.1, 3, None]}},  # wrong bucket count
        {**good, "capabilities": {"web.search": [[1], 0, 0, 0]}},
    ):
        with pytest.raises(ValueError, match="malformed metrics snapshot"):
            aggregates.restore(load_aggregates(broken, aggregates.duration_buckets))
    assert dump_aggregates(aggregates.snapshot()) == good


def test_process_counters_are_not_part_of_the_snapshot() -> None:
    aggregates = Aggregates()
    aggregates.count_request("append", "bad_json")
    aggregates.observe_commit(0.01, 5)
    restarted = Aggregates()
    restarted.restore(load_aggregates(dump_aggregates(aggregates.snapshot()), restarted.duration_buckets))
    snap = restarted.snapshot()
    assert snap.ingest_requests == {} and snap.refused == {} and snap.commit_batches.count == 0


# --- one encoding: the stored snapshot and the renderer's state read back exactly


def as_json(data: Any) -> Any:
    """``data`` as it comes back from JSON (tuples become lists)."""
    return json.loads(json.dumps(data))


@given(entries_strategy, st.booleans())
def test_dump_then_load_then_dump_gives_the_same_dump(raw: list[dict[str, Any]], process: bool) -> None:
    aggregates = Aggregates(max_label_values=3)
    aggregates.observe_entries(numbered(raw))
    aggregates.observe_commit(0.002, len(raw))
    aggregates.count_request("append", "ok")
    aggregates.count_request("append", "bad_json")
    dumped = dump_aggregates(aggregates.snapshot(), process=process)
    loaded = load_aggregates(as_json(dumped), aggregates.duration_buckets)
    assert as_json(dump_aggregates(loaded, process=process)) == as_json(dumped)


@pytest.mark.parametrize("created", [None, (1_700_000_000.0, 1_800_000_000.0)])
def test_a_loaded_state_renders_as_the_collector_it_was_taken_from(created: tuple[float, float] | None) -> None:
    live = collector(created)
    dumped = dump_state(live.state())
    loaded = load_state(as_json(dumped))
    assert as_json(dump_state(loaded)) == as_json(dumped)
    original, copy = CollectorRegistry(), CollectorRegistry()
    original.register(live)
    copy.register(StateCollector(loaded))
    assert generate_latest(copy) == generate_latest(original)
    assert openmetrics_latest(copy) == openmetrics_latest(original)
