"""Canonical JSON: the exact bytes every hash and signature covers.

UTF-8, keys sorted by Unicode code point at every level (Python's ``str``
ordering), no insignificant whitespace, no NaN or Infinity. The daemon encodes
each entry once and stores those bytes; nothing is ever re-serialized to verify.
"""

from __future__ import annotations

import json
from typing import Any

from ccos_obsd.errors import NotCanonicalizable

_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
    check_circular=False,
)


def canonical_bytes(value: Any, *, keys_checked: bool = False) -> bytes:
    """Encode ``value`` as canonical JSON bytes.

    Raises :class:`NotCanonicalizable` for NaN, Infinity, lone surrogates (not
    encodable as UTF-8), non-JSON types and non-string object keys (which
    ``json`` would silently turn into strings, out of code-point order).
    ``keys_checked=True`` skips the key walk for values parsed from JSON text,
    whose keys are strings by construction.
    """
    if not keys_checked:
        _check_keys(value)
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
        raise NotCanonicalizable(str(exc)) from exc


def _check_keys(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise NotCanonicalizable(f"object key {key!r} is not a string")
                if isinstance(child, dict | list | tuple):
                    stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(child for child in item if isinstance(child, dict | list | tuple))
