"""The Working Memory store (ccos_obsd.wm.store): idempotent ingest, search, budgets, digest.

Entries are derived from ledger entries built as the writer builds them, so the
store sees what the sink runner will hand it.
"""

from __future__ import annotations

import pickle
import random
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccos_obsd.errors import InvalidRequest, WmQueryError, WmReadOnlyError
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import CHAIN_ROOT, chain_hash, leaf_hash
from ccos_obsd.ledger.keys import KeyId
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.wm import store as wm_store
from ccos_obsd.wm.derive import WmEntry, derive_wm_entry
from ccos_obsd.wm.store import (
    MAX_QUERY_TAGS,
    MAX_QUERY_WORDS,
    MAX_SEARCH_LIMIT,
    Budgets,
    WmStore,
    fts_match_expression,
)

BASE_MS = 1_700_000_000_000
"""Entry ``seq`` is stamped ``BASE_MS + seq * 1000`` unless a test says otherwise."""


def stored(action: dict[str, Any], seq: int, signature: bytes | None = b"\x01" * 64) -> StoredEntry:
    entry = canonical_bytes({**action, "v": 1, "seq": seq, "recorded_at_ms": BASE_MS + seq})
    leaf = leaf_hash(entry)
    return StoredEntry(seq, entry, leaf, chain_hash(CHAIN_ROOT, leaf), KeyId("0a1b2c3d"), signature)


def wm(seq: int, *, ts_ms: int | None = None, action_type: str = "CapabilityCall", **fields: Any) -> WmEntry:
    """The WM entry of an action recorded at ``seq`` (stamped at second ``seq`` unless ``ts_ms``)."""
    action = {
        "action_id": f"a-{seq}", "action_type": action_type,
        "timestamp_ms": BASE_MS + seq * 1000 if ts_ms is None else ts_ms, **fields,
    }
    return derive_wm_entry(stored(action, seq))


def seconds(seq: int) -> float:
    return (BASE_MS + seq * 1000) / 1000


def seqs(results: Sequence[dict[str, Any]]) -> list[int]:
    return [record["meta"]["seq"] for record in results]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[WmStore]:
    with WmStore(tmp_path / "wm.db") as opened:
        yield opened


def filled(store: WmStore, entries: Sequence[WmEntry]) -> WmStore:
    store.ingest(entries)
    return store


# --- ingest


def test_ingest_returns_how_many_entries_were_new(store: WmStore) -> None:
    assert store.ingest([wm(0), wm(1)]) == 2
    assert store.ingest([wm(1), wm(2), wm(3)]) == 2
    assert store.count() == 4


def test_delivering_entries_again_leaves_one_copy_of_each(store: WmStore) -> None:
    entries = [wm(seq, function_name="web.search") for seq in range(5)]
    store.ingest(entries)
    digest = store.digest()
    assert store.ingest(entries) == 0
    assert store.ingest(entries[2:]) == 0
    assert store.count() == 5
    assert store.digest() == digest
    assert seqs(store.search(text="web.search")) == [4, 3, 2, 1, 0]


def test_a_batch_holding_an_entry_twice_stores_it_once(store: WmStore) -> None:
    assert store.ingest([wm(0), wm(0), wm(1)]) == 2
    assert store.count() == 2


def test_an_empty_batch_changes_nothing(store: WmStore) -> None:
    digest = store.digest()
    assert store.ingest([]) == 0
    assert (store.count(), store.digest()) == (0, digest)


def test_ids_are_compared_in_full_even_when_their_index_keys_collide(
    store: WmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wm_store, "_id_key", lambda entry_id: 7)
    assert store.ingest([wm(0), wm(1)]) == 2
    assert store.ingest([wm(1), wm(2)]) == 1
    assert seqs(store.search()) == [2, 1, 0]


def test_the_first_delivery_of_an_id_wins(store: WmStore) -> None:
    action = {"action_id": "a-1", "action_type": "PlanStarted", "timestamp_ms": BASE_MS}
    first, second = derive_wm_entry(stored(action, 3)), derive_wm_entry(stored(action, 9))
    assert first.id == second.id
    assert store.ingest([first]) == 1
    assert store.ingest([second]) == 0
    assert seqs(store.search()) == [3]


def test_search_returns_each_entry_as_its_record(store: WmStore) -> None:
    entry = wm(0, function_name="web.search", metadata={"provider": "openai"}, provenance={"run": [1, 2.5]})
    store.ingest([entry])
    assert store.search() == [entry.to_record()]


def test_entries_survive_closing_and_reopening(tmp_path: Path) -> None:
    with WmStore(tmp_path / "wm.db") as first:
        first.ingest([wm(seq) for seq in range(3)])
        digest = first.digest()
    with WmStore(tmp_path / "wm.db") as again:
        assert (again.count(), again.digest(), seqs(again.search())) == (3, digest, [2, 1, 0])


def test_entries_can_go_to_a_process_pool_and_back() -> None:
    entry = wm(0, provenance={"a": {"b": [1]}})
    assert pickle.loads(pickle.dumps(entry)) == entry  # noqa: S301 -- our own bytes


# --- order


def test_search_gives_the_newest_first_up_to_the_limit(store: WmStore) -> None:
    # Arrival order is not time order: the client clocks decide.
    store.ingest([wm(seq) for seq in (3, 0, 4, 1, 2)])
    assert seqs(store.search()) == [4, 3, 2, 1, 0]
    assert seqs(store.search(limit=2)) == [4, 3]


def test_entries_stamped_alike_come_by_seq_newest_first(store: WmStore) -> None:
    store.ingest([wm(seq, ts_ms=BASE_MS) for seq in (1, 3, 2)])
    assert seqs(store.search()) == [3, 2, 1]
    assert seqs(store.search(text="capabilitycall")) == [3, 2, 1]
    assert seqs(store.search(tags=["capabilitycall"])) == [3, 2, 1]


_KINDS = ("CapabilityCall", "CapabilityResult", "PlanStepStarted")
_PROVIDERS = (None, "openai", "anthropic")
_spec = st.tuples(
    st.integers(0, 40),  # timestamp, seconds after BASE_MS: repeats and any arrival order
    st.sampled_from(_KINDS), st.sampled_from(_PROVIDERS), st.sampled_from(("p1", "p2")),
)


_QUERIES: tuple[dict[str, Any], ...] = (
    {}, {"text": "capabilitycall"}, {"text": "fetch"}, {"text": "fetch capabilityresult"},
    {"tags": ["openai"]}, {"tags": ["openai", "anthropic"]}, {"tags": ["planstepstarted", "openai"]},
    {"tags": ["wisdom", "anthropic"]}, {"plan_id": "p1"}, {"plan_id": "p1", "text": "fetch"},
    {"plan_id": "p1", "tags": ["openai", "planstepstarted"]}, {"text": "capabilitycall", "tags": ["openai"]},
    {"since": 10}, {"until": 20}, {"since": 5, "until": 30, "text": "fetch"}, {"since": 25, "text": "capabilitycall"},
    {"since": 10, "tags": ["openai", "anthropic"]}, {"until": 15, "tags": ["wisdom"]},
    {"since": 12, "plan_id": "p2", "text": "db"}, {"until": 20.5, "text": "capabilitycall"},
    {"since": 10.5, "until": 19.5, "text": "fetch"}, {"until": 0.5, "text": "capabilitycall"},
)


def _expected(records: list[dict[str, Any]], query: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """What a search must answer, by brute force: filter everything, sort, cut."""
    def matches(record: dict[str, Any]) -> bool:
        words = set(re.findall(r"\w+", f"{record['title']} {record['content']} {' '.join(record['tags'])}".lower()))
        return (
            all(word in words for word in query.get("text", "").split())
            and ("tags" not in query or bool(set(query["tags"]) & set(record["tags"])))
            and ("since" not in query or record["timestamp_s"] >= query["since"])
            and ("until" not in query or record["timestamp_s"] < query["until"])
            and ("plan_id" not in query or record["meta"].get("plan_id") == query["plan_id"])
        )
    newest_first = sorted(records, key=lambda record: (record["timestamp_s"], record["meta"]["seq"]), reverse=True)
    return [record for record in newest_first if matches(record)][:limit]


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(_spec, min_size=1, max_size=30),
    arrival=st.randoms(use_true_random=False),
    batch=st.integers(1, 7),
    limit=st.integers(1, 8),
)
def test_every_search_gives_what_a_full_sort_of_the_matches_gives(
    specs: list[tuple[int, str, str | None, str]], arrival: random.Random, batch: int, limit: int
) -> None:
    entries = []
    for seq, (offset, kind, provider, plan) in enumerate(specs):
        fields: dict[str, Any] = {"plan_id": plan}
        if kind != "PlanStepStarted":
            fields["function_name"] = "net.fetch" if seq % 2 else "db.query"
        if provider is not None:
            fields["metadata"] = {"provider": provider}
        entries.append(wm(seq, ts_ms=BASE_MS + offset * 1000, action_type=kind, **fields))
    records = [entry.to_record() for entry in entries]
    arrival.shuffle(entries)
    with WmStore(":memory:") as store:
        for at in range(0, len(entries), batch):
            store.ingest(entries[at:at + batch])
        for query in _QUERIES:
            # Window bounds are seconds after BASE_MS.
            absolute = {key: BASE_MS / 1000 + value if key in ("since", "until") else value
                        for key, value in query.items()}
            assert store.search(**absolute, limit=limit) == _expected(records, absolute, limit), query


def test_a_text_search_finds_newer_entries_that_arrived_earlier(store: WmStore) -> None:
    # The text walk goes by arrival (doc) order; an older entry arriving later
    # must not hide a newer one that arrived before it.
    for seq, second in ((0, 10), (1, 1), (2, 5)):
        store.ingest([wm(seq, ts_ms=BASE_MS + second * 1000)])
    assert seqs(store.search(text="capabilitycall", limit=1)) == [0]
    assert seqs(store.search(text="capabilitycall", limit=2)) == [0, 2]
    assert seqs(store.search(text="capabilitycall", since=seconds(0) + 4)) == [0, 2]


def test_a_text_search_finds_a_late_arrival_before_until(store: WmStore) -> None:
    store.ingest([wm(seq) for seq in range(1, 50)])
    store.ingest([wm(0)])  # stamped long before the entries already stored
    assert seqs(store.search(text="capabilitycall", until=seconds(1))) == [0]
    assert seqs(store.search(text="capabilitycall", until=seconds(2))) == [1, 0]


def test_a_text_search_from_any_since_finds_every_entry_from_then(store: WmStore) -> None:
    order = list(range(60))
    random.Random(5).shuffle(order)  # noqa: S311 -- a fixed arrival order, not a secret
    for at in range(0, 60, 7):
        store.ingest([wm(seq) for seq in order[at:at + 7]])
    store.ingest([], Budgets(max_entries=50))  # gaps in the doc numbers
    for first in range(-1, 62):
        expected = list(range(59, max(first, 10) - 1, -1))
        assert seqs(store.search(text="capabilitycall", since=seconds(first), limit=100)) == expected, first


# --- text


def test_text_matches_words_of_the_title_content_and_tags(store: WmStore) -> None:
    filled(store, [
        wm(0, function_name="web.search"),
        wm(1, action_type="PlanStarted", plan_id="plan-7"),
        wm(2, function_name="db.query", metadata={"provider": "anthropic"}),
    ])
    assert seqs(store.search(text="search")) == [0]
    assert seqs(store.search(text="plan-7")) == [1]
    assert seqs(store.search(text="anthropic")) == [2]
    assert seqs(store.search(text="capabilitycall")) == [2, 0]


def test_every_word_must_match_and_a_dotted_word_is_a_phrase(store: WmStore) -> None:
    filled(store, [
        wm(0, function_name="web.search"),
        wm(1, function_name="web.fetch", plan_id="search-1"),
    ])
    assert seqs(store.search(text="web search")) == [1, 0]
    assert seqs(store.search(text="web.search")) == [0]
    assert seqs(store.search(text="web fetch search")) == [1]


def test_text_ignores_case_and_diacritics(store: WmStore) -> None:
    filled(store, [wm(0, function_name="Café.Crème"), wm(1, function_name="日本語.検索")])
    assert seqs(store.search(text="CAFE")) == [0]
    assert seqs(store.search(text="creme")) == [0]
    assert seqs(store.search(text="café.crème")) == [0]
    assert seqs(store.search(text="日本語")) == [1]


@pytest.mark.parametrize(
    "text",
    ['he said "web"', 'web"', "web AND", "web OR search", "NOT web", "web NEAR(web search)", "title:web",
     "web*", "^web", "(web", "web)", "-web", "+web", "{web}", "[web]", "web\x00", "web\\", "web'", "web;--",
     "🚀 web", "web\u200b", "web\ttab\nnew line"],
)
def test_fts_syntax_in_user_text_is_only_ever_words(store: WmStore, text: str) -> None:
    filled(store, [wm(0, function_name="web.search", error="web said and tab new line or near not title")])
    store.search(text=text)  # never an FTS5 syntax error
    assert seqs(store.search(text="web " + text)) in ([0], [])


def test_an_operator_word_is_searched_as_a_word(store: WmStore) -> None:
    filled(store, [wm(0, error="this and that"), wm(1, error="this or that")])
    assert seqs(store.search(text="AND")) == [0]
    assert seqs(store.search(text="OR")) == [1]
    assert seqs(store.search(text='"this" NOT')) == []


def test_the_match_expression_quotes_every_word() -> None:
    assert fts_match_expression('say "hi" web.search') == '"say" """hi""" "web.search"'
    assert fts_match_expression(" a\x00b  ... c ") == '"a" "b" "c"'


@pytest.mark.parametrize("text", ["", "   ", "...", '""', "- * ( )", "\u0301", "🚀"])
def test_text_without_a_word_is_a_query_error(store: WmStore, text: str) -> None:
    with pytest.raises(WmQueryError, match="no word") as caught:
        store.search(text=text)
    assert caught.value.field == "text"
    assert isinstance(caught.value, InvalidRequest)  # answered as invalid_request on the wire


@pytest.mark.parametrize("text", ["bad \ud800 surrogate", 42, b"bytes", " ".join(["w"] * (MAX_QUERY_WORDS + 1))])
def test_unusable_text_is_a_query_error(store: WmStore, text: Any) -> None:
    with pytest.raises(WmQueryError) as caught:
        store.search(text=text)
    assert caught.value.field == "text"


# --- tags


def _providers(store: WmStore) -> WmStore:
    return filled(store, [
        wm(0, metadata={"provider": "openai"}),
        wm(1, metadata={"provider": "anthropic"}),
        wm(2, metadata={"provider": "local"}),
        wm(3, metadata={"provider": "openai"}, action_type="CapabilityResult"),
        wm(4),
    ])


def test_tags_match_entries_carrying_any_of_them(store: WmStore) -> None:
    _providers(store)
    assert seqs(store.search(tags=["openai"])) == [3, 0]
    assert seqs(store.search(tags=["openai", "anthropic"])) == [3, 1, 0]
    assert seqs(store.search(tags=["anthropic", "capabilityresult"])) == [3, 1]
    assert seqs(store.search(tags=["nobody"])) == []


def test_an_entry_carrying_several_of_the_tags_is_found_once(store: WmStore) -> None:
    _providers(store)
    assert seqs(store.search(tags=["openai", "capabilityresult", "wisdom"])) == [4, 3, 2, 1, 0]
    assert seqs(store.search(tags=["openai", "capabilityresult"])) == [3, 0]


def test_the_tags_every_entry_carries_match_every_entry(store: WmStore) -> None:
    _providers(store)
    assert seqs(store.search(tags=["wisdom"])) == [4, 3, 2, 1, 0]
    assert seqs(store.search(tags=["causal-chain", "openai"], limit=3)) == [4, 3, 2]


def test_tag_filters_ignore_case(store: WmStore) -> None:
    _providers(store)
    assert seqs(store.search(tags=["OpenAI", "WISDOM"], limit=1)) == [4]
    assert seqs(store.search(tags=["OpenAI"])) == [3, 0]


def test_tags_combine_with_text_window_and_plan(store: WmStore) -> None:
    filled(store, [
        wm(0, metadata={"provider": "openai"}, plan_id="p1", function_name="web.search"),
        wm(1, metadata={"provider": "openai"}, plan_id="p2", function_name="web.search"),
        wm(2, metadata={"provider": "local"}, plan_id="p1", function_name="web.search"),
        wm(3, metadata={"provider": "openai"}, plan_id="p1", function_name="db.query"),
    ])
    assert seqs(store.search(tags=["openai"], text="search")) == [1, 0]
    assert seqs(store.search(tags=["openai"], plan_id="p1")) == [3, 0]
    assert seqs(store.search(tags=["openai", "wisdom"], plan_id="p1", text="search")) == [2, 0]
    assert seqs(store.search(tags=["openai"], since=seconds(1), until=seconds(3))) == [1]


@pytest.mark.parametrize(
    "tags",
    ["openai", b"openai", [], [""], [1], ["ok", None], 7, ["\ud800"], [f"t{n}" for n in range(MAX_QUERY_TAGS + 1)]],
)
def test_unusable_tags_are_a_query_error(store: WmStore, tags: Any) -> None:
    with pytest.raises(WmQueryError) as caught:
        store.search(tags=tags)
    assert caught.value.field == "tags"


# --- time window, plan, intent, session, limit


def test_the_time_window_includes_since_and_excludes_until(store: WmStore) -> None:
    filled(store, [wm(seq) for seq in range(6)])
    assert seqs(store.search(since=seconds(2), until=seconds(4))) == [3, 2]
    assert seqs(store.search(since=seconds(4))) == [5, 4]
    assert seqs(store.search(until=seconds(1))) == [0]
    assert seqs(store.search(since=seconds(9))) == []
    assert seqs(store.search(text="capabilitycall", since=seconds(2), until=seconds(4))) == [3, 2]
    assert seqs(store.search(text="capabilitycall", since=seconds(9))) == []
    assert seqs(store.search(text="capabilitycall", until=seconds(4) + 0.5)) == [4, 3, 2, 1, 0]
    assert seqs(store.search(text="capabilitycall", until=seconds(0))) == []
    assert seqs(store.search(tags=["capabilitycall"], since=seconds(2), until=seconds(4))) == [3, 2]


def test_plan_intent_and_session_filters_each_narrow_the_answer(store: WmStore) -> None:
    filled(store, [
        wm(0, plan_id="p1", intent_id="i1", session_id="s1"),
        wm(1, plan_id="p2", intent_id="i1", session_id="s1"),
        wm(2, plan_id="p1", intent_id="i2", session_id="s1"),
        wm(3, plan_id="p1", intent_id="i1", session_id="s2", function_name="web.search"),
        wm(4),
    ])
    assert seqs(store.search(plan_id="p1")) == [3, 2, 0]
    assert seqs(store.search(intent_id="i1")) == [3, 1, 0]
    assert seqs(store.search(session_id="s1")) == [2, 1, 0]
    assert seqs(store.search(plan_id="p1", intent_id="i1", session_id="s1")) == [0]
    assert seqs(store.search(plan_id="p1", text="search")) == [3]
    assert seqs(store.search(plan_id="p1", text="capabilitycall", until=seconds(3))) == [2, 0]
    assert seqs(store.search(plan_id="nowhere", text="capabilitycall")) == []


def test_a_plan_spread_over_the_whole_store_is_found_by_text(store: WmStore) -> None:
    filled(store, [wm(seq, plan_id="long" if seq in (0, 57, 99) else f"p{seq}") for seq in range(100)])
    assert seqs(store.search(plan_id="long", text="capabilitycall")) == [99, 57, 0]
    assert seqs(store.search(plan_id="long", text="capabilitycall", limit=1)) == [99]


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"since": "yesterday"}, "since"), ({"since": True}, "since"), ({"until": float("nan")}, "until"),
        ({"until": float("inf")}, "until"), ({"since": 10**400}, "since"),
        ({"plan_id": 7}, "plan_id"), ({"intent_id": ["i"]}, "intent_id"), ({"session_id": "\udfff"}, "session_id"),
        ({"limit": 0}, "limit"), ({"limit": -1}, "limit"), ({"limit": MAX_SEARCH_LIMIT + 1}, "limit"),
        ({"limit": True}, "limit"), ({"limit": 2.0}, "limit"),
    ],
)
def test_unusable_filters_are_query_errors_naming_the_field(
    store: WmStore, arguments: dict[str, Any], field: str
) -> None:
    with pytest.raises(WmQueryError) as caught:
        store.search(**arguments)
    assert caught.value.field == field


def test_the_largest_limit_is_allowed(store: WmStore) -> None:
    filled(store, [wm(seq) for seq in range(3)])
    assert len(store.search(limit=MAX_SEARCH_LIMIT)) == 3


# --- budgets


def test_the_entry_budget_evicts_the_oldest_entries_first(store: WmStore) -> None:
    # The oldest entries arrive last: eviction goes by time, not by arrival.
    store.ingest([wm(seq) for seq in (5, 6, 7, 8, 9)])
    assert store.ingest([wm(seq) for seq in (0, 1, 2, 3, 4)], Budgets(max_entries=4)) == 5
    assert store.count() == 4
    assert seqs(store.search()) == [9, 8, 7, 6]


def test_the_token_budget_evicts_the_oldest_until_the_total_fits(store: WmStore) -> None:
    entries = [wm(seq, function_name="f" * (4 * seq)) for seq in range(6)]
    tokens = [entry.approx_tokens for entry in entries]
    budget = sum(tokens[3:]) + tokens[2] - 1  # the newest three fit; adding the fourth would not
    store.ingest(entries, Budgets(max_tokens=budget))
    assert seqs(store.search()) == [5, 4, 3]
    assert store.total_tokens() == sum(tokens[3:])


def test_both_budgets_hold_after_an_ingest(store: WmStore) -> None:
    store.ingest([wm(seq) for seq in range(10)])
    per_entry = store.total_tokens() // 10
    store.ingest([], Budgets(max_entries=8, max_tokens=per_entry * 3))
    assert store.count() == 3
    store.ingest([], Budgets(max_entries=2, max_tokens=10**9))
    assert seqs(store.search()) == [9, 8]


def test_budgets_that_hold_evict_nothing(store: WmStore) -> None:
    store.ingest([wm(seq) for seq in range(3)])
    digest = store.digest()
    store.ingest([], Budgets())
    store.ingest([], Budgets(max_entries=3, max_tokens=store.total_tokens()))
    assert (store.count(), store.digest()) == (3, digest)


def test_zero_budgets_evict_everything(store: WmStore) -> None:
    assert store.ingest([wm(seq) for seq in range(3)], Budgets(max_tokens=0)) == 3
    assert (store.count(), store.total_tokens(), store.search()) == (0, 0, [])


@pytest.mark.parametrize(
    "budgets", [{"max_entries": -1}, {"max_tokens": -5}, {"max_entries": 1.5}, {"max_tokens": True}]
)
def test_budgets_must_be_non_negative_integers(budgets: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        Budgets(**budgets)


def test_the_settings_budgets_treat_zero_as_no_limit() -> None:
    assert Budgets.from_settings(0, 0) is None
    assert Budgets.from_settings(100, 0) == Budgets(max_entries=100)
    assert Budgets.from_settings(0, 7) == Budgets(max_tokens=7)


def test_evicted_entries_leave_no_trace_in_the_text_and_tag_indexes(store: WmStore) -> None:
    store.ingest([wm(0, function_name="gone.away", metadata={"provider": "old"})])
    store.ingest([wm(seq, function_name="kept.here") for seq in range(1, 4)], Budgets(max_entries=3))
    assert store.search(text="gone") == []
    assert store.search(tags=["old"]) == []
    assert seqs(store.search(text="kept", tags=["capabilitycall", "old"])) == [3, 2, 1]
    # The full-text index itself forgot the entry: words of its title, content and tags.
    for word in ("gone", "old", "capabilitycall"):
        indexed = store._conn.execute("SELECT rowid FROM wm_fts WHERE wm_fts MATCH ?", (f'"{word}"',)).fetchall()
        assert len(indexed) == (3 if word == "capabilitycall" else 0), word
    assert store._conn.execute("SELECT count(*) FROM wm_tags").fetchone()[0] == 3
    store._conn.execute("INSERT INTO wm_fts (wm_fts, rank) VALUES ('integrity-check', 0)")


def test_an_evicted_entry_delivered_again_stays_out(store: WmStore) -> None:
    budgets = Budgets(max_entries=2)
    store.ingest([wm(seq) for seq in range(3)], budgets)
    assert store.ingest([wm(0)], budgets) == 0  # a re-delivery after a crash, say
    assert seqs(store.search()) == [2, 1]


def test_an_entry_older_than_an_evicted_one_is_not_added_even_when_it_fits(store: WmStore) -> None:
    # Entry 1 is big: with it the tokens exceed the budget, and eviction takes it.
    big, small, newest = wm(1, function_name="f" * 400), wm(0), wm(2)
    budgets = Budgets(max_tokens=big.approx_tokens + newest.approx_tokens - 1)
    store.ingest([big, newest], budgets)
    assert seqs(store.search()) == [2]
    # Entry 0 would fit beside entry 2, but one batch of all three keeps only entry 2.
    assert store.ingest([small], budgets) == 0
    with WmStore(":memory:") as at_once:
        at_once.ingest([big, newest, small], budgets)
        assert at_once.digest() == store.digest()


def test_without_budgets_the_eviction_mark_is_not_applied(store: WmStore) -> None:
    store.ingest([wm(seq) for seq in range(3)], Budgets(max_entries=2))
    assert store.ingest([wm(0)]) == 1
    assert seqs(store.search()) == [2, 1, 0]


def test_clear_forgets_the_eviction_mark(store: WmStore) -> None:
    store.ingest([wm(seq) for seq in range(3)], Budgets(max_entries=1))
    store.clear()
    assert store.ingest([wm(0)], Budgets(max_entries=1)) == 1
    assert seqs(store.search()) == [0]


def budgeted_entries(draw: st.DrawFn) -> list[WmEntry]:
    """Entries stamped out of seq order, of uneven sizes, with re-deliveries and shared timestamps."""
    found = draw(st.lists(st.integers(0, 60), min_size=1, max_size=25, unique=True))
    stamps = draw(st.lists(st.integers(0, 20), min_size=len(found), max_size=len(found)))
    sizes = draw(st.lists(st.integers(0, 40), min_size=len(found), max_size=len(found)))
    entries = [wm(seq, ts_ms=BASE_MS + stamp * 1000, function_name="f" * size)
               for seq, stamp, size in zip(sorted(found), stamps, sizes, strict=True)]
    again = draw(st.lists(st.sampled_from(range(len(entries))), max_size=5))
    for at, index in enumerate(again):  # each delivered again later on
        entries.insert(min(len(entries), index + 1 + at * 3), entries[index])
    return entries


@settings(max_examples=150, deadline=None)
@given(
    entries=st.composite(budgeted_entries)(),
    batches=st.lists(st.integers(1, 8), min_size=1, max_size=6),
    max_entries=st.integers(0, 20) | st.none(),
    max_tokens=st.integers(0, 200) | st.none(),
)
def test_what_budgets_keep_does_not_depend_on_the_batches(
    entries: list[WmEntry], batches: list[int], max_entries: int | None, max_tokens: int | None
) -> None:
    budgets = Budgets(max_entries, max_tokens)
    with WmStore(":memory:") as incremental, WmStore(":memory:") as at_once:
        at = 0
        for size in batches * len(entries):
            if at >= len(entries):
                break
            incremental.ingest(entries[at:at + size], budgets)
            at += size
        at_once.ingest(entries, budgets)
        assert incremental.digest() == at_once.digest() == incremental.recompute_digest()
        assert incremental.search(limit=100) == at_once.search(limit=100)
        assert budgets.max_entries is None or incremental.count() <= budgets.max_entries
        assert budgets.max_tokens is None or incremental.total_tokens() <= budgets.max_tokens


# --- digest


def test_a_digest_is_hex_sha256_and_equal_for_empty_stores(tmp_path: Path) -> None:
    with WmStore(tmp_path / "a.db") as first, WmStore(tmp_path / "b.db") as second:
        assert re.fullmatch(r"[0-9a-f]{64}", first.digest())
        assert first.digest() == second.digest() == first.recompute_digest()


@settings(max_examples=40, deadline=None)
@given(
    found=st.lists(st.integers(0, 1000), min_size=1, max_size=30, unique=True),
    order=st.randoms(use_true_random=False),
    batches=st.lists(st.integers(1, 8), min_size=1, max_size=10),
)
def test_the_digest_does_not_depend_on_arrival_order_or_batching(
    found: list[int], order: random.Random, batches: list[int]
) -> None:
    entries = [wm(seq, function_name=f"fn.{seq % 7}") for seq in found]
    shuffled = entries[:]
    order.shuffle(shuffled)
    with WmStore(":memory:") as in_order, WmStore(":memory:") as reordered:
        in_order.ingest(entries)
        at = 0
        while at < len(shuffled):
            size = batches[at % len(batches)]
            reordered.ingest(shuffled[at:at + size] + shuffled[:at][-1:])  # with a re-delivery
            at += size
        assert reordered.digest() == in_order.digest() == in_order.recompute_digest()
        assert reordered.recompute_digest() == reordered.digest()


def test_the_digest_changes_with_the_content(tmp_path: Path) -> None:
    entries = [wm(seq) for seq in range(4)]
    unsigned = derive_wm_entry(stored({"action_id": "a-3", "action_type": "CapabilityCall",
                                       "timestamp_ms": BASE_MS + 3000}, 3, signature=None))
    with WmStore(tmp_path / "a.db") as base, WmStore(tmp_path / "b.db") as other:
        base.ingest(entries)
        other.ingest(entries[:3])
        assert other.digest() != base.digest()  # one entry fewer
        other.ingest([unsigned])
        assert other.count() == base.count()
        assert other.digest() != base.digest()  # same ids, one entry's meta differs


def test_after_eviction_the_digest_is_that_of_the_entries_kept(tmp_path: Path) -> None:
    entries = [wm(seq) for seq in range(6)]
    with WmStore(tmp_path / "a.db") as trimmed, WmStore(tmp_path / "b.db") as kept:
        trimmed.ingest(entries, Budgets(max_entries=2))
        kept.ingest(entries[4:])
        assert trimmed.digest() == kept.digest() == trimmed.recompute_digest()


def test_a_store_rebuilt_after_clear_has_the_same_digest(store: WmStore) -> None:
    entries = [wm(seq, metadata={"provider": "openai"}) for seq in range(20)]
    for at in range(0, 20, 3):
        store.ingest(entries[at:at + 3])
    digest = store.digest()
    store.clear()
    assert (store.count(), store.total_tokens(), store.search()) == (0, 0, [])
    assert store.digest() == WmStore(":memory:").digest()
    store.ingest(entries[::-1])
    assert store.digest() == digest
    assert seqs(store.search(tags=["openai"], limit=2)) == [19, 18]


# --- read-only


def test_a_read_only_store_answers_searches(tmp_path: Path) -> None:
    path = tmp_path / "wm.db"
    with WmStore(path) as writer:
        writer.ingest([wm(seq, function_name="web.search") for seq in range(3)])
        digest = writer.digest()
    with WmStore.open_readonly(path) as reader:
        assert reader.readonly
        assert (reader.count(), reader.digest()) == (3, digest)
        assert seqs(reader.search(text="web.search", limit=2)) == [2, 1]


def test_a_read_only_store_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "wm.db"
    with WmStore(path) as writer:
        writer.ingest([wm(0)])
    with WmStore.open_readonly(path) as reader:
        for write in (lambda: reader.ingest([wm(1)]), lambda: reader.ingest([], Budgets(0)), reader.clear):
            with pytest.raises(WmReadOnlyError):
                write()
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
            reader._conn.execute("DELETE FROM wm_entries")
        assert reader.count() == 1


def test_a_read_only_store_sees_what_the_writer_adds_later(tmp_path: Path) -> None:
    path = tmp_path / "wm.db"
    with WmStore(path) as writer:
        writer.ingest([wm(0)])
        with WmStore.open_readonly(path) as reader:
            writer.ingest([wm(1)])
            assert seqs(reader.search()) == [1, 0]
            assert reader.digest() == writer.digest()


def test_opening_a_missing_store_read_only_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        WmStore.open_readonly(tmp_path / "nothing.db")
    assert not (tmp_path / "nothing.db").exists()


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wm.db"
    WmStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE wm_meta SET value = '2' WHERE key = 'format'")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="format 2"):
        WmStore(path)
    with pytest.raises(sqlite3.DatabaseError, match="format"):
        WmStore.open_readonly(path)


def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="not a Working Memory store"):
        WmStore(path)
    with pytest.raises(sqlite3.DatabaseError, match="not a Working Memory store"):
        WmStore.open_readonly(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_schema").fetchall() == [("entries",)]
    conn.close()


def test_a_bulk_load_ends_with_the_same_store_as_ingesting_as_usual(tmp_path: Path) -> None:
    entries = [wm(n, plan_id=f"plan-{n % 3}", function_name=f"tool.{n % 4}") for n in range(60)]
    with WmStore(tmp_path / "usual.db") as usual:
        for start in range(0, 60, 7):
            usual.ingest(entries[start:start + 7])
        expected = (usual.digest(), usual.search(text="tool.1", limit=100), usual.search(plan_id="plan-2"))
    with WmStore(tmp_path / "bulk.db") as bulk:
        with bulk.bulk_load():
            for start in range(0, 60, 7):
                bulk.ingest(entries[start:start + 7])
            assert bulk.ingest(entries[:5]) == 0  # ids are still checked inside
        assert (bulk.digest(), bulk.search(text="tool.1", limit=100), bulk.search(plan_id="plan-2")) == expected
    conn = sqlite3.connect(tmp_path / "bulk.db")
    try:
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")}
        automerge = conn.execute("SELECT v FROM wm_fts_config WHERE k = 'automerge'").fetchone()
    finally:
        conn.close()
    assert set(wm_store._SEARCH_INDEXES) <= indexes
    assert automerge == (wm_store.FTS_AUTOMERGE,)


def test_a_store_left_inside_a_bulk_load_is_repaired_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "wm.db"
    with WmStore(path) as store:
        store.ingest([wm(0, plan_id="p")])
        conn = store._conn
        conn.execute("INSERT INTO wm_fts (wm_fts, rank) VALUES ('automerge', 0)")
        for name in wm_store._SEARCH_INDEXES:
            conn.execute(f"DROP INDEX {name}")
    with WmStore(path) as reopened:
        assert seqs(reopened.search(plan_id="p")) == [0]
        indexes = {name for (name,) in reopened._conn.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")}
        assert set(wm_store._SEARCH_INDEXES) <= indexes
        assert reopened._conn.execute("SELECT v FROM wm_fts_config WHERE k = 'automerge'").fetchone() == (4,)
