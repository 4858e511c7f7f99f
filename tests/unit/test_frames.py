"""parse_frame: one request line to a JSON object, or BadJson (DESIGN.md, "Socket protocol")."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccos_obsd.errors import BadJson
from ccos_obsd.protocol import parse_frame

MAX_DEPTH = 64


def bad_json(line: bytes, max_depth: int = MAX_DEPTH) -> BadJson:
    with pytest.raises(BadJson) as caught:
        parse_frame(line, max_depth)
    assert caught.value.code == "bad_json"
    return caught.value


def nested(depth: int) -> bytes:
    """An object whose containers nest ``depth`` levels deep (the object itself is level 1)."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


# --- valid requests


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"op":"ping"}', {"op": "ping"}),
        (b'  {"op": "append", "action": {"action_type": "PlanStarted"}}\n', {
            "op": "append", "action": {"action_type": "PlanStarted"}}),
        (b"{}", {}),
        ('{"name":"caf\u00e9 \U0001f600"}'.encode(), {"name": "caf\u00e9 \U0001f600"}),
        (b'{"n":1e300,"m":-2.5e-3,"big":123456789012345678901234567890}', {
            "n": 1e300, "m": -2.5e-3, "big": 123456789012345678901234567890}),
        (b'{"tiny":1e-400}', {"tiny": 0.0}),
    ],
)
def test_valid_objects_parse(line: bytes, expected: dict[str, Any]) -> None:
    assert parse_frame(line, MAX_DEPTH) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=25,
)


@given(st.dictionaries(st.text(), json_values, max_size=5), st.booleans())
def test_any_json_object_parses_to_itself(value: dict[str, Any], ensure_ascii: bool) -> None:
    assert parse_frame(json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8"), MAX_DEPTH) == value


# --- BadJson


@pytest.mark.parametrize(
    "line",
    [
        b'{"a":"\xff"}',  # not UTF-8
        b'{"a":"\xc3"}',  # truncated sequence
        b'{"a":"\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
        b"\xef\xbb\xbf{}",  # a BOM is not JSON whitespace
    ],
)
def test_invalid_utf8_is_bad_json(line: bytes) -> None:
    bad_json(line)


def test_invalid_utf8_names_the_byte() -> None:
    assert "byte 6" in bad_json(b'{"a":"\xff"}').message


@pytest.mark.parametrize(
    "line",
    [b"", b"   ", b"{", b'{"a":1,}', b"{'a':1}", b'{"a":1}{"b":2}', b'{"a":1} x', b"{a:1}", b'{"a":01}'],
)
def test_invalid_json_is_bad_json(line: bytes) -> None:
    bad_json(line)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_are_bad_json(literal: bytes) -> None:
    bad_json(b'{"cost":' + literal + b"}")
    bad_json(b'{"a":[{"b":' + literal + b"}]}")


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1E999", b"1" + b"0" * 400 + b".0"])
def test_floats_that_overflow_to_infinity_are_bad_json(number: bytes) -> None:
    bad_json(b'{"duration_ms":' + number + b"}")


@pytest.mark.parametrize("sign", [b"", b"-"])
def test_integers_beyond_4300_digits_are_bad_json(sign: bytes) -> None:
    bad_json(b'{"cost":' + sign + b"9" * 4301 + b"}")


def test_integer_of_4300_digits_is_fine() -> None:
    assert parse_frame(b'{"n":' + b"9" * 4300 + b"}", MAX_DEPTH)["n"] == int("9" * 4300)


@pytest.mark.parametrize("line", [b"[]", b'[{"op":"ping"}]', b'"op"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object_is_bad_json(line: bytes) -> None:
    assert "object" in bad_json(line).message


def test_nesting_up_to_max_depth_is_accepted_and_one_more_is_not() -> None:
    assert parse_frame(nested(4), 4) == {"a": [[[]]]}
    bad_json(nested(5), 4)
    assert parse_frame(nested(MAX_DEPTH), MAX_DEPTH)
    assert "deeper" in bad_json(nested(MAX_DEPTH + 1)).message


def test_depth_counts_objects_and_lists_alike() -> None:
    bad_json(b'{"a":{"b":{"c":{"d":{}}}}}', 4)
    bad_json(b'{"a":[{"c":[{}]}]}', 4)


def test_brackets_inside_strings_are_not_nesting() -> None:
    assert parse_frame(b'{"a":"[[[[[[{{{{{{"}', 2) == {"a": "[[[[[[{{{{{{"}


def test_nesting_beyond_the_interpreter_recursion_limit_is_bad_json() -> None:
    bad_json(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    bad_json(b'{"a":' + b"[" * 200_000)


# --- property: nothing but BadJson ever escapes

json_ish_tokens = st.sampled_from(
    [
        b"{", b"}", b"[", b"]", b":", b",", b'"', b'"k"', b" ", b"\n", b"\\", b"\\u", b"d800", b"0", b"1",
        b"-", b".", b"e", b"e400", b"E-", b"NaN", b"Infinity", b"true", b"false", b"null", b"\xff", b"\xc3",
        b"\xe2\x82", b"\x00", b"9" * 4301,
    ]
)


@given(st.binary() | st.lists(json_ish_tokens, max_size=40).map(b"".join), st.integers(2, 70))
def test_any_bytes_give_an_object_or_bad_json(line: bytes, max_depth: int) -> None:
    try:
        value = parse_frame(line, max_depth)
    except BadJson:
        return
    assert isinstance(value, dict)
    assert depth(value) <= max_depth
