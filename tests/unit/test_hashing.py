"""Leaf hash, chain hash and the per-entry signed message (DESIGN.md, "Entry bytes, hashes, signatures").

Expected values are computed here with hashlib, independently of the module under test.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.ledger.hashing import (
    CHAIN_ROOT,
    ENTRY_SIGNATURE_CONTEXT,
    chain_hash,
    entry_signed_message,
    leaf_hash,
)
from tests.vectors import vectors_dir

# The shared test vectors (DESIGN.md: "vectors/ beside this file").
VECTORS = vectors_dir() / "rfc6962"

# The leaves of the test tree used by transparency-dev/merkle (its testdata/).
TEST_TREE_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_leaf_hash_is_sha256_of_zero_byte_then_entry_bytes() -> None:
    entry = b'{"action_type":"PlanStarted","seq":0}'
    assert leaf_hash(entry) == sha256(b"\x00" + entry)


def test_leaf_hash_of_empty_leaf_is_the_rfc6962_constant() -> None:
    assert leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


@pytest.mark.parametrize("case", ["0", "1", "2", "3", "4"])
def test_leaf_hash_matches_the_rfc6962_inclusion_vectors(case: str) -> None:
    vector = json.loads((VECTORS / "inclusion" / case / "happy-path.json").read_text())
    leaf = TEST_TREE_LEAVES[vector["leafIdx"]]
    assert leaf_hash(leaf) == base64.b64decode(vector["leafHash"])


def test_leaf_hash_is_not_the_plain_sha256() -> None:
    # The 0x00 prefix separates leaves from interior nodes (RFC 6962 second-preimage defence).
    assert leaf_hash(b"abc") != sha256(b"abc")


def test_chain_root_is_32_zero_bytes() -> None:
    assert CHAIN_ROOT.hex() == "00" * 32


def test_chain_hash_is_sha256_of_previous_then_leaf() -> None:
    previous, leaf = bytes(range(32)), bytes(range(32, 64))
    assert chain_hash(previous, leaf) == sha256(previous + leaf)


def test_worked_example_of_a_three_entry_chain() -> None:
    entries = [b'{"seq":0}', b'{"seq":1}', b'{"seq":2}']

    leaf0 = sha256(b"\x00" + entries[0])
    chain0 = sha256(bytes(32) + leaf0)
    leaf1 = sha256(b"\x00" + entries[1])
    chain1 = sha256(chain0 + leaf1)
    leaf2 = sha256(b"\x00" + entries[2])
    chain2 = sha256(chain1 + leaf2)

    previous = CHAIN_ROOT
    computed = []
    for entry in entries:
        leaf = leaf_hash(entry)
        previous = chain_hash(previous, leaf)
        computed.append((leaf, previous))
    assert computed == [(leaf0, chain0), (leaf1, chain1), (leaf2, chain2)]


def test_signed_message_is_context_then_raw_chain_hash() -> None:
    chain = sha256(b"head")
    message = entry_signed_message(chain)
    assert ENTRY_SIGNATURE_CONTEXT == b"ccos-obsd/entry/v1\x00"
    assert message == b"ccos-obsd/entry/v1\x00" + chain
    assert len(message) == 19 + 32


@given(st.binary())
def test_leaf_hash_property(entry: bytes) -> None:
    assert leaf_hash(entry) == sha256(b"\x00" + entry)
    assert len(leaf_hash(entry)) == 32


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=10), st.data())
def test_chain_hash_commits_to_every_earlier_entry(entries: list[bytes], data: st.DataObject) -> None:
    def head(items: list[bytes]) -> bytes:
        previous = CHAIN_ROOT
        for item in items:
            previous = chain_hash(previous, leaf_hash(item))
        return previous

    index = data.draw(st.integers(0, len(entries) - 1))
    altered = list(entries)
    altered[index] = entries[index] + b"!"
    assert head(altered) != head(entries)
