"""The capability ``observability.ingestor:v1.ingest`` (SEP-024): records straight into Working Memory.

Modes: ``["single", record]``, ``["batch", [record, ...]]``, ``["replay"]``. Each
call is itself two ledger entries: a ``CapabilityCall`` whose ``arguments`` carry
the mode and the normalized valid records (generated ids and default timestamps
filled in, so the ledger fixes them), then a ``CapabilityResult`` with the
duration and outcome. Working Memory derives one entry per carried record from
the call entry (:func:`ccos_obsd.wm.derive.derive_wm_entries`), so a WM rebuilt
from the ledger reproduces the directly ingested records.
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


def call_actions(mode: str, records: list[dict[str, Any]], result: Mapping[str, Any], duration_ms: float,
                 ok: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CapabilityCall and CapabilityResult actions that record one call on the ledger."""
    call_id = new_action_id()
    arguments: list[Any] = [mode] if mode == "replay" else [mode, records]
    call = {"action_id": call_id, "action_type": "CapabilityCall", "function_name": CAPABILITY,
            "arguments": arguments, "duration_ms": duration_ms, "success": ok}
    outcome = {"action_type": "CapabilityResult", "parent_action_id": call_id, "function_name": CAPABILITY,
               "duration_ms": duration_ms, "success": ok, "result": {"success": ok, "value": dict(result)}}
    return call, outcome
