"""The demo workload: valid, varied, reproducible actions, sent at a steady rate."""

from __future__ import annotations

from collections import Counter
from itertools import islice, pairwise
from typing import Any

import pytest

from ccos_obsd.actions import ACTION_TYPES, validate_action
from ccos_obsd.demo import CAPABILITIES, MAX_ATTEMPTS, TIMEOUT_MS, CapabilityProfile, Workload, run_demo
from ccos_obsd.ledger.entry import outcome

SAMPLE = 20_000


def take(n: int, seed: int = 1, run_id: str = "run-1") -> list[dict[str, Any]]:
    return list(islice(Workload(seed, run_id), n))


@pytest.fixture(scope="module")
def actions() -> list[dict[str, Any]]:
    return take(SAMPLE)


@pytest.fixture(scope="module")
def calls(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in actions if a["action_type"] == "CapabilityCall"]


@pytest.fixture(scope="module")
def completions(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The action that completes each call: its result, or the call itself when it carries its outcome."""
    return [a for a in actions if a["action_type"] == "CapabilityResult"
            or (a["action_type"] == "CapabilityCall" and "success" in a)]


def test_every_action_is_valid_as_sent(actions: list[dict[str, Any]]) -> None:
    for action in actions:
        validated = validate_action(action)  # raises on any field the daemon would refuse
        assert validated.fields == action
        assert action["action_type"] in ACTION_TYPES


def test_ids_are_unique_and_parents_come_first(actions: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for action in actions:
        assert action["action_id"] not in seen
        parent = action.get("parent_action_id")
        assert parent is None or parent in seen, f"{action['action_id']} names a parent not sent before it"
        seen.add(action["action_id"])


def test_every_id_and_metadata_carry_the_run_id(actions: list[dict[str, Any]]) -> None:
    for action in actions:
        assert action["metadata"]["run_id"] == "run-1"
        for field in ("action_id", "session_id", "intent_id", "plan_id", "step_id"):
            if field in action:
                assert action[field].startswith("run-1-")


def test_the_same_seed_gives_the_same_actions_and_another_seed_others() -> None:
    assert take(3000, seed=42) == take(3000, seed=42)
    assert take(3000, seed=42) != take(3000, seed=43)


def test_the_run_id_changes_only_the_ids() -> None:
    def without_ids(actions: list[dict[str, Any]]) -> list[str]:
        return [repr(sorted((k, v) for k, v in a.items() if not k.endswith("_id") and k not in ("metadata", "result")))
                for a in actions]

    first, second = take(2000, run_id="run-a"), take(2000, run_id="run-b")
    assert without_ids(first) == without_ids(second)
    assert {a["action_id"] for a in first}.isdisjoint(a["action_id"] for a in second)


def test_it_covers_every_capability(calls: list[dict[str, Any]]) -> None:
    counts = Counter(c["function_name"] for c in calls)
    assert set(counts) == {c.name for c in CAPABILITIES}
    assert len(counts) >= 12
    assert min(counts.values()) >= 20


def test_it_covers_the_lifecycle_governance_and_budget_events(actions: list[dict[str, Any]]) -> None:
    kinds = Counter(a["action_type"] for a in actions)
    expected = {
        "IntentCreated", "IntentStatusChanged",
        "PlanStarted", "PlanCompleted", "PlanAborted",
        "PlanStepStarted", "PlanStepCompleted", "PlanStepFailed", "PlanStepRetrying",
        "CapabilityCall", "CapabilityResult", "AgentLlmConsultation",
        "GovernanceApprovalRequested", "GovernanceApprovalGranted", "GovernanceApprovalDenied",
        "BudgetAllocated", "BudgetConsumptionRecorded", "BudgetWarningIssued", "BudgetExhausted", "BudgetExtended",
    }
    assert expected <= set(kinds), f"missing: {expected - set(kinds)}"
    # Capability calls dominate, as in a real agent runtime.
    assert kinds["CapabilityCall"] == kinds.most_common(1)[0][1]


def test_completed_calls_carry_duration_cost_and_outcome(completions: list[dict[str, Any]]) -> None:
    for completion in completions:
        assert 0 < completion["duration_ms"] <= TIMEOUT_MS
        assert completion["cost"] >= 0
        assert isinstance(completion["success"], bool)
        assert outcome(completion) == ("success" if completion["success"] else "failure")
        assert ("error" in completion) == (not completion["success"])
    assert sum(c["cost"] for c in completions) > 0


def test_failure_rate_is_occasional(completions: list[dict[str, Any]]) -> None:
    failed = sum(outcome(c) == "failure" for c in completions)
    assert 0.01 <= failed / len(completions) <= 0.10


def test_latencies_are_skewed_per_capability(completions: list[dict[str, Any]]) -> None:
    for capability in CAPABILITIES:
        durations = sorted(c["duration_ms"] for c in completions if c["function_name"] == capability.name)
        median = durations[len(durations) // 2]
        p95 = durations[int(len(durations) * 0.95)]
        assert capability.median_ms / 1.6 <= median <= capability.median_ms * 1.6, capability.name
        assert p95 > 1.5 * median, f"{capability.name}: a log-normal tail, not a constant"
    medians = {c.name: c.median_ms for c in CAPABILITIES}
    assert max(medians.values()) / min(medians.values()) > 100


def test_most_calls_are_a_call_then_its_result_as_ccos_records_them(calls: list[dict[str, Any]]) -> None:
    paired = [c for c in calls if "success" not in c]
    assert 0.7 <= len(paired) / len(calls) < 1.0  # most, and some self-contained ones too
    for call in paired:
        assert not {"duration_ms", "cost", "error", "result"} & call.keys()  # the outcome is the result's
    for call in calls:
        assert ("success" in call) == ("duration_ms" in call) == (not _profile(call).paired)


def test_each_paired_call_is_answered_by_its_result_and_failures_are_retried(actions: list[dict[str, Any]]) -> None:
    by_id = {a["action_id"]: a for a in actions}
    results = [a for a in actions if a["action_type"] == "CapabilityResult"]
    for result in results:
        call = by_id[result["parent_action_id"]]
        assert call["action_type"] == "CapabilityCall" and "success" not in call
        assert result["function_name"] == call["function_name"]
        assert result["result"]["success"] == result["success"]
        correlation = {"run_id": call["metadata"]["run_id"], "step_id": call["step_id"]}
        assert result["metadata"] == result["result"]["metadata"] == correlation
        assert call["metadata"]["step_id"] == call["step_id"]
        assert {k: result[k] for k in ("session_id", "intent_id", "plan_id", "step_id")} == {
            k: call[k] for k in ("session_id", "intent_id", "plan_id", "step_id")}
    assert len({r["parent_action_id"] for r in results}) == len(results)  # one result per call
    answered = {r["parent_action_id"] for r in results}
    calls = [a for a in actions if a["action_type"] == "CapabilityCall"]
    paired = [c for c in calls if "success" not in c]
    # All but the calls still in flight when the sample was cut have their result.
    assert len(paired) - len(answered) <= 4
    attempts = Counter(c["metadata"]["attempt"] for c in calls)
    assert set(attempts) <= set(range(1, MAX_ATTEMPTS + 1))
    assert attempts[2] > 0
    assert attempts[2] == pytest.approx(
        sum(1 for a in actions if a["action_type"] == "PlanStepRetrying" and a["metadata"]["attempt"] == 2), abs=4
    )


def _profile(call: dict[str, Any]) -> CapabilityProfile:
    return next(c for c in CAPABILITIES if c.name == call["function_name"])


def test_sessions_interleave(actions: list[dict[str, Any]]) -> None:
    sessions = [a["session_id"] for a in actions[:200]]
    switches = sum(1 for a, b in pairwise(sessions) if a != b)
    assert switches > 50


# --- pacing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class FakeClient:
    """Records each append_batch; takes ``latency`` seconds of the fake clock per request."""

    def __init__(self, clock: FakeClock, latency: float = 0.0, refuse_every: int = 0) -> None:
        self.clock = clock
        self.latency = latency
        self.refuse_every = refuse_every
        self.batches: list[list[dict[str, Any]]] = []
        self.sent_at: list[float] = []
        self.count = 0

    def append_batch(self, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batches.append(actions)
        self.sent_at.append(self.clock.now)
        self.clock.now += self.latency
        answers = []
        for action in actions:
            self.count += 1
            refused = self.refuse_every and self.count % self.refuse_every == 0
            answers.append({"ok": False, "error": {"code": "busy"}} if refused
                           else {"ok": True, "action_id": action["action_id"]})
        return answers


def run(client: FakeClient, clock: FakeClock, **kwargs: Any) -> Any:
    return run_demo(client, Workload(1, "run-1"), clock=clock, sleep=clock.sleep,  # type: ignore[arg-type]
                    wall_clock_ms=lambda: 1_764_000_000_000 + int(clock.now * 1000), **kwargs)


def test_a_fast_daemon_gets_one_action_at_each_due_time() -> None:
    clock = FakeClock()
    client = FakeClient(clock)
    summary = run(client, clock, rate=10, duration_s=2)
    assert summary.sent == 20 and summary.errors == 0
    assert [len(b) for b in client.batches] == [1] * 20
    assert client.sent_at == pytest.approx([i / 10 for i in range(20)])
    stamps = [b[0]["timestamp_ms"] for b in client.batches]
    assert stamps == [1_764_000_000_000 + round(i * 100) for i in range(20)]
    # The actions are the workload's, in order.
    assert [a["action_id"] for b in client.batches for a in b] == [a["action_id"] for a in take(20)]


def test_a_slow_daemon_gets_what_is_due_in_larger_batches_without_sleeping() -> None:
    clock = FakeClock()
    client = FakeClient(clock, latency=0.35)
    summary = run(client, clock, rate=10, duration_s=2)
    assert clock.sleeps == []
    assert [len(b) for b in client.batches][:3] == [1, 3, 4]  # due by 0, 0.35 and 0.7 s
    assert summary.sent == sum(len(b) for b in client.batches)
    assert 15 <= summary.sent <= 20
    # Never ahead of the schedule: by each send, every action in it was due.
    total = 0
    for batch, at in zip(client.batches, client.sent_at, strict=True):
        total += len(batch)
        assert (total - 1) / 10 <= at + 1e-9


def test_refused_actions_are_counted_as_errors() -> None:
    clock = FakeClock()
    summary = run(FakeClient(clock, refuse_every=5), clock, rate=50, duration_s=1)
    assert summary.sent == 50
    assert summary.errors == 10
    assert "sent 50 actions, 10 errors" in summary.line()


def test_ctrl_c_stops_with_a_summary() -> None:
    clock = FakeClock()
    client = FakeClient(clock)

    def interrupted_sleep(seconds: float) -> None:
        if len(client.batches) == 7:
            raise KeyboardInterrupt
        clock.sleep(seconds)

    summary = run_demo(client, Workload(1, "run-1"), rate=10, clock=clock, sleep=interrupted_sleep)  # type: ignore[arg-type]
    assert summary.sent == 7
    assert summary.elapsed_s == pytest.approx(0.6)


@pytest.mark.parametrize("rate", [0, -1])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        run_demo(FakeClient(FakeClock()), Workload(1, "r"), rate=rate)  # type: ignore[arg-type]
