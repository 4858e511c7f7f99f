"""The ingestor capability (ccos_obsd.wm.capability): call arguments, records, and the actions a call records.

What a recorded call gives Working Memory is derivation's part (test_wm_derive.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from ccos_obsd.actions import validate_action
from ccos_obsd.errors import InvalidRequest
from ccos_obsd.wm.capability import (
    CAPABILITY,
    DEFAULT_KIND,
    call_action,
    normalize_record,
    parse_call,
    result_action,
)

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NOW_S = 1_700_000_000.123456


# --- parse_call


def test_single_takes_one_record() -> None:
    assert parse_call(["single", {"summary": "s"}]) == ("single", [{"summary": "s"}])


def test_single_passes_a_record_of_any_shape_on_to_normalize_record() -> None:
    assert parse_call(["single", "not an object"]) == ("single", ["not an object"])


def test_batch_takes_a_list_of_records_and_copies_it() -> None:
    records: list[Any] = [{"summary": "a"}, {"summary": "b"}]
    mode, parsed = parse_call(["batch", records])
    assert (mode, parsed) == ("batch", records)
    assert parsed is not records


def test_an_empty_batch_is_a_batch() -> None:
    assert parse_call(["batch", []]) == ("batch", [])


def test_replay_takes_no_records() -> None:
    assert parse_call(["replay"]) == ("replay", [])


@pytest.mark.parametrize("args", [None, {}, "single", [], ["explode"], [None], [{"summary": "s"}], ["SINGLE", {}]])
def test_args_must_start_with_a_mode(args: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_call(args)
    assert caught.value.message == "args must start with a mode: one of single, batch, replay"
    assert caught.value.field == "args"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["single"], 'single takes one record: ["single", {...}]'),
        (["single", {}, {}], 'single takes one record: ["single", {...}]'),
        (["batch"], 'batch takes a list of records: ["batch", [{...}, ...]]'),
        (["batch", {"summary": "s"}], 'batch takes a list of records: ["batch", [{...}, ...]]'),
        (["batch", [], []], 'batch takes a list of records: ["batch", [{...}, ...]]'),
        (["replay", 0], 'replay takes no arguments: ["replay"]'),
    ],
)
def test_each_mode_names_its_shape_when_given_another(args: list[Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_call(args)
    assert caught.value.message == message
    assert caught.value.field == "args"
    assert caught.value.code == "invalid_request"


# --- normalize_record


def test_a_record_gets_an_id_a_kind_and_a_timestamp_by_default() -> None:
    record = normalize_record({"summary": "cheaper provider found"}, NOW_S)
    assert UUID4.fullmatch(record.pop("action_id"))
    assert record == {"summary": "cheaper provider found", "kind": DEFAULT_KIND, "timestamp_s": 1_700_000_000.123}


def test_every_default_id_is_new() -> None:
    assert normalize_record({}, NOW_S)["action_id"] != normalize_record({}, NOW_S)["action_id"]


def test_given_fields_are_kept_as_given() -> None:
    raw = {
        "action_id": "r-1", "kind": "Insight", "provider": "Acme", "summary": "s", "content": "c", "plan_id": "p",
        "intent_id": "i", "step_id": "st", "attestation_hash": "h", "content_hash": "ch", "timestamp_s": 12,
    }
    assert normalize_record(raw, NOW_S) == raw


def test_the_input_record_is_not_changed() -> None:
    raw = {"summary": "s"}
    normalize_record(raw, NOW_S)
    assert raw == {"summary": "s"}


@pytest.mark.parametrize("timestamp", [0, 0.5, 1_700_000_000, 1e308])
def test_any_finite_timestamp_from_zero_is_accepted(timestamp: float) -> None:
    assert normalize_record({"timestamp_s": timestamp}, NOW_S)["timestamp_s"] == timestamp


@pytest.mark.parametrize("raw", [None, "summary", ["summary"], 7])
def test_a_record_must_be_an_object(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"^a record must be an object$"):
        normalize_record(raw, NOW_S)


@pytest.mark.parametrize("timestamp", [-1, -0.001, math.inf, -math.inf, math.nan, True, "12", None, [1]])
def test_a_timestamp_must_be_a_finite_number_from_zero(timestamp: Any) -> None:
    with pytest.raises(ValueError, match=r"^timestamp_s must be a finite number >= 0$"):
        normalize_record({"timestamp_s": timestamp}, NOW_S)


@pytest.mark.parametrize("field", ["action_id", "kind", "provider", "summary", "content", "content_hash"])
@pytest.mark.parametrize("value", ["", None, 3, ["x"], {"x": 1}])
def test_string_fields_must_be_non_empty_strings(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as caught:
        normalize_record({field: value}, NOW_S)
    assert str(caught.value) == f"{field} must be a non-empty string"


def test_an_unknown_field_is_named() -> None:
    with pytest.raises(ValueError) as caught:
        normalize_record({"summary": "s", "bogus": 1}, NOW_S)
    assert str(caught.value) == "unknown record field 'bogus'"


def test_a_record_must_have_a_canonical_json_form() -> None:
    with pytest.raises(ValueError) as caught:
        normalize_record({"summary": "lone \ud800 surrogate"}, NOW_S)
    assert str(caught.value).startswith("record is not representable as canonical JSON: ")
    assert "surrogates not allowed" in str(caught.value)


# --- call_action and result_action


def test_a_call_is_recorded_as_a_call_then_its_result() -> None:
    records = [normalize_record({"summary": "a"}, NOW_S), normalize_record({"summary": "b"}, NOW_S)]
    result = {"mode": "batch", "ingested": 2, "errors": []}
    call = call_action("batch", records)
    outcome = result_action(call["action_id"], result, 1.25, True)
    assert UUID4.fullmatch(call["action_id"])
    # The call carries no outcome nor duration: it completes with its result, as CCOS records a call.
    assert call == {
        "action_id": call["action_id"], "action_type": "CapabilityCall", "function_name": CAPABILITY,
        "arguments": ["batch", records],
    }
    assert outcome == {
        "action_type": "CapabilityResult", "parent_action_id": call["action_id"], "function_name": CAPABILITY,
        "duration_ms": 1.25, "success": True, "result": {"success": True, "value": result},
    }


def test_a_replay_call_carries_no_records() -> None:
    call = call_action("replay", [])
    outcome = result_action(call["action_id"], {"mode": "replay", "ingested": 3}, 9.0, True)
    assert call["arguments"] == ["replay"]
    assert outcome["result"]["value"] == {"mode": "replay", "ingested": 3}


def test_a_failed_call_says_so_in_its_result() -> None:
    errors = [{"index": 0, "reason": "a record must be an object"}]
    outcome = result_action("c-1", {"mode": "batch", "ingested": 0, "errors": errors}, 0.5, False)
    assert outcome["success"] is False and outcome["result"]["success"] is False
    assert "error" not in outcome
    broken = result_action("c-1", {"mode": "replay", "ingested": 0, "errors": []}, 0.5, False, error="OSError: x")
    assert broken["error"] == "OSError: x"


def test_every_call_has_its_own_id() -> None:
    assert call_action("single", [])["action_id"] != call_action("single", [])["action_id"]


def test_the_recorded_actions_pass_validation_unchanged() -> None:
    records = [normalize_record({"summary": "s", "provider": "Acme"}, NOW_S)]
    call = call_action("single", records)
    outcome = result_action(call["action_id"], {"mode": "single", "ingested": 1, "errors": []}, 2.0, True)
    assert validate_action(call).fields == call
    validated = validate_action(outcome).fields  # the result gets its action_id on validation
    assert {name: value for name, value in validated.items() if name != "action_id"} == outcome
