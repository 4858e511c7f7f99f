"""The README's Python example, end to end: a call and its result are one capability call.

CCOS records a capability call as a ``CapabilityCall`` and its outcome as a child
``CapabilityResult`` (``record_result``). Five such calls, one failed, must show as
five completed calls with their outcomes and durations, counted once, the same
after a restart with the metrics snapshot and after one without it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ccos_obsd.client import Client
from tests.daemon import DaemonProcess, running_daemon

FAMILIES = (
    "ccos_capability_calls", "ccos_capability_duration_seconds", "ccos_capability_calls_started",
    "ccos_capability_orphan_results", "ccos_function_calls", "ccos_function_duration_seconds",
    "ccos_capability_cost",
)


def call_samples(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(daemon.metrics()):
        if family.name in FAMILIES:
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def record_call(chain: Client, n: int, *, success: bool) -> None:
    """The README example: the call, then its result as a child of the call."""
    call = chain.append({"action_type": "CapabilityCall", "function_name": "web.search",
                         "plan_id": "p1", "arguments": ["ccos"], "timestamp_ms": 1764000000000 + n})
    chain.append({"action_type": "CapabilityResult", "parent_action_id": call["action_id"],
                  "function_name": "web.search", "duration_ms": 42, "success": success})


def test_the_readme_example_counts_each_call_once_with_outcome_and_duration(state_dir: Path) -> None:
    with running_daemon(state_dir) as daemon:
        with daemon.client() as chain:
            for n in range(5):
                record_call(chain, n, success=n != 3)
        live = call_samples(daemon)
    search = (("capability", "web.search"),)
    assert live[("ccos_capability_calls_total", (*search, ("outcome", "success")))] == 4
    assert live[("ccos_capability_calls_total", (*search, ("outcome", "failure")))] == 1
    assert live[("ccos_function_calls_total", (("function", "web.search"), ("outcome", "success")))] == 4
    assert live[("ccos_function_calls_total", (("function", "web.search"), ("outcome", "failure")))] == 1
    assert not [key for key in live if ("outcome", "unknown") in key[1]]
    assert live[("ccos_capability_duration_seconds_count", search)] == 5
    assert live[("ccos_capability_duration_seconds_sum", search)] == 5 * 0.042
    assert live[("ccos_capability_duration_seconds_bucket", (*search, ("le", "0.05")))] == 5
    assert live[("ccos_function_duration_seconds_count", (("function", "web.search"),))] == 5
    assert live[("ccos_capability_calls_started_total", search)] == 5
    assert live[("ccos_capability_orphan_results_total", ())] == 0

    with running_daemon(state_dir) as daemon:  # with the snapshot written at shutdown
        assert call_samples(daemon) == live
    conn = sqlite3.connect(state_dir / "ledger.db")
    with conn:
        conn.execute("DELETE FROM metrics_snapshot")
    conn.close()
    with running_daemon(state_dir) as daemon:  # rebuilt from the ledger alone
        assert call_samples(daemon) == live


def test_a_result_after_a_restart_on_another_connection_completes_its_call(state_dir: Path) -> None:
    with running_daemon(state_dir) as daemon, daemon.client() as chain:
        call = chain.append({"action_type": "CapabilityCall", "function_name": "db.query",
                             "timestamp_ms": 1764000000000})
        samples = call_samples(daemon)
        assert samples[("ccos_capability_calls_started_total", (("capability", "db.query"),))] == 1
        assert ("ccos_capability_calls_total", (("capability", "db.query"), ("outcome", "success"))) not in samples
    with running_daemon(state_dir) as daemon:
        with daemon.client() as other:
            other.append({"action_type": "CapabilityResult", "parent_action_id": call["action_id"],
                          "success": True, "timestamp_ms": 1764000000250})
            other.append({"action_type": "CapabilityResult", "parent_action_id": "no-such-call", "success": True})
        samples = call_samples(daemon)
    query = (("capability", "db.query"),)
    assert samples[("ccos_capability_calls_total", (*query, ("outcome", "success")))] == 1
    assert samples[("ccos_capability_duration_seconds_sum", query)] == 0.25  # result time minus call time
    assert samples[("ccos_capability_orphan_results_total", ())] == 1
