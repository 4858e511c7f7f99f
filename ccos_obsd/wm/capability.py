"""The capability ``observability.ingestor:v1.ingest`` (SEP-024): records straight into Working Memory.

Modes: ``["single", record]``, ``["batch", [record, ...]]``, ``["replay"]``. Each
call is itself two ledger entries, as CCOS records a call: first a
``CapabilityCall`` whose ``arguments`` carry the mode and the normalized valid
records (generated ids and default timestamps filled in, so the ledger fixes
them); once that is committed and Working Memory has taken it (or replayed),
a ``CapabilityResult`` (its ``parent_action_id`` the call's) with the outcome
and the duration of the whole call (``ccos_obsd.ops``). Working Memory derives
one entry per carried record from the call entry
(:func:`ccos_obsd.wm.derive.derive_wm_entries`), so a WM rebuilt from the
ledger reproduces the directly ingested records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ccos_obsd.errors import InvalidRequest
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.entry import new_action_id

CAPABILITY = "observability.ingestor:v1.ingest"
MODES = ("single", "batch", "replay")
RECORD_STRINGS = ("action_id", "kind", "provider", "summary", "content", "plan_id", "intent_id", "step_id",
                  "attestation_hash", "content_hash")
DEFAULT_KIND = "CapabilityCall"
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Buckets of ``ccos_wm_ingest_duration_seconds`` (one observation per call), in seconds."""
WM_DELIVERY_TIMEOUT_S = 10.0
"""How long a call waits for Working Memory to take its records before it answers anyway."""


def parse_call(args: Any) -> tuple[str, list[Any]]:
    """The mode and raw records of ``args``, or ``InvalidRequest``."""
    if not isinstance(args, list) or not args or args[0] not in MODES:
        raise InvalidRequest(f"args must start with a mode: one of {', '.join(MODES)}", field="args")
    mode = args[0]
    if mode == "single":
        if len(args) != 2:
            raise InvalidRequest('single takes one record: ["single", {...}]', field="args")
        return mode, [args[1]]
    if mode == "batch":
        if len(args) != 2 or not isinstance(args[1], list):
            raise InvalidRequest('batch takes a list of records: ["batch", [{...}, ...]]', field="args")
        return mode, list(args[1])
    if len(args) != 1:
        raise InvalidRequest('replay takes no arguments: ["replay"]', field="args")
    return mode, []


def normalize_record(raw: Any, now_s: float) -> dict[str, Any]:
    """A record with SEP-024 defaults filled in; ``ValueError`` says what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError("a record must be an object")
    record: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "timestamp_s":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError("timestamp_s must be a finite number >= 0")
            record[key] = value
        elif key in RECORD_STRINGS:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string")
            record[key] = value
        else:
            raise ValueError(f"unknown record field {key!r}")
    record.setdefault("action_id", new_action_id())
    record.setdefault("kind", DEFAULT_KIND)
    record.setdefault("timestamp_s", round(now_s, 3))
    try:
        canonical_bytes(record)
    except ValueError as exc:
        raise ValueError(f"record is not representable as canonical JSON: {exc}") from None
    return record


def call_action(mode: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The CapabilityCall that opens one call on the ledger, carrying its records."""
    arguments: list[Any] = [mode] if mode == "replay" else [mode, records]
    return {"action_id": new_action_id(), "action_type": "CapabilityCall", "function_name": CAPABILITY,
            "arguments": arguments}


def result_action(call_id: str, result: Mapping[str, Any], duration_ms: float, ok: bool,
                  error: str | None = None) -> dict[str, Any]:
    """The CapabilityResult that completes the call ``call_id``: outcome and the whole call's duration."""
    outcome: dict[str, Any] = {
        "action_type": "CapabilityResult", "parent_action_id": call_id, "function_name": CAPABILITY,
        "duration_ms": duration_ms, "success": ok, "result": {"success": ok, "value": dict(result)},
    }
    if error is not None:
        outcome["error"] = error
    return outcome
