"""Ledger entries: the exact bytes an action is recorded as, and their hashes.

An entry is a validated action's fields plus the daemon's own (``v``, ``seq``,
``recorded_at_ms`` and, when known, ``peer``), encoded once as canonical JSON
(DESIGN.md, "Entry bytes, hashes, signatures"). :func:`build_entry` is the one
place that makes those bytes, for clients' appends and for the daemon's own
entries (key rotation). What an action may contain is checked before it gets
here, in ``ccos_obsd.actions``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import Hash, chain_hash, leaf_hash

ENTRY_FORMAT_VERSION = 1

DAEMON_FIELDS = ("v", "seq", "recorded_at_ms", "peer")
"""Entry fields the daemon adds; not part of an action's content."""

KEY_ROTATED = "KeyRotated"
"""Written by the daemon itself when it changes signing keys; clients cannot send it."""


@dataclass(frozen=True, slots=True)
class ValidatedAction:
    """Action fields ready for the ledger (``ccos_obsd.actions.validate_action`` makes them).

    Every object key in ``fields`` is a string: they were checked, or parsed from JSON.
    """

    fields: dict[str, Any]
    client_action_id: bool
    """Whether the client named the action_id (only then can it be a duplicate)."""

    @property
    def action_id(self) -> str:
        return str(self.fields["action_id"])

    def content(self) -> bytes:
        """The canonical bytes of the action's fields: what duplicate detection compares."""
        return canonical_bytes(self.fields, keys_checked=True)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """An entry built for appending at ``seq``: its fields, stored bytes and hashes."""

    seq: int
    fields: dict[str, Any]
    entry: bytes
    leaf_hash: Hash
    chain_hash: Hash


def build_entry(
    action_fields: Mapping[str, Any],
    *,
    seq: int,
    recorded_at_ms: int,
    peer: dict[str, int] | None,
    previous_chain_hash: Hash,
) -> NewEntry:
    """The entry that records ``action_fields`` at ``seq``, chained after ``previous_chain_hash``.

    ``action_fields`` are a :class:`ValidatedAction`'s (string keys only). Raises
    ``NotCanonicalizable`` when a value has no canonical JSON form.
    """
    fields = dict(action_fields)
    fields["v"] = ENTRY_FORMAT_VERSION
    fields["seq"] = seq
    fields["recorded_at_ms"] = recorded_at_ms
    if peer is not None:
        fields["peer"] = peer
    entry = canonical_bytes(fields, keys_checked=True)
    leaf = leaf_hash(entry)
    return NewEntry(seq, fields, entry, leaf, chain_hash(previous_chain_hash, leaf))


def key_rotated_action(old_vkey: str, new_vkey: str) -> ValidatedAction:
    """The daemon's record that signing passes from ``old_vkey`` to ``new_vkey``."""
    return ValidatedAction(
        {
            "action_type": KEY_ROTATED,
            "action_id": new_action_id(),
            "metadata": {"old_key": old_vkey, "new_key": new_vkey},
        },
        client_action_id=False,
    )


def content_of_entry(entry: Mapping[str, Any]) -> bytes:
    """The content of the action an entry records (its fields minus the daemon's)."""
    return canonical_bytes({k: v for k, v in entry.items() if k not in DAEMON_FIELDS})


def new_action_id() -> str:
    """A random (version 4) UUID string, without uuid.uuid4()'s object overhead."""
    n = int.from_bytes(os.urandom(16), "big")
    n = (n & ~(0xF000 << 64)) | (4 << 76)  # version 4
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


RESULT_TYPES = frozenset({"CapabilityResult"})
"""Action types that record the result of their parent (a ``CapabilityCall``), as CCOS's ``record_result`` does."""


def outcome(fields: Mapping[str, Any]) -> str:
    """``success``, ``failure`` or ``unknown``: from ``result.success``, else ``success``."""
    result = fields.get("result")
    flag = result.get("success") if isinstance(result, dict) else None
    if flag is None:
        flag = fields.get("success")
    if flag is None:
        return "unknown"
    return "success" if flag else "failure"
