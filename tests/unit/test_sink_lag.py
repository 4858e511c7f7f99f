"""A sink's lag in seconds (ccos_obsd.sinks.lag) and the wait for a sink's cursor (SinkHost.wait_delivered)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from ccos_obsd.config import load_config
from ccos_obsd.ledger import store
from ccos_obsd.metrics.aggregates import Histogram
from ccos_obsd.metrics.snapshot import encode_histogram
from ccos_obsd.sinks.base import DELIVERY_BUCKETS
from ccos_obsd.sinks.host import SinkHost
from ccos_obsd.sinks.lag import CommitTimes
from tests.unit.metrics_helpers import collector


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_caught_up_sink_has_no_lag() -> None:
    times = CommitTimes(clock=Clock())
    times.note(0, 10.0)
    assert times.age(5, 5) == 0.0
    assert times.age(7, 5) == 0.0


def test_the_lag_is_the_age_of_the_group_holding_the_first_undelivered_entry() -> None:
    clock = Clock(100.0)
    times = CommitTimes(clock=clock)
    for first_seq, recorded in [(0, 10.0), (4, 20.0), (9, 30.0)]:
        times.note(first_seq, recorded)
    assert times.age(0, 12) == 90.0
    assert times.age(3, 12) == 90.0  # seq 3 was committed with seq 0
    assert times.age(4, 12) == 80.0
    assert times.age(11, 12) == 70.0
    clock.now = 130.0
    assert times.age(11, 12) == 100.0  # grows while the sink stands still


def test_points_every_cursor_passed_are_forgotten_but_the_one_still_needed_stays() -> None:
    times = CommitTimes(clock=Clock(100.0))
    for first_seq in range(0, 50, 5):
        times.note(first_seq, float(first_seq))
    times.forget_below(22)
    assert times.age(22, 50) == 80.0  # the group starting at 20
    assert len(times._seqs) == 6


def test_a_point_at_or_below_the_last_is_ignored() -> None:
    times = CommitTimes(clock=Clock(100.0))
    times.note(10, 50.0)
    times.note(10, 90.0)
    times.note(3, 90.0)
    assert times.age(10, 11) == 50.0


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(1, 20), min_size=1, max_size=300),
    cursor_at=st.floats(0, 1),
    max_points=st.integers(2, 16),
)
def test_with_its_points_bounded_the_age_is_never_less_than_the_truth(
    groups: list[int], cursor_at: float, max_points: int
) -> None:
    clock = Clock(10_000.0)
    times = CommitTimes(max_points, clock=clock)
    recorded: list[float] = []  # each entry's time, by seq
    for index, size in enumerate(groups):
        times.note(len(recorded), float(index))
        recorded.extend([float(index)] * size)
    head = len(recorded)
    cursor = min(head - 1, int(cursor_at * head))
    assert len(times._seqs) <= max_points
    assert times.age(cursor, head) >= clock.now - recorded[cursor]


def test_the_collector_shows_each_sinks_lag_in_seconds() -> None:
    registry = CollectorRegistry()
    registry.register(collector())
    assert registry.get_sample_value("ccos_sink_lag_seconds", {"sink": "wm"}) == 2.5


# --- waiting for a sink's cursor


@pytest.fixture
def host(tmp_path: Path) -> SinkHost:
    config = load_config(environ={}, overrides={"state_dir": str(tmp_path)})
    db = store.ledger_path(tmp_path)
    store.connect(db, readonly=False).close()
    return SinkHost(config, db, lambda: 10)


def report(host: SinkHost, cursor: int) -> None:
    """What the sink host child reports for the WM sink, read on the stats thread."""
    thread = threading.Thread(target=host._update, args=({
        "sink": "wm", "cursor": cursor, "delivered": cursor, "errors": 0,
        "durations": encode_histogram(Histogram(DELIVERY_BUCKETS)), "wm": {"size": cursor},
    },))
    thread.start()
    thread.join()


async def test_a_wait_returns_once_a_report_shows_the_cursor_there(host: SinkHost) -> None:
    waiting = asyncio.create_task(host.wait_delivered("wm", 5, 30.0))
    await asyncio.sleep(0)  # one turn of the loop: the task registers its wait before its first await
    report(host, 3)
    assert not waiting.done()
    report(host, 6)
    assert await asyncio.wait_for(waiting, 30.0) is True
    assert host._counters["wm"].waiters == []
    assert await host.wait_delivered("wm", 6, 0.0) is True  # there already


async def test_a_wait_gives_up_after_its_timeout(host: SinkHost) -> None:
    assert await host.wait_delivered("wm", 5, 0.01) is False
    assert host._counters["wm"].waiters == []


async def test_a_cancelled_wait_leaves_nothing_behind(host: SinkHost) -> None:
    waiting = asyncio.create_task(host.wait_delivered("wm", 5, 30.0))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert host._counters["wm"].waiters == []
    report(host, 9)  # resolving nothing, raising nothing
