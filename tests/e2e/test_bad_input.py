"""Malformed, hostile and out-of-range input on the real socket.

Every bad request gets a structured error answer ({ok: false, error: {code,
message, field?}}), appends nothing, and leaves its connection usable: each
test sends a valid append on the same connection afterwards. Clients that
misbehave (hang up mid-line, never read) must not affect anyone else.
"""

from __future__ import annotations

import json
import select
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess, running_daemon
from tests.e2e.socket_helpers import (
    RawConnection,
    assert_appended,
    assert_error,
    unique,
    wait_for_open_connections,
)

MAX_LINE_BYTES = 4096




def action_line(**fields: Any) -> bytes:
    return json.dumps({"action_type": "PlanStarted", **fields}).encode()


def assert_still_usable(connection: RawConnection, head: int) -> None:
    """Nothing was appended, and the same connection appends at the old head."""
    assert connection.ping() == head
    answer = connection.request({"id": "after", "op": "append", "action": {"action_type": "PlanStarted"}})
    assert_appended(answer, seq=head)
    assert answer["id"] == "after"


BAD_JSON = {
    "truncated_json": b'{"action_type": "PlanStarted",',
    "trailing_garbage": b'{"op": "ping"} x',
    "single_quotes": b"{'op': 'ping'}",
    "invalid_utf8": b'{"action_type": "PlanStarted", "plan_id": "\xff\xfe"}',
    "utf8_encoded_surrogate": b'{"action_type": "PlanStarted", "plan_id": "\xed\xa0\x80"}',
    "json_array": b'[{"action_type": "PlanStarted"}]',
    "json_string": b'"PlanStarted"',
    "json_number": b"42",
    "json_null": b"null",
    "deeply_nested_brackets": b"[" * 100_000,
    "deeply_nested_complete_object": (
        b'{"action_type": "PlanStarted", "metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"}"
    ),
    "nan_literal": b'{"action_type": "PlanStarted", "cost": NaN}',
    "infinity_literal": b'{"action_type": "PlanStarted", "cost": Infinity}',
    "negative_infinity_literal": b'{"action_type": "PlanStarted", "duration_ms": -Infinity}',
    "number_overflowing_to_infinity": b'{"action_type": "PlanStarted", "cost": 1e400}',
}


@pytest.mark.parametrize("line", list(BAD_JSON.values()), ids=list(BAD_JSON))
def test_bad_json_is_answered_and_the_connection_stays_usable(raw: RawConnection, line: bytes) -> None:
    head = raw.ping()
    answer = raw.roundtrip(line)
    assert_error(answer, "bad_json")
    assert "id" not in answer
    assert_still_usable(raw, head)


INVALID_ACTIONS: dict[str, tuple[dict[str, Any], str | None]] = {
    # name: (action, the field the error names)
    "plan_id_not_a_string": ({"action_type": "PlanStarted", "plan_id": 5}, "plan_id"),
    "action_id_empty": ({"action_type": "PlanStarted", "action_id": ""}, "action_id"),
    "action_type_not_a_string": ({"action_type": 7}, "action_type"),
    "cost_as_a_string": ({"action_type": "PlanStarted", "cost": "1.5"}, "cost"),
    "cost_as_a_boolean": ({"action_type": "PlanStarted", "cost": True}, "cost"),
    "arguments_not_a_list": ({"action_type": "CapabilityCall", "arguments": {"a": 1}}, "arguments"),
    "success_not_a_boolean": ({"action_type": "CapabilityResult", "success": "yes"}, "success"),
    "timestamp_not_an_integer": ({"action_type": "PlanStarted", "timestamp_ms": 1.5}, "timestamp_ms"),
    "metadata_not_an_object": ({"action_type": "PlanStarted", "metadata": ["a"]}, "metadata"),
    "result_success_not_a_boolean": ({"action_type": "CapabilityResult", "result": {"success": 1}},
                                     "result.success"),
    "unknown_field": ({"action_type": "PlanStarted", "colour": "red"}, "colour"),
    "unknown_field_in_result": ({"action_type": "CapabilityResult", "result": {"extra": 1}}, "result.extra"),
    "unknown_action_type": ({"action_type": "NotARealActionType"}, "action_type"),
    "negative_cost": ({"action_type": "CapabilityCall", "cost": -0.01}, "cost"),
    "negative_duration_ms": ({"action_type": "CapabilityCall", "duration_ms": -1}, "duration_ms"),
    "negative_timestamp_ms": ({"action_type": "PlanStarted", "timestamp_ms": -1}, "timestamp_ms"),
    "missing_action_type": ({"plan_id": "p"}, "action_type"),
}


@pytest.mark.parametrize(("action", "field"), list(INVALID_ACTIONS.values()), ids=list(INVALID_ACTIONS))
def test_invalid_action_names_the_field_and_appends_nothing(
    raw: RawConnection, action: dict[str, Any], field: str
) -> None:
    head = raw.ping()
    answer = raw.request({"id": 11, "op": "append", "action": action})
    assert_error(answer, "invalid_action", field=field)
    assert answer["id"] == 11
    assert field in answer["error"]["message"] or field.split(".")[-1] in answer["error"]["message"]
    assert_still_usable(raw, head)


@pytest.mark.parametrize(("action", "field"), list(INVALID_ACTIONS.values()), ids=list(INVALID_ACTIONS))
def test_invalid_bare_action_line_is_rejected_the_same_way(
    raw: RawConnection, action: dict[str, Any], field: str
) -> None:
    head = raw.ping()
    assert_error(raw.request(action), "invalid_action", field=field)
    assert_still_usable(raw, head)


LONE_SURROGATES = {
    "in_an_id_field": rb'{"action_type": "PlanStarted", "plan_id": "\ud800"}',
    "uppercase_escape": rb'{"action_type": "PlanStarted", "plan_id": "x\uDBFFy"}',
    "low_surrogate_in_metadata_value": rb'{"action_type": "PlanStarted", "metadata": {"k": ["\udc00"]}}',
    "in_a_metadata_key": rb'{"action_type": "PlanStarted", "metadata": {"\ud800": 1}}',
    "inside_append_op": rb'{"op": "append", "action": {"action_type": "PlanStarted", "error": "\ud834"}}',
}


@pytest.mark.parametrize("line", list(LONE_SURROGATES.values()), ids=list(LONE_SURROGATES))
def test_lone_surrogate_in_a_string_is_invalid_action(raw: RawConnection, line: bytes) -> None:
    head = raw.ping()
    assert_error(raw.roundtrip(line), "invalid_action")
    assert_still_usable(raw, head)


def test_lone_surrogate_in_one_batch_action_fails_only_that_action(raw: RawConnection) -> None:
    head = raw.ping()
    line = (rb'{"op": "append_batch", "actions": [{"action_type": "PlanStarted"},'
            rb' {"action_type": "PlanStarted", "plan_id": "\ud800"}, {"action_type": "PlanCompleted"}]}')
    results = raw.roundtrip(line)["results"]
    assert_appended(results[0], seq=head)
    assert_error(results[1], "invalid_action")
    assert_appended(results[2], seq=head + 1)


def test_valid_surrogate_pair_escape_is_accepted(raw: RawConnection) -> None:
    head = raw.ping()
    answer = raw.roundtrip(rb'{"action_type": "PlanStarted", "plan_id": "clef-\ud834\udd1e"}')
    assert_appended(answer, seq=head)
    record = raw.request({"op": "get", "seq": head})["record"]
    assert record["entry"]["plan_id"] == "clef-\U0001d11e"


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str, str | None]] = {
    # name: (request, code, field)
    "unknown_op": ({"id": 3, "op": "frobnicate"}, "unknown_op", "op"),
    "op_not_a_string": ({"id": 3, "op": 5}, "unknown_op", "op"),
    "append_without_action": ({"id": 3, "op": "append"}, "invalid_request", "action"),
    "append_with_unknown_request_field": (
        {"id": 3, "op": "append", "action": {"action_type": "PlanStarted"}, "extra": 1}, "invalid_request", "extra"),
    "append_action_not_an_object": ({"id": 3, "op": "append", "action": [1]}, "invalid_action", None),
    "batch_actions_not_a_list": ({"id": 3, "op": "append_batch", "actions": {}}, "invalid_request", "actions"),
}


@pytest.mark.parametrize(("request_", "code", "field"), list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_request_is_answered_with_its_id_and_appends_nothing(
    raw: RawConnection, request_: dict[str, Any], code: str, field: str | None
) -> None:
    head = raw.ping()
    answer = raw.request(request_)
    assert_error(answer, code, field=field)
    assert answer["id"] == 3
    assert_still_usable(raw, head)


def test_non_scalar_id_is_rejected(raw: RawConnection) -> None:
    head = raw.ping()
    answer = raw.request({"id": [1], "action_type": "PlanStarted"})
    assert_error(answer, "invalid_request", field="id")
    assert_still_usable(raw, head)


# --- numbers the validator lets through: they must not break the ledger

REJECTED_NUMBER = {"invalid_action", "bad_json"}  # docs/protocol.md: bad_json covers "a number out of range"


def test_integer_cost_beyond_64_bits_is_rejected_or_stored_cleanly(daemon: DaemonProcess) -> None:
    """A finite, non-negative integer cost too large for SQLite's INTEGER column."""
    with RawConnection(daemon.socket_path) as connection:
        head = connection.ping()
        answer = connection.roundtrip(action_line(cost=10**20))
        after = connection.ping()
        following = connection.request({"op": "append", "action": {"action_type": "PlanStarted"}})
    accepted = answer["ok"] is True and answer.get("seq") == head and after == head + 1
    rejected = answer["ok"] is False and answer["error"]["code"] in REJECTED_NUMBER and after == head
    next_append_works = following.get("ok") is True and following["seq"] == after
    assert (accepted or rejected) and next_append_works, (
        f"answer {answer}, head {head} -> {after}, the next append got {following}"
    )


def test_huge_integer_duration_is_rejected_or_stored_and_the_daemon_restarts(state_dir: Path) -> None:
    """A finite, non-negative integer duration_ms too large to convert to a float."""
    line = action_line(action_type="CapabilityCall", function_name="cap.slow", duration_ms=10**400)
    with running_daemon(state_dir) as daemon, RawConnection(daemon.socket_path) as connection:
        answer = connection.roundtrip(line)
        head = connection.ping()
    accepted = answer["ok"] is True and head == 1
    rejected = answer["ok"] is False and answer["error"]["code"] in REJECTED_NUMBER and head == 0
    try:
        with running_daemon(state_dir) as restarted, restarted.client() as client:
            head_after_restart: int | str = client.ping()
    except RuntimeError as exc:  # the daemon exited before it was ready
        head_after_restart = f"restart failed: {str(exc).strip().splitlines()[-1]}"
    assert (accepted or rejected) and head_after_restart == head, (
        f"answered {answer}; the ledger holds {head} entries; after a restart: {head_after_restart}"
    )


def test_cost_and_duration_are_capped_at_2_pow_53(daemon: DaemonProcess) -> None:
    """Finite but absurd quantities (1e308) are refused, so no sum of them overflows."""
    with RawConnection(daemon.socket_path, timeout=5) as connection:
        for field in ("cost", "duration_ms"):
            line = action_line(action_type="CapabilityCall", function_name="f", **{field: 1e308})
            answer = connection.roundtrip(line)
            assert answer["ok"] is False
            assert answer["error"]["code"] == "invalid_action"
            assert answer["error"]["field"] == field
        assert_still_usable(connection, 0)


def test_largest_costs_still_sum_to_a_stats_answer(daemon: DaemonProcess) -> None:
    with RawConnection(daemon.socket_path, timeout=5) as connection:
        for seq in range(2):
            assert_appended(connection.roundtrip(action_line(action_type="CapabilityCall", function_name="cap.big",
                                                             plan_id="p", cost=2**53)), seq=seq)
        line = connection.roundtrip(b'{"id": 1, "op": "stats", "capability": "cap.big", "plan_id": "p"}')
        assert line["id"] == 1
        assert line["ok"] is True
        assert line["plan_cost"] == 2.0 * 2**53
        assert line["capabilities"]["cap.big"]["cost"] == 2.0 * 2**53
        assert_still_usable(connection, 2)


OUT_OF_RANGE_READS = {
    "get_seq_beyond_64_bits": {"op": "get", "seq": 2**64},
    "get_action_id_with_lone_surrogate": {"op": "get", "action_id": "\ud800"},
    "query_since_ms_beyond_64_bits": {"op": "query", "since_ms": 2**64},
    "query_plan_id_with_lone_surrogate": {"op": "query", "plan_id": "\udfff"},
}


@pytest.mark.parametrize("request_", list(OUT_OF_RANGE_READS.values()), ids=list(OUT_OF_RANGE_READS))
def test_out_of_range_read_arguments_are_client_errors_not_internal(
    raw: RawConnection, request_: dict[str, Any]
) -> None:
    head = raw.ping()
    answer = raw.request({"id": 2, **request_})
    assert answer["id"] == 2
    if not answer["ok"]:
        assert answer["error"]["code"] in {"invalid_request", "not_found", "bad_json"}, answer
    assert_still_usable(raw, head)


# --- frames over socket.max_line_bytes


@pytest.fixture(scope="module")
def small_frames() -> Iterator[DaemonProcess]:
    env = {"CCOS_OBSD_SOCKET_MAX_LINE_BYTES": str(MAX_LINE_BYTES)}
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory, running_daemon(Path(directory), env=env) as daemon:
        yield daemon


def padded_action(size: int, plan_id: str) -> bytes:
    """A valid action line of exactly ``size`` bytes (without its newline)."""
    head = json.dumps({"action_type": "PlanStarted", "plan_id": plan_id, "metadata": {"pad": ""}}).encode()
    line = head[:-3] + b"x" * (size - len(head)) + head[-3:]
    assert len(line) == size and json.loads(line)
    return line


def test_line_over_max_line_bytes_is_frame_too_large_and_the_next_line_works(small_frames: DaemonProcess) -> None:
    plan = unique("too-big")
    with RawConnection(small_frames.socket_path) as connection:
        head = connection.ping()
        connection.send(padded_action(MAX_LINE_BYTES + 1000, plan) + b"\n" + b'{"id": 1, "op": "ping"}\n')
        assert_error(connection.answer(), "frame_too_large")
        assert connection.answer() == {"id": 1, "ok": True, "head": head}
        assert_still_usable(connection, head)
        assert connection.request({"op": "query", "plan_id": plan})["records"] == []


def test_oversized_line_sent_in_pieces_gets_one_error(small_frames: DaemonProcess) -> None:
    plan = unique("pieces")
    line = padded_action(3 * MAX_LINE_BYTES, plan)
    with RawConnection(small_frames.socket_path) as connection:
        head = connection.ping()
        for start in range(0, len(line), 1000):
            connection.send(line[start:start + 1000])
        connection.send(b'\n{"id": 2, "op": "ping"}\n')
        assert_error(connection.answer(), "frame_too_large")
        assert connection.answer() == {"id": 2, "ok": True, "head": head}
        assert_still_usable(connection, head)
        assert connection.request({"op": "query", "plan_id": plan})["records"] == []


def test_line_at_max_line_bytes_is_accepted(small_frames: DaemonProcess) -> None:
    plan = unique("fits")
    with RawConnection(small_frames.socket_path) as connection:
        head = connection.ping()
        assert_appended(connection.roundtrip(padded_action(MAX_LINE_BYTES, plan)), seq=head)


# --- misbehaving clients


def test_client_that_hangs_up_mid_line_appends_nothing_and_disturbs_no_one(daemon: DaemonProcess) -> None:
    plan = unique("half")
    with daemon.client() as bystander:
        head = bystander.ping()
        wait_for_open_connections(daemon, 1)
        half = RawConnection(daemon.socket_path)
        try:
            half.send(b'{"action_type": "PlanStarted", "plan_id": "' + plan.encode())
            wait_for_open_connections(daemon, 2)
            # The bystander is served while the half line is pending.
            assert bystander.append({"action_type": "PlanStarted", "plan_id": "bystander"})["seq"] == head
        finally:
            half.close()
        wait_for_open_connections(daemon, 1)  # the daemon has seen the hang-up
        assert bystander.ping() == head + 1
        assert bystander.query(plan_id=plan) == []
        assert bystander.append({"action_type": "PlanCompleted"})["seq"] == head + 1
    with daemon.client() as newcomer:
        assert newcomer.ping() == head + 2


def test_client_that_never_reads_does_not_block_other_clients(daemon: DaemonProcess) -> None:
    chunk = b"".join(
        json.dumps({"id": i, "action_type": "PlanStepStarted", "step_id": str(i)}).encode() + b"\n" for i in range(200)
    )
    hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hostile.connect(str(daemon.socket_path))
        hostile.setblocking(False)
        # Send until the daemon stops reading from us (it must not buffer our answers forever).
        deadline = time.monotonic() + 20
        stalled = False
        sent = 0
        while not stalled and time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            try:
                sent += hostile.send(chunk)
            except BlockingIOError:
                _, writable, _ = select.select([], [hostile], [], 0.5)
                stalled = not writable
        assert stalled, f"the daemon kept reading {sent} bytes from a client that never reads its answers"

        with daemon.client(timeout=10) as polite:
            started = time.monotonic()
            answer = polite.append({"action_type": "PlanStarted", "plan_id": "polite"})
            records = polite.query(plan_id="polite")
            assert time.monotonic() - started < 5
        assert answer["duplicate"] is False
        assert [record["seq"] for record in records] == [answer["seq"]]
    finally:
        hostile.close()
