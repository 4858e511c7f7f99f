"""Canonical JSON: the exact bytes every hash and signature covers.

UTF-8, keys sorted by Unicode code point at every level (Python's ``str``
ordering), no insignificant whitespace, no NaN or Infinity. The daemon encodes
each entry once and stores those bytes; nothing is ever re-serialized to verify.
"""

from __future__ import annotations

import json
from typing import Any

_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
    check_circular=False,
)


class NotCanonicalizable(ValueError):
    """The value holds something canonical JSON cannot express."""


def canonical_bytes(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes.

    Raises :class:`NotCanonicalizable` for NaN, Infinity, lone surrogates (not
    encodable as UTF-8) and non-JSON types.
    """
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
        raise NotCanonicalizable(str(exc)) from exc
