"""A realistic agent workload for trying the daemon, its metrics and dashboards.

:class:`Workload` is the pure part: an endless, seeded stream of actions as a CCOS
agent runtime would log them. Sessions create an intent, draft a plan with an LLM,
get a budget, and run steps that call capabilities (a dozen, each with its own
log-normal latency, cost and failure rate, and a slow tail), with retries,
governance approvals for sensitive capabilities, budget warnings and extensions,
and aborted plans. Several sessions run interleaved. The same seed and run id
give the same actions, field for field.

Most capability calls are recorded as CCOS's ``record_result`` records them: a
``CapabilityCall`` without an outcome, then a ``CapabilityResult`` child carrying
the outcome, duration and cost, and the call's ``run_id``/``step_id``. Calls of
the local file system are recorded once, already complete, as runtimes that log
a call after it returned do.

:func:`run_demo` is the shell: it sends the stream to the daemon at a steady rate,
paced against a monotonic clock, and stamps each action with the client's clock.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from ccos_obsd.client import Client

Action = dict[str, Any]
Steps = Generator[Action, None, None]

MAX_BATCH = 1000
"""Most actions in one append_batch request (well under socket.max_batch)."""

CONCURRENT_SESSIONS = 4
"""Sessions whose actions interleave, as several agents on one host would."""

TIMEOUT_MS = 10_000.0
"""A capability call that would take longer fails with a timeout at this duration."""

MAX_ATTEMPTS = 3
"""A failed call is retried until it succeeds or has been tried this many times."""


@dataclass(frozen=True, slots=True)
class CapabilityProfile:
    """How one capability behaves: latency, cost and how often it fails."""

    name: str
    median_ms: float
    spread: float
    """Standard deviation of the latency's logarithm: 0.3 is steady, 1.0 is erratic."""
    failure_rate: float
    cost: float
    """Mean cost of one call (the agents' own unit, e.g. USD)."""
    weight: float
    """How often agents pick it, relative to the others."""
    needs_approval: bool = False
    """Side effects outside the host: governance approves each use first."""
    paired: bool = True
    """Recorded as a call, then its result; False: one call entry carrying the outcome."""


CAPABILITIES: tuple[CapabilityProfile, ...] = (
    CapabilityProfile("fs.read", 2.0, 0.7, 0.005, 0.0, 10, paired=False),
    CapabilityProfile("sql.query", 8.0, 0.9, 0.02, 0.0, 8),
    CapabilityProfile("vector.search", 12.0, 0.5, 0.005, 0.00005, 8),
    CapabilityProfile("llm.embed", 40.0, 0.4, 0.01, 0.0001, 6),
    CapabilityProfile("calendar.lookup", 90.0, 0.4, 0.02, 0.0, 3),
    CapabilityProfile("web.search", 180.0, 0.5, 0.03, 0.002, 6),
    CapabilityProfile("web.fetch", 350.0, 0.8, 0.08, 0.0, 5),
    CapabilityProfile("translate.text", 300.0, 0.5, 0.03, 0.0005, 2),
    CapabilityProfile("llm.complete", 1200.0, 0.6, 0.03, 0.01, 6),
    CapabilityProfile("fs.write", 4.0, 0.7, 0.01, 0.0, 3, needs_approval=True, paired=False),
    CapabilityProfile("email.send", 250.0, 0.5, 0.05, 0.001, 1, needs_approval=True),
    CapabilityProfile("code.exec", 600.0, 1.0, 0.12, 0.003, 2, needs_approval=True),
)

_WEIGHTS = tuple(c.weight for c in CAPABILITIES)
_ERRORS = ("upstream returned 503", "rate limited (429)", "connection reset by peer", "invalid response")
_GOALS = (
    "summarise this week's incident reports",
    "plan a team offsite in Lisbon",
    "answer a customer's billing question",
    "triage new issues in the tracker",
    "draft release notes from merged changes",
    "reconcile invoices against the ledger",
    "find papers on hash-based signatures",
    "translate the onboarding guide",
)
_MODEL = "demo-llm-large"


class Workload:
    """An endless, seeded stream of agent actions, valid for the daemon as they are.

    Every id is derived from ``run_id`` and a counter, so that runs with distinct
    run ids never collide in one ledger; ``metadata.run_id`` carries it too (the
    ``query --run-id`` filter).
    """

    def __init__(self, seed: int, run_id: str) -> None:
        self.run_id = run_id
        self._random = random.Random(seed)  # noqa: S311 - a reproducible simulation, not secrets
        self._actions = 0
        self._sessions = 0

    def __iter__(self) -> Iterator[Action]:
        active = [self._session() for _ in range(CONCURRENT_SESSIONS)]
        while True:
            index = self._random.randrange(len(active))
            try:
                yield next(active[index])
            except StopIteration:
                active[index] = self._session()

    # --- building blocks

    def _id(self, kind: str) -> str:
        self._actions += 1
        return f"{self.run_id}-{kind}-{self._actions}"

    def _action(self, action_type: str, context: dict[str, str], **fields: Any) -> Action:
        metadata = {"run_id": self.run_id, **fields.pop("metadata", {})}
        return {"action_id": self._id("a"), "action_type": action_type, **context, **fields, "metadata": metadata}

    def _latency_ms(self, capability: CapabilityProfile) -> float:
        latency = self._random.lognormvariate(math.log(capability.median_ms), capability.spread)
        if self._random.random() < 0.01:  # the slow tail: cold caches, GC pauses, retries upstream
            latency *= self._random.uniform(5.0, 30.0)
        return round(min(latency, TIMEOUT_MS), 3)

    def _cost(self, mean: float) -> float:
        return round(mean * self._random.uniform(0.5, 1.5), 6)

    # --- a session: intent, plan, steps

    def _session(self) -> Steps:
        self._sessions += 1
        n = self._sessions
        session = {"session_id": f"{self.run_id}-session-{n}"}
        intent_id = f"{self.run_id}-intent-{n}"
        plan_id = f"{self.run_id}-plan-{n}"
        goal = self._random.choice(_GOALS)
        intent = self._action("IntentCreated", {**session, "intent_id": intent_id},
                              metadata={"goal": goal}, provenance={"agent": f"demo-agent-{n % 7}"})
        yield intent
        context = {**session, "intent_id": intent_id, "plan_id": plan_id}
        steps = self._random.randint(2, 6)
        plan = self._action("PlanStarted", context, parent_action_id=intent["action_id"],
                            metadata={"steps": steps})
        yield plan
        prompt, completion = self._random.randint(300, 3000), self._random.randint(100, 1200)
        yield self._action("AgentLlmConsultation", context, parent_action_id=plan["action_id"],
                           duration_ms=round(self._random.lognormvariate(math.log(900.0), 0.4), 3),
                           cost=round((prompt + 2 * completion) * 2e-6, 6),
                           metadata={"model": _MODEL, "prompt_tokens": prompt, "completion_tokens": completion,
                                     "purpose": "plan"})
        budget = Budget(round(self._random.uniform(0.005, 0.05), 4))
        yield self._action("BudgetAllocated", context, parent_action_id=plan["action_id"],
                           metadata={"budget": budget.limit})
        outcome = "completed"
        for number in range(1, steps + 1):
            step = _StepState(plan["action_id"], f"{plan_id}-step-{number}")
            yield from self._step(context, step, budget)
            if step.aborted:
                outcome = "aborted"
                break
        started = plan["action_id"]
        if outcome == "completed":
            yield self._action("PlanCompleted", context, parent_action_id=started, success=True,
                               metadata={"cost": round(budget.spent, 6)})
        else:
            yield self._action("PlanAborted", context, parent_action_id=started, success=False,
                               error=step.abort_reason, metadata={"cost": round(budget.spent, 6)})
        yield self._action("IntentStatusChanged", {**session, "intent_id": intent_id},
                           parent_action_id=intent["action_id"],
                           metadata={"from": "Active", "to": "Completed" if outcome == "completed" else "Failed"})

    def _step(self, context: dict[str, str], step: _StepState, budget: Budget) -> Steps:
        step_context = {**context, "step_id": step.step_id}
        started = self._action("PlanStepStarted", step_context, parent_action_id=step.plan_action_id)
        yield started
        step_ms = 0.0
        for _ in range(self._random.randint(1, 3)):
            capability = self._random.choices(CAPABILITIES, _WEIGHTS)[0]
            if capability.needs_approval:
                granted = yield from self._approval(step_context, started["action_id"], capability)
                if not granted:
                    step.abort(f"governance denied {capability.name}")
                    yield self._action("PlanStepFailed", step_context, parent_action_id=started["action_id"],
                                       success=False, error=step.abort_reason, duration_ms=round(step_ms, 3))
                    return
            succeeded, spent_ms = yield from self._call(step_context, started["action_id"], capability, budget)
            step_ms += spent_ms
            if not succeeded:
                error = f"{capability.name} failed {MAX_ATTEMPTS} times"
                yield self._action("PlanStepFailed", step_context, parent_action_id=started["action_id"],
                                   success=False, error=error, duration_ms=round(step_ms, 3))
                if self._random.random() < 0.5:  # the planner gives up, or carries on without this step
                    step.abort(error)
                return
            if capability.cost:
                yield from self._account(context, started["action_id"], budget, step)
                if step.aborted:
                    return
        yield self._action("PlanStepCompleted", step_context, parent_action_id=started["action_id"],
                           success=True, duration_ms=round(step_ms, 3))

    def _approval(
        self, context: dict[str, str], parent: str, capability: CapabilityProfile
    ) -> Generator[Action, None, bool]:
        request = self._action("GovernanceApprovalRequested", context, parent_action_id=parent,
                               metadata={"capability": capability.name})
        yield request
        granted = self._random.random() < 0.9
        if granted:
            yield self._action("GovernanceApprovalGranted", context, parent_action_id=request["action_id"],
                               metadata={"capability": capability.name, "approver": "policy:default"})
        else:
            yield self._action("GovernanceApprovalDenied", context, parent_action_id=request["action_id"],
                               metadata={"capability": capability.name, "reason": "outside the session's scope"})
        return granted

    def _call(
        self, context: dict[str, str], parent: str, capability: CapabilityProfile, budget: Budget
    ) -> Generator[Action, None, tuple[bool, float]]:
        """One capability call with its retries; returns (succeeded, milliseconds spent)."""
        spent_ms = 0.0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            duration_ms = self._latency_ms(capability)
            failed = self._random.random() < capability.failure_rate
            error = None
            if duration_ms >= TIMEOUT_MS:
                failed, error = True, f"timed out after {TIMEOUT_MS:.0f} ms"
            elif failed:
                error = self._random.choice(_ERRORS)
            cost = self._cost(capability.cost) if capability.cost else 0.0
            budget.spent += cost
            spent_ms += duration_ms
            completion: dict[str, Any] = {"duration_ms": duration_ms, "cost": cost, "success": not failed}
            if error is not None:
                completion["error"] = error
            call_fields: dict[str, Any] = {
                "function_name": capability.name,
                "arguments": [f"input-{self._random.randrange(10_000)}"],
                "metadata": {"attempt": attempt, "step_id": context["step_id"]},
            }
            if capability.paired:
                call = self._action("CapabilityCall", context, parent_action_id=parent, **call_fields)
                yield call
                yield self._result(context, call, completion)
            else:
                yield self._action("CapabilityCall", context, parent_action_id=parent, **call_fields, **completion)
            if not failed:
                return True, spent_ms
            if attempt < MAX_ATTEMPTS:
                backoff_ms = 100 * 2 ** (attempt - 1)
                spent_ms += backoff_ms
                yield self._action("PlanStepRetrying", context, parent_action_id=parent,
                                   metadata={"attempt": attempt + 1, "backoff_ms": backoff_ms,
                                             "capability": capability.name})
        return False, spent_ms

    def _result(self, context: dict[str, str], call: Action, completion: dict[str, Any]) -> Action:
        """The ``CapabilityResult`` of ``call``, as CCOS's ``record_result`` writes it."""
        correlation = {"run_id": self.run_id, "step_id": context["step_id"]}
        result: Action = {"success": completion["success"], "metadata": correlation}
        if completion["success"]:
            result["value"] = {"items": self._random.randint(0, 20)}
        return self._action("CapabilityResult", context, parent_action_id=call["action_id"],
                            function_name=call["function_name"], result=result, **completion, metadata=correlation)

    def _account(self, context: dict[str, str], parent: str, budget: Budget, step: _StepState) -> Steps:
        yield self._action("BudgetConsumptionRecorded", context, parent_action_id=parent,
                           metadata={"consumed": round(budget.spent, 6), "budget": budget.limit})
        if budget.spent >= budget.limit:
            yield self._action("BudgetExhausted", context, parent_action_id=parent,
                               metadata={"consumed": round(budget.spent, 6), "budget": budget.limit})
            if self._random.random() < 0.6:
                budget.extend(budget.limit)
                yield self._action("BudgetExtended", context, parent_action_id=parent,
                                   metadata={"budget": budget.limit, "approver": "policy:default"})
            else:
                step.abort("budget exhausted")
        elif budget.spent >= 0.8 * budget.limit and not budget.warned:
            budget.warned = True
            yield self._action("BudgetWarningIssued", context, parent_action_id=parent,
                               metadata={"consumed": round(budget.spent, 6), "budget": budget.limit})


@dataclass(slots=True)
class Budget:
    limit: float
    spent: float = 0.0
    warned: bool = False

    def extend(self, amount: float) -> None:
        self.limit = round(self.limit + amount, 6)
        self.warned = False


@dataclass(slots=True)
class _StepState:
    plan_action_id: str
    step_id: str
    abort_reason: str | None = None

    @property
    def aborted(self) -> bool:
        return self.abort_reason is not None

    def abort(self, reason: str) -> None:
        self.abort_reason = reason


# --- sending it


@dataclass(frozen=True, slots=True)
class DemoSummary:
    sent: int
    errors: int
    elapsed_s: float
    run_id: str

    def line(self) -> str:
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"demo: sent {self.sent} actions, {self.errors} errors, in {self.elapsed_s:.1f} s "
                f"({rate:.1f} actions/s); run_id {self.run_id}")


def run_demo(
    client: Client,
    workload: Workload,
    *,
    rate: float,
    duration_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> DemoSummary:
    """Send ``workload`` at ``rate`` actions per second until ``duration_s`` (or Ctrl-C).

    Action ``i`` is due at ``start + i / rate``. Whatever is due goes in one
    ``append_batch``, so a client that falls behind catches up in larger batches
    instead of drifting; it sleeps only when it is ahead.
    """
    if not rate > 0:
        raise ValueError("rate must be > 0")
    actions = iter(workload)
    limit = None if duration_s is None else math.ceil(duration_s * rate)
    sent = errors = 0
    start = clock()
    try:
        while limit is None or sent < limit:
            now = clock()
            elapsed = now - start
            if duration_s is not None and elapsed >= duration_s:
                break
            next_due = start + sent / rate
            if now < next_due:
                sleep(next_due - now)
                continue
            # At least the next action (due by the test above, whatever rounding says).
            due = max(1, math.floor(elapsed * rate) + 1 - sent)
            if limit is not None:
                due = min(due, limit - sent)
            stamp = wall_clock_ms()
            batch = [{**next(actions), "timestamp_ms": stamp} for _ in range(min(due, MAX_BATCH))]
            results = client.append_batch(batch)
            sent += len(batch)
            errors += sum(1 for result in results if not result.get("ok"))
    except KeyboardInterrupt:
        pass
    return DemoSummary(sent, errors, clock() - start, workload.run_id)
