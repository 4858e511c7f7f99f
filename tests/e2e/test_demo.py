"""``ccos-obsd demo`` against a real daemon: the simulated workload lands in the ledger."""

from __future__ import annotations

import re
from collections import Counter
from itertools import islice
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ccos_obsd.demo import Workload
from ccos_obsd.ledger.entry import DAEMON_FIELDS
from tests.daemon import DaemonProcess, run_cli

SUMMARY = re.compile(r"demo: sent (\d+) actions, (\d+) errors, in ([\d.]+) s \(([\d.]+) actions/s\); run_id (\S+)")


def run_demo(daemon: DaemonProcess, *args: str) -> tuple[int, int, float, str]:
    result = run_cli("demo", "--socket", str(daemon.socket_path), *args)
    assert result.returncode == 0, result.stderr.decode()
    match = SUMMARY.fullmatch(result.stdout.decode().strip())
    assert match, result.stdout
    return int(match[1]), int(match[2]), float(match[3]), match[5]


def test_demo_appends_the_seeded_workload_at_the_requested_rate(daemon: DaemonProcess) -> None:
    sent, errors, elapsed, run_id = run_demo(daemon, "--rate", "40", "--duration", "2", "--seed", "3",
                                             "--run-id", "e2e-run")
    assert run_id == "e2e-run"
    assert errors == 0
    # 40/s for 2 s is 80 actions; paced, so it takes the 2 s, and no more.
    assert 64 <= sent <= 80
    assert 1.5 <= elapsed <= 3.0
    with daemon.client() as client:
        assert client.ping() == sent
        entries = [client.get(seq=seq)["entry"] for seq in range(sent)]
    expected = list(islice(Workload(3, "e2e-run"), sent))
    for entry, action in zip(entries, expected, strict=True):
        assert isinstance(entry["timestamp_ms"], int)
        stored = {k: v for k, v in entry.items() if k not in (*DAEMON_FIELDS, "timestamp_ms")}
        assert stored == action


def completed_calls(entries: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """(capability, outcome) of each completed call: a result of a call in ``entries``, or a self-contained call."""
    calls = {e["action_id"]: e for e in entries if e["action_type"] == "CapabilityCall"}
    completed: Counter[tuple[str, str]] = Counter()
    for entry in entries:
        answered = entry["action_type"] == "CapabilityResult" and entry["parent_action_id"] in calls
        if answered or (entry["action_type"] == "CapabilityCall" and "success" in entry):
            completed[(entry["function_name"], "success" if entry["success"] else "failure")] += 1
    return completed


def test_the_dashboard_families_count_each_demo_call_once_with_its_outcome(daemon: DaemonProcess) -> None:
    """Most demo calls are a call and its result (CCOS's record_result): each counts once, when it completes."""
    sent, errors, _, _ = run_demo(daemon, "--rate", "400", "--duration", "1", "--seed", "5")
    assert errors == 0
    with daemon.client() as client:
        entries = [r["entry"] for r in client.query(limit=10_000)]
    assert len(entries) == sent
    calls = [e for e in entries if e["action_type"] == "CapabilityCall"]
    paired = [c for c in calls if "success" not in c]
    assert len(paired) > len(calls) / 2
    counted = Counter({
        (sample.labels["capability"], sample.labels["outcome"]): int(sample.value)
        for family in text_string_to_metric_families(daemon.metrics())
        for sample in family.samples if sample.name == "ccos_capability_calls_total" and sample.value
    })
    assert counted == completed_calls(entries)  # no "unknown", and no call counted twice


def test_a_second_run_appends_alongside_the_first(daemon: DaemonProcess) -> None:
    first, _, _, first_id = run_demo(daemon, "--rate", "50", "--duration", "0.5")
    second, errors, _, second_id = run_demo(daemon, "--rate", "50", "--duration", "0.5")
    assert first_id != second_id and first_id.startswith("demo-")
    assert errors == 0
    with daemon.client() as client:
        assert client.ping() == first + second
        assert len(client.query(run_id=second_id, limit=1000)) == second


def test_demo_without_a_daemon_or_with_a_bad_rate_exits_2(daemon: DaemonProcess) -> None:
    missing = run_cli("demo", "--socket", str(daemon.state_dir / "nothing.sock"), "--duration", "1")
    assert missing.returncode == 2
    assert b"nothing.sock" in missing.stderr
    bad = run_cli("demo", "--socket", str(daemon.socket_path), "--rate", "0")
    assert bad.returncode == 2
    assert b"--rate" in bad.stderr
