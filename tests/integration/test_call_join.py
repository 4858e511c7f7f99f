"""The call/result join is a function of the ledger: live, across restarts and evictions, or rebuilt.

Random interleavings of capability calls, their results (in later batches, twice,
before their call, for unknown calls) and other actions are appended by a real
writer to a real ledger in random commit groups, with a restart (snapshot, new
process state) somewhere and a tiny open-call map that forces the ledger lookup.
The live totals must equal a rebuild from the ledger alone and an independent
model of the rule written from the issue's words.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ccos_obsd.actions import validate_action
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import SigningKey
from ccos_obsd.ledger.writer import LedgerWriter
from ccos_obsd.metrics.aggregates import Aggregates
from ccos_obsd.metrics.calls import LedgerCalls
from ccos_obsd.metrics.snapshot import dump_aggregates, load_aggregates

NAMES = ("web.search", "db.query")

step = st.one_of(
    st.tuples(st.just("call"), st.sampled_from(NAMES), st.sampled_from([None, True, False]),
              st.none() | st.integers(0, 3000), st.integers(0, 5), st.integers(0, 100)),
    st.tuples(st.just("result"), st.integers(-2, 5), st.sampled_from([None, True, False]),
              st.none() | st.integers(0, 3000), st.integers(0, 5), st.integers(0, 200), st.booleans()),
    st.tuples(st.just("other"), st.sampled_from([None, "planner.step"]), st.integers(0, 5)),
)


def build(script: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Actions with fixed ids; a result's parent is an earlier call, a later id, or an unknown one."""
    actions: list[dict[str, Any]] = []
    calls: list[str] = []
    for index, item in enumerate(script):
        action_id = f"a{index}"
        if item[0] == "call":
            _, name, success, duration, cost, ts = item
            action = {"action_type": "CapabilityCall", "function_name": name, "cost": cost, "timestamp_ms": ts}
            if success is not None:
                action["success"] = success
            if duration is not None:
                action["duration_ms"] = duration
            calls.append(action_id)
        elif item[0] == "result":
            _, parent, success, duration, cost, ts, named = item
            if parent >= 0 and calls:
                parent_id = calls[-1 - parent % len(calls)]  # one of the latest calls
            else:
                parent_id = f"a{index + 1}" if parent == -1 else f"unknown-{index}"  # later, or no such call
            action = {"action_type": "CapabilityResult", "parent_action_id": parent_id, "cost": cost,
                      "timestamp_ms": ts}
            if success is not None:
                action["result"] = {"success": success}
            if duration is not None:
                action["duration_ms"] = duration
            if named:
                action["function_name"] = "renamed.by.result"
        else:
            _, function, cost = item
            action = {"action_type": "InternalStep", "cost": cost}
            if function is not None:
                action["function_name"] = function
        actions.append({"action_id": action_id, **action})
    return actions


def model(actions: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule, from the issue: count each call once, at completion; outcome and duration from the result."""
    def outcome(a: dict[str, Any]) -> str:
        flag = a.get("result", {}).get("success", a.get("success"))
        return "unknown" if flag is None else ("success" if flag else "failure")

    calls: dict[str, dict[str, Any]] = {}
    done: set[str] = set()
    counted: dict[tuple[str, str], int] = defaultdict(int)
    timed: dict[str, list[float]] = defaultdict(list)
    started: dict[str, int] = defaultdict(int)
    orphans = 0
    for a in actions:
        if a["action_type"] == "CapabilityCall":
            calls[a["action_id"]] = a
            started[a["function_name"]] += 1
            if outcome(a) != "unknown" or "duration_ms" in a:
                done.add(a["action_id"])
                counted[(a["function_name"], outcome(a))] += 1
                if "duration_ms" in a:
                    timed[a["function_name"]].append(a["duration_ms"])
        elif a["action_type"] == "CapabilityResult":
            call = calls.get(a["parent_action_id"])
            if call is None:
                orphans += 1
            elif call["action_id"] not in done:
                done.add(call["action_id"])
                name = a.get("function_name", call["function_name"])
                counted[(name, outcome(a))] += 1
                duration = a.get("duration_ms")
                if duration is None and a["timestamp_ms"] >= call["timestamp_ms"]:
                    duration = a["timestamp_ms"] - call["timestamp_ms"]
                if duration is not None:
                    timed[name].append(duration)
    return {"counted": dict(counted), "timed": {k: sorted(v) for k, v in timed.items()},
            "started": dict(started), "orphans": orphans}


def observed_totals(aggregates: Aggregates) -> dict[str, Any]:
    snap = aggregates.snapshot()
    counted = {(name, label): n for name, s in snap.capabilities.items() for label, n in s.by_outcome.items() if n}
    function_counted = {
        (name, label): n for name, s in snap.functions.items() for label, n in s.by_outcome.items() if n
        if name != "planner.step"
    }
    assert counted == function_counted  # a capability call counts once in each family
    timed = {name: h.count for name, h in snap.capability_durations.items()}
    return {"counted": counted, "timed": timed, "started": snap.calls_started, "orphans": snap.orphan_results}


async def append_live(db: Path, actions: list[dict[str, Any]], cuts: list[int], restart_at: int,
                      capacity: int) -> Aggregates:
    """Append in commit groups, counting live; restart (snapshot, fresh state) before group ``restart_at``."""
    key = SigningKey.generate("test/ccos-obsd")
    bounds = [0, *sorted(set(c % (len(actions) + 1) for c in cuts)), len(actions)]
    groups = [actions[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    aggregates = Aggregates(max_open_calls=capacity)
    aggregates.call_lookup = calls = LedgerCalls(db)
    writer: LedgerWriter | None = None
    try:
        for index, group in enumerate(groups):
            if writer is None or index == restart_at:
                if writer is not None:
                    await asyncio.to_thread(writer.close)
                    stored = json.dumps(dump_aggregates(aggregates.snapshot()))
                    calls.close()
                    aggregates = Aggregates(max_open_calls=capacity)
                    aggregates.restore(load_aggregates(json.loads(stored), aggregates.duration_buckets))
                    aggregates.call_lookup = calls = LedgerCalls(db)
                writer = LedgerWriter(db, key, asyncio.get_running_loop())
                writer.add_commit_listener(aggregates.on_commit)
                writer.start()
            await writer.submit([validate_action(a) for a in group], None)
    finally:
        if writer is not None:
            await asyncio.to_thread(writer.close)
        calls.close()
    return aggregates


def rebuilt(db: Path, capacity: int) -> Aggregates:
    aggregates = Aggregates(max_open_calls=capacity)
    aggregates.call_lookup = calls = LedgerCalls(db)
    conn = store.connect(db, readonly=True)
    try:
        aggregates.observe_entries(json.loads(e.entry) for e in store.iter_entries(conn, start=0))
    finally:
        conn.close()
        calls.close()
    return aggregates


SECOND_RESULT_AFTER_EVICTION = [
    ("call", "web.search", None, None, 1, 0), ("result", 0, True, 5, 0, 10, False),
    ("call", "db.query", None, None, 0, 0), ("result", 1, False, 5, 2, 10, False),
]
RESULT_AFTER_A_RESTART = [
    ("call", "web.search", None, None, 1, 100), ("other", None, 0),
    ("result", 0, None, None, 0, 250, True),
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(script=SECOND_RESULT_AFTER_EVICTION, cuts=[2], restart_at=0, capacity=1)
@example(script=RESULT_AFTER_A_RESTART, cuts=[2], restart_at=1, capacity=4)
@given(
    script=st.lists(step, min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=4),
    restart_at=st.integers(0, 5),
    capacity=st.integers(1, 4),
)
def test_live_totals_equal_a_rebuild_from_the_ledger_and_the_rule(
    script: list[tuple[Any, ...]], cuts: list[int], restart_at: int, capacity: int
) -> None:
    actions = build(script)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ledger.db"
        live = asyncio.run(append_live(db, actions, cuts, restart_at, capacity))
        from_ledger = rebuilt(db, capacity=1_000)
        evicting = rebuilt(db, capacity=1)
    expected = model(actions)
    for aggregates in (live, from_ledger, evicting):
        totals = observed_totals(aggregates)
        assert totals["counted"] == expected["counted"]
        assert totals["timed"] == {k: len(v) for k, v in expected["timed"].items()}
        assert totals["started"] == expected["started"]
        assert totals["orphans"] == expected["orphans"]
    assert dump_aggregates(live.snapshot()) == dump_aggregates(from_ledger.snapshot())
