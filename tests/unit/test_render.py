"""The renderer process renders exactly what the daemon's own collector would."""

from __future__ import annotations

import os
import pickle
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ccos_obsd.metrics import Aggregates, Histogram, LedgerCollector, LiveGauges, SinkView, WmView
from ccos_obsd.render import render_state
from ccos_obsd.sinks.base import DELIVERY_BUCKETS
from ccos_obsd.sinks.wm import WM_INGEST_BUCKETS

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def collector(created: tuple[float, float] | None = None) -> LedgerCollector:
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
        lambda: [SinkView("wm", 3, 37, 1, durations)], lambda: WmView(37, ingest), lambda: 1.5, created,
    )


def ccos_lines(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if "process_" not in line]


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
@pytest.mark.parametrize("created", [None, (1_700_000_000.0, 1_800_000_000.0)])
def test_the_state_renders_as_the_collector_does(accept: str, created: tuple[float, float] | None) -> None:
    live = collector(created)
    registry = CollectorRegistry()
    registry.register(live)
    encoder, content_type = choose_encoder(accept)
    state = pickle.loads(pickle.dumps(live.state()))  # noqa: S301 - as it crosses the pipe
    body, rendered_type = render_state(state, accept, os.getpid())
    assert rendered_type == content_type
    assert ccos_lines(body) == ccos_lines(encoder(registry))
    assert b"process_cpu_seconds_total" in body


def test_exemplars_and_the_overflow_cross_to_the_renderer() -> None:
    body, _ = render_state(collector().state(), OPENMETRICS, os.getpid())
    text = body.decode()
    assert '# {action_id="a-' in text
    assert 'ccos_metrics_label_overflow_total{family="ccos_capability_calls_total"}' in text
    assert text.endswith("# EOF\n")
