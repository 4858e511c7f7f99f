"""The op table in-process, over a real ledger writer and reader pool on a SQLite file.

``ccos_obsd.ops`` is the one place request arguments are parsed: the socket
protocol (``protocol.dispatch_line``) and the HTTP API both call it, so what is
checked here holds on both. Each op has a role (the contract access control
builds on); background work an op starts is cancelled and awaited by
``Ops.close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ccos_obsd.access import ROLE_KEYS, Role
from ccos_obsd.config import Config, load_config
from ccos_obsd.errors import InvalidRequest
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import load_or_create_signing_key
from ccos_obsd.ledger.writer import LedgerWriter
from ccos_obsd.log import LogRing
from ccos_obsd.metrics.aggregates import Aggregates
from ccos_obsd.ops import HTTP_CALLER, TABLE, Answer, Caller, Later, Ops, parse_entry_query
from ccos_obsd.protocol import dispatch_line
from ccos_obsd.statedir import key_path
from ccos_obsd.wm import capability
from ccos_obsd.wm.replay import LiveReplay

KEY_NAME = "test/ccos-obsd"
PEER = {"uid": 1000, "gid": 100, "pid": 4242}
WAIT_S = 30.0
"""Deadline for a condition a test waits on (a held sink pause outlasts it)."""


class Sinks:
    """Stands in for the sink host around a live replay: records pauses and resumes.

    With ``hold``, a pause blocks (on its executor thread) until ``release`` is set,
    so a replay can be caught while it runs.
    """

    def __init__(self, *, hold: bool = False) -> None:
        self.events: list[str] = []
        self.pausing = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def pause(self) -> None:
        self.events.append("pause")
        self.pausing.set()
        self.release.wait(3 * WAIT_S)

    def resume(self) -> None:
        self.events.append("resume")


class WmSink:
    """Stands in for the WM sink an ingest call waits for: answers at once unless ``hold``, then on ``release``."""

    def __init__(self, *, hold: bool = False, delivers: bool = True) -> None:
        self.asked: list[tuple[int, float]] = []
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()
        self.delivers = delivers
        if not hold:
            self.release.set()

    async def delivered(self, through: int, timeout_s: float) -> bool:
        self.asked.append((through, timeout_s))
        self.waiting.set()
        await self.release.wait()
        return self.delivers


@dataclass
class Running:
    """An op table wired as the daemon wires it, minus the servers."""

    ops: Ops
    config: Config
    log_ring: LogRing
    sinks: Sinks
    wm_sink: WmSink


@contextlib.asynccontextmanager
async def open_ops(
    state_dir: Path, settings: dict[str, str] | None = None, sinks: Sinks | None = None,
    wm: WmSink | None = None,
) -> AsyncIterator[Running]:
    """``settings`` are configuration keys, as flags give them."""
    config = load_config(environ={}, overrides={"state_dir": str(state_dir), **(settings or {})})
    db = store.ledger_path(state_dir)
    key, _ = load_or_create_signing_key(key_path(state_dir), KEY_NAME)
    writer = LedgerWriter(db, key, asyncio.get_running_loop(), key_path=key_path(state_dir))
    aggregates = Aggregates(config.metrics.duration_buckets, config.metrics.max_label_values)
    writer.add_commit_listener(aggregates.on_commit)
    writer.start()
    readers = store.ReaderPool(db)
    sinks = sinks or Sinks()
    wm_sink = config.wm_sink
    replay = None if wm_sink is None else LiveReplay(
        db, wm_sink.path, wm_sink.name, lambda: writer.head.size, pause_sinks=sinks.pause, resume_sinks=sinks.resume
    )
    log_ring = LogRing(config.log.ring_size)
    wm = wm or WmSink()
    ops = Ops(config, writer, readers.read, aggregates, log_ring, replay, None if replay is None else wm.delivered)
    try:
        yield Running(ops, config, log_ring, sinks, wm)
    finally:
        # The daemon's order: the ops' background work, then the readers, then the writer.
        await ops.close()
        readers.close()
        await asyncio.to_thread(writer.close)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with open_ops(tmp_path) as opened:
        yield opened


@pytest.fixture
def ops(running: Running) -> Ops:
    return running.ops


async def append(ops: Ops, **fields: Any) -> Answer:
    answer = await ops.call("append", {"action": {"action_type": "PlanStarted", **fields}})
    assert answer["ok"], answer
    return answer


def refused(answer: Answer, code: str, field: str | None = None) -> str:
    """Assert ``answer`` is an error with ``code`` (and ``field``); return its message."""
    assert answer["ok"] is False, answer
    error = answer["error"]
    assert error["code"] == code, error
    assert error.get("field") == field, error
    message: str = error["message"]
    return message


# --- the table


def test_every_op_has_its_role() -> None:
    roles = {name: op.role for name, op in TABLE.items()}
    assert roles == {
        "append": "write", "append_batch": "write", "call": "write",
        "ping": "read", "get": "read", "query": "read", "logs": "read", "stats": "read",
        "checkpoint": "read", "wm_search": "read", "wm_digest": "read",
        "prove_inclusion": "read", "prove_consistency": "read",
        "rotate_key": "admin", "backup": "admin", "replay": "admin", "replay_status": "admin",
    }
    assert all(op.name == name for name, op in TABLE.items())


def test_reads_and_backup_wait_for_the_connections_earlier_answers_and_the_rest_start_at_once() -> None:
    in_order = {name for name, op in TABLE.items() if op.in_order}
    assert in_order == {name for name, op in TABLE.items() if op.role == "read"} | {"backup"}


@pytest.mark.parametrize(("name", "request_fields"), [
    ("append", {"action": {"action_type": "PlanStarted"}, "extra": 1}),
    ("append_batch", {"actions": [], "extra": 1}),
    *((name, {"extra": 1}) for name in ["checkpoint", "wm_digest", "rotate_key", "replay_status", "logs", "backup"]),
])
async def test_an_unknown_request_field_is_named(ops: Ops, name: str, request_fields: dict[str, Any]) -> None:
    answer = await ops.call(name, request_fields)
    assert refused(answer, "invalid_request", "extra") == "unknown request field 'extra'"
    assert (await ops.call("ping", {}))["head"] == 0


# --- appends and gets


async def test_appends_answer_consecutive_seqs(ops: Ops) -> None:
    first = await append(ops, plan_id="p", action_id="a-0")
    second = await append(ops, plan_id="p")
    assert (first["seq"], first["action_id"], first["duplicate"]) == (0, "a-0", False)
    assert second["seq"] == 1
    assert set(first) == {"ok", "seq", "action_id", "leaf_hash", "chain_hash", "duplicate"}
    assert (await ops.call("ping", {})) == {"ok": True, "head": 2}


async def test_get_finds_an_entry_by_seq_and_by_action_id(ops: Ops) -> None:
    await append(ops, plan_id="p", action_id="a-0")
    appended = await append(ops, plan_id="q", action_id="a-1")
    by_seq = await ops.call("get", {"seq": 1})
    by_id = await ops.call("get", {"action_id": "a-1"})
    assert by_seq == by_id
    record = by_seq["record"]
    assert by_seq["ok"] is True
    assert (record["seq"], record["chain_hash"]) == (1, appended["chain_hash"])
    assert (record["entry"]["plan_id"], record["entry"]["action_id"]) == ("q", "a-1")


@pytest.mark.parametrize("request_fields", [{}, {"seq": 0, "action_id": "a-0"}])
async def test_get_needs_exactly_one_of_seq_or_action_id(ops: Ops, request_fields: dict[str, Any]) -> None:
    await append(ops, action_id="a-0")
    message = refused(await ops.call("get", request_fields), "invalid_request")
    assert message == "get needs exactly one of 'seq' or 'action_id'"


async def test_get_of_a_missing_entry_is_not_found(ops: Ops) -> None:
    await append(ops)
    assert refused(await ops.call("get", {"seq": 1}), "not_found") == "no entry with seq 1"
    assert refused(await ops.call("get", {"action_id": "nope"}), "not_found") == "no entry with action_id 'nope'"


async def test_an_append_without_an_action_or_with_an_invalid_one_is_refused(ops: Ops) -> None:
    assert refused(await ops.call("append", {}), "invalid_request", "action") == "append needs an 'action' object"
    refused(await ops.call("append", {"action": {"action_type": "NoSuchType"}}), "invalid_action", "action_type")
    refused(await ops.call("append", {"action": {"action_type": "PlanStarted", "plan_id": "\ud800"}}),
            "invalid_action")
    assert (await ops.call("ping", {}))["head"] == 0


async def test_a_batch_answers_each_action_and_appends_the_valid_ones_in_order(ops: Ops) -> None:
    answer = await ops.call("append_batch", {"actions": [
        {"action_type": "PlanStarted", "plan_id": "first"},
        {"action_type": "PlanStarted", "cost": -1},
        {"action_type": "PlanStarted", "plan_id": "last"},
    ]})
    assert answer["ok"] is True
    first, bad, last = answer["results"]
    assert (first["ok"], first["seq"]) == (True, 0)
    refused(bad, "invalid_action", "cost")
    assert (last["ok"], last["seq"]) == (True, 1)
    assert (await ops.call("get", {"seq": 1}))["record"]["entry"]["plan_id"] == "last"


async def test_a_batch_of_only_invalid_actions_appends_nothing(ops: Ops) -> None:
    answer = await ops.call("append_batch", {"actions": [{"action_type": 1}]})
    [only] = answer["results"]
    refused(only, "invalid_action", "action_type")
    assert (await ops.call("ping", {}))["head"] == 0


async def test_a_batch_must_be_a_list_within_socket_max_batch(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"socket.max_batch": "2"}) as small:
        ops = small.ops
        refused(await ops.call("append_batch", {"actions": {}}), "invalid_request", "actions")
        action = {"action_type": "PlanStarted"}
        message = refused(await ops.call("append_batch", {"actions": [action] * 3}), "invalid_request", "actions")
        assert message == "batch of 3 actions exceeds socket.max_batch (2)"
        assert (await ops.call("append_batch", {"actions": [action] * 2}))["ok"] is True


async def test_appends_beyond_ledger_max_pending_are_busy(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"ledger.max_pending": "1"}) as small:
        action = {"action_type": "PlanStarted"}
        refused(await small.ops.call("append_batch", {"actions": [action, action]}), "busy")
        assert (await small.ops.call("ping", {}))["head"] == 0


async def test_once_writes_stop_being_accepted_appends_are_unavailable(ops: Ops) -> None:
    await append(ops)
    ops.accepting_writes = False
    action = {"action_type": "PlanStarted"}
    refused(await ops.call("append", {"action": action}), "unavailable")
    refused(await ops.call("append_batch", {"actions": [action]}), "unavailable")
    refused(await ops.call("rotate_key", {}, Caller({"uid": os.getuid(), "gid": 0, "pid": 1})), "unavailable")
    assert (await ops.call("get", {"seq": 0}))["ok"] is True  # reads still answer
    assert (await ops.call("ping", {}))["head"] == 1


# --- argument checks shared by the socket and HTTP


@pytest.mark.parametrize("op", ["get", "prove_inclusion"])
@pytest.mark.parametrize(("request_fields", "field", "message"), [
    ({"action_id": 123}, "action_id", "action_id must be a string"),
    ({"action_id": "\ud800"}, "action_id", "action_id is not valid Unicode (lone surrogate)"),
    ({"seq": "0"}, "seq", "seq must be an integer"),
    ({"seq": True}, "seq", "seq must be an integer"),
    ({"seq": 2**63}, "seq", "seq is out of range"),
    ({"seq": -(2**63) - 1}, "seq", "seq is out of range"),
])
async def test_seq_and_action_id_are_checked_before_any_read(
    ops: Ops, op: str, request_fields: dict[str, Any], field: str, message: str
) -> None:
    assert refused(await ops.call(op, request_fields), "invalid_request", field) == message


@pytest.mark.parametrize(("request_fields", "field"), [
    ({}, "size1"),
    ({"size1": 1.5}, "size1"),
    ({"size1": 1, "size2": 2**64}, "size2"),
    ({"size1": 1, "other": 2}, "other"),
])
async def test_prove_consistency_checks_its_sizes(ops: Ops, request_fields: dict[str, Any], field: str) -> None:
    refused(await ops.call("prove_consistency", request_fields), "invalid_request", field)


@pytest.mark.parametrize("n", [-1, True, "5", 1.0])
async def test_logs_needs_a_non_negative_integer(ops: Ops, n: Any) -> None:
    assert refused(await ops.call("logs", {"n": n}), "invalid_request", "n") == "n must be a non-negative integer"


async def test_logs_answers_the_most_recent_lines_parsed(running: Running) -> None:
    for n in range(3):
        running.log_ring.append(json.dumps({"event": "line", "n": n}))
    assert await running.ops.call("logs", {"n": 2}) == {"ok": True, "lines": [{"event": "line", "n": 1},
                                                                              {"event": "line", "n": 2}], "last": 3}
    assert await running.ops.call("logs", {"n": 0}) == {"ok": True, "lines": [], "last": 3}
    assert len((await running.ops.call("logs", {}))["lines"]) == 3


def same_lines(ring: LogRing, count: int) -> None:
    """``count`` identical lines: only their numbers tell them apart."""
    ring.extend([json.dumps({"event": "tick"})] * count)


async def test_logs_after_a_line_number_answers_only_the_lines_that_follow_it(running: Running) -> None:
    same_lines(running.log_ring, 3)
    first = await running.ops.call("logs", {"n": 2})
    assert first["last"] == 3
    assert await running.ops.call("logs", {"after": 3}) == {"ok": True, "lines": [], "last": 3, "missed": 0}
    same_lines(running.log_ring, 5)
    # The oldest lines after the cursor first, n at a time, so a reader pages through them all.
    page = await running.ops.call("logs", {"after": 3, "n": 2})
    assert (len(page["lines"]), page["last"], page["missed"]) == (2, 5, 0)
    rest = await running.ops.call("logs", {"after": page["last"], "n": 10})
    assert (len(rest["lines"]), rest["last"], rest["missed"]) == (3, 8, 0)


async def test_logs_after_says_how_many_lines_the_ring_dropped_before_they_were_read(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"log.ring_size": "4"}) as running:
        same_lines(running.log_ring, 10)  # lines 7..10 are left
        answer = await running.ops.call("logs", {"after": 2, "n": 10})
        assert (len(answer["lines"]), answer["last"], answer["missed"]) == (4, 10, 4)
        assert (await running.ops.call("logs", {"after": 0}))["missed"] == 6


@pytest.mark.parametrize("after", [-1, True, "3", 2.0])
async def test_logs_after_must_be_a_line_number(ops: Ops, after: Any) -> None:
    message = refused(await ops.call("logs", {"after": after}), "invalid_request", "after")
    assert message == "after must be a non-negative integer"


# --- query


def test_a_query_with_no_filters_is_the_first_page_oldest_first() -> None:
    assert parse_entry_query({}) == store.EntryQuery(limit=store.DEFAULT_QUERY_LIMIT, order="asc")


def test_query_filters_become_one_checked_query() -> None:
    query = parse_entry_query({"plan_id": "p", "action_type": "PlanStarted", "function_prefix": "web.",
                               "since_ms": 10, "until_ms": 20, "after_seq": 3, "limit": store.MAX_QUERY_LIMIT,
                               "order": "desc", "run_id": "r", "step_id": "s"})
    assert query == store.EntryQuery(
        equal={"plan_id": "p", "action_type": "PlanStarted"}, function_prefix="web.", run_id="r", step_id="s",
        since_ms=10, until_ms=20, after_seq=3, limit=store.MAX_QUERY_LIMIT, order="desc",
    )
    assert parse_entry_query({"plan_id": "p", "order": "time"}).order == "time"


@pytest.mark.parametrize(("request_fields", "field", "message"), [
    ({"bogus": 1}, "bogus", "unknown query filter 'bogus'"),
    ({"seq": 1}, "seq", "unknown query filter 'seq'"),
    ({"order": "newest"}, "order", "order must be 'asc', 'desc' or 'time'"),
    ({"order": "time", "after_seq": 3}, "after_seq", "after_seq pages in seq order; it does not apply to order 'time'"),
    ({"step_id": 5}, "step_id", "step_id must be a string"),
    ({"limit": 0}, "limit", f"limit must be between 1 and {store.MAX_QUERY_LIMIT}"),
    ({"limit": store.MAX_QUERY_LIMIT + 1}, "limit", f"limit must be between 1 and {store.MAX_QUERY_LIMIT}"),
    ({"limit": "10"}, "limit", "limit must be an integer"),
    ({"since_ms": 2**63}, "since_ms", "since_ms is out of range"),
    ({"plan_id": 7}, "plan_id", "plan_id must be a string"),
    ({"run_id": "\udfff"}, "run_id", "run_id is not valid Unicode (lone surrogate)"),
])
def test_a_bad_query_names_the_filter(request_fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_entry_query(request_fields)
    assert (raised.value.field, raised.value.message) == (field, message)


async def test_query_filters_combine_and_order_desc_pages_backwards(ops: Ops) -> None:
    for plan_id, action_type in [("p1", "PlanStarted"), ("p1", "PlanCompleted"), ("p2", "PlanStarted"),
                                 ("p1", "PlanCompleted")]:
        await append(ops, action_type=action_type, plan_id=plan_id)

    async def seqs(**filters: Any) -> list[int]:
        answer = await ops.call("query", filters)
        assert answer["ok"] is True, answer
        return [record["seq"] for record in answer["records"]]

    assert await seqs() == [0, 1, 2, 3]
    assert await seqs(plan_id="p1", action_type="PlanCompleted") == [1, 3]
    assert await seqs(plan_id="p1", order="desc") == [3, 1, 0]
    assert await seqs(plan_id="p1", order="desc", after_seq=3, limit=1) == [1]
    assert await seqs(plan_id="p1", after_seq=0, limit=1) == [1]
    refused(await ops.call("query", {"limit": 0}), "invalid_request", "limit")


async def query_seqs(ops: Ops, **filters: Any) -> list[int]:
    answer = await ops.call("query", filters)
    assert answer["ok"] is True, answer
    return [record["seq"] for record in answer["records"]]


async def test_run_id_and_step_id_also_match_the_results_of_a_matching_call(ops: Ops) -> None:
    """CCOS's results inherit run_id and step_id from their call: a result matches through its parent."""
    traced = {"step_id": "s1", "metadata": {"run_id": "r1"}}
    await append(ops, action_type="CapabilityCall", action_id="call-1", function_name="web.search", **traced)  # 0
    await append(ops, action_type="CapabilityResult", parent_action_id="call-1", success=True)  # 1: inherits
    await append(ops, action_type="PlanStepRetrying", parent_action_id="call-1")  # 2: a child, not a result
    await append(ops, action_type="CapabilityCall", action_id="call-2", step_id="s2",
                 metadata={"run_id": "r2"})  # 3
    await append(ops, action_type="CapabilityResult", parent_action_id="call-2",
                 result={"success": True, "metadata": {"run_id": "r1"}})  # 4: its own run_id
    await append(ops, action_type="CapabilityResult", parent_action_id="nobody", step_id="s1")  # 5: its own step
    await append(ops, action_type="CapabilityResult", parent_action_id="nobody")  # 6: an orphan matches nothing

    assert await query_seqs(ops, run_id="r1") == [0, 1, 4]
    assert await query_seqs(ops, run_id="r2") == [3, 4]  # 4 also through its call
    assert await query_seqs(ops, step_id="s1") == [0, 1, 5]
    assert await query_seqs(ops, step_id="s2") == [3, 4]
    assert await query_seqs(ops, run_id="r1", step_id="s1") == [0, 1]
    assert await query_seqs(ops, run_id="r1", action_type="CapabilityResult", order="desc") == [4, 1]
    assert await query_seqs(ops, step_id="nothing") == []


async def test_order_time_is_the_execution_trace_by_timestamp_then_seq(ops: Ops) -> None:
    for timestamp_ms in (3000, 1000, 2000, 1000):
        await append(ops, plan_id="p1", timestamp_ms=timestamp_ms)
    await append(ops, plan_id="p2", timestamp_ms=500)
    await append(ops, plan_id="p1")  # no timestamp: ordered by its recording time, after the others

    assert await query_seqs(ops, plan_id="p1", order="time") == [1, 3, 2, 0, 5]
    assert await query_seqs(ops, order="time", limit=3) == [4, 1, 3]
    assert await query_seqs(ops, plan_id="p1", order="time", since_ms=2000, until_ms=3001) == [2, 0]
    refused(await ops.call("query", {"order": "time", "after_seq": 1}), "invalid_request", "after_seq")


# --- stats


async def test_stats_with_a_plan_or_intent_answers_the_cost_recorded_for_it(ops: Ops) -> None:
    await append(ops, action_type="CapabilityCall", plan_id="p", intent_id="i", cost=1.5)
    await append(ops, action_type="CapabilityCall", plan_id="p", cost=2.25)
    await append(ops, action_type="CapabilityCall", plan_id="q", intent_id="i", cost=10)

    plain = await ops.call("stats", {})
    assert plain["ok"] is True
    assert (plain["entries"], plain["total_cost"]) == (3, 13.75)
    assert "plan_cost" not in plain and "intent_cost" not in plain
    assert (await ops.call("stats", {"plan_id": "p"}))["plan_cost"] == 3.75
    both = await ops.call("stats", {"plan_id": "q", "intent_id": "i"})
    assert (both["plan_cost"], both["intent_cost"]) == (10, 11.5)
    assert (await ops.call("stats", {"plan_id": "nobody"}))["plan_cost"] == 0


@pytest.mark.parametrize("field", ["plan_id", "intent_id", "capability", "function"])
async def test_stats_filters_must_be_strings(ops: Ops, field: str) -> None:
    assert refused(await ops.call("stats", {field: 1}), "invalid_request", field) == f"{field} must be a string"


# --- the ingestor capability


INGEST = "observability.ingestor:v1.ingest"


async def test_a_capability_call_is_recorded_as_a_call_and_its_result(running: Running) -> None:
    ops = running.ops
    await append(ops)
    args = ["single", {"summary": "fetched the page", "plan_id": "p"}]
    answer = await ops.call("call", {"capability": INGEST, "args": args})
    assert answer == {"ok": True, "result": {"mode": "single", "ingested": 1, "errors": [], "delivered": True}}
    records = (await ops.call("query", {"function_name": INGEST}))["records"]
    call, result = (r["entry"] for r in records)
    # As CCOS records a call: the call carries the records; its result, the outcome and the duration.
    assert (call["action_type"], call["arguments"][0], call["seq"]) == ("CapabilityCall", "single", 1)
    assert "duration_ms" not in call and "success" not in call
    assert (result["action_type"], result["parent_action_id"], result["success"]) == (
        "CapabilityResult", call["action_id"], True)
    assert result["duration_ms"] > 0 and result["result"]["value"] == answer["result"]
    # The result waited for Working Memory to take every entry up to the call's.
    assert running.wm_sink.asked == [(2, capability.WM_DELIVERY_TIMEOUT_S)]


async def test_the_result_records_the_whole_call_until_working_memory_took_the_records(tmp_path: Path) -> None:
    async with open_ops(tmp_path, wm=WmSink(hold=True)) as running:
        ops = running.ops
        reply = ops.run(TABLE["call"], {"capability": INGEST, "args": ["batch", [{"summary": "s"}]]}, HTTP_CALLER)
        assert isinstance(reply, Later)
        await asyncio.wait_for(running.wm_sink.waiting.wait(), WAIT_S)
        held_from = time.perf_counter()  # inside the call: it started before Working Memory was asked
        assert (await ops.call("ping", {}))["head"] == 1  # the call is committed; its result waits
        assert not reply.future.done()
        held_ms = (time.perf_counter() - held_from) * 1000
        running.wm_sink.release.set()
        answer = reply.transform(await reply.future)
        assert answer["ok"] and answer["result"]["delivered"] is True
        result = (await ops.call("get", {"seq": 1}))["record"]["entry"]
        assert result["duration_ms"] >= held_ms - 0.001  # duration_ms is rounded to the microsecond


async def test_a_call_answers_when_working_memory_is_late_and_says_so(tmp_path: Path) -> None:
    async with open_ops(tmp_path, wm=WmSink(delivers=False)) as running:
        answer = await running.ops.call("call", {"capability": INGEST, "args": ["single", {"summary": "s"}]})
        assert answer["ok"] and answer["result"]["delivered"] is False
        assert (await running.ops.call("get", {"seq": 1}))["record"]["entry"]["success"] is True


async def test_with_working_memory_off_a_call_is_recorded_up_to_its_commit(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"wm.enabled": "false"}) as off:
        answer = await off.ops.call("call", {"capability": INGEST, "args": ["single", {"summary": "s"}]})
        assert answer == {"ok": True, "result": {"mode": "single", "ingested": 1, "errors": [], "delivered": False}}
        result = (await off.ops.call("get", {"seq": 1}))["record"]["entry"]
        assert result["success"] is True and result["duration_ms"] > 0
        assert off.wm_sink.asked == []


async def test_every_ingest_call_is_one_ingest_duration(running: Running) -> None:
    ops = running.ops
    calls = [["single", {"summary": "a"}], ["batch", [{"summary": "b"}, {"bogus": 1}]], ["batch", [{"x": 1}]],
             ["replay"]]
    for args in calls:
        assert (await ops.call("call", {"capability": INGEST, "args": args}))["ok"], args
    refused(await ops.call("call", {"capability": INGEST, "args": ["single", {"bogus": 1}]}), "invalid_request", "args")
    durations = ops.ingest_durations()
    results = [r["entry"] for r in (await ops.call("query", {"action_type": "CapabilityResult"}))["records"]]
    assert durations.count == len(calls) == len(results)
    assert durations.total == pytest.approx(sum(r["duration_ms"] for r in results) / 1000, abs=1e-5)
    assert [r["success"] for r in results] == [True, True, False, True]


async def test_a_replay_call_that_fails_records_a_failed_result(tmp_path: Path) -> None:
    async with open_ops(tmp_path) as running:
        running.config.wm_path.write_text("not a database")  # type: ignore[union-attr]
        with pytest.raises(sqlite3.DatabaseError):
            await running.ops.call("call", {"capability": INGEST, "args": ["replay"]})
        result = (await running.ops.call("get", {"seq": 1}))["record"]["entry"]
        assert result["success"] is False and result["error"].startswith("DatabaseError: ")
        assert running.sinks.events == ["pause", "resume"]


async def test_close_cancels_a_call_waiting_for_working_memory(tmp_path: Path) -> None:
    async with open_ops(tmp_path, wm=WmSink(hold=True)) as running:
        reply = running.ops.run(TABLE["call"], {"capability": INGEST, "args": ["single", {"summary": "s"}]},
                                HTTP_CALLER)
        assert isinstance(reply, Later)
        await asyncio.wait_for(running.wm_sink.waiting.wait(), WAIT_S)
        await running.ops.close()
        assert reply.future.cancelled()
        assert (await running.ops.call("ping", {}))["head"] == 1  # the call, without a result: still open


async def test_an_unknown_capability_is_refused(ops: Ops) -> None:
    answer = await ops.call("call", {"capability": "web.search", "args": []})
    message = refused(answer, "invalid_request", "capability")
    assert message == "unknown capability 'web.search' (known: observability.ingestor:v1.ingest)"


# --- key rotation


async def test_rotate_key_appends_a_key_rotated_entry_and_answers_the_new_vkey(ops: Ops) -> None:
    await append(ops)
    answer = await ops.call("rotate_key", {}, Caller({"uid": os.getuid(), "gid": 0, "pid": 1}))
    assert (answer["ok"], answer["seq"]) == (True, 1)
    assert answer["vkey"].startswith(KEY_NAME + "+")
    assert (await ops.call("get", {"seq": 1}))["record"]["entry"]["action_type"] == "KeyRotated"


# --- Working Memory


async def test_a_replay_rebuilds_working_memory_and_resumes_the_sinks(running: Running) -> None:
    ops = running.ops
    refused(await ops.call("wm_digest", {}), "not_found")  # nothing built yet
    for n in range(3):
        await append(ops, plan_id="p" if n else "other")
    answer = await ops.call("replay", {})
    assert answer == {"ok": True, "mode": "replay", "scanned_actions": 3, "ingested": 3, "head": 3}
    assert running.sinks.events == ["pause", "resume"]
    assert (await ops.call("wm_digest", {}))["entries"] == 3
    found = await ops.call("wm_search", {"plan_id": "p"})
    assert len(found["entries"]) == 2
    assert await ops.call("replay_status", {}) == {"ok": True, "running": False}


@pytest.mark.parametrize(("request_fields", "field"), [({"from": -1}, "from"), ({"from": "0"}, "from")])
async def test_a_replay_needs_a_seq_to_start_from(ops: Ops, request_fields: dict[str, Any], field: str) -> None:
    refused(await ops.call("replay", request_fields), "invalid_request", field)


async def test_with_working_memory_off_its_ops_are_unavailable(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"wm.enabled": "false"}) as off:
        ops = off.ops
        assert off.config.wm_path is None
        for name, request_fields in [("wm_search", {"text": "x"}), ("wm_digest", {}), ("replay", {})]:
            message = refused(await ops.call(name, request_fields), "unavailable")
            assert message == "Working Memory is off (wm.enabled = false)"
        replay_call = {"capability": "observability.ingestor:v1.ingest", "args": ["replay"]}
        refused(await ops.call("call", replay_call), "unavailable")
        assert await ops.call("replay_status", {}) == {"ok": True, "running": False}
        assert off.sinks.events == []


# --- backups, and the background work close() owns


async def test_backup_over_the_socket_is_off_unless_allowed(ops: Ops, tmp_path: Path) -> None:
    refused(await ops.call("backup", {"dest": str(tmp_path / "copy")}), "forbidden")
    assert not (tmp_path / "copy").exists()


async def test_a_backup_copies_the_state_dir_and_leaves_no_task_behind(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"backup.allow_socket": "true"}) as allowed:
        ops = allowed.ops
        await append(ops)
        refused(await ops.call("backup", {"dest": "relative/copy"}), "invalid_request", "dest")
        answer = await ops.call("backup", {"dest": str(tmp_path / "copy")})
        assert (answer["ok"], answer["entries"]) == (True, 1)
        assert "ledger.db" in answer["files"]
        assert (tmp_path / "copy" / "ledger.db").is_file()
        again = await ops.call("backup", {"dest": str(tmp_path / "copy")})
        assert "is not empty" in refused(again, "invalid_request", "dest")
        assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_close_cancels_a_backup_that_has_not_run_yet(tmp_path: Path) -> None:
    async with open_ops(tmp_path, {"backup.allow_socket": "true"}) as allowed:
        reply = allowed.ops.run(TABLE["backup"], {"dest": str(tmp_path / "copy")}, HTTP_CALLER)
        assert isinstance(reply, Later)
        await allowed.ops.close()
        assert reply.future.cancelled()
        assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not (tmp_path / "copy").exists()


async def test_close_cancels_and_awaits_a_replay_still_running(tmp_path: Path) -> None:
    sinks = Sinks(hold=True)
    async with open_ops(tmp_path, sinks=sinks) as held:
        try:
            reply = held.ops.run(TABLE["replay"], {}, HTTP_CALLER)
            assert isinstance(reply, Later)
            assert await asyncio.to_thread(sinks.pausing.wait, WAIT_S)
            assert not reply.future.done()
            # Not wait_for: cancelling close() on a timeout would cancel the replay for it.
            closing = asyncio.ensure_future(held.ops.close())
            done, _ = await asyncio.wait([closing], timeout=WAIT_S)
        finally:
            sinks.release.set()
        await closing
        assert closing in done, "close() waited for the replay instead of cancelling it"
        assert reply.future.cancelled()
        assert asyncio.all_tasks() == {asyncio.current_task()}
    assert sinks.events == ["pause"]


# --- the socket's way in: protocol.dispatch_line


async def test_a_line_without_an_op_is_the_action_to_append(ops: Ops) -> None:
    pending = dispatch_line(ops, b'{"action_type":"PlanStarted","plan_id":"p"}', PEER)
    assert pending.op == "append"
    assert pending.future is not None and pending.transform is not None
    answer = pending.transform(await pending.future)
    assert (answer["ok"], answer["seq"]) == (True, 0)
    entry = (await ops.call("get", {"seq": 0}))["record"]["entry"]
    assert (entry["plan_id"], entry["peer"]) == ("p", PEER)


async def test_a_bare_action_with_an_escaped_lone_surrogate_is_refused(ops: Ops) -> None:
    pending = dispatch_line(ops, b'{"action_type":"PlanStarted","plan_id":"\\ud800"}', PEER)
    assert pending.answer is not None
    refused(pending.answer, "invalid_action")


def test_an_unknown_op_is_answered_with_the_ops_there_are(ops: Ops) -> None:
    pending = dispatch_line(ops, b'{"op":"frobnicate"}', PEER)
    assert pending.op == "unknown"
    message = refused(pending.answer or {}, "unknown_op", "op")
    assert message == f"unknown op 'frobnicate' (ops: {', '.join(sorted(TABLE))})"


def test_a_line_that_is_not_a_json_object_is_bad_json(ops: Ops) -> None:
    pending = dispatch_line(ops, b"[1, 2]", PEER)
    assert pending.op == "invalid"
    assert refused(pending.answer or {}, "bad_json") == "a request must be a JSON object"


async def test_a_read_starts_only_when_its_turn_comes(ops: Ops) -> None:
    await append(ops, plan_id="p")
    pending = dispatch_line(ops, b'{"op":"get","seq":0}', PEER)
    assert (pending.op, pending.answer, pending.future) == ("get", None, None)
    assert pending.later is not None
    reply = pending.later()
    assert isinstance(reply, Later)
    assert reply.transform(await reply.future)["record"]["entry"]["plan_id"] == "p"


@pytest.mark.parametrize(("line", "op", "role"), [
    (b'{"id":7,"op":"query","no_such_filter":1}', "query", "read"),
    (b'{"op":"ping"}', "ping", "read"),
    (b'{"op":"rotate_key","extra":1}', "rotate_key", "admin"),
    (b'{"op":"backup","dest":"relative"}', "backup", "admin"),
    (b'{"action_type":"PlanStarted"}', "append", "write"),
    (b'{"op":"append_batch","actions":[{"action_type":"PlanStarted"}]}', "append_batch", "write"),
])
async def test_an_op_outside_the_peers_roles_is_forbidden_before_its_arguments_are_read(
    ops: Ops, line: bytes, op: str, role: Role
) -> None:
    told: list[tuple[str, str]] = []
    pending = dispatch_line(ops, line, PEER, frozenset(), lambda *refusal: told.append(refusal))
    assert (pending.op, pending.future, pending.later) == (op, None, None)
    assert pending.has_id == (b'"id"' in line) and pending.request_id == (7 if pending.has_id else None)
    uids, gids = ROLE_KEYS[role]
    message = refused(pending.answer or {}, "forbidden")
    assert message == f"uid {PEER['uid']} does not have the {role} role that op {op!r} needs ({uids}, {gids})"
    assert told == [(op, role)]
    assert (await ops.call("ping", {}))["head"] == 0


async def test_a_peer_is_served_the_ops_of_its_roles_only(ops: Ops) -> None:
    writer: frozenset[Role] = frozenset({"write"})
    reader: frozenset[Role] = frozenset({"read"})
    appended = dispatch_line(ops, b'{"action_type":"PlanStarted","plan_id":"p"}', PEER, writer)
    assert appended.future is not None and appended.transform is not None
    assert appended.transform(await appended.future)["seq"] == 0
    refused(dispatch_line(ops, b'{"op":"get","seq":0}', PEER, writer).answer or {}, "forbidden")
    read = dispatch_line(ops, b'{"op":"get","seq":0}', PEER, reader)
    assert read.later is not None
    reply = read.later()
    assert isinstance(reply, Later)
    assert reply.transform(await reply.future)["record"]["entry"]["plan_id"] == "p"
    refused(dispatch_line(ops, b'{"action_type":"PlanStarted"}', PEER, reader).answer or {}, "forbidden")
    refused(dispatch_line(ops, b'{"op":"rotate_key"}', PEER, reader).answer or {}, "forbidden")
    # Lines that are no request are answered as such, whatever the roles: they do nothing.
    refused(dispatch_line(ops, b'{"op":"frobnicate"}', PEER, frozenset()).answer or {}, "unknown_op", "op")
    refused(dispatch_line(ops, b"[1]", PEER, frozenset()).answer or {}, "bad_json")


def test_a_write_with_bad_arguments_is_answered_at_once(ops: Ops) -> None:
    pending = dispatch_line(ops, b'{"op":"append"}', PEER)
    assert pending.op == "append"
    refused(pending.answer or {}, "invalid_request", "action")
