"""The shipped Prometheus configuration, rules and Grafana dashboard, against a real Prometheus.

promtool checks the exposition, the configuration and the rules (and runs the rules'
unit tests). Then a real ``prometheus`` server, with exemplar storage on, scrapes a
real daemon every second and evaluates the shipped rule file every second; the tests
read its HTTP API: quantiles land in the right bucket, exemplars name the ledger
entries that were sent, every dashboard and rule expression evaluates (and finds
data), the rules are loaded and healthy, and the label-overflow alert fires.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess
from tests.waiting import wait_for as wait_for_condition

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
RULES = PROMETHEUS_DIR / "ccos-obsd.rules.yml"
DASHBOARD = ROOT / "config" / "grafana" / "ccos-obsd.json"
DEADLINE_S = 60.0

MAX_LABEL_VALUES = 8
"""The daemon under test keeps 8 values per label: the overflow capabilities go past it."""

RECORDS = [
    "capability:ccos_capability_duration_seconds:p50_5m",
    "capability:ccos_capability_duration_seconds:p95_5m",
    "capability:ccos_capability_duration_seconds:p99_5m",
    "function:ccos_function_duration_seconds:p50_5m",
    "function:ccos_function_duration_seconds:p95_5m",
    "function:ccos_function_duration_seconds:p99_5m",
    "capability:ccos_capability_duration_seconds:mean5m",
    "instance:ccos_commit_duration_seconds:p99_5m",
    "capability:ccos_capability_calls:rate5m",
    "capability:ccos_capability_calls_in_flight:sum",
    "capability:ccos_capability_call_failures_per_calls:ratio_rate5m",
    "action_type:ccos_actions:rate5m",
    "instance:ccos_actions:rate5m",
    "job:ccos_cost:rate5m",
    "capability:ccos_capability_cost:rate5m",
]
ALERTS = ["CcosObsdDown", "CcosSinkLagGrowing", "CcosSinkFailing", "CcosNoRecentCheckpoint",
          "CcosCommitLatencyHigh", "CcosMetricsLabelOverflow"]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    return wait_for_condition(condition, what, timeout, poll=0.2)


# --- promtool


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], input=None if stdin is None else stdin.decode(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_config_accepts_the_shipped_configuration() -> None:
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules_accepts_the_rule_file() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RECORDS) + len(ALERTS)} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(PROMETHEUS_DIR / "ccos-obsd.rules.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rule_file_has_exactly_the_documented_rules() -> None:
    text = RULES.read_text()
    assert re.findall(r"^\s*- record: (\S+)$", text, re.MULTILINE) == RECORDS
    assert re.findall(r"^\s*- alert: (\S+)$", text, re.MULTILINE) == ALERTS
    for name in RECORDS:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), f"{name} is not level:metric:operations"


# --- a daemon fed with known actions, scraped by a real Prometheus


@dataclass
class Sent:
    """What the tests sent, to compare Prometheus's view with."""

    exemplar_candidates: dict[str, int] = field(default_factory=dict)
    """action_id -> seq of every cap.a call."""
    head: int = 0


def wave(client: Any, sent: Sent, number: int) -> None:
    """One round of varied actions. Both rounds have the same mix, so rates keep its ratios."""
    actions: list[dict[str, Any]] = []
    for i in range(8):
        # 30 ms each: in the (0.025, 0.05] bucket.
        actions.append({"action_type": "CapabilityCall", "function_name": "cap.a", "duration_ms": 30,
                        "cost": 0.5, "success": True, "plan_id": f"p{number}", "action_id": f"a-{number}-{i}"})
    for i in range(4):
        # cap.b: one call in four fails.
        actions.append({"action_type": "CapabilityCall", "function_name": "cap.b", "duration_ms": 200,
                        "cost": 0.25, "success": i != 0, **({"error": "upstream 503"} if i == 0 else {})})
    actions += [
        {"action_type": "CapabilityResult", "function_name": "cap.a", "result": {"success": True, "value": 1}},
        {"action_type": "PlanStarted", "plan_id": f"p{number}", "cost": 0.125},
        {"action_type": "PlanStepStarted", "plan_id": f"p{number}", "step_id": "s1", "function_name": "step.fn",
         "duration_ms": 1500},
    ]
    # More distinct capabilities than metrics.max_label_values: the rest become __other__.
    actions += [{"action_type": "CapabilityCall", "function_name": f"overflow.{number}.{i}", "duration_ms": 5,
                 "success": True} for i in range(MAX_LABEL_VALUES)]
    for action in actions:
        answer = client.append(action)
        if action.get("function_name") == "cap.a" and action["action_type"] == "CapabilityCall":
            sent.exemplar_candidates[answer["action_id"]] = answer["seq"]
    sent.head = client.ping()


@pytest.fixture(scope="module")
def fed() -> Iterator[tuple[DaemonProcess, Sent]]:
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        state = Path(directory)
        config = state / "ccos-obsd.toml"
        config.write_text(f'[[sinks]]\ntype = "jsonl"\nname = "audit"\npath = "{state / "audit.jsonl"}"\n')
        daemon = DaemonProcess(state, "--config", str(config),
                               env={"CCOS_OBSD_METRICS_MAX_LABEL_VALUES": str(MAX_LABEL_VALUES)}).start()
        try:
            sent = Sent()
            with daemon.client() as client:
                wave(client, sent, 1)
            yield daemon, sent
        finally:
            daemon.stop()


class Prometheus:
    def __init__(self, workdir: Path, target: str = "", scrape_configs: list[dict[str, Any]] | None = None) -> None:
        """Scrapes ``target`` as job ccos-obsd, or the jobs of ``scrape_configs`` when given."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": scrape_configs or [{"job_name": "ccos-obsd", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--enable-feature=exemplar-storage"],
                stdout=log, stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - loopback
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def recorded(self, expr: str, what: str) -> float:
        """Wait until ``expr`` has a number (a rate over one sample only is NaN) and return it."""
        def number() -> tuple[float] | None:  # a tuple: 0.0 is a number too
            value = self.value(expr)
            return None if value is None or math.isnan(value) else (value,)

        found: tuple[float] = wait_for(number, what)
        return found[0]

    def value(self, expr: str) -> Any:
        """The value of a one-series result, or None when there is no series."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def prometheus(fed: tuple[DaemonProcess, Sent]) -> Iterator[Prometheus]:
    daemon, sent = fed
    with tempfile.TemporaryDirectory(prefix="ccos-prom-") as directory:
        server = Prometheus(Path(directory), daemon.ready["http"])
        try:
            wait_for(server.ready, "prometheus to be ready")
            wait_for(lambda: server.value('up{job="ccos-obsd"}') == 1, "a successful scrape")
            # A first scrape has seen the first wave; a second wave makes every counter
            # grow between scrapes, so rates and increases are above zero.
            wait_for(lambda: server.value("ccos_ledger_entries") == sent.head, "the first wave in Prometheus")
            with daemon.client() as client:
                wave(client, sent, 2)
            wait_for(lambda: server.value("ccos_ledger_entries") == sent.head, "the second wave in Prometheus")
            yield server
        finally:
            server.stop()


def test_promtool_check_metrics_finds_nothing_in_the_exposition(fed: tuple[DaemonProcess, Sent]) -> None:
    daemon, _ = fed
    text = daemon.metrics()
    # Varied: overflowed labels, sinks, checkpoints and the ledger's size are all there.
    for needle in ('capability="__other__"', "ccos_metrics_label_overflow_total{",
                   'ccos_sink_lag_entries{sink="audit"}', "ccos_checkpoint_age_seconds ", "ccos_ledger_size_bytes "):
        assert needle in text, f"{needle} is not in the exposition"
    result = promtool("check", "metrics", stdin=text.encode())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_the_median_of_30_ms_calls_lands_in_their_bucket(prometheus: Prometheus) -> None:
    # From the cumulative counts, and from the shipped recording rules (rates over 5m).
    assert 0.025 < prometheus.value('histogram_quantile(0.5, ccos_capability_duration_seconds_bucket{capability="cap.a"})') <= 0.05  # noqa: E501
    p50 = prometheus.recorded('capability:ccos_capability_duration_seconds:p50_5m{capability="cap.a"}',
                              "the p50 recording rule")
    assert p50 == pytest.approx(0.0375)  # interpolated inside (0.025, 0.05]
    p99 = prometheus.value('capability:ccos_capability_duration_seconds:p99_5m{capability="cap.a"}')
    assert p99 == pytest.approx(0.04975)
    mean = prometheus.value('capability:ccos_capability_duration_seconds:mean5m{capability="cap.a"}')
    assert mean == pytest.approx(0.03)
    # cap.b's 200 ms calls: in (0.1, 0.25].
    assert 0.1 < prometheus.value('capability:ccos_capability_duration_seconds:p50_5m{capability="cap.b"}') <= 0.25


def test_error_ratio_and_cost_rules(prometheus: Prometheus) -> None:
    ratio = "capability:ccos_capability_call_failures_per_calls:ratio_rate5m"
    failing = prometheus.recorded(f'{ratio}{{capability="cap.b"}}', "the error ratio")
    assert failing == pytest.approx(0.25)
    assert prometheus.value(f'{ratio}{{capability="cap.a"}}') == 0
    # Cost: per wave 8 * 0.5 (cap.a) + 4 * 0.25 (cap.b) + 0.125 (plan), so cap.a is 4/5.125 of the total.
    total = wait_for(lambda: prometheus.value("job:ccos_cost:rate5m"), "the cost rate")
    cap_a = prometheus.value('capability:ccos_capability_cost:rate5m{capability="cap.a"}')
    assert cap_a == pytest.approx(total * 4 / 5.125)


def test_exemplars_name_the_ledger_entries_sent(prometheus: Prometheus, fed: tuple[DaemonProcess, Sent]) -> None:
    _, sent = fed

    def exemplars() -> list[dict[str, Any]]:
        now = time.time()
        answer = prometheus.get("/api/v1/query_exemplars",
                                query='ccos_capability_duration_seconds_bucket{capability="cap.a"}',
                                start=str(now - 600), end=str(now + 60))
        assert answer["status"] == "success", answer
        return [{**e, "le": series["seriesLabels"]["le"]} for series in answer["data"] for e in series["exemplars"]]

    found = wait_for(exemplars, "exemplars of cap.a in Prometheus")
    for exemplar in found:
        labels = exemplar["labels"]
        assert set(labels) == {"action_id", "seq"}
        assert sent.exemplar_candidates.get(labels["action_id"]) == int(labels["seq"]), labels
        assert float(exemplar["value"]) == pytest.approx(0.03)
        assert exemplar["le"] == "0.05"


def dashboard_exprs(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        yield from dashboard_exprs(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def as_promql(expr: str) -> str:
    """Grafana's interval variables become 1m; the dashboard's own variables match everything."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr)
    expr = re.sub(r"\$\{?(job|instance|capability)\}?", ".+", expr)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def test_the_dashboard_is_importable_and_wired_to_its_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ccos-obsd" and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "${datasource}" not in target["expr"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("ingest rate", "heatmap", "p50 / p95 / p99", "cost", "error", "sink lag", "ledger growth",
                  "commit latency", "connections"):
        assert topic in titles, f"no {topic} panel"
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["repeat"] == "capability"
    latency = heatmaps + [p for p in panels if "p50 / p95 / p99" in p["title"]]
    for panel in latency:
        assert all(t["exemplar"] for t in panel["targets"]), panel["title"]
        assert "_bucket" in panel["targets"][0]["expr"]
    assert all(t["format"] == "heatmap" for t in heatmaps[0]["targets"])


def test_every_dashboard_query_evaluates_and_finds_data(prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(dashboard_exprs(dashboard["panels"]))
    assert len(queries) >= 15
    for title, expr in queries:
        result = prometheus.query(as_promql(expr))  # fails on any PromQL error
        assert result, f"panel {title!r}: {expr} finds no data"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable
        series = prometheus.query(as_promql(match[1]))
        assert any(match[2] in s["metric"] for s in series), f"variable {variable['name']} has no values"


def test_the_rules_are_loaded_healthy_and_every_expression_evaluates(prometheus: Prometheus) -> None:
    def evaluated_groups() -> list[dict[str, Any]] | None:
        groups: list[dict[str, Any]] = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
        return groups if done else None

    groups = wait_for(evaluated_groups, "every rule to be evaluated")
    rules = [r for g in groups for r in g["rules"]]
    assert all(g["file"] == str(RULES) for g in groups)
    assert sorted(r["name"] for r in rules if r["type"] == "recording") == sorted(RECORDS)
    assert sorted(r["name"] for r in rules if r["type"] == "alerting") == sorted(ALERTS)
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        prometheus.query(rule["query"])
    for rule in rules:
        if rule["type"] == "alerting":
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_daemon_is_up_and_the_label_overflow_alert_fires(prometheus: Prometheus) -> None:
    def firing() -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = prometheus.get("/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing"]

    alerts = wait_for(lambda: [a for a in firing() if a["labels"]["alertname"] == "CcosMetricsLabelOverflow"],
                      "CcosMetricsLabelOverflow to fire")
    families = {a["labels"]["family"] for a in alerts}
    assert {"ccos_capability_calls_total", "ccos_capability_duration_seconds"} <= families
    assert all(a["labels"]["job"] == "ccos-obsd" and a["labels"]["severity"] == "warning" for a in alerts)
    assert "hit metrics.max_label_values" in alerts[0]["annotations"]["summary"]
    # Nothing else is wrong with this daemon.
    assert {a["labels"]["alertname"] for a in firing()} == {"CcosMetricsLabelOverflow"}
