"""The CPU cost of redaction per action, in process: ``python -m bench.redact``.

The shipped default ``[[redact]]`` rules (the commented-out block of
config/ccos-obsd.toml, uncommented: eight patterns and one hashed path rule)
applied with :meth:`ccos_obsd.redact.Redactor.redact` to

- the benchmarks' action mix (``bench.workload``, about 330 bytes of JSON each);
- the same actions with a secret in the first argument (every CapabilityCall);
- an action carrying a 4 KiB tool output (a log text without secrets).

Without rules the ops skip redaction altogether (one attribute check per request),
so that cost is not measured. Prints one JSON object: microseconds per action.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import make_actions
from ccos_obsd.config import load_config
from ccos_obsd.redact import Redactor

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "ccos-obsd.toml"


def shipped_rules_text(config_file: Path = SHIPPED_CONFIG) -> str:
    """The shipped file's commented-out ``[[redact]]`` block, uncommented (``#`` lines up to the next other line)."""
    lines = config_file.read_text(encoding="utf-8").splitlines()
    block = []
    for line in lines[lines.index("# [[redact]]"):]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else "")
    return "\n".join(block) + "\n"


def per_action_us(redactor: Redactor, actions: list[dict[str, Any]], repeats: int = 10) -> float:
    """The best of ``repeats`` passes over ``actions``, in microseconds per action."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for action in actions:
            redactor.redact(action)
        best = min(best, time.perf_counter() - started)
    return best / len(actions) * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        rules_file = Path(directory) / "redact.toml"
        rules_file.write_text(shipped_rules_text(), encoding="utf-8")
        rules = load_config(rules_file, environ={}).redact
    redactor = Redactor(rules, bytes(32))
    mix = make_actions(10_000)
    with_secret = [
        {**a, "arguments": [f"API_KEY=sk-live-{n:024d}", *a["arguments"][1:]]} if "arguments" in a else a
        for n, a in enumerate(mix)
    ]
    log_text = " ".join(f"line {n}: fetched https://example.org/item/{n} in 12 ms, status 200" for n in range(70))
    big = [{"action_type": "CapabilityResult", "function_name": "ccos.fs.read",
            "result": {"success": True, "value": log_text[:4096]}} for _ in range(1_000)]
    print(json.dumps({
        "rules": len(rules),
        "mix_us_per_action": round(per_action_us(redactor, mix), 2),
        "mix_with_secret_us_per_action": round(per_action_us(redactor, with_secret), 2),
        "tool_output_4k_us_per_action": round(per_action_us(redactor, big), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
