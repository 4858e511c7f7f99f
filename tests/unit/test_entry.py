"""Building a ledger entry from an action (DESIGN.md, "Entry bytes, hashes, signatures").

The entry is the action's fields plus ``v``, ``seq``, ``recorded_at_ms`` and
``peer``, stored as canonical JSON; its leaf and chain hashes cover those bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.errors import NotCanonicalizable
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.entry import (
    DAEMON_FIELDS,
    KEY_ROTATED,
    build_entry,
    content_of_entry,
    key_rotated_action,
    new_action_id,
)
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash, chain_hash, leaf_hash

PEER = {"uid": 1000, "gid": 100, "pid": 4242}


def test_an_entry_is_the_action_plus_the_daemon_fields_as_canonical_json() -> None:
    new = build_entry(
        {"action_type": "PlanStarted", "action_id": "a-1", "plan_id": "p"},
        seq=7, recorded_at_ms=1_700_000_000_000, peer=PEER, previous_chain_hash=CHAIN_ROOT,
    )
    expected = (
        b'{"action_id":"a-1","action_type":"PlanStarted",'
        b'"peer":{"gid":100,"pid":4242,"uid":1000},"plan_id":"p","recorded_at_ms":1700000000000,"seq":7,"v":1}'
    )
    assert new.entry == expected
    assert new.seq == 7
    assert new.leaf_hash == hashlib.sha256(b"\x00" + expected).digest()
    assert new.chain_hash == hashlib.sha256(bytes(32) + new.leaf_hash).digest()


def test_without_a_peer_the_entry_has_no_peer_field() -> None:
    new = build_entry({"action_type": "PlanStarted", "action_id": "a-1"}, seq=0, recorded_at_ms=5, peer=None,
                      previous_chain_hash=CHAIN_ROOT)
    assert json.loads(new.entry) == {"action_type": "PlanStarted", "action_id": "a-1", "v": 1, "seq": 0,
                                     "recorded_at_ms": 5}


def test_the_chain_hash_follows_the_previous_one() -> None:
    first = build_entry({"action_type": "PlanStarted", "action_id": "a"}, seq=0, recorded_at_ms=1, peer=None,
                        previous_chain_hash=CHAIN_ROOT)
    second = build_entry({"action_type": "PlanStarted", "action_id": "b"}, seq=1, recorded_at_ms=1, peer=None,
                         previous_chain_hash=first.chain_hash)
    assert second.chain_hash == hashlib.sha256(first.chain_hash + second.leaf_hash).digest()


def test_a_value_with_no_canonical_form_is_refused() -> None:
    with pytest.raises(NotCanonicalizable):
        build_entry({"action_type": "PlanStarted", "action_id": "a", "cost": float("nan")}, seq=0,
                    recorded_at_ms=1, peer=None, previous_chain_hash=CHAIN_ROOT)


def test_the_key_rotation_action_names_both_keys() -> None:
    action = key_rotated_action("old+0000+AQ", "new+0000+AQ")
    assert action.fields["action_type"] == KEY_ROTATED
    assert action.fields["metadata"] == {"old_key": "old+0000+AQ", "new_key": "new+0000+AQ"}
    assert not action.client_action_id
    assert action.action_id != key_rotated_action("old+0000+AQ", "new+0000+AQ").action_id


def test_new_action_ids_are_version_4_uuids() -> None:
    ids = {new_action_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i) for i in ids)


# --- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
action_fields = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda key: key not in DAEMON_FIELDS), json_values, max_size=6
).map(lambda fields: {**fields, "action_type": "CapabilityCall", "action_id": "a-1"})
peers = st.none() | st.fixed_dictionaries(
    {"uid": st.integers(0, 2**32 - 1), "gid": st.integers(0, 2**32 - 1), "pid": st.integers(1, 2**22)}
)
hashes = st.binary(min_size=32, max_size=32).map(Hash)


@given(action_fields, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), peers, hashes)
def test_an_entry_is_canonical_and_its_hashes_cover_its_bytes(
    fields: dict[str, Any], seq: int, recorded_at_ms: int, peer: dict[str, int] | None, previous: Hash
) -> None:
    sent = json.loads(json.dumps(fields))
    new = build_entry(fields, seq=seq, recorded_at_ms=recorded_at_ms, peer=peer, previous_chain_hash=previous)
    parsed = json.loads(new.entry)
    assert canonical_bytes(parsed) == new.entry
    assert parsed == new.fields
    assert new.leaf_hash == leaf_hash(new.entry)
    assert new.chain_hash == chain_hash(previous, new.leaf_hash)
    daemon_fields = {"v": 1, "seq": seq, "recorded_at_ms": recorded_at_ms} | ({} if peer is None else {"peer": peer})
    assert parsed == {**fields, **daemon_fields}
    assert content_of_entry(parsed) == canonical_bytes(fields)
    assert fields == sent  # the action's own fields are left as they were
