"""The HTTP read API, the pending-appends limit, the socket's group and start-up refusals."""

from __future__ import annotations

import grp
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, run_cli


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[DaemonProcess]:
    """The daemon with a reader: the read API's content routes answer only to a user."""
    process = DaemonProcess(state_dir, reader=True).start()
    try:
        yield process
    finally:
        process.stop()


def test_http_read_api_serves_entries_queries_and_stats(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        first = client.append({"action_type": "CapabilityCall", "function_name": "web.search", "plan_id": "p1",
                               "action_id": "a-1", "cost": 0.5, "duration_ms": 20, "success": True})
        client.append({"action_type": "PlanCompleted", "plan_id": "p2"})
    status, _, body = daemon.get("/v1/entries/0")
    assert status == 200 and json.loads(body)["leaf_hash"] == first["leaf_hash"]
    status, _, body = daemon.get("/v1/actions/a-1")
    assert status == 200 and json.loads(body)["entry"]["plan_id"] == "p1"
    assert daemon.get("/v1/entries/99")[0] == 404
    assert daemon.get("/v1/entries/x")[0] == 400
    status, _, body = daemon.get("/v1/query?plan_id=p2")
    assert status == 200 and [json.loads(line)["seq"] for line in body.decode().splitlines()] == [1]
    assert daemon.get("/v1/query?bogus=1")[0] == 400
    status, _, body = daemon.get("/v1/stats?capability=web.search")
    stats = json.loads(body)
    assert status == 200 and stats["capabilities"]["web.search"]["calls"] == 1
    assert stats["total_cost"] == 0.5


def test_http_stats_takes_the_stats_filters(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append_batch([
            {"action_type": "CapabilityCall", "function_name": "web.search", "plan_id": "p1", "intent_id": "i1",
             "cost": 0.5, "duration_ms": 20, "success": True},
            {"action_type": "CapabilityCall", "function_name": "llm.complete", "plan_id": "p2", "intent_id": "i1",
             "cost": 2.0, "duration_ms": 900, "success": False},
            {"action_type": "AgentLlmConsultation", "function_name": "llm.plan", "plan_id": "p1", "cost": 0.25},
        ])
        socket_answer = client.stats(plan_id="p1", intent_id="i1", capability="llm.complete", function="web.search")
    status, _, body = daemon.get("/v1/stats?plan_id=p1&intent_id=i1&capability=llm.complete&function=web.search")
    assert status == 200
    stats = json.loads(body)
    assert stats == {k: v for k, v in socket_answer.items() if k != "ok"}
    assert (stats["plan_cost"], stats["intent_cost"], stats["total_cost"]) == (0.75, 2.5, 2.75)
    assert set(stats["capabilities"]) == {"llm.complete"} and set(stats["functions"]) == {"web.search"}
    assert stats["capabilities"]["llm.complete"]["failures"] == 1
    assert stats["functions"]["web.search"]["successes"] == 1
    status, _, body = daemon.get("/v1/stats?plan_id=nobody")
    assert status == 200 and json.loads(body)["plan_cost"] == 0
    status, _, body = daemon.get("/v1/stats?bogus=1")
    assert status == 400 and json.loads(body)["error"]["field"] == "bogus"


def test_http_logs_pages_after_a_line_number_given_in_headers(daemon: DaemonProcess) -> None:
    status, headers, _ = daemon.get("/v1/logs?n=0")
    assert status == 200 and "Ccos-Log-Missed" not in headers
    last = int(headers["Ccos-Log-Last"])
    with daemon.client() as client:
        appended = client.append({"action_type": "IntentCreated"})
    status, headers, body = daemon.get(f"/v1/logs?after={last}&n=1000")
    assert status == 200 and headers["Ccos-Log-Missed"] == "0"
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert int(headers["Ccos-Log-Last"]) == last + len(lines)
    assert [line["action_id"] for line in lines if line["event"] == "action_appended"] == [appended["action_id"]]
    assert daemon.get("/v1/logs?after=x")[0] == 400


def test_appends_beyond_max_pending_answer_busy(state_dir: Path) -> None:
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_LEDGER_MAX_PENDING": "2"}).start()
    try:
        with daemon.client() as client:
            answer = client.request({"op": "append_batch", "actions": [{"action_type": "PlanStarted"}] * 3})
            assert answer["ok"] is False and answer["error"]["code"] == "busy"
            assert client.ping() == 0
            assert client.append_batch([{"action_type": "PlanStarted"}] * 2)[1]["seq"] == 1
    finally:
        daemon.stop()


def test_the_socket_belongs_to_the_configured_writers_group(state_dir: Path) -> None:
    other = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_SOCKET_GROUP": other.gr_name}).start()
    try:
        assert daemon.socket_path.stat().st_gid == other.gr_gid
    finally:
        daemon.stop()


def test_an_http_port_in_use_is_a_start_up_failure(state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "--state-dir", str(state_dir), "--http", f"127.0.0.1:{port}")
    assert result.returncode == 3
    assert "cannot listen on http" in result.stderr.decode()
    assert not (state_dir / "ccos-obsd.sock").exists()


def test_a_live_socket_is_never_replaced(daemon: DaemonProcess, state_dir: Path) -> None:
    other_state = state_dir / "second"
    result = run_cli("run", "--state-dir", str(other_state), "--socket", str(daemon.socket_path),
                     "--http", "127.0.0.1:0")
    assert result.returncode == 3
    assert "listening on" in result.stderr.decode()
    with daemon.client() as client:
        assert client.ping() == 0


def test_query_with_a_state_dir_reads_it_without_the_daemon(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append({"action_type": "PlanStarted", "plan_id": "p9"})
    daemon.stop()
    result = run_cli("query", "--state-dir", str(daemon.state_dir), "--plan-id", "p9")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["seq"] for line in result.stdout.decode().splitlines()] == [0]
