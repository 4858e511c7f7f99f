"""The renderer process renders exactly what the daemon's own collector would."""

from __future__ import annotations

import os
import pickle

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ccos_obsd.metrics.render import render_state
from ccos_obsd.metrics.snapshot import dump_state
from tests.unit.metrics_helpers import OPENMETRICS, collector


def ccos_lines(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if "process_" not in line]


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
@pytest.mark.parametrize("created", [None, (1_700_000_000.0, 1_800_000_000.0)])
def test_the_state_renders_as_the_collector_does(accept: str, created: tuple[float, float] | None) -> None:
    live = collector(created)
    registry = CollectorRegistry()
    registry.register(live)
    encoder, content_type = choose_encoder(accept)
    state = pickle.loads(pickle.dumps(dump_state(live.state())))  # noqa: S301 - as it crosses the pipe
    body, rendered_type = render_state(state, accept, os.getpid())
    assert rendered_type == content_type
    assert ccos_lines(body) == ccos_lines(encoder(registry))
    assert b"process_cpu_seconds_total" in body


def test_exemplars_and_the_overflow_cross_to_the_renderer() -> None:
    body, _ = render_state(dump_state(collector().state()), OPENMETRICS, os.getpid())
    text = body.decode()
    assert '# {action_id="a-' in text
    assert 'ccos_metrics_label_overflow_total{family="ccos_capability_calls_total"}' in text
    assert text.endswith("# EOF\n")
