"""The socket protocol of DESIGN.md ("Socket protocol", "Actions"), against the real daemon.

Most tests share one daemon (module scope) and only assume what they append
themselves: they name their plans, intents and capabilities uniquely and
compare heads before and after. Tests that need other limits start their own.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess, running_daemon
from tests.e2e.socket_helpers import (
    APPEND_FIELDS,
    ZERO_HASH,
    BackgroundSender,
    RawConnection,
    assert_appended,
    assert_error,
    canonical,
    chain_hash,
    leaf_hash,
    unique,
    wait_for_open_connections,
)

REPO = Path(__file__).resolve().parents[2]
RECORD_FIELDS = {"seq", "entry", "leaf_hash", "chain_hash", "key_id", "signature"}




# --- append


def test_append_answer_has_exactly_the_contract_fields(shared: DaemonProcess) -> None:
    with shared.client() as client:
        answer = client.request({"op": "append", "action": {"action_type": "PlanStarted", "plan_id": unique("p")}})
        assert set(answer) == APPEND_FIELDS
        assert answer["ok"] is True
        assert answer["duplicate"] is False
        assert isinstance(answer["seq"], int) and answer["seq"] >= 0
        assert isinstance(answer["action_id"], str) and answer["action_id"]  # generated
        assert bytes.fromhex(answer["leaf_hash"]) and len(answer["leaf_hash"]) == 64
        assert bytes.fromhex(answer["chain_hash"]) and len(answer["chain_hash"]) == 64


def test_append_answer_echoes_the_request_id(shared: DaemonProcess) -> None:
    action_id = unique("action")
    with shared.client() as client:
        answer = client.request(
            {"id": "req-1", "op": "append", "action": {"action_type": "PlanStarted", "action_id": action_id}}
        )
    assert set(answer) == APPEND_FIELDS | {"id"}
    assert answer["id"] == "req-1"
    assert answer["action_id"] == action_id


def test_consecutive_appends_get_consecutive_seqs(shared: DaemonProcess) -> None:
    with shared.client() as client:
        head = client.ping()
        seqs = [client.append({"action_type": "PlanStepStarted", "step_id": f"s{i}"})["seq"] for i in range(5)]
        assert seqs == list(range(head, head + 5))
        assert client.ping() == head + 5


def test_leaf_and_chain_hash_cover_the_stored_entry_bytes(shared: DaemonProcess) -> None:
    actions = [
        {"action_type": "IntentCreated", "intent_id": unique("i"), "metadata": {"goal": "café ✓", "b": [1, 2.5]}},
        {"action_type": "CapabilityCall", "function_name": "cap.read", "arguments": ["ü", {"z": 1, "a": None}],
         "cost": 0.1, "duration_ms": 12.75, "timestamp_ms": 1_700_000_000_000},
        {"action_type": "CapabilityResult", "function_name": "cap.read",
         "result": {"success": True, "value": {"rows": 3}, "metadata": {}}},
    ]
    with shared.client() as client:
        for action in actions:
            answer = client.append(action)
            record = client.get(seq=answer["seq"])
            assert set(record) == RECORD_FIELDS
            entry_bytes = canonical(record["entry"])
            leaf = leaf_hash(entry_bytes)
            assert answer["leaf_hash"] == record["leaf_hash"] == leaf.hex()
            seq = answer["seq"]
            previous = ZERO_HASH if seq == 0 else bytes.fromhex(client.get(seq=seq - 1)["chain_hash"])
            assert answer["chain_hash"] == record["chain_hash"] == chain_hash(previous, leaf).hex()


def test_stored_entry_is_the_action_plus_the_daemon_fields(shared: DaemonProcess) -> None:
    action = {"action_type": "PlanStarted", "plan_id": unique("p"), "session_id": "s", "metadata": {"k": "v"}}
    with shared.client() as client:
        answer = client.append(action)
        entry = client.get(seq=answer["seq"])["entry"]
    assert entry == {
        **action,
        "action_id": answer["action_id"],
        "v": 1,
        "seq": answer["seq"],
        "recorded_at_ms": entry["recorded_at_ms"],
        "peer": entry["peer"],
    }
    assert isinstance(entry["recorded_at_ms"], int)


def test_append_batch_answers_each_action_in_order_and_a_bad_one_fails_alone(shared: DaemonProcess) -> None:
    plan = unique("plan")
    actions: list[dict[str, Any]] = [
        {"action_type": "PlanStarted", "plan_id": plan},
        {"action_type": "NoSuchActionType", "plan_id": plan},
        {"action_type": "PlanStepStarted", "plan_id": plan, "step_id": "1"},
        {"action_type": "PlanStepCompleted", "plan_id": plan, "cost": -1},
        {"action_type": "PlanCompleted", "plan_id": plan},
    ]
    with shared.client() as client:
        head = client.ping()
        answer = client.request({"id": 9, "op": "append_batch", "actions": actions})
        assert set(answer) == {"id", "ok", "results"}
        assert answer["id"] == 9 and answer["ok"] is True
        results = answer["results"]
        assert len(results) == 5
        assert_appended(results[0], seq=head)
        assert_error(results[1], "invalid_action", field="action_type")
        assert_appended(results[2], seq=head + 1)
        assert_error(results[3], "invalid_action", field="cost")
        assert_appended(results[4], seq=head + 2)
        assert all("id" not in result for result in results)
        assert client.ping() == head + 3
        stored = [record["entry"]["action_type"] for record in client.query(plan_id=plan)]
        assert stored == ["PlanStarted", "PlanStepStarted", "PlanCompleted"]


# --- ping, bare lines, blank lines


def test_ping_answers_the_number_of_entries(shared: DaemonProcess) -> None:
    with shared.client() as client:
        first = client.request({"id": 5, "op": "ping"})
        assert first == {"id": 5, "ok": True, "head": first["head"]}
        client.append({"action_type": "PlanPaused"})
        assert client.request({"op": "ping"}) == {"ok": True, "head": first["head"] + 1}


def test_a_line_without_op_is_an_append_and_its_id_is_echoed_not_stored(raw: RawConnection) -> None:
    intent = unique("intent")
    head = raw.ping()
    answer = raw.roundtrip(json.dumps({"id": "line-7", "action_type": "IntentCreated", "intent_id": intent}).encode())
    assert_appended(answer, seq=head)
    assert answer["id"] == "line-7"
    record = raw.request({"op": "get", "seq": head})["record"]
    assert "id" not in record["entry"]
    assert record["entry"]["intent_id"] == intent
    assert record["entry"]["action_type"] == "IntentCreated"


def test_blank_lines_get_no_answer(raw: RawConnection) -> None:
    raw.send(b"\n\r\n   \n\t\n" + b'{"id":1,"op":"ping"}\n' + b"\n\n" + b'{"id":2,"op":"ping"}\n' + b"\n")
    assert raw.answer()["id"] == 1
    assert raw.answer()["id"] == 2
    # Had a blank line been answered, this would not be the next answer.
    assert raw.request({"id": 3, "op": "ping"})["id"] == 3


# --- pipelining


def test_500_pipelined_requests_are_answered_in_request_order(shared: DaemonProcess) -> None:
    plan = unique("pipe")
    head = RawConnection(shared.socket_path)
    with head:
        head0 = head.ping()
    lines: list[bytes] = []
    expected: list[dict[str, Any]] = []
    appended = 0
    last: tuple[int, str] | None = None
    for i in range(500):
        kind = i % 7
        action_id = f"{plan}-{i}"
        if kind == 0:
            request: dict[str, Any] = {"id": i, "op": "append",
                                       "action": {"action_type": "PlanStepStarted", "plan_id": plan,
                                                  "action_id": action_id}}
            expected.append({"kind": "append", "seq": head0 + appended, "action_id": action_id})
            last = (head0 + appended, action_id)
            appended += 1
        elif kind == 1:
            request = {"id": i, "action_type": "PlanStepCompleted", "plan_id": plan, "action_id": action_id}
            expected.append({"kind": "append", "seq": head0 + appended, "action_id": action_id})
            last = (head0 + appended, action_id)
            appended += 1
        elif kind == 2:
            request = {"id": i, "op": "ping"}
            expected.append({"kind": "ping", "head": head0 + appended})
        elif kind == 3:
            assert last is not None
            request = {"id": i, "op": "get", "seq": last[0]}
            expected.append({"kind": "get", "seq": last[0], "action_id": last[1]})
        elif kind == 4:
            batch = [{"action_type": "PlanStepRetrying", "plan_id": plan, "action_id": f"{action_id}-{k}"}
                     for k in range(2)]
            request = {"id": i, "op": "append_batch", "actions": batch}
            expected.append({"kind": "batch", "seqs": [head0 + appended, head0 + appended + 1]})
            last = (head0 + appended + 1, f"{action_id}-1")
            appended += 2
        elif kind == 5:
            request = {"id": i, "op": "no_such_op"}
            expected.append({"kind": "error", "code": "unknown_op"})
        else:
            request = {"id": i, "op": "append", "action": {"action_type": "NotAType", "plan_id": plan}}
            expected.append({"kind": "error", "code": "invalid_action"})
        lines.append(json.dumps(request).encode())
        if i % 50 == 25:
            lines.append(b"")  # a blank line in the stream: no answer
    payload = b"\n".join(lines) + b"\n"

    with RawConnection(shared.socket_path) as connection:
        sender = BackgroundSender(connection.sock, payload)  # one write, read while it is sent
        answers = [connection.answer() for _ in range(500)]
        sender.join()
        assert connection.ping() == head0 + appended

    assert [answer.get("id") for answer in answers] == list(range(500))
    heads_seen = [head0]
    for answer, want in zip(answers, expected, strict=True):
        if want["kind"] == "append":
            assert_appended(answer, seq=want["seq"])
            assert answer["action_id"] == want["action_id"]
        elif want["kind"] == "ping":
            # Read-your-writes: every append answered before the ping is counted. (Appends
            # sent after it may already be committed too: they can share a group commit.)
            assert answer["ok"] is True and answer["head"] >= want["head"], (answer, want)
            assert answer["head"] >= heads_seen[-1]
            heads_seen.append(answer["head"])
        elif want["kind"] == "get":
            assert answer["ok"] is True, answer
            assert answer["record"]["seq"] == want["seq"]
            assert answer["record"]["entry"]["action_id"] == want["action_id"]
        elif want["kind"] == "batch":
            assert answer["ok"] is True, answer
            assert [result["seq"] for result in answer["results"]] == want["seqs"]
        else:
            assert_error(answer, want["code"])


# --- duplicates


def test_resending_an_action_is_a_duplicate_with_the_same_seq(shared: DaemonProcess) -> None:
    action = {"action_id": unique("dup"), "action_type": "CapabilityCall", "function_name": "cap.x", "cost": 0.5,
              "metadata": {"a": 1, "b": 2}}
    reordered = {"metadata": {"b": 2, "a": 1}, "cost": 0.5, "function_name": "cap.x",
                 "action_type": "CapabilityCall", "action_id": action["action_id"]}
    with shared.client() as client:
        first = client.append(action)
        head = client.ping()
        again = client.append(action)
        same_content = client.request({"id": "r", **reordered})  # bare line, keys in another order
        assert client.ping() == head
    for answer in (again, same_content):
        assert answer["duplicate"] is True
        assert set(answer) - {"id"} == APPEND_FIELDS
        assert {k: answer[k] for k in ("seq", "action_id", "leaf_hash", "chain_hash")} == {
            k: first[k] for k in ("seq", "action_id", "leaf_hash", "chain_hash")
        }
    assert same_content["id"] == "r"


def test_same_action_id_with_different_content_is_a_conflict(shared: DaemonProcess) -> None:
    action_id = unique("conflict")
    with shared.client() as client:
        first = client.append({"action_id": action_id, "action_type": "PlanStarted", "cost": 1})
        head = client.ping()
        answer = client.request(
            {"id": 4, "op": "append", "action": {"action_id": action_id, "action_type": "PlanStarted", "cost": 2}}
        )
        assert_error(answer, "conflict")
        assert answer["id"] == 4
        assert client.ping() == head
        assert client.get(action_id=action_id)["entry"]["cost"] == 1
        assert client.get(action_id=action_id)["seq"] == first["seq"]


def test_duplicates_inside_one_batch(shared: DaemonProcess) -> None:
    a, b = unique("a"), unique("b")
    action_a = {"action_id": a, "action_type": "PlanStepStarted", "step_id": "1"}
    action_b = {"action_id": b, "action_type": "PlanStepStarted", "step_id": "2"}
    with shared.client() as client:
        head = client.ping()
        results = client.append_batch(
            [action_a, action_a, {**action_a, "step_id": "changed"}, action_b, action_b]
        )
        assert_appended(results[0], seq=head)
        assert results[1]["duplicate"] is True and results[1]["seq"] == head
        assert results[1]["chain_hash"] == results[0]["chain_hash"]
        assert_error(results[2], "conflict")
        assert_appended(results[3], seq=head + 1)
        assert results[4]["duplicate"] is True and results[4]["seq"] == head + 1
        assert client.ping() == head + 2
        # And a later batch repeating a stored action.
        later = client.append_batch([action_b])
        assert later[0]["duplicate"] is True and later[0]["seq"] == head + 1
        assert client.ping() == head + 2


# --- limits


def test_a_batch_over_max_batch_is_an_error_and_appends_nothing(state_dir: Path) -> None:
    with running_daemon(state_dir, env={"CCOS_OBSD_SOCKET_MAX_BATCH": "5"}) as daemon, daemon.client() as client:
        too_many = [{"action_type": "PlanStepStarted", "step_id": str(i)} for i in range(6)]
        answer = client.request({"id": 1, "op": "append_batch", "actions": too_many})
        assert_error(answer, "invalid_request", field="actions")
        assert answer["id"] == 1
        assert client.ping() == 0
        results = client.append_batch(too_many[:5])
        assert [result["seq"] for result in results] == [0, 1, 2, 3, 4]


def test_connection_over_max_connections_gets_busy_and_is_closed(state_dir: Path) -> None:
    with running_daemon(state_dir, env={"CCOS_OBSD_SOCKET_MAX_CONNECTIONS": "3"}) as daemon, ExitStack() as stack:
        clients = [stack.enter_context(daemon.client()) for _ in range(3)]
        for client in clients:
            client.ping()  # admitted: the daemon has accepted it
        with RawConnection(daemon.socket_path) as fourth:
            assert_error(fourth.answer(), "busy")
            assert fourth.read_line() == b""  # then closed
        for i, client in enumerate(clients):
            assert client.append({"action_type": "PlanStarted", "plan_id": f"p{i}"})["seq"] == i
        clients.pop().close()
        wait_for_open_connections(daemon, 2)
        with daemon.client() as replacement:
            assert replacement.ping() == 3


# --- peer credentials


def test_entries_carry_the_kernel_peer_credentials_of_the_sender(shared: DaemonProcess) -> None:
    with shared.client() as client:
        seq = client.append({"action_type": "PlanStarted"})["seq"]
        entry = client.get(seq=seq)["entry"]
    assert entry["peer"] == {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}


def test_peer_pid_is_the_process_that_connected(shared: DaemonProcess) -> None:
    script = (
        "import json, sys\n"
        "from ccos_obsd.client import Client\n"
        "with Client(sys.argv[1]) as client:\n"
        "    print(json.dumps(client.append({'action_type': 'PlanStarted'})))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(shared.socket_path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    seq = json.loads(out)["seq"]
    with shared.client() as client:
        entry = client.get(seq=seq)["entry"]
    assert entry["peer"] == {"uid": os.getuid(), "gid": os.getgid(), "pid": process.pid}


@pytest.mark.parametrize("field", ["peer", "seq", "recorded_at_ms", "v"])
def test_a_client_cannot_supply_the_daemon_fields(raw: RawConnection, field: str) -> None:
    forged: dict[str, Any] = {"peer": {"uid": 0, "gid": 0, "pid": 1}, "seq": 0, "recorded_at_ms": 1, "v": 1}
    head = raw.ping()
    answer = raw.request({"op": "append", "action": {"action_type": "PlanStarted", field: forged[field]}})
    assert_error(answer, "invalid_action", field=field)
    bare = raw.request({"action_type": "PlanStarted", field: forged[field]})
    assert_error(bare, "invalid_action", field=field)
    assert raw.ping() == head


# --- read ops


def test_get_by_seq_and_by_action_id_return_the_same_record(shared: DaemonProcess) -> None:
    action_id = unique("get")
    with shared.client() as client:
        seq = client.append({"action_id": action_id, "action_type": "PlanStarted"})["seq"]
        by_seq = client.get(seq=seq)
        by_id = client.get(action_id=action_id)
    assert by_seq == by_id
    assert set(by_seq) == RECORD_FIELDS
    assert by_seq["seq"] == seq
    assert by_seq["entry"]["action_id"] == action_id
    assert len(by_seq["key_id"]) == 8


def test_get_of_a_missing_entry_is_not_found(shared: DaemonProcess) -> None:
    with shared.client() as client:
        head = client.ping()
        assert_error(client.request({"id": 1, "op": "get", "seq": head + 1000}), "not_found")
        assert_error(client.request({"op": "get", "action_id": unique("missing")}), "not_found")


@pytest.fixture(scope="module")
def scenario(shared: DaemonProcess) -> dict[str, Any]:
    """A small causal chain with unique ids, appended once for the query tests."""
    s = {name: unique(name) for name in ("session", "plan", "intent", "other_plan", "fn")}
    root = unique("root")
    actions = [
        {"action_id": root, "action_type": "IntentCreated", "intent_id": s["intent"], "session_id": s["session"],
         "timestamp_ms": 1000},
        {"action_type": "PlanStarted", "plan_id": s["plan"], "intent_id": s["intent"], "session_id": s["session"],
         "parent_action_id": root, "timestamp_ms": 2000},
        {"action_type": "CapabilityCall", "plan_id": s["plan"], "session_id": s["session"],
         "function_name": f"{s['fn']}.alpha.read", "parent_action_id": root, "timestamp_ms": 3000},
        {"action_type": "CapabilityCall", "plan_id": s["plan"], "session_id": s["session"],
         "function_name": f"{s['fn']}.alpha.write", "timestamp_ms": 4000},
        {"action_type": "CapabilityCall", "plan_id": s["other_plan"], "session_id": s["session"],
         "function_name": f"{s['fn']}.beta", "timestamp_ms": 5000},
        {"action_type": "PlanCompleted", "plan_id": s["plan"], "session_id": s["session"], "timestamp_ms": 6000},
    ]
    with shared.client() as client:
        s["seqs"] = [result["seq"] for result in client.append_batch(actions)]
    s["root"] = root
    return s


def _seqs(records: list[dict[str, Any]]) -> list[int]:
    return [record["seq"] for record in records]


def test_query_by_plan_id(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        records = client.query(plan_id=scenario["plan"])
    assert _seqs(records) == [scenario["seqs"][i] for i in (1, 2, 3, 5)]
    assert all(set(record) == RECORD_FIELDS for record in records)


def test_query_by_intent_id(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        assert _seqs(client.query(intent_id=scenario["intent"])) == scenario["seqs"][0:2]


def test_query_by_session_id(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        assert _seqs(client.query(session_id=scenario["session"])) == scenario["seqs"]


def test_query_by_action_type(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        calls = client.query(action_type="CapabilityCall", session_id=scenario["session"])
        assert _seqs(calls) == scenario["seqs"][2:5]
        everywhere = client.query(action_type="IntentCreated", limit=10_000)
    assert {record["entry"]["action_type"] for record in everywhere} == {"IntentCreated"}
    assert scenario["seqs"][0] in _seqs(everywhere)


def test_query_by_function_prefix(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        alpha = client.query(function_prefix=f"{scenario['fn']}.alpha.")
        every = client.query(function_prefix=scenario["fn"])
    assert _seqs(alpha) == scenario["seqs"][2:4]
    assert _seqs(every) == scenario["seqs"][2:5]


def test_query_by_parent_action_id(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        assert _seqs(client.query(parent_action_id=scenario["root"])) == scenario["seqs"][1:3]


def test_query_by_time_range(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        # since_ms is inclusive, until_ms exclusive.
        records = client.query(session_id=scenario["session"], since_ms=2000, until_ms=5000)
    assert _seqs(records) == scenario["seqs"][1:4]
    assert [record["entry"]["timestamp_ms"] for record in records] == [2000, 3000, 4000]


def test_query_limit_and_descending_order(shared: DaemonProcess, scenario: dict[str, Any]) -> None:
    with shared.client() as client:
        newest = client.query(session_id=scenario["session"], order="desc", limit=2)
        oldest = client.query(session_id=scenario["session"], limit=2)
    assert _seqs(newest) == [scenario["seqs"][5], scenario["seqs"][4]]
    assert _seqs(oldest) == scenario["seqs"][0:2]


def test_logs_op_returns_recent_structured_lines_with_the_appended_action(shared: DaemonProcess) -> None:
    intent = unique("logged")
    with shared.client() as client:
        answer = client.append({"action_type": "IntentCreated", "intent_id": intent})
        lines = client.logs(50)
        assert len(client.logs(1)) == 1
    assert 0 < len(lines) <= 50
    assert all(isinstance(line, dict) and "event" in line for line in lines)
    appended = [line for line in lines if line.get("action_id") == answer["action_id"]]
    assert len(appended) == 1, lines
    line = appended[0]
    assert line["event"] == "action_appended"
    assert line["seq"] == answer["seq"]
    assert line["intent_id"] == intent
    assert line["action_type"] == "IntentCreated"
    assert line["level"] == "info"
    assert "ts" in line


def test_stats_op_reports_per_capability_calls_and_plan_and_intent_cost(shared: DaemonProcess) -> None:
    capability, plan, intent = unique("cap"), unique("plan"), unique("intent")
    actions: list[dict[str, Any]] = [
        {"action_type": "CapabilityCall", "function_name": capability, "plan_id": plan,
         "result": {"success": True}, "cost": 1.5, "duration_ms": 10},
        {"action_type": "CapabilityCall", "function_name": capability, "plan_id": plan, "intent_id": intent,
         "success": False, "cost": 0.5, "duration_ms": 30},
        {"action_type": "CapabilityCall", "function_name": capability, "intent_id": intent,
         "cost": 0.25, "duration_ms": 20},  # outcome unknown
        {"action_type": "PlanStepCompleted", "plan_id": plan, "cost": 1.0},  # not a capability call
    ]
    with shared.client() as client:
        client.append_batch(actions)
        answer = client.stats(capability=capability, plan_id=plan, intent_id=intent)
        everything = client.stats()
    assert answer["ok"] is True
    assert answer["capabilities"] == {
        capability: {"calls": 3, "successes": 1, "failures": 1, "cost": 2.25,
                     "total_duration_ms": 60, "avg_duration_ms": 20},
    }
    assert answer["plan_cost"] == 3.0
    assert answer["intent_cost"] == 0.75
    assert capability in everything["capabilities"]
    assert "plan_cost" not in everything and "intent_cost" not in everything


# --- the socket file


def test_socket_file_mode_is_0660(shared: DaemonProcess) -> None:
    info = os.stat(shared.socket_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660

