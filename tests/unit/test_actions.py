"""Validation of CCOS actions (DESIGN.md, "Actions"), and the outcome derived from them."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.actions import (
    ACTION_FIELDS,
    ACTION_TYPES,
    MAX_ID_LENGTH,
    MAX_QUANTITY,
    validate_action,
)
from ccos_obsd.errors import InvalidAction
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.entry import ValidatedAction, outcome

ID_FIELDS = ["action_id", "parent_action_id", "session_id", "plan_id", "intent_id", "step_id", "function_name"]


def valid(**fields: Any) -> ValidatedAction:
    return validate_action({"action_type": "CapabilityCall", **fields})


def rejected(raw: Any, *, allow_custom_types: bool = False) -> InvalidAction:
    with pytest.raises(InvalidAction) as caught:
        validate_action(raw, allow_custom_types=allow_custom_types)
    assert caught.value.code == "invalid_action"
    return caught.value


# --- the field set


def test_the_action_fields_are_the_sep003_set() -> None:
    assert frozenset(
        [
            *ID_FIELDS,
            "action_type", "arguments", "result", "success", "error", "cost", "duration_ms",
            "timestamp_ms", "metadata", "provenance",
        ]
    ) == ACTION_FIELDS


def test_a_full_action_is_kept_as_sent() -> None:
    raw = {
        "action_id": "a-1",
        "action_type": "CapabilityCall",
        "parent_action_id": "a-0",
        "session_id": "s",
        "plan_id": "p",
        "intent_id": "i",
        "step_id": "st",
        "function_name": "ccos.echo",
        "arguments": [1, "two", {"three": 3}],
        "result": {"success": True, "value": {"x": [1]}, "metadata": {"m": 1}},
        "success": True,
        "error": "",
        "cost": 0.25,
        "duration_ms": 12,
        "timestamp_ms": 1_700_000_000_000,
        "metadata": {"k": "v"},
        "provenance": {"source": "test"},
    }
    action = validate_action(raw)
    assert action.fields == raw
    assert action.action_id == "a-1"
    assert action.client_action_id
    assert action.content() == canonical_bytes(raw)


def test_minimal_action_gets_a_generated_uuid_action_id() -> None:
    action = validate_action({"action_type": "PlanStarted"})
    assert not action.client_action_id
    generated = uuid.UUID(action.action_id)
    assert (generated.version, generated.variant) == (4, uuid.RFC_4122)
    assert str(generated) == action.action_id
    assert action.fields == {"action_type": "PlanStarted", "action_id": action.action_id}
    assert action.content() == canonical_bytes(action.fields)


def test_generated_action_ids_are_distinct_uuid4_strings() -> None:
    ids = [valid().action_id for _ in range(500)]
    assert len(set(ids)) == len(ids)
    for action_id in ids:
        generated = uuid.UUID(action_id)
        assert (generated.version, generated.variant, str(generated)) == (4, uuid.RFC_4122, action_id)


def test_explicit_nulls_count_as_absent() -> None:
    action = validate_action({"action_type": "PlanStarted", "plan_id": None, "cost": None, "action_id": None})
    assert "plan_id" not in action.fields
    assert "cost" not in action.fields
    assert not action.client_action_id


def test_content_does_not_depend_on_field_order() -> None:
    one = validate_action({"action_id": "x", "action_type": "PlanStarted", "plan_id": "p"})
    two = validate_action({"plan_id": "p", "action_type": "PlanStarted", "action_id": "x"})
    assert one.content() == two.content()


# --- rejection, with the offending field named


@pytest.mark.parametrize("raw", [[], [["action_type", "PlanStarted"]], "PlanStarted", 1, None])
def test_action_must_be_an_object(raw: Any) -> None:
    assert rejected(raw).field is None


def test_action_type_is_required() -> None:
    assert rejected({"plan_id": "p"}).field == "action_type"
    assert rejected({"action_type": None}).field == "action_type"


@pytest.mark.parametrize("name", ["bogus", "actionType", "id", "seq", "recorded_at_ms", "peer", "v"])
def test_unknown_fields_are_rejected(name: str) -> None:
    # seq, recorded_at_ms, peer and v are the daemon's to stamp, never the client's.
    assert rejected({"action_type": "PlanStarted", name: 1}).field == name


@pytest.mark.parametrize("action_type", ["NotAType", "planstarted", "", "Custom.Type"])
def test_unknown_action_types_are_rejected_by_default(action_type: str) -> None:
    error = rejected({"action_type": action_type})
    assert error.field == "action_type"


def test_every_ccos_action_type_is_accepted() -> None:
    for action_type in sorted(ACTION_TYPES):
        assert validate_action({"action_type": action_type}).fields["action_type"] == action_type


@pytest.mark.parametrize("action_type", ["Custom", "my.app:Thing-1", "x_y", "A" * 128])
def test_custom_types_are_accepted_only_when_allowed(action_type: str) -> None:
    assert rejected({"action_type": action_type}).field == "action_type"
    action = validate_action({"action_type": action_type}, allow_custom_types=True)
    assert action.fields["action_type"] == action_type


@pytest.mark.parametrize("action_type", ["", "1abc", "_x", "has space", "a/b", "A" * 129, "caf\u00e9"])
def test_custom_types_must_match_the_pattern(action_type: str) -> None:
    assert rejected({"action_type": action_type}, allow_custom_types=True).field == "action_type"


@pytest.mark.parametrize("bad", [1, True, [], {}])
def test_action_type_must_be_a_string(bad: Any) -> None:
    assert rejected({"action_type": bad}, allow_custom_types=True).field == "action_type"


NOT_STRINGS = [1, 1.5, True, [], {}]
NOT_NUMBERS = ["1", True, False, [], {}]
NOT_OBJECTS = ["x", 1, True, [], [["k", "v"]]]

WRONG_TYPES: list[tuple[str, Any]] = [
    *[(name, bad) for name in ID_FIELDS for bad in NOT_STRINGS],
    *[("arguments", bad) for bad in ["x", 1, True, {}]],
    *[("result", bad) for bad in NOT_OBJECTS],
    *[("success", bad) for bad in [1, 0, "true", [], {}]],
    *[("error", bad) for bad in [1, True, [], {"message": "x"}]],
    *[("cost", bad) for bad in NOT_NUMBERS],
    *[("duration_ms", bad) for bad in NOT_NUMBERS],
    *[("timestamp_ms", bad) for bad in ["1", 1.0, 1.5, True, [], {}]],
    *[("metadata", bad) for bad in NOT_OBJECTS],
    *[("provenance", bad) for bad in NOT_OBJECTS],
]


@pytest.mark.parametrize(("name", "bad"), WRONG_TYPES)
def test_each_field_has_a_type(name: str, bad: Any) -> None:
    assert rejected({"action_type": "PlanStarted", name: bad}).field == name


@pytest.mark.parametrize("name", ID_FIELDS)
def test_id_fields_are_non_empty_and_bounded(name: str) -> None:
    assert rejected({"action_type": "PlanStarted", name: ""}).field == name
    assert rejected({"action_type": "PlanStarted", name: "x" * (MAX_ID_LENGTH + 1)}).field == name
    longest = "x" * MAX_ID_LENGTH
    assert validate_action({"action_type": "PlanStarted", name: longest}).fields[name] == longest


@pytest.mark.parametrize("name", ["cost", "duration_ms"])
@pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf, -math.inf])
def test_cost_and_duration_are_finite_and_non_negative(name: str, bad: float) -> None:
    assert rejected({"action_type": "PlanStarted", name: bad}).field == name


@pytest.mark.parametrize("name", ["cost", "duration_ms"])
@pytest.mark.parametrize("good", [0, 0.0, -0.0, 1, 2.5, 2**53, float(2**53)])
def test_cost_and_duration_accept_ints_and_floats_up_to_2_pow_53(name: str, good: float) -> None:
    assert validate_action({"action_type": "PlanStarted", name: good}).fields[name] == good


@pytest.mark.parametrize("name", ["cost", "duration_ms"])
@pytest.mark.parametrize("bad", [2**53 + 1, 2.0**53 * 2, 1e300, 10**30])
def test_cost_and_duration_above_2_pow_53_are_rejected(name: str, bad: float) -> None:
    # Beyond 2^53 a double is no longer exact, and sums of such values could overflow.
    assert MAX_QUANTITY == 2**53
    assert rejected({"action_type": "PlanStarted", name: bad}).field == name


@pytest.mark.parametrize("bad", [-1, 2**63])
def test_timestamp_is_a_non_negative_int64(bad: int) -> None:
    assert rejected({"action_type": "PlanStarted", "timestamp_ms": bad}).field == "timestamp_ms"


@pytest.mark.parametrize("good", [0, 1_700_000_000_000, 2**63 - 1])
def test_timestamp_bounds_are_inclusive(good: int) -> None:
    assert validate_action({"action_type": "PlanStarted", "timestamp_ms": good}).fields["timestamp_ms"] == good


def test_result_fields_are_success_value_metadata_only() -> None:
    assert rejected({"action_type": "CapabilityResult", "result": {"succes": True}}).field == "result.succes"
    assert rejected({"action_type": "CapabilityResult", "result": {"success": "yes"}}).field == "result.success"
    assert rejected({"action_type": "CapabilityResult", "result": {"metadata": []}}).field == "result.metadata"


def test_result_value_may_be_any_json() -> None:
    for value in (None, 1, "s", [1, {"a": None}], {"nested": {"deep": [True]}}):
        assert valid(result={"value": value}).fields["result"] == {"value": value}


def test_content_is_the_canonical_bytes_of_the_fields() -> None:
    action = valid(action_id="a", arguments=["caf\u00e9"], metadata={"b": 1, "a": 2})
    assert action.content() == '{"action_id":"a","action_type":"CapabilityCall","arguments":["caf\u00e9"],'.encode() + (
        b'"metadata":{"a":2,"b":1}}'
    )


def test_values_canonical_json_cannot_hold_are_rejected() -> None:
    with pytest.raises(InvalidAction):
        valid(metadata={"ratio": math.nan})
    with pytest.raises(InvalidAction):
        valid(arguments=["\ud800"])


@given(
    name=st.sampled_from(["cost", "duration_ms"]),
    value=st.one_of(st.integers(0, 2**53), st.floats(min_value=0, max_value=2**53)),
)
def test_any_finite_non_negative_number_is_accepted(name: str, value: float) -> None:
    assert valid(**{name: value}).fields[name] == value


@given(st.dictionaries(st.text(min_size=1).filter(lambda n: n not in ACTION_FIELDS), st.integers(), min_size=1))
def test_any_unknown_field_is_rejected_and_named(extra: dict[str, int]) -> None:
    error = rejected({"action_type": "PlanStarted", **extra})
    # Named by its first 80 characters, so a huge key doesn't make a huge answer.
    assert error.field in {name[:80] for name in extra}


def test_a_long_unknown_field_name_is_cut_to_80_characters() -> None:
    assert rejected({"action_type": "PlanStarted", "x" * 1000: 1}).field == "x" * 80


# --- outcome


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"result": {"success": True}}, "success"),
        ({"result": {"success": False}}, "failure"),
        ({"success": True}, "success"),
        ({"success": False}, "failure"),
        ({"result": {"success": True}, "success": False}, "success"),
        ({"result": {"success": False}, "success": True}, "failure"),
        ({"result": {"value": 1}, "success": False}, "failure"),
        ({"result": {"value": 1}}, "unknown"),
        ({}, "unknown"),
        ({"error": "boom"}, "unknown"),
    ],
)
def test_outcome_prefers_result_success_then_success_else_unknown(fields: dict[str, Any], expected: str) -> None:
    assert outcome(valid(**fields).fields) == expected


def test_an_unknown_field_is_rejected_even_when_null() -> None:
    with pytest.raises(InvalidAction) as caught:
        validate_action({"action_type": "PlanStarted", "bogus": None})
    assert caught.value.field == "bogus"
