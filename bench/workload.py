"""The actions every benchmark sends, and their pre-encoded request lines.

A deterministic mix shaped like a CCOS plan run: plans with intents and
sessions, capability calls and their results (a bounded set of capability
names, as in real use), step lifecycle events. Actions carry no ``action_id``,
so the daemon generates one (no duplicate look-up), as in ``cat actions.ndjson
| socat - UNIX:...``. Every line is encoded before any clock starts.
"""

from __future__ import annotations

import json
import random
from typing import Any

CAPABILITIES = tuple(
    f"ccos.{area}.{verb}"
    for area in ("network", "fs", "llm", "db")
    for verb in ("fetch", "read", "write", "query")
)
_STEP_TYPES = ("PlanStepStarted", "CapabilityCall", "CapabilityResult", "PlanStepCompleted")


def make_actions(count: int, *, start: int = 0, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` actions (about 330 bytes each as JSON), numbered from ``start``."""
    rng = random.Random(seed + start)
    actions: list[dict[str, Any]] = []
    base_ms = 1_760_000_000_000
    for n in range(start, start + count):
        plan = n // 40
        step = (n % 40) // 4
        action_type = _STEP_TYPES[n % 4]
        capability = CAPABILITIES[(plan * 7 + step) % len(CAPABILITIES)]
        action: dict[str, Any] = {
            "action_type": action_type,
            "plan_id": f"plan-{plan:08d}",
            "intent_id": f"intent-{plan // 4:08d}",
            "session_id": f"session-{plan // 16:06d}",
            "step_id": f"step-{step}",
            "timestamp_ms": base_ms + n * 3,
            "metadata": {"run_id": f"run-{plan // 64:05d}", "agent": "bench-agent", "attempt": 1},
        }
        if action_type in ("CapabilityCall", "CapabilityResult"):
            action["function_name"] = capability
            action["parent_action_id"] = f"step-action-{plan:08d}-{step}"
        if action_type == "CapabilityCall":
            action["arguments"] = [f"https://example.org/item/{n}", {"timeout_ms": 5000, "retries": 2}]
        elif action_type == "CapabilityResult":
            ok = rng.random() > 0.05
            action["result"] = {"success": ok, "value": {"status": 200 if ok else 503, "bytes": rng.randrange(99999)}}
            action["success"] = ok
            action["cost"] = round(rng.random() * 0.01, 6)
            action["duration_ms"] = round(rng.random() * 250, 3)
        actions.append(action)
    return actions


def encode(request: dict[str, Any]) -> bytes:
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def single_lines(actions: list[dict[str, Any]]) -> list[bytes]:
    """One ``append`` request line per action."""
    return [encode({"op": "append", "action": action}) for action in actions]


def batch_lines(actions: list[dict[str, Any]], batch: int) -> list[bytes]:
    """One ``append_batch`` request line per ``batch`` actions."""
    return [encode({"op": "append_batch", "actions": actions[i:i + batch]}) for i in range(0, len(actions), batch)]
