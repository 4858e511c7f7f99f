"""Validation of CCOS actions (SEP-003) before they reach the ledger.

A validated action keeps exactly the fields the client sent (an explicit
``null`` counts as absent), plus a generated ``action_id`` when none was given.
Its canonical bytes are the "content" that duplicate detection compares. The
:class:`~ccos_obsd.ledger.entry.ValidatedAction` type itself lives with the ledger
entries, so the ledger never imports this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ccos_obsd.errors import InvalidAction, NotCanonicalizable
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.entry import KEY_ROTATED, ValidatedAction, new_action_id

ACTION_TYPES = frozenset(
    (
        "PlanStarted", "PlanCompleted", "PlanAborted", "PlanPaused", "PlanResumed",
        "PlanStepStarted", "PlanStepCompleted", "PlanStepFailed", "PlanStepRetrying",
        "CapabilityCall", "CapabilityResult", "CatalogReuse", "InternalStep", "StepProfileDerived",
        "IntentCreated", "IntentStatusChanged", "IntentRelationshipCreated",
        "IntentRelationshipModified", "IntentArchived", "IntentReactivated", "CapabilityRegistered",
        "CapabilityRemoved", "CapabilityUpdated", "CapabilityDiscoveryCompleted",
        "CapabilityVersionCreated", "CapabilityRollback", "CapabilitySynthesisStarted",
        "CapabilitySynthesisCompleted", "GovernanceApprovalRequested", "GovernanceApprovalGranted",
        "GovernanceApprovalDenied", "BoundedExplorationLimitReached",
        "GovernanceCheckpointDecision", "GovernanceCheckpointOutcome", "HintApplied",
        "BudgetAllocated", "BudgetConsumptionRecorded", "BudgetWarningIssued", "BudgetExhausted",
        "BudgetExtended", "AgentLlmConsultation", "PureEval", "StepYield", "ResumeFrom",
        "DelegationProposed", "DelegationApproved", "DelegationRejected", "DelegationRevoked",
        "DelegationCompleted",
    )
)
"""The CCOS ActionType names (causal chain sources and SEP-003)."""

SELF_CHECK_FAILED = "SelfCheckFailed"
"""Written by the daemon itself when it starts despite a failed start-up self-check."""
RESERVED_TYPES = frozenset({KEY_ROTATED, SELF_CHECK_FAILED})

CUSTOM_TYPE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,127}")
MAX_ID_LENGTH = 512
MAX_TIMESTAMP_MS = 2**63 - 1
MAX_QUANTITY = 2**53
"""Largest cost or duration_ms: exact as a double, and no sum of 2^63 of them overflows."""

_ID_FIELDS = (
    "action_id",
    "parent_action_id",
    "session_id",
    "plan_id",
    "intent_id",
    "step_id",
    "function_name",
)
_RESULT_FIELDS = frozenset({"success", "value", "metadata"})
STRING_FIELDS = frozenset((*_ID_FIELDS, "error"))
"""The action fields whose value may be any (non-empty) string."""


def _id_string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidAction(f"{name} must be a string, not {_json_type(value)}", field=name)
    if not value:
        raise InvalidAction(f"{name} must not be empty", field=name)
    if len(value) > MAX_ID_LENGTH:
        raise InvalidAction(f"{name} is longer than {MAX_ID_LENGTH} characters", field=name)
    return value


def _non_negative_number(name: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidAction(f"{name} must be a number, not {_json_type(value)}", field=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidAction(f"{name} must be finite", field=name)
    if value < 0:
        raise InvalidAction(f"{name} must be >= 0", field=name)
    if value > MAX_QUANTITY:
        raise InvalidAction(f"{name} must be at most 2^53 ({MAX_QUANTITY})", field=name)
    return value


def _timestamp(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAction(f"{name} must be an integer (milliseconds), not {_json_type(value)}", field=name)
    if not 0 <= value <= MAX_TIMESTAMP_MS:
        raise InvalidAction(f"{name} must be between 0 and 2^63-1", field=name)
    return value


def _object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidAction(f"{name} must be an object, not {_json_type(value)}", field=name)
    return value


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidAction(f"{name} must be a list, not {_json_type(value)}", field=name)
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidAction(f"{name} must be true or false, not {_json_type(value)}", field=name)
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidAction(f"{name} must be a string, not {_json_type(value)}", field=name)
    return value


def _result(name: str, value: Any) -> dict[str, Any]:
    result = _object(name, value)
    for key in result:
        if key not in _RESULT_FIELDS:
            raise InvalidAction(
                f"unknown field {key!r} in result (allowed: success, value, metadata)",
                field=f"result.{key}",
            )
    if "success" in result:
        _bool("result.success", result["success"])
    if "metadata" in result:
        _object("result.metadata", result["metadata"])
    return result


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    **{name: _id_string for name in _ID_FIELDS},
    "arguments": _list,
    "result": _result,
    "success": _bool,
    "error": _string,
    "cost": _non_negative_number,
    "duration_ms": _non_negative_number,
    "timestamp_ms": _timestamp,
    "metadata": _object,
    "provenance": _object,
}
ACTION_FIELDS = frozenset(_VALIDATORS) | {"action_type"}


def validate_action(
    raw: Any, *, allow_custom_types: bool = False, check_encodable: bool = True
) -> ValidatedAction:
    """Check one action against the SEP-003 field rules; raise ``InvalidAction``.

    ``check_encodable=False`` skips the canonical-JSON check, for callers that
    know the value cannot hold NaN, Infinity or lone surrogates (the socket
    parser rejects the first two and looks for the third in the raw line).
    """
    if not isinstance(raw, Mapping):
        raise InvalidAction(f"an action must be an object, not {_json_type(raw)}")
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "action_type":
            if value is not None:
                fields[name] = _action_type(value, allow_custom_types)
            continue
        validator = _VALIDATORS.get(name)
        if validator is None:
            raise InvalidAction(f"unknown field {str(name)[:80]!r}", field=str(name)[:80])
        if value is not None:
            fields[name] = validator(name, value)
    if "action_type" not in fields:
        raise InvalidAction("action_type is required", field="action_type")
    client_action_id = "action_id" in fields
    if not client_action_id:
        fields["action_id"] = new_action_id()
    if check_encodable:
        try:
            canonical_bytes(fields)
        except NotCanonicalizable as exc:
            raise InvalidAction(f"action is not representable as canonical JSON: {exc}") from exc
    return ValidatedAction(fields, client_action_id)


def _action_type(value: Any, allow_custom_types: bool) -> str:
    if not isinstance(value, str):
        raise InvalidAction(f"action_type must be a string, not {_json_type(value)}", field="action_type")
    if value in ACTION_TYPES:
        return value
    if value in RESERVED_TYPES:
        raise InvalidAction(f"action_type {value!r} is reserved for the daemon", field="action_type")
    if allow_custom_types and CUSTOM_TYPE_PATTERN.fullmatch(value):
        return value
    hint = "" if allow_custom_types else " (custom types are off: actions.allow_custom_types)"
    raise InvalidAction(f"unknown action_type {value[:80]!r}{hint}", field="action_type")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
