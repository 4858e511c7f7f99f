"""Derivation of Working Memory entries from ledger entries (ccos_obsd.wm.derive), ingested records included.

Stored entries are built as the ledger writer builds them: canonical bytes of
the action fields plus the daemon's fields, their leaf hash, a key id and a
signature beside them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.actions import ACTION_TYPES, validate_action
from ccos_obsd.errors import WmDerivationError
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import CHAIN_ROOT, chain_hash, leaf_hash
from ccos_obsd.ledger.keys import KeyId
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.wm.capability import CAPABILITY
from ccos_obsd.wm.derive import (
    BASE_TAGS,
    MAX_ERROR_CHARS,
    WmEntry,
    approx_tokens,
    derive_wm_entries,
    derive_wm_entry,
)

KEY_ID = KeyId("0a1b2c3d")
SIGNATURE = bytes(range(64))
RECORDED_AT_MS = 1_700_000_000_000


def stored(
    action: dict[str, Any], *, seq: int = 0, recorded_at_ms: int = RECORDED_AT_MS,
    peer: dict[str, Any] | None = None, signature: bytes | None = SIGNATURE,
) -> StoredEntry:
    """A ledger entry recording ``action`` at ``seq``, as the writer stores it."""
    fields = {**action, "v": 1, "seq": seq, "recorded_at_ms": recorded_at_ms}
    if peer is not None:
        fields["peer"] = peer
    entry = canonical_bytes(fields)
    leaf = leaf_hash(entry)
    return StoredEntry(seq, entry, leaf, chain_hash(CHAIN_ROOT, leaf), KEY_ID, signature)


def call(**fields: Any) -> dict[str, Any]:
    return {"action_id": "a-1", "action_type": "CapabilityCall", **fields}


FULL_CALL = call(
    parent_action_id="a-0", session_id="s-1", plan_id="p-1", intent_id="i-1", step_id="st-1",
    function_name="web.search", arguments=["ccos", {"lang": "en"}], result={"success": False},
    error="boom", cost=0.5, duration_ms=12, timestamp_ms=1_700_000_000_123,
    metadata={"provider": "OpenAI", "attestation_hash": "att-1"}, provenance={"source": "agent-7"},
)


# --- id and content hash


def test_the_id_is_the_action_id_and_the_sha256_of_the_action_content() -> None:
    wm = derive_wm_entry(stored(FULL_CALL, seq=7, peer={"uid": 1, "gid": 2, "pid": 3}))
    # The content is the action as validated: the bytes duplicate detection compares.
    expected = hashlib.sha256(validate_action(FULL_CALL).content()).hexdigest()
    assert wm.meta["content_hash"] == expected
    assert wm.id == f"wm:a-1:{expected}"


def test_the_same_action_content_gives_the_same_id_wherever_it_was_recorded() -> None:
    first = derive_wm_entry(stored(FULL_CALL, seq=3))
    again = derive_wm_entry(stored(FULL_CALL, seq=90, recorded_at_ms=RECORDED_AT_MS + 5_000,
                                   peer={"uid": 1000, "gid": 1000, "pid": 42}, signature=None))
    assert again.id == first.id
    assert again.meta["content_hash"] == first.meta["content_hash"]
    assert (first.meta["seq"], again.meta["seq"]) == (3, 90)


@pytest.mark.parametrize(
    ("peer", "metadata"),
    [
        ({"uid": 1, "gid": 2, "pid": 3}, {"v": 1, "seq": 0, "x": {"recorded_at_ms": RECORDED_AT_MS}}),
        ({"uid": -1, "gid": 2, "pid": 3}, {"a": 0, "v": 1}),  # a peer the cut cannot match: nested v stays
        ({"uid": "root"}, {"peer": {"uid": 1}}),
        ({}, {}),
    ],
)
def test_the_content_hash_ignores_daemon_fields_only_at_the_top_level(
    peer: dict[str, Any], metadata: dict[str, Any]
) -> None:
    action = call(metadata=metadata)
    expected = hashlib.sha256(validate_action(action).content()).hexdigest()
    assert derive_wm_entry(stored(action, seq=1, peer=peer)).meta["content_hash"] == expected


@pytest.mark.parametrize(
    "change",
    [{"cost": 0.6}, {"arguments": ["ccos"]}, {"metadata": {"provider": "OpenAI"}}, {"provenance": {}},
     {"timestamp_ms": 1}, {"error": "Boom"}],
)
def test_any_change_of_the_action_content_changes_the_id(change: dict[str, Any]) -> None:
    assert derive_wm_entry(stored({**FULL_CALL, **change})).id != derive_wm_entry(stored(FULL_CALL)).id


def test_derivation_is_deterministic() -> None:
    entry = stored(FULL_CALL, seq=5)
    assert derive_wm_entry(entry) == derive_wm_entry(entry)
    assert derive_wm_entry(entry).canonical_bytes() == derive_wm_entry(entry).canonical_bytes()


# --- title and content


@pytest.mark.parametrize(
    ("action", "title"),
    [
        (call(function_name="web.search", plan_id="p-1"), "CapabilityCall web.search"),
        ({"action_id": "a", "action_type": "PlanStarted", "plan_id": "p", "intent_id": "i"}, "PlanStarted plan=p"),
        ({"action_id": "a", "action_type": "IntentCreated", "intent_id": "i-1"}, "IntentCreated intent=i-1"),
        ({"action_id": "a", "action_type": "BudgetExhausted"}, "BudgetExhausted"),
    ],
)
def test_the_title_names_the_action_type_and_its_capability_or_plan_or_intent(
    action: dict[str, Any], title: str
) -> None:
    assert derive_wm_entry(stored(action)).title == title


def test_the_content_is_a_compact_summary_of_the_action() -> None:
    assert derive_wm_entry(stored(FULL_CALL)).content == (
        "type=CapabilityCall; plan=p-1; intent=i-1; ts=1700000000123; fn=web.search; args=2; "
        "cost=0.5; dur_ms=12; outcome=failure; error=boom"
    )


def test_the_content_leaves_out_what_the_action_does_not_have() -> None:
    action = {"action_id": "a", "action_type": "PlanStarted"}
    assert derive_wm_entry(stored(action)).content == f"type=PlanStarted; ts={RECORDED_AT_MS}"


@pytest.mark.parametrize(
    ("fields", "part"),
    [
        ({"success": True}, "outcome=success"),
        ({"success": True, "result": {"success": False}}, "outcome=failure"),
        ({"result": {"value": 1}}, None),
    ],
)
def test_the_outcome_comes_from_result_success_then_success(fields: dict[str, Any], part: str | None) -> None:
    content = derive_wm_entry(stored(call(**fields))).content
    if part is None:
        assert "outcome=" not in content
    else:
        assert content.endswith(part)


def test_a_long_error_is_collapsed_and_cut() -> None:
    content = derive_wm_entry(stored(call(error="line one\n\tline two " + "x" * 500))).content
    error = content.split("error=", 1)[1]
    assert error.startswith("line one line two x")
    assert len(error) == MAX_ERROR_CHARS
    assert error.endswith("…")


# --- time and tokens


def test_the_timestamp_is_the_client_timestamp_in_seconds() -> None:
    assert derive_wm_entry(stored(call(timestamp_ms=1_700_000_000_123))).timestamp_s == 1_700_000_000.123


def test_without_a_client_timestamp_the_recording_time_is_used() -> None:
    assert derive_wm_entry(stored(call(), recorded_at_ms=1_700_000_000_500)).timestamp_s == 1_700_000_000.5


def test_approx_tokens_is_a_quarter_of_the_content_length_at_least_one() -> None:
    wm = derive_wm_entry(stored(FULL_CALL))
    assert wm.approx_tokens == len(wm.content) // 4
    assert [approx_tokens(text) for text in ("", "abc", "abcd", "a" * 41)] == [1, 1, 1, 10]


# --- tags


def test_tags_are_the_ccos_tags_the_action_kind_and_the_provider_in_lower_case() -> None:
    wm = derive_wm_entry(stored(FULL_CALL))
    assert wm.tags == ("causal-chain", "distillation", "wisdom", "capabilitycall", "openai")
    assert wm.tags[:3] == BASE_TAGS


def test_the_provider_comes_from_metadata_then_provenance() -> None:
    from_provenance = derive_wm_entry(stored(call(provenance={"provider": "Local"})))
    both = derive_wm_entry(stored(call(metadata={"provider": "A"}, provenance={"provider": "B"})))
    assert from_provenance.tags[-1] == "local"
    assert from_provenance.meta["provider"] == "Local"
    assert both.tags[-1] == "a"
    assert both.meta["provider"] == "A"


def test_without_a_provider_there_is_no_provider_tag() -> None:
    wm = derive_wm_entry(stored(call(metadata={"provider": 7}, provenance={"provider": ""})))
    assert wm.tags == (*BASE_TAGS, "capabilitycall")
    assert "provider" not in wm.meta


def test_tags_do_not_repeat() -> None:
    assert derive_wm_entry(stored(call(metadata={"provider": "Wisdom"}))).tags == (*BASE_TAGS, "capabilitycall")


# --- meta


def test_meta_carries_provenance_and_where_the_entry_sits_in_the_ledger() -> None:
    wm = derive_wm_entry(stored(FULL_CALL, seq=41))
    assert dict(wm.meta) == {
        "action_id": "a-1",
        "action_type": "CapabilityCall",
        "content_hash": wm.id.rsplit(":", 1)[1],
        "seq": 41,
        "key_id": "0a1b2c3d",
        "signature": base64.b64encode(SIGNATURE).decode("ascii"),
        "parent_action_id": "a-0",
        "plan_id": "p-1",
        "intent_id": "i-1",
        "step_id": "st-1",
        "session_id": "s-1",
        "provider": "OpenAI",
        "attestation_hash": "att-1",
        "provenance": {"source": "agent-7"},
    }
    assert base64.b64decode(wm.meta["signature"]) == SIGNATURE
    assert (wm.seq, wm.plan_id, wm.intent_id, wm.session_id) == (41, "p-1", "i-1", "s-1")


def test_meta_leaves_out_absent_fields_and_the_signature_of_an_unsigned_entry() -> None:
    wm = derive_wm_entry(stored({"action_id": "a", "action_type": "PlanStarted"}, seq=2, signature=None))
    assert set(wm.meta) == {"action_id", "action_type", "content_hash", "seq", "key_id"}
    assert (wm.plan_id, wm.intent_id, wm.session_id) == (None, None, None)


@pytest.mark.parametrize(
    ("fields", "attestation"),
    [
        ({"metadata": {"attestation_hash": "m", "signature": "s"}, "provenance": {"attestation_hash": "p"}}, "m"),
        ({"metadata": {"signature": "s"}, "provenance": {"attestation_hash": "p"}}, "p"),
        ({"metadata": {"signature": "s"}}, "s"),  # where CCOS's sink looked
    ],
)
def test_the_attestation_hash_comes_from_metadata_then_provenance_then_the_ccos_signature(
    fields: dict[str, Any], attestation: str
) -> None:
    assert derive_wm_entry(stored(call(**fields))).meta["attestation_hash"] == attestation


# --- the entry value


def test_an_entry_is_immutable() -> None:
    wm = derive_wm_entry(stored(FULL_CALL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        wm.title = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        wm.meta["seq"] = 9  # type: ignore[index]


def test_the_record_is_the_entry_as_canonical_json() -> None:
    wm = derive_wm_entry(stored(FULL_CALL))
    record = wm.to_record()
    assert set(record) == {"id", "title", "content", "tags", "timestamp_s", "approx_tokens", "meta"}
    assert wm.canonical_bytes() == canonical_bytes(record)
    assert json.loads(wm.canonical_bytes()) == record


@pytest.mark.parametrize(
    ("tags", "meta"),
    [
        (("Wisdom",), {"seq": 1}),
        (("",), {"seq": 1}),
        (("a", "a"), {"seq": 1}),
        (("a",), {}),
        (("a",), {"seq": True}),
        (("a",), {"seq": 1, 2: "x"}),
        (("a",), {"seq": 1, "provenance": {"deep": [{3: "x"}]}}),
    ],
)
def test_an_entry_rejects_tags_not_in_lower_case_or_repeated_and_meta_without_seq_or_string_keys(
    tags: tuple[str, ...], meta: dict[Any, Any]
) -> None:
    with pytest.raises(ValueError, match="Working Memory"):
        WmEntry("wm:a:h", "t", "c", tags, 1.0, 1, meta)


@pytest.mark.parametrize(
    ("timestamp_s", "approx_tokens"), [(float("nan"), 1), (float("inf"), 1), (1.0, -1), (1.0, True)]
)
def test_an_entry_rejects_an_unusable_time_or_token_count(timestamp_s: float, approx_tokens: int) -> None:
    with pytest.raises(ValueError, match="Working Memory"):
        WmEntry("wm:a:h", "t", "c", ("a",), timestamp_s, approx_tokens, {"seq": 1})


# --- entries that cannot be derived


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"action_id":"a","seq":3}', "no action_id or action_type"),
        (b'{"action_id":"a","action_type":"PlanStarted","seq":3}', "neither timestamp_ms nor recorded_at_ms"),
    ],
)
def test_a_malformed_entry_raises_naming_its_seq(entry: bytes, problem: str) -> None:
    with pytest.raises(WmDerivationError, match=problem) as caught:
        derive_wm_entry(StoredEntry(3, entry, leaf_hash(entry), CHAIN_ROOT, KEY_ID, None))
    assert caught.value.seq == 3
    assert str(caught.value).startswith("seq 3: ")


# --- properties over any valid action

_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
_json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_actions = st.fixed_dictionaries(
    {"action_id": _ids, "action_type": st.sampled_from(sorted(ACTION_TYPES))},
    optional={
        "plan_id": _ids, "intent_id": _ids, "session_id": _ids, "step_id": _ids, "function_name": _ids,
        "arguments": st.lists(_json, max_size=3), "cost": st.floats(0, 1e6), "duration_ms": st.integers(0, 10**6),
        "timestamp_ms": st.integers(0, 2**63 - 1), "success": st.booleans(), "error": st.text(max_size=300),
        # Nested members named like the daemon's fields must stay in the content.
        "metadata": st.dictionaries(st.sampled_from(["provider", "seq", "v", "peer", "x"]), _json, max_size=4),
        "provenance": st.dictionaries(st.sampled_from(["provider", "recorded_at_ms", "y"]), _json, max_size=3),
    },
)


# Peers of shapes the daemon never writes, too: the content hash must not depend on them.
_peers = st.none() | st.fixed_dictionaries({"uid": st.integers(0, 2**32), "gid": st.integers(0, 9),
                                            "pid": st.integers(0, 2**22)}) | st.dictionaries(
    st.sampled_from(["uid", "gid", "pid", "Pid"]), st.integers(-3, 3) | st.booleans() | st.text(max_size=2))


@given(action=_actions, seq=st.integers(0, 2**40), other_seq=st.integers(0, 2**40),
       recorded_at_ms=st.integers(0, 2**50), peer=_peers)
def test_any_action_derives_deterministically_with_an_id_independent_of_where_it_was_recorded(
    action: dict[str, Any], seq: int, other_seq: int, recorded_at_ms: int, peer: dict[str, Any] | None
) -> None:
    validated = validate_action(action)
    wm = derive_wm_entry(stored(validated.fields, seq=seq))
    elsewhere = derive_wm_entry(stored(validated.fields, seq=other_seq, recorded_at_ms=recorded_at_ms, peer=peer))
    content_hash = hashlib.sha256(validated.content()).hexdigest()
    assert wm.id == elsewhere.id == f"wm:{validated.action_id}:{content_hash}"
    assert re.fullmatch(r"[0-9a-f]{64}", wm.meta["content_hash"])
    assert wm.approx_tokens == max(1, len(wm.content) // 4)
    assert all(tag == tag.lower() for tag in wm.tags)
    assert len(set(wm.tags)) == len(wm.tags)
    assert wm.meta["seq"] == seq
    assert derive_wm_entry(stored(validated.fields, seq=seq)) == wm


# --- the records an ingest call carries (derive_wm_entries)


def ingest_call(records: list[Any], mode: str = "batch") -> dict[str, Any]:
    return call(function_name=CAPABILITY, arguments=[mode, records], duration_ms=1.5, success=True)


def test_an_ordinary_entry_derives_only_its_own_wm_entry() -> None:
    entry = stored(FULL_CALL, seq=4)
    assert derive_wm_entries(entry) == [derive_wm_entry(entry)]


def test_an_ingest_call_derives_its_own_entry_then_one_per_record_in_order() -> None:
    records = [{"action_id": "r-1", "summary": "one"}, {"action_id": "r-2", "content": "two"}]
    entry = stored(ingest_call(records), seq=5)
    derived = derive_wm_entries(entry)
    assert derived[0] == derive_wm_entry(entry)
    assert [wm.meta["action_id"] for wm in derived[1:]] == ["r-1", "r-2"]


def test_a_record_entry_follows_the_record() -> None:
    record = {
        "action_id": "r-1", "kind": "Insight", "provider": "Acme", "summary": "cheaper provider found",
        "content": "Acme is 20% cheaper", "plan_id": "p-1", "intent_id": "i-1", "step_id": "st-1",
        "attestation_hash": "att-1", "timestamp_s": 1_700_000_000.5,
    }
    wm = derive_wm_entries(stored(ingest_call([record]), seq=9))[1]
    content_hash = hashlib.sha256(canonical_bytes(record)).hexdigest()
    assert wm.id == f"wm:r-1:{content_hash}"
    assert wm.title == "cheaper provider found"
    assert wm.content == "Acme is 20% cheaper"
    assert wm.tags == (*BASE_TAGS, "insight", "acme")
    assert wm.timestamp_s == 1_700_000_000.5
    assert wm.approx_tokens == approx_tokens("Acme is 20% cheaper")
    assert dict(wm.meta) == {
        "action_id": "r-1", "content_hash": content_hash, "seq": 9, "key_id": str(KEY_ID),
        "ingested_by": CAPABILITY, "signature": base64.b64encode(SIGNATURE).decode("ascii"),
        "plan_id": "p-1", "intent_id": "i-1", "step_id": "st-1", "provider": "Acme", "attestation_hash": "att-1",
    }


def test_a_record_names_its_own_content_hash_and_falls_back_from_content_to_summary_to_kind() -> None:
    records = [
        {"action_id": "r-1", "summary": "only a summary", "content_hash": "given"},
        {"action_id": "r-2", "kind": "Note"},
        {"action_id": "r-3"},
    ]
    summary_only, kind_only, bare = derive_wm_entries(stored(ingest_call(records), signature=None))[1:]
    assert summary_only.id == "wm:r-1:given"
    assert (summary_only.title, summary_only.content) == ("only a summary", "only a summary")
    assert (kind_only.title, kind_only.content) == ("Note", "Note")
    assert (bare.title, bare.content, bare.tags[-1]) == ("CapabilityCall", "CapabilityCall", "capabilitycall")
    assert bare.timestamp_s == 0.0
    assert "signature" not in bare.meta


def test_a_provider_named_like_the_kind_is_one_tag() -> None:
    wm = derive_wm_entries(stored(ingest_call([{"action_id": "r-1", "kind": "Acme", "provider": "ACME"}])))[1]
    assert wm.tags == (*BASE_TAGS, "acme")


@pytest.mark.parametrize(
    "action",
    [
        ingest_call([{"action_id": "r-1"}], mode="single") | {"action_type": "CapabilityResult"},
        call(function_name="other.tool", arguments=["batch", [{"action_id": "r-1"}]]),
        call(function_name="web.search", arguments=[CAPABILITY, [{"action_id": "r-1"}]]),
        call(function_name=CAPABILITY, arguments=["replay"]),
        call(function_name=CAPABILITY, arguments=["batch", {"action_id": "r-1"}]),
        call(function_name=CAPABILITY, arguments=["batch", [{"action_id": "r-1"}], "extra"]),
        call(function_name=CAPABILITY),
    ],
)
def test_only_an_ingest_call_with_a_record_list_derives_records(action: dict[str, Any]) -> None:
    assert len(derive_wm_entries(stored(action))) == 1


def test_records_without_a_string_action_id_are_skipped() -> None:
    records = [{"action_id": 7}, "r-2", None, {"summary": "no id"}, {"action_id": "r-5"}]
    derived = derive_wm_entries(stored(ingest_call(records)))
    assert [wm.meta["action_id"] for wm in derived[1:]] == ["r-5"]
