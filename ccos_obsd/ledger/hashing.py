"""Leaf and chain hashes (RFC 6962 leaf prefix, then a running SHA-256 chain)."""

from __future__ import annotations

import hashlib
from typing import NewType

Hash = NewType("Hash", bytes)

HASH_SIZE = 32
CHAIN_ROOT = Hash(bytes(HASH_SIZE))
"""``chain_hash[-1]``: the chain hash before the first entry."""

ENTRY_SIGNATURE_CONTEXT = b"ccos-obsd/entry/v1\x00"
"""Domain separation for per-entry signatures, so they can't be replayed elsewhere."""


def leaf_hash(entry_bytes: bytes) -> Hash:
    """``SHA-256(0x00 || entry_bytes)``, the RFC 6962 leaf hash."""
    return Hash(hashlib.sha256(b"\x00" + entry_bytes).digest())


def chain_hash(previous: bytes, leaf: bytes) -> Hash:
    """``SHA-256(chain_hash[seq-1] || leaf_hash[seq])``."""
    return Hash(hashlib.sha256(previous + leaf).digest())


def entry_signed_message(chain: bytes) -> bytes:
    """The bytes an entry's Ed25519 signature covers."""
    return ENTRY_SIGNATURE_CONTEXT + chain
