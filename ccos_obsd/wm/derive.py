"""Working Memory entries derived from ledger entries (CCOS's WM sink, SEP-013/SEP-023; SEP-024 records).

Derivation is pure and deterministic: the same stored entry always gives the
same :class:`WmEntry`, so a Working Memory rebuilt from the ledger equals the one
built entry by entry.

Content hash
    ``content_hash`` is the SHA-256 (hex) of the canonical JSON bytes of the
    *action* the entry records: the entry's fields minus the ones the daemon adds
    (``v``, ``seq``, ``recorded_at_ms``, ``peer``; ``ledger.entry.DAEMON_FIELDS``).
    These are exactly the bytes the ledger compares to detect a duplicate append
    (``ValidatedAction.content()``), so a client can compute the hash from the
    action it sent, and the same action content gives the same id wherever and
    whenever it was recorded (CCOS's "same content, same id"). Stored entry bytes
    are canonical, so re-encoding the parsed fields reproduces the canonical form
    byte for byte.

Id
    ``wm:{action_id}:{content_hash}``.

Tags
    ``causal-chain``, ``distillation``, ``wisdom`` (as CCOS), the action type in
    lower case (``capabilitycall``) and, when known, the provider in lower case
    (``metadata.provider``, else ``provenance.provider``). Tags are always lower
    case (``WmEntry`` enforces it), so tag filters can be case-insensitive. Plan,
    intent and session are not tags: they are indexed fields of their own.

Title
    ``"<action_type> <function_name>"`` (``"CapabilityCall web.search"``); without a
    function name ``"<action_type> plan=<plan_id>"``, else ``intent=<intent_id>``,
    else the action type alone.

Content
    ``"; "``-separated ``key=value`` parts, absent ones left out, in this order:
    ``type``, ``plan``, ``intent``, ``ts`` (milliseconds), ``fn``, ``args`` (argument
    count), ``cost``, ``dur_ms``, ``outcome`` (``success``/``failure``, omitted when
    unknown), ``error`` (whitespace collapsed, at most 200 characters).

Time
    ``timestamp_s`` = ``timestamp_ms / 1000`` (the client's clock), else
    ``recorded_at_ms / 1000``; ``approx_tokens`` = ``max(1, len(content) // 4)``.

Meta
    ``action_id``, ``action_type``, ``content_hash``, ``seq``, ``key_id``,
    ``signature`` (base64, when the entry is signed) and, when
    present, ``parent_action_id``, ``plan_id``, ``intent_id``, ``step_id``,
    ``session_id``, ``provider``, ``attestation_hash`` (``metadata.attestation_hash``,
    else ``provenance.attestation_hash``, else CCOS's ``metadata.signature``) and
    ``provenance`` (the action's object, as recorded). Absent fields are omitted,
    as in the ledger.

Records of an ingest call
    A ``CapabilityCall`` of ``observability.ingestor:v1.ingest``
    (:mod:`ccos_obsd.wm.capability`) also gives one entry per record its
    ``arguments`` carry (``[mode, [record, ...]]``), so a Working Memory rebuilt
    from the ledger reproduces the records ingested directly. Such an entry's id
    is ``wm:{record action_id}:{hash}``, the hash being the record's
    ``content_hash``, else SHA-256 of its canonical JSON; title ``summary``, else
    ``kind``; content ``content``, else ``summary``, else ``kind``; tags the base
    tags, the kind and the provider (lower case); ``timestamp_s`` the record's.
    Meta: ``action_id``, ``content_hash``, ``seq``, ``key_id``, ``ingested_by``
    (the capability), ``signature`` when the call entry is signed, and the
    record's ``plan_id``, ``intent_id``, ``step_id``, ``provider`` and
    ``attestation_hash`` when present.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ccos_obsd.errors import WmDerivationError
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.entry import DAEMON_FIELDS, outcome
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.wm.capability import CAPABILITY, DEFAULT_KIND

BASE_TAGS = ("causal-chain", "distillation", "wisdom")
"""Tags every derived entry carries (CCOS's WM sink)."""

MAX_ERROR_CHARS = 200
"""Longest ``error=`` part of the content; the ledger keeps the whole message."""


@dataclass(frozen=True, slots=True)
class WmEntry:
    """One Working Memory entry: a searchable summary of one ledger entry.

    Tags are distinct, non-empty and lower case; ``timestamp_s`` is finite and
    ``approx_tokens`` a non-negative integer. ``meta`` is read-only at the top
    level and must hold an integer ``seq``: the store orders entries by
    ``(timestamp_s, seq)``. Its keys are strings at every depth.
    """

    id: str
    title: str
    content: str
    tags: tuple[str, ...]
    timestamp_s: float
    approx_tokens: int
    meta: Mapping[str, Any]

    def __post_init__(self) -> None:
        for tag in self.tags:
            if not tag or tag != tag.lower():
                raise ValueError(f"Working Memory tags are non-empty and lower case, not {tag!r}")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError("Working Memory tags must not repeat")
        if not math.isfinite(self.timestamp_s):
            raise ValueError("Working Memory entry timestamp_s must be finite")
        if isinstance(self.approx_tokens, bool) or not isinstance(self.approx_tokens, int) or self.approx_tokens < 0:
            raise ValueError("Working Memory entry approx_tokens must be a non-negative integer")
        seq = self.meta.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ValueError("Working Memory entry meta must hold an integer seq")
        # Checked once here, so encoding the record can skip canonical_bytes' key walk.
        _check_string_keys(self.meta)
        if not isinstance(self.meta, MappingProxyType):
            object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only meta view cannot be pickled; its dict can (for process pools).
        fields = (self.id, self.title, self.content, self.tags, self.timestamp_s, self.approx_tokens, dict(self.meta))
        return (WmEntry, fields)

    @property
    def seq(self) -> int:
        return int(self.meta["seq"])

    @property
    def plan_id(self) -> str | None:
        return _str_or_none(self.meta.get("plan_id"))

    @property
    def intent_id(self) -> str | None:
        return _str_or_none(self.meta.get("intent_id"))

    @property
    def session_id(self) -> str | None:
        return _str_or_none(self.meta.get("session_id"))

    def to_record(self) -> dict[str, Any]:
        """The entry as a JSON object (what searches return)."""
        return {
            "id": self.id,
            "title": self.title,
            "content": self.content,
            "tags": list(self.tags),
            "timestamp_s": self.timestamp_s,
            "approx_tokens": self.approx_tokens,
            "meta": dict(self.meta),
        }

    def canonical_bytes(self) -> bytes:
        """Canonical JSON of :meth:`to_record`: what the store keeps and digests."""
        return canonical_bytes(self.to_record(), keys_checked=True)  # meta's keys: __post_init__


def approx_tokens(content: str) -> int:
    """CCOS's estimate: about four characters a token, at least one."""
    return max(1, len(content) // 4)


_DAEMON_MEMBER = re.compile(
    rb',"(?:' + b"|".join(re.escape(name.encode("ascii")) for name in DAEMON_FIELDS) + rb')":'
    rb'(?:\d+|\{"[a-z]+":\d+(?:,"[a-z]+":\d+)*\})(?=[,}])'
)
"""A daemon member (``,"seq":12``, ``,"peer":{"gid":1,"pid":2,"uid":3}``) of some object in canonical JSON."""


def content_hash(fields: Mapping[str, Any], entry_bytes: bytes | None = None) -> str:
    """SHA-256 hex of the canonical bytes of an entry's action (its fields minus the daemon's).

    ``fields`` is the parsed entry; ``entry_bytes``, when given, the canonical
    bytes it was parsed from. Then the action's bytes are the stored bytes with
    the daemon's members cut out, not a new encoding: canonical JSON joins an
    object's members with commas in key order, so dropping a member and the
    comma before it (every daemon field sorts after ``action_id``) leaves the
    canonical bytes of the rest. A ``,"name":`` can only start an object member
    (quotes inside strings are escaped). When every daemon value has the shape
    the pattern expects, each top-level daemon member matches it; if it then
    matches no more often than that, the matches are exactly those members.
    Otherwise (a nested object holding such a member, say) the action is
    encoded anew. Both ways give the same bytes.
    """
    action_bytes = None
    if entry_bytes is not None:
        present = [fields[name] for name in DAEMON_FIELDS if name in fields]
        if all(map(_matches_daemon_member, present)):  # then every top-level daemon member matches
            cut, matches = _DAEMON_MEMBER.subn(b"", entry_bytes)
            if matches == len(present):
                action_bytes = cut
    if action_bytes is None:
        action = {key: value for key, value in fields.items() if key not in DAEMON_FIELDS}
        # Fields parsed from JSON text have string keys by construction.
        action_bytes = canonical_bytes(action, keys_checked=True)
    return hashlib.sha256(action_bytes).hexdigest()


def _matches_daemon_member(value: Any) -> bool:
    """Whether ``value`` is written as ``_DAEMON_MEMBER`` expects: an int >= 0, or {"[a-z]+": int >= 0, ...}."""
    if type(value) is int:
        return value >= 0
    return type(value) is dict and bool(value) and all(
        type(key) is str and key.isascii() and key.isalpha() and key.islower() and type(number) is int and number >= 0
        for key, number in value.items()
    )


def derive_wm_entry(entry: StoredEntry) -> WmEntry:
    """The Working Memory entry for one stored ledger entry (rules in the module doc)."""
    try:
        fields = json.loads(entry.entry)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise WmDerivationError(entry.seq, f"entry bytes are not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise WmDerivationError(entry.seq, "entry is not a JSON object")
    action_id = fields.get("action_id")
    action_type = fields.get("action_type")
    if not isinstance(action_id, str) or not isinstance(action_type, str):
        raise WmDerivationError(entry.seq, "entry has no action_id or action_type string")
    time_ms = _entry_time_ms(fields)
    if time_ms is None:
        raise WmDerivationError(entry.seq, "entry has neither timestamp_ms nor recorded_at_ms")

    metadata = _object(fields.get("metadata"))
    provenance = _object(fields.get("provenance"))
    provider = _first_string(metadata.get("provider"), provenance.get("provider"))
    attestation = _first_string(
        metadata.get("attestation_hash"), provenance.get("attestation_hash"), metadata.get("signature")
    )
    digest = content_hash(fields, entry.entry)

    plan_id = _str_or_none(fields.get("plan_id"))
    intent_id = _str_or_none(fields.get("intent_id"))
    function_name = _str_or_none(fields.get("function_name"))
    content = _content(fields, action_type, plan_id, intent_id, function_name, time_ms)

    meta: dict[str, Any] = {
        "action_id": action_id,
        "action_type": action_type,
        "content_hash": digest,
        "seq": entry.seq,
        "key_id": str(entry.key_id),
    }
    if entry.signature is not None:
        meta["signature"] = base64.b64encode(entry.signature).decode("ascii")
    for name in ("parent_action_id", "plan_id", "intent_id", "step_id", "session_id"):
        value = fields.get(name)
        if isinstance(value, str):
            meta[name] = value
    if provider is not None:
        meta["provider"] = provider
    if attestation is not None:
        meta["attestation_hash"] = attestation
    if "provenance" in fields:
        meta["provenance"] = fields["provenance"]

    return WmEntry(
        id=f"wm:{action_id}:{digest}",
        title=_title(action_type, plan_id, intent_id, function_name),
        content=content,
        tags=_tags(action_type, provider),
        timestamp_s=time_ms / 1000,
        approx_tokens=approx_tokens(content),
        meta=MappingProxyType(meta),
    )


def derive_wm_entries(entry: StoredEntry) -> list[WmEntry]:
    """Working Memory entries for one ledger entry: its own, plus the records an ingest call carries."""
    derived = [derive_wm_entry(entry)]
    if _CAPABILITY_BYTES not in entry.entry:  # most entries: skip parsing the JSON a second time
        return derived
    fields = _fields(entry)
    if fields.get("function_name") != CAPABILITY or fields.get("action_type") != "CapabilityCall":
        return derived
    arguments = fields.get("arguments")
    if not isinstance(arguments, list) or len(arguments) != 2 or not isinstance(arguments[1], list):
        return derived
    for record in arguments[1]:
        if isinstance(record, dict) and isinstance(record.get("action_id"), str):
            derived.append(_record_entry(record, entry))
    return derived


_CAPABILITY_BYTES = json.dumps(CAPABILITY).encode()


def _fields(entry: StoredEntry) -> dict[str, Any]:
    try:
        fields = json.loads(entry.entry)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _record_entry(record: Mapping[str, Any], entry: StoredEntry) -> WmEntry:
    kind = str(record.get("kind", DEFAULT_KIND))
    summary = record.get("summary")
    content = str(record.get("content") or summary or kind)
    digest = record.get("content_hash") or hashlib.sha256(canonical_bytes(dict(record))).hexdigest()
    tags = [*BASE_TAGS, kind.lower()]
    provider = record.get("provider")
    if isinstance(provider, str) and provider.lower() not in tags:
        tags.append(provider.lower())
    meta: dict[str, Any] = {"action_id": record["action_id"], "content_hash": digest, "seq": entry.seq,
                            "key_id": str(entry.key_id), "ingested_by": CAPABILITY}
    if entry.signature is not None:
        meta["signature"] = base64.b64encode(entry.signature).decode("ascii")
    for name in ("plan_id", "intent_id", "step_id", "provider", "attestation_hash"):
        if isinstance(record.get(name), str):
            meta[name] = record[name]
    return WmEntry(
        id=f"wm:{record['action_id']}:{digest}",
        title=str(summary or kind),
        content=content,
        tags=tuple(dict.fromkeys(tags)),
        timestamp_s=float(record.get("timestamp_s", 0.0)),
        approx_tokens=approx_tokens(content),
        meta=MappingProxyType(meta),
    )


def _entry_time_ms(fields: Mapping[str, Any]) -> int | None:
    for name in ("timestamp_ms", "recorded_at_ms"):
        value = fields.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _title(action_type: str, plan_id: str | None, intent_id: str | None, function_name: str | None) -> str:
    if function_name is not None:
        return f"{action_type} {function_name}"
    if plan_id is not None:
        return f"{action_type} plan={plan_id}"
    if intent_id is not None:
        return f"{action_type} intent={intent_id}"
    return action_type


def _content(
    fields: Mapping[str, Any],
    action_type: str,
    plan_id: str | None,
    intent_id: str | None,
    function_name: str | None,
    time_ms: int,
) -> str:
    parts = [f"type={action_type}"]
    if plan_id is not None:
        parts.append(f"plan={plan_id}")
    if intent_id is not None:
        parts.append(f"intent={intent_id}")
    parts.append(f"ts={time_ms}")
    if function_name is not None:
        parts.append(f"fn={function_name}")
    arguments = fields.get("arguments")
    if isinstance(arguments, list):
        parts.append(f"args={len(arguments)}")
    for name, label in (("cost", "cost"), ("duration_ms", "dur_ms")):
        value = fields.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{label}={value!r}")
    result = outcome(fields)
    if result != "unknown":
        parts.append(f"outcome={result}")
    error = fields.get("error")
    if isinstance(error, str):
        compact = " ".join(error.split())
        if len(compact) > MAX_ERROR_CHARS:
            compact = compact[: MAX_ERROR_CHARS - 1] + "…"
        parts.append(f"error={compact}")
    return "; ".join(parts)


def _tags(action_type: str, provider: str | None) -> tuple[str, ...]:
    tags = [*BASE_TAGS, action_type.lower()]
    if provider is not None and provider.strip():
        tags.append(provider.lower())
    return tuple(dict.fromkeys(tags))  # de-duplicated, first occurrence kept


def _check_string_keys(meta: Mapping[str, Any]) -> None:
    """Every object key in ``meta``, at any depth, is a string (canonical JSON has no others)."""
    # Exact type tests: this runs for every entry, and ABC isinstance checks cost more than the rest.
    stack: list[Any] = [meta]
    while stack:
        item = stack.pop()
        if type(item) is list or type(item) is tuple:
            stack.extend(value for value in item if type(value) in _CONTAINERS)
            continue
        for key, value in item.items():
            if type(key) is not str:
                raise ValueError(f"Working Memory meta keys must be strings, not {key!r}")
            if type(value) in _CONTAINERS:
                stack.append(value)


_CONTAINERS = frozenset((dict, list, tuple, MappingProxyType))


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _first_string(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
