"""/metrics and the rest of the read-only HTTP side, scraped from a real daemon.

One daemon per module is fed a known set of actions; every test only reads.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from tests.daemon import DaemonProcess, basic_auth

WEIRD = 'we"ird\\name\nü→✓'
"""A capability id with a quote, a backslash, a newline and non-ASCII characters."""
WEIRD_ESCAPED = 'we\\"ird\\\\name\\nü→✓'
"""How the exposition formats write it inside a label value."""

ACTIONS: list[dict[str, Any]] = [
    {"action_type": "CapabilityCall", "function_name": "cap.alpha", "duration_ms": 3, "cost": 0.5, "success": True},
    # 5 ms is exactly the 0.005 s bound: le is inclusive.
    {"action_type": "CapabilityCall", "function_name": "cap.alpha", "duration_ms": 5, "cost": 0.25, "success": True},
    {"action_type": "CapabilityCall", "function_name": "cap.alpha", "duration_ms": 7, "cost": 1.0, "success": False},
    {"action_type": "CapabilityCall", "function_name": "cap.alpha", "duration_ms": 120, "cost": 0,
     "result": {"success": True, "value": 1}},
    # 20 s: beyond the last bound (10 s), only in +Inf. No success flag: outcome unknown.
    {"action_type": "CapabilityCall", "function_name": "cap.alpha", "duration_ms": 20000},
    {"action_type": "CapabilityCall", "function_name": "cap.beta", "duration_ms": 250, "cost": 2.0, "success": True},
    # No duration: counted as a call, not observed in the histogram.
    {"action_type": "CapabilityCall", "function_name": "cap.beta", "cost": 0.125, "success": False},
    # Not a CapabilityCall: function metrics only.
    {"action_type": "CapabilityResult", "function_name": "cap.alpha", "duration_ms": 10, "result": {"success": True}},
    {"action_type": "PlanStepStarted", "function_name": "step.fn", "duration_ms": 1000, "plan_id": "p"},
    {"action_type": "PlanStarted", "plan_id": "p", "cost": 0.75},
    {"action_type": "CapabilityCall", "function_name": WEIRD, "duration_ms": 50, "cost": 0.0625, "success": True},
]
TOTAL_COST = 0.5 + 0.25 + 1.0 + 2.0 + 0.125 + 0.75 + 0.0625
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def populated() -> Iterator[DaemonProcess]:
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        daemon = DaemonProcess(Path(directory), reader=True).start()  # reads /v1/entries and /v1/logs
        try:
            with daemon.client() as client:
                for action in ACTIONS:
                    client.append(action)
                rejected = client.request({"op": "append", "action": {"action_type": "NotAType"}})
                assert rejected["ok"] is False
                assert client.ping() == len(ACTIONS)
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="module")
def exposition(populated: DaemonProcess) -> str:
    status, headers, body = populated.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return body.decode("utf-8")


@pytest.fixture(scope="module")
def values(exposition: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parse_prometheus(exposition)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def buckets(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    return {
        float(dict(label_set)["le"]): v
        for (sample_name, label_set), v in samples.items()
        if sample_name == f"{name}_bucket" and {k: v for k, v in label_set if k != "le"} == labels
    }


def cumulative(counts_by_bound: dict[float, int]) -> dict[float, float]:
    """Expected cumulative bucket counts from the number of observations at each bound."""
    total, out = 0, {}
    for bound in BOUNDS:
        total += counts_by_bound.get(bound, 0)
        out[bound] = float(total)
    return out


# --- families


FAMILIES = [
    ("ccos_actions_total", "counter"),
    ("ccos_capability_calls_total", "counter"),
    ("ccos_capability_duration_seconds", "histogram"),
    ("ccos_function_calls_total", "counter"),
    ("ccos_function_duration_seconds", "histogram"),
    ("ccos_cost_total", "counter"),
    ("ccos_capability_cost_total", "counter"),
    ("ccos_ledger_entries", "gauge"),
    ("ccos_commit_duration_seconds", "histogram"),
    ("ccos_ingest_requests_total", "counter"),
    ("ccos_refused_frames_total", "counter"),
    ("ccos_received_bytes_total", "counter"),
    ("ccos_connections_open", "gauge"),
    ("ccos_pending_appends", "gauge"),
    ("ccos_commit_batch_entries", "histogram"),
    ("ccos_checkpoint_age_seconds", "gauge"),
    ("ccos_ledger_size_bytes", "gauge"),
    ("ccos_metrics_label_overflow_total", "counter"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
]
WORKING_MEMORY_FAMILIES = [
    ("ccos_wm_ingest_duration_seconds", "histogram"),
    ("ccos_sink_lag_entries", "gauge"),
    ("ccos_sink_lag_seconds", "gauge"),
    ("ccos_sink_delivered_total", "counter"),
    ("ccos_sink_errors_total", "counter"),
]


def has_family(exposition: str, name: str, kind: str) -> bool:
    help_line = re.search(rf"^# HELP {re.escape(name)} \S.*$", exposition, re.MULTILINE)
    type_line = re.search(rf"^# TYPE {re.escape(name)} {kind}$", exposition, re.MULTILINE)
    return help_line is not None and type_line is not None


@pytest.mark.parametrize(("name", "kind"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_design_family_has_help_and_type(exposition: str, name: str, kind: str) -> None:
    assert has_family(exposition, name, kind), f"no HELP/TYPE {kind} lines for {name}"


def test_no_millisecond_or_ccos_legacy_names(exposition: str) -> None:
    names = set(re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE))
    assert not {n for n in names if n.endswith("_ms") or n == "ccos_total_cost"}


# --- values


def test_action_and_cost_totals_are_exact(values: Samples) -> None:
    assert value(values, "ccos_actions_total", action_type="CapabilityCall") == 8
    assert value(values, "ccos_actions_total", action_type="CapabilityResult") == 1
    assert value(values, "ccos_actions_total", action_type="PlanStepStarted") == 1
    assert value(values, "ccos_actions_total", action_type="PlanStarted") == 1
    assert sum(v for (name, _), v in values.items() if name == "ccos_actions_total") == len(ACTIONS)
    assert value(values, "ccos_cost_total") == TOTAL_COST
    assert value(values, "ccos_ledger_entries") == len(ACTIONS)


def test_capability_calls_by_outcome(values: Samples) -> None:
    calls = {
        (dict(labels)["capability"], dict(labels)["outcome"]): v
        for (name, labels), v in values.items()
        if name == "ccos_capability_calls_total" and v
    }
    assert calls == {
        ("cap.alpha", "success"): 3,
        ("cap.alpha", "failure"): 1,
        ("cap.alpha", "unknown"): 1,
        ("cap.beta", "success"): 1,
        ("cap.beta", "failure"): 1,
        (WEIRD, "success"): 1,
    }


def test_capability_cost(values: Samples) -> None:
    assert value(values, "ccos_capability_cost_total", capability="cap.alpha") == 1.75
    assert value(values, "ccos_capability_cost_total", capability="cap.beta") == 2.125
    assert value(values, "ccos_capability_cost_total", capability=WEIRD) == 0.0625


def test_capability_duration_buckets_are_in_seconds(values: Samples) -> None:
    name = "ccos_capability_duration_seconds"
    alpha = buckets(values, name, capability="cap.alpha")
    assert alpha == cumulative({0.005: 2, 0.01: 1, 0.25: 1, math.inf: 1})
    assert value(values, f"{name}_count", capability="cap.alpha") == 5
    assert value(values, f"{name}_sum", capability="cap.alpha") == pytest.approx(0.003 + 0.005 + 0.007 + 0.12 + 20)

    beta = buckets(values, name, capability="cap.beta")
    assert beta == cumulative({0.25: 1})
    assert value(values, f"{name}_count", capability="cap.beta") == 1
    assert value(values, f"{name}_sum", capability="cap.beta") == pytest.approx(0.25)

    assert buckets(values, name, capability=WEIRD) == cumulative({0.05: 1})


def test_function_metrics_count_each_call_once_and_other_actions_with_a_function_name(values: Samples) -> None:
    calls = {
        (dict(labels)["function"], dict(labels)["outcome"]): v
        for (name, labels), v in values.items()
        if name == "ccos_function_calls_total" and v
    }
    assert calls == {
        ("cap.alpha", "success"): 3,  # the three calls; the CapabilityResult names no call: an orphan
        ("cap.alpha", "failure"): 1,
        ("cap.alpha", "unknown"): 1,
        ("cap.beta", "success"): 1,
        ("cap.beta", "failure"): 1,
        ("step.fn", "unknown"): 1,
        (WEIRD, "success"): 1,
    }
    name = "ccos_function_duration_seconds"
    assert buckets(values, name, function="cap.alpha") == cumulative({0.005: 2, 0.01: 1, 0.25: 1, math.inf: 1})
    assert value(values, f"{name}_count", function="cap.alpha") == 5
    assert value(values, "ccos_capability_orphan_results_total") == 1
    assert buckets(values, name, function="step.fn") == cumulative({1.0: 1})
    assert value(values, f"{name}_sum", function="step.fn") == pytest.approx(1.0)
    # Only CapabilityCall actions are capabilities.
    assert not buckets(values, "ccos_capability_duration_seconds", capability="step.fn")


def test_commit_and_ingest_metrics(values: Samples) -> None:
    commits = value(values, "ccos_commit_duration_seconds_count")
    assert 1 <= commits <= len(ACTIONS)
    assert value(values, "ccos_commit_duration_seconds_bucket", le="+Inf") == commits
    assert value(values, "ccos_ingest_requests_total", op="append", result="ok") == len(ACTIONS)
    assert value(values, "ccos_ingest_requests_total", op="append", result="invalid_action") == 1
    assert value(values, "ccos_ingest_requests_total", op="ping", result="ok") == 1


def test_duration_histograms_use_the_default_buckets(values: Samples) -> None:
    for name, labels in (("ccos_capability_duration_seconds", {"capability": "cap.alpha"}),
                         ("ccos_function_duration_seconds", {"function": "step.fn"})):
        assert sorted(buckets(values, name, **labels)) == list(BOUNDS)


# --- escaping and format


def test_label_values_are_escaped(exposition: str, values: Samples) -> None:
    assert f'capability="{WEIRD_ESCAPED}"' in exposition
    assert f'function="{WEIRD_ESCAPED}"' in exposition
    # A raw newline inside a label value would split a sample line in two.
    sample_line = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+$')
    for line in exposition.splitlines():
        assert line.startswith("# ") or sample_line.match(line), line
    assert value(values, "ccos_capability_calls_total", capability=WEIRD, outcome="success") == 1


def test_promtool_check_metrics_finds_nothing(exposition: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition.encode("utf-8"),
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == b"" and result.stderr == b"", result.stdout + result.stderr


def test_openmetrics_on_request(populated: DaemonProcess) -> None:
    status, headers, body = populated.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode("utf-8")
    assert text.endswith("# EOF\n")
    assert text.count("# EOF") == 1
    families = {f.name: f for f in parse_openmetrics(text)}  # strict: raises on any format error
    assert families["ccos_actions"].type == "counter"
    om = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    assert value(om, "ccos_actions_total", action_type="CapabilityCall") == 8
    assert value(om, "ccos_cost_total") == TOTAL_COST
    assert value(om, "ccos_capability_calls_total", capability=WEIRD, outcome="success") == 1
    assert f'capability="{WEIRD_ESCAPED}"' in text
    assert families["ccos_capability_duration_seconds"].type == "histogram"


def test_duration_buckets_carry_exemplars_that_lead_to_the_entry(populated: DaemonProcess) -> None:
    _, _, body = populated.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    families = {f.name: f for f in parse_openmetrics(body.decode("utf-8"))}
    exemplars = [s.exemplar for s in families["ccos_capability_duration_seconds"].samples if s.exemplar]
    assert exemplars
    for exemplar in exemplars:
        assert set(exemplar.labels) == {"action_id", "seq"}
        status, _, entry = populated.get(f"/v1/entries/{exemplar.labels['seq']}")
        assert status == 200
        record = json.loads(entry)
        assert record["entry"]["action_id"] == exemplar.labels["action_id"]
        assert record["entry"]["duration_ms"] / 1000 == pytest.approx(exemplar.value)
    function_exemplars = [s.exemplar for s in families["ccos_function_duration_seconds"].samples if s.exemplar]
    assert function_exemplars


def test_self_metrics_describe_the_process(values: Samples) -> None:
    assert value(values, "ccos_refused_frames_total", code="invalid_action") == 1
    assert value(values, "ccos_received_bytes_total") > 0
    assert value(values, "ccos_ledger_size_bytes") > 0
    assert value(values, "ccos_commit_batch_entries_count") == value(values, "ccos_commit_duration_seconds_count")
    assert value(values, "ccos_commit_batch_entries_sum") == len(ACTIONS)
    assert value(values, "ccos_checkpoint_age_seconds") >= 0


# --- the other routes


def test_healthz(populated: DaemonProcess) -> None:
    status, _, body = populated.get("/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def test_recent_logs_as_ndjson(populated: DaemonProcess) -> None:
    status, headers, body = populated.get("/v1/logs?n=5")
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-ndjson")
    lines = body.decode("utf-8").splitlines()
    assert len(lines) == 5
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict) and record["event"] and record["level"]
    events = [json.loads(line)["event"] for line in populated.get("/v1/logs?n=1000")[2].decode().splitlines()]
    assert "daemon_ready" in events


def request(daemon: DaemonProcess, method: str, path: str) -> int:
    host, port = daemon.ready["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = {"Authorization": basic_auth(*daemon.http_auth)} if daemon.http_auth else {}
        conn.request(method, path, body=b"x" if method in ("POST", "PUT") else None, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_http_is_read_only(populated: DaemonProcess, method: str) -> None:
    assert request(populated, method, "/metrics") == 405
    assert request(populated, method, "/healthz") == 405


def refused(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
        return False


def test_http_listens_on_loopback_only(populated: DaemonProcess) -> None:
    host, port_text = populated.ready["http"].rsplit(":", 1)
    port = int(port_text)
    assert host == "127.0.0.1"
    assert request(populated, "GET", "/healthz") == 200
    assert refused(socket.AF_INET, "127.0.0.2", port)  # another loopback address: not bound
    with contextlib.suppress(OSError):  # hosts without IPv6 have no ::1 to test
        assert refused(socket.AF_INET6, "::1", port)
    # The host's outward-facing address (a UDP "connect" sends nothing).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            outward = probe.getsockname()[0]
        except OSError:
            outward = None
    if outward and not outward.startswith("127."):
        assert refused(socket.AF_INET, outward, port)


def test_a_duplicate_append_is_not_counted_twice(daemon: DaemonProcess) -> None:
    action = {"action_type": "CapabilityCall", "action_id": "once", "function_name": "cap.once",
              "duration_ms": 30, "cost": 1.5, "success": True}
    with daemon.client() as client:
        assert client.append(action)["duplicate"] is False
        again = client.append(action)
        assert again["duplicate"] is True and again["seq"] == 0
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in parse_prometheus(daemon.metrics())
        for s in family.samples
    }
    assert value(samples, "ccos_ledger_entries") == 1
    assert value(samples, "ccos_actions_total", action_type="CapabilityCall") == 1
    assert value(samples, "ccos_cost_total") == 1.5
    assert value(samples, "ccos_capability_calls_total", capability="cap.once", outcome="success") == 1
    assert value(samples, "ccos_capability_duration_seconds_count", capability="cap.once") == 1
