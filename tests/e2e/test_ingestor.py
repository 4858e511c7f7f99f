"""The ingestor capability's own numbers, on a real daemon: a call lasts until Working Memory has its records.

``observability.ingestor:v1.ingest`` is recorded as a CapabilityCall, then (once
the call is committed and the WM sink delivered it) a CapabilityResult with the
whole call's duration; ``ccos_wm_ingest_duration_seconds`` observes each call;
``ccos_sink_lag_seconds`` is the age of what a sink still owes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tests.daemon import DaemonProcess, running_daemon
from tests.e2e.test_sinks import sample, sink_host_pid, wait_for

INGEST = "observability.ingestor:v1.ingest"


def call(daemon: DaemonProcess, args: list[Any]) -> dict[str, Any]:
    with daemon.client() as client:
        return client.request({"op": "call", "capability": INGEST, "args": args})


def ingest_pairs(daemon: DaemonProcess) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each ingest CapabilityCall with its CapabilityResult, in ledger order."""
    with daemon.client() as client:
        entries = [record["entry"] for record in client.query(function_name=INGEST, limit=1000)]
    results = {e["parent_action_id"]: e for e in entries if e["action_type"] == "CapabilityResult"}
    return [(e, results[e["action_id"]]) for e in entries if e["action_type"] == "CapabilityCall"]


def test_a_call_answers_once_working_memory_can_find_its_records(daemon: DaemonProcess) -> None:
    words = []
    with daemon.client() as client:
        for _ in range(20):
            word = "w" + uuid.uuid4().hex[:12]
            words.append(word)
            answer = client.request({"op": "call", "capability": INGEST, "args": ["single", {"summary": word}]})
            assert answer["ok"] and answer["result"]["delivered"] is True
            # Right after the answer, on the same connection: the record is there.
            found = client.request({"op": "wm_search", "text": word})
            assert [entry["title"] for entry in found["entries"]] == [word]
    pairs = ingest_pairs(daemon)
    assert len(pairs) == 20
    for (call_entry, result), word in zip(pairs, words, strict=True):
        assert call_entry["arguments"][1][0]["summary"] == word
        assert "duration_ms" not in call_entry
        assert result["success"] is True and result["duration_ms"] > 0
        # The result was recorded after the call's commit and the WM delivery it waited for.
        assert result["seq"] > call_entry["seq"] and result["recorded_at_ms"] >= call_entry["recorded_at_ms"]


def test_each_ingest_call_is_one_observation_of_its_whole_duration(daemon: DaemonProcess) -> None:
    calls = [["single", {"summary": "a"}], ["batch", [{"summary": "b"}, {"summary": "c"}]],
             ["batch", [{"bogus": 1}]], ["replay"], ["single", {"summary": "d"}]]
    for args in calls:
        assert call(daemon, args)["ok"], args
    assert call(daemon, ["explode"])["ok"] is False  # refused before anything is recorded: not a call
    durations = [result["duration_ms"] for _, result in ingest_pairs(daemon)]
    assert sample(daemon, "ccos_wm_ingest_duration_seconds_count") == len(calls) == len(durations)
    total = sample(daemon, "ccos_wm_ingest_duration_seconds_sum")
    assert total is not None and abs(total - sum(durations) / 1000) < 1e-3
    assert sample(daemon, "ccos_capability_calls_total", capability=INGEST, outcome="success") == 4
    assert sample(daemon, "ccos_capability_calls_total", capability=INGEST, outcome="failure") == 1


def test_while_the_sink_host_stands_still_calls_wait_and_its_lag_in_seconds_grows(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append({"action_type": "PlanStarted", "plan_id": "before"})
    wait_for(lambda: sample(daemon, "ccos_sink_lag_entries", sink="wm") == 0, "WM to catch up")
    assert sample(daemon, "ccos_sink_lag_seconds", sink="wm") == 0
    host = sink_host_pid(daemon)
    answers: list[dict[str, Any]] = []
    os.kill(host, signal.SIGSTOP)
    try:
        caller = threading.Thread(target=lambda: answers.append(call(daemon, ["single", {"summary": "held"}])))
        caller.start()
        with daemon.client() as client:
            wait_for(lambda: client.ping() == 2, "the call to be committed")
        held_from = time.monotonic()  # the call is committed, so it started before this
        wait_for(lambda: (sample(daemon, "ccos_sink_lag_seconds", sink="wm") or 0) >= 1.0,
                 "the lag in seconds to pass 1 s")
        first = sample(daemon, "ccos_sink_lag_seconds", sink="wm")
        wait_for(lambda: (sample(daemon, "ccos_sink_lag_seconds", sink="wm") or 0) > (first or 0), "it to grow")
        assert caller.is_alive()  # Working Memory has not got the record: no answer yet
    finally:
        resumed = time.monotonic()
        os.kill(host, signal.SIGCONT)
    caller.join(30)
    assert answers and answers[0]["ok"] and answers[0]["result"]["delivered"] is True
    (_, result), = ingest_pairs(daemon)
    assert result["duration_ms"] >= (resumed - held_from) * 1000
    wait_for(lambda: sample(daemon, "ccos_sink_lag_seconds", sink="wm") == 0, "the lag to go back to 0")


def test_with_working_memory_off_a_call_lasts_until_its_commit(state_dir: Path) -> None:
    with running_daemon(state_dir, env={"CCOS_OBSD_WM_ENABLED": "false"}) as daemon:
        answer = call(daemon, ["single", {"summary": "kept on the ledger"}])
        assert answer == {"ok": True, "result": {"mode": "single", "ingested": 1, "errors": [], "delivered": False}}
        assert call(daemon, ["replay"])["error"]["code"] == "unavailable"
        (call_entry, result), = ingest_pairs(daemon)
        assert call_entry["arguments"][1][0]["summary"] == "kept on the ledger"
        assert result["success"] is True and result["duration_ms"] > 0
