"""Canonical JSON: the exact bytes every hash and signature covers (DESIGN.md, "Entry bytes").

UTF-8, keys sorted by Unicode code point at every level, no insignificant
whitespace, no NaN or Infinity.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.errors import NotCanonicalizable
from ccos_obsd.ledger.canonical import canonical_bytes

# JSON values as the daemon sees them after parsing a request: finite floats, ints
# within the interpreter's conversion limit, text without lone surrogates.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)


def _object_keys_in_order(data: bytes) -> list[list[str]]:
    """The keys of every object in ``data``, in the order they appear in the bytes."""
    orders: list[list[str]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        orders.append([key for key, _ in pairs])
        return dict(pairs)

    json.loads(data, object_pairs_hook=keep)
    return orders


# --- key order


def test_keys_are_sorted_by_code_point() -> None:
    assert canonical_bytes({"b": 1, "a": 2, "B": 3, "_": 4}) == b'{"B":3,"_":4,"a":2,"b":1}'


def test_keys_are_sorted_at_every_level() -> None:
    value = {"z": {"y": [{"d": 1, "c": 2}], "x": None}, "a": [{"b": {"k": 1, "j": 2}}]}
    assert canonical_bytes(value) == b'{"a":[{"b":{"j":2,"k":1}}],"z":{"x":null,"y":[{"c":2,"d":1}]}}'


def test_non_ascii_keys_sort_by_code_point_not_locale() -> None:
    # U+00E9 (é) sorts after every ASCII letter, U+0100 after U+00E9.
    value = {"\u0100": 1, "\u00e9": 2, "z": 3, "e": 4}
    assert canonical_bytes(value) == '{"e":4,"z":3,"\u00e9":2,"\u0100":1}'.encode()


def test_astral_keys_sort_after_the_whole_bmp() -> None:
    # By code point U+1F600 > U+FFFF. (UTF-16 order, as in RFC 8785, would put the
    # surrogate pair D83D DE00 before U+FFFF: the contract is code points.)
    value = {"\U0001f600": 1, "\uffff": 2, "\ue000": 3}
    assert _object_keys_in_order(canonical_bytes(value)) == [["\ue000", "\uffff", "\U0001f600"]]


@given(st.dictionaries(st.text(), st.integers(), max_size=12))
def test_key_order_is_code_point_order_which_is_utf8_byte_order(value: dict[str, int]) -> None:
    (keys,) = _object_keys_in_order(canonical_bytes(value))
    assert keys == sorted(value, key=lambda k: [ord(c) for c in k])
    assert keys == sorted(value, key=lambda k: k.encode("utf-8"))


def test_non_string_keys_are_rejected() -> None:
    # JSON object keys are strings. An int key would be written as a string but
    # sorted as a number ({10, 9} -> "9","10"), breaking the code-point order.
    with pytest.raises(NotCanonicalizable):
        canonical_bytes({10: "ten", 9: "nine"})


# --- whitespace and encoding


def test_no_insignificant_whitespace() -> None:
    assert canonical_bytes({"a": [1, 2, {"b": "c d"}], "e": True}) == b'{"a":[1,2,{"b":"c d"}],"e":true}'


def test_non_ascii_text_is_raw_utf8_not_escaped() -> None:
    data = canonical_bytes({"name": "caf\u00e9 \u2014 \U0001f600"})
    assert data == '{"name":"caf\u00e9 \u2014 \U0001f600"}'.encode()
    assert b"\\u" not in data


def test_control_characters_are_escaped_as_json_requires() -> None:
    assert canonical_bytes("a\nb\x01") == b'"a\\nb\\u0001"'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-12, b"-12"),
        (2**64, b"18446744073709551616"),
        (1.5, b"1.5"),
        ([], b"[]"),
        ({}, b"{}"),
        ("", b'""'),
    ],
)
def test_scalars_and_empty_containers(value: Any, expected: bytes) -> None:
    assert canonical_bytes(value) == expected


# --- values canonical JSON cannot express


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_rejected_at_any_depth(number: float) -> None:
    with pytest.raises(NotCanonicalizable):
        canonical_bytes(number)
    with pytest.raises(NotCanonicalizable):
        canonical_bytes({"a": [{"cost": number}]})


@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff", "x\udc00y"])
def test_lone_surrogates_are_rejected_in_values_and_keys(surrogate: str) -> None:
    with pytest.raises(NotCanonicalizable):
        canonical_bytes({"text": surrogate})
    with pytest.raises(NotCanonicalizable):
        canonical_bytes({surrogate: 1})


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object(), (1j)])
def test_non_json_types_are_rejected(value: Any) -> None:
    with pytest.raises(NotCanonicalizable):
        canonical_bytes({"a": value})


def test_integers_beyond_the_conversion_limit_are_rejected() -> None:
    with pytest.raises(NotCanonicalizable):
        canonical_bytes(10**5000)


def test_not_canonicalizable_is_a_value_error() -> None:
    assert issubclass(NotCanonicalizable, ValueError)


# --- properties


@given(json_values)
def test_round_trip_gives_back_the_value(value: Any) -> None:
    assert json.loads(canonical_bytes(value)) == value


@given(json_values)
def test_re_encoding_the_parsed_bytes_gives_the_same_bytes(value: Any) -> None:
    data = canonical_bytes(value)
    assert canonical_bytes(json.loads(data)) == data


def _bytes_outside_strings(data: bytes) -> bytes:
    outside = bytearray()
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        else:
            outside.append(byte)
    return bytes(outside)


@given(json_values)
def test_output_is_utf8_with_no_whitespace_outside_strings(value: Any) -> None:
    data = canonical_bytes(value)
    data.decode("utf-8")
    assert not set(_bytes_outside_strings(data)) & set(b" \t\r\n")


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_insertion_order_does_not_matter(value: dict[str, Any]) -> None:
    reversed_value = dict(reversed(list(value.items())))
    assert canonical_bytes(reversed_value) == canonical_bytes(value)
