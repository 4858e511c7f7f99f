"""Persisted metric aggregates: start-up loads the snapshot and folds in only newer entries."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ccos_obsd.metrics.snapshot import SNAPSHOT_FORMAT
from tests.daemon import DaemonProcess, running_daemon

LEDGER_FAMILIES = (
    "ccos_actions", "ccos_capability_calls", "ccos_capability_duration_seconds", "ccos_capability_cost",
    "ccos_function_calls", "ccos_function_duration_seconds", "ccos_cost", "ccos_ledger_entries",
    "ccos_metrics_label_overflow", "ccos_capability_calls_started", "ccos_capability_orphan_results",
)


def ledger_samples(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The ledger-derived samples of /metrics (not those that describe the running process)."""
    out = {}
    for family in text_string_to_metric_families(daemon.metrics()):
        if family.name in LEDGER_FAMILIES:
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def append_calls(daemon: DaemonProcess, start: int, count: int) -> None:
    with daemon.client() as client:
        answers = client.append_batch([
            {"action_type": "CapabilityCall", "function_name": f"cap.{i % 7}", "duration_ms": i % 900,
             "cost": 0.25, "success": i % 5 != 0}
            for i in range(start, start + count)
        ])
        assert all(a["ok"] for a in answers)


def restored(daemon: DaemonProcess) -> dict[str, Any]:
    return next(x for x in daemon.log if isinstance(x, dict) and x.get("event") == "metrics_restored")


def discarded(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [x for x in daemon.log if isinstance(x, dict) and x.get("event") == "metrics_snapshot_discarded"]


def snapshot_row(state_dir: Path) -> tuple[int, int] | None:
    conn = sqlite3.connect(state_dir / "ledger.db")
    try:
        return conn.execute("SELECT format, entries FROM metrics_snapshot").fetchone()  # type: ignore[no-any-return]
    finally:
        conn.close()


def edit_snapshot(state_dir: Path, sql: str, *args: Any) -> None:
    conn = sqlite3.connect(state_dir / "ledger.db")
    try:
        with conn:
            conn.execute(sql, args)
    finally:
        conn.close()


def test_a_restart_loads_the_snapshot_and_folds_in_nothing(state_dir: Path) -> None:
    with running_daemon(state_dir) as daemon:
        append_calls(daemon, 0, 300)
        before = ledger_samples(daemon)
    assert snapshot_row(state_dir) == (SNAPSHOT_FORMAT, 300)  # written at shutdown
    with running_daemon(state_dir) as daemon:
        assert restored(daemon)["from_snapshot"] == 300
        assert restored(daemon)["folded_in"] == 0
        assert ledger_samples(daemon) == before


def test_entries_after_the_snapshot_are_folded_in(state_dir: Path) -> None:
    with running_daemon(state_dir) as daemon:
        append_calls(daemon, 0, 200)
    with running_daemon(state_dir) as daemon:
        append_calls(daemon, 200, 150)
        expected = ledger_samples(daemon)
        daemon.kill()  # no shutdown snapshot: the stored one still covers 200 entries
    assert snapshot_row(state_dir) == (SNAPSHOT_FORMAT, 200)
    with running_daemon(state_dir) as daemon:
        assert (restored(daemon)["from_snapshot"], restored(daemon)["folded_in"]) == (200, 150)
        assert ledger_samples(daemon) == expected


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d: edit_snapshot(d, "UPDATE metrics_snapshot SET entries = 5000"), "covers 5000 entries"),
        (lambda d: edit_snapshot(d, "UPDATE metrics_snapshot SET format = 99"), "format 99"),
        (lambda d: edit_snapshot(d, "UPDATE metrics_snapshot SET body = x'7b7b7b'"), "unreadable"),
        (lambda d: edit_snapshot(d, "UPDATE metrics_snapshot SET body = ?", b'{"entries": 120}'), "unreadable"),
        (lambda d: edit_snapshot(d, "UPDATE metrics_snapshot SET chain_hash = zeroblob(32)"), "chain hash"),
        (lambda d: edit_snapshot(d, "UPDATE metrics_snapshot SET entries = 100"), "chain hash"),
    ],
)
def test_a_snapshot_that_does_not_match_the_ledger_is_discarded_and_rebuilt(
    state_dir: Path, tamper: Callable[[Path], None], reason: str
) -> None:
    with running_daemon(state_dir) as daemon:
        append_calls(daemon, 0, 120)
        expected = ledger_samples(daemon)
    tamper(state_dir)
    with running_daemon(state_dir) as daemon:
        [line] = discarded(daemon)
        assert reason in line["reason"]
        assert restored(daemon)["from_snapshot"] == 0
        assert ledger_samples(daemon) == expected


def test_changed_buckets_discard_the_snapshot(state_dir: Path) -> None:
    with running_daemon(state_dir) as daemon:
        append_calls(daemon, 0, 50)
    with running_daemon(state_dir, env={"CCOS_OBSD_METRICS_DURATION_BUCKETS": "0.1,1,10"}) as daemon:
        [line] = discarded(daemon)
        assert "duration_buckets" in line["reason"]
        buckets = {k for k in ledger_samples(daemon) if k[0] == "ccos_capability_duration_seconds_bucket"}
        assert {dict(labels)["le"] for _, labels in buckets} == {"0.1", "1.0", "10.0", "+Inf"}


def test_snapshots_are_written_periodically_while_running(state_dir: Path) -> None:
    with running_daemon(state_dir, env={"CCOS_OBSD_METRICS_SNAPSHOT_INTERVAL": "0.05"}) as daemon:
        append_calls(daemon, 0, 80)
        deadline = time.monotonic() + 10
        while snapshot_row(state_dir) != (SNAPSHOT_FORMAT, 80):
            assert time.monotonic() < deadline, f"no snapshot of 80 entries: {snapshot_row(state_dir)}"
            time.sleep(0.02)
        conn = sqlite3.connect(state_dir / "ledger.db")
        try:
            body = json.loads(conn.execute("SELECT body FROM metrics_snapshot").fetchone()[0])
        finally:
            conn.close()
        assert body["entries"] == 80
        assert sum(body["actions_by_type"].values()) == 80


def test_created_series_only_when_configured(state_dir: Path) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    with running_daemon(state_dir, reader=True) as daemon:  # GETs /v1/entries
        append_calls(daemon, 0, 5)
        assert "_created" not in daemon.get("/metrics", headers=openmetrics)[2].decode()
        first_entry_ms = json.loads(daemon.get("/v1/entries/0")[2])["entry"]["recorded_at_ms"]
    with running_daemon(state_dir, env={"CCOS_OBSD_METRICS_CREATED_SERIES": "true"}) as daemon:
        text = daemon.get("/metrics", headers=openmetrics)[2].decode()
    created = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_openmetrics(text) for s in family.samples if s.name.endswith("_created")
    }
    assert created[("ccos_actions_created", (("action_type", "CapabilityCall"),))] == first_entry_ms / 1000
    duration = ("ccos_capability_duration_seconds_created", (("capability", "cap.0"),))
    assert created[duration] == first_entry_ms / 1000
    assert created[("ccos_received_bytes_created", ())] > first_entry_ms / 1000  # this process's start


def renderer_pids(daemon: DaemonProcess) -> list[int]:
    assert daemon.proc is not None
    pids = []
    for task in Path(f"/proc/{daemon.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"ccos_obsd.metrics.render" in cmdline:
                pids.append(int(child))
    return pids


def test_metrics_render_in_a_process_of_their_own_that_is_replaced_when_it_dies(state_dir: Path) -> None:
    import os
    import signal

    with running_daemon(state_dir) as daemon:
        append_calls(daemon, 0, 20)
        before = ledger_samples(daemon)
        [renderer] = renderer_pids(daemon)
        os.kill(renderer, signal.SIGKILL)
        assert ledger_samples(daemon) == before  # the next scrape is answered all the same
        [replacement] = renderer_pids(daemon)
        assert replacement != renderer
        append_calls(daemon, 20, 5)
        assert ledger_samples(daemon)[("ccos_ledger_entries", ())] == 25


def checkpoint_age(daemon: DaemonProcess) -> float:
    for family in text_string_to_metric_families(daemon.metrics()):
        if family.name == "ccos_checkpoint_age_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no ccos_checkpoint_age_seconds")


def test_checkpoint_age_is_how_long_uncovered_entries_have_waited(state_dir: Path) -> None:
    with running_daemon(state_dir, env={"CCOS_OBSD_CHECKPOINT_INTERVAL": "3600"}) as daemon:
        assert checkpoint_age(daemon) == 0.0  # nothing to cover
        append_calls(daemon, 0, 1)  # the first group is checkpointed at once
        assert checkpoint_age(daemon) == 0.0
        append_calls(daemon, 1, 1)  # the next checkpoint is an hour away
        first = checkpoint_age(daemon)
        deadline = time.monotonic() + 5
        while (later := checkpoint_age(daemon)) <= first:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert 0 < first < later < 60
