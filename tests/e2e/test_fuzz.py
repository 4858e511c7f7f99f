"""Fuzzing the live socket with hypothesis: structured requests and raw bytes.

One daemon serves the whole module, with nobody else writing to it. Each example
sends a few lines on a fresh connection: requests of the right shape with wrong
types, huge numbers (``10**400``, ``1e400``, ``NaN`` and ``Infinity`` as JSON text),
deep nesting, unknown ops and fields, strings around ``socket.max_line_bytes``;
and raw bytes: cut frames, invalid UTF-8, lone surrogate escapes, NUL bytes, CR/LF
mixes, unicode edge cases. After each example:

- every answer is one complete JSON line with a boolean ``ok``; an error carries a
  code from the table in docs/protocol.md (never ``internal``) and a message;
- there is exactly one answer per non-blank line: a ``ping`` sent last is answered
  next, so the daemon is alive and sent nothing extra;
- the ledger head grew by exactly the number of entries the answers acknowledge.

At the end the daemon stops cleanly and ``ccos-obsd verify`` passes on its ledger.
test_bad_input.py pins each known bad input to its exact error; this module looks
for inputs nobody thought of.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.daemon import DaemonProcess, run_cli
from tests.e2e.socket_helpers import RawConnection

MAX_LINE_BYTES = 8192
MAX_EXAMPLES = int(os.environ.get("CCOS_FUZZ_EXAMPLES", "250"))
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def documented_error_codes() -> set[str]:
    """The codes in the table under "## Errors" in docs/protocol.md."""
    section = PROTOCOL_DOC.read_text(encoding="utf-8").split("\n## Errors", 1)[1]
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    assert {"bad_json", "invalid_action", "internal"} <= codes, codes
    return codes


ERROR_CODES = documented_error_codes()


@dataclass
class Ledger:
    """The fuzzed daemon and the number of entries its answers have acknowledged."""

    daemon: DaemonProcess
    expected_head: int = 0


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Ledger]:
    env = {"CCOS_OBSD_SOCKET_MAX_LINE_BYTES": str(MAX_LINE_BYTES), "CCOS_OBSD_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="ccos-fuzz-") as directory:
        state_dir = Path(directory)
        ledger = Ledger(DaemonProcess(state_dir, env=env).start())
        try:
            yield ledger
        finally:
            code = ledger.daemon.stop()
        assert code == 0, ledger.daemon.stderr.decode(errors="replace")
        result = run_cli("verify", "--state-dir", str(state_dir))
        output = result.stdout.decode(errors="replace")
        assert result.returncode == 0, output
        assert output.startswith(f"ok: {ledger.expected_head} entries"), output


# --- JSON text with tokens json.dumps will not write (NaN, 1e400, 10**5000, bad numbers)


@dataclass(frozen=True)
class Raw:
    """Text inserted verbatim where a JSON value goes."""

    text: str


def to_json(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(
            json.dumps(key, ensure_ascii=ascii_only) + ":" + to_json(item, ascii_only) for key, item in value.items()
        ) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(item, ascii_only) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def encode(value: Any, ascii_only: bool) -> bytes:
    """The request line: non-ASCII as \\u escapes, or as raw UTF-8 (lone surrogates then as CESU-8 bytes)."""
    return to_json(value, ascii_only).encode("utf-8", "surrogatepass")


NUMBER_TOKENS = [
    "1" + "0" * 400, "-1" + "0" * 400, "1" + "0" * 4400, "1e400", "-1e400", "1e-400", "NaN", "Infinity",
    "-Infinity", "-0", "-0.0e-0", "9223372036854775808", "18446744073709551616", "9007199254740993",
    "1.7976931348623157e308", "5e-324", "2E+2", "01", "1.", ".5", "+1", "0x10", "1e", "--1",
]
EDGE_STRINGS = [
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udbffy", "\udc00\ud800", "\ud834\udd1e", "\u2028\u2029",
    "\ufeff", "\uffff", "\ufffe", "\U0010ffff", "e\u0301", "\u202eevil", "\U0001f469\u200d\U0001f467", "\r\n",
    "a\rb", "\t", "\\", '"', "\x7f", "\u0085", "PlanStarted", "CapabilityCall", "observability.ingestor:v1.ingest",
]
ACTION_TYPES = ["PlanStarted", "PlanCompleted", "PlanStepStarted", "CapabilityCall", "CapabilityResult",
                "InternalStep", "KeyRotated", "SelfCheckFailed", "planstarted", "Bogus"]
ACTION_FIELDS = ["action_id", "action_type", "parent_action_id", "session_id", "plan_id", "intent_id", "step_id",
                 "function_name", "arguments", "result", "success", "error", "cost", "duration_ms", "timestamp_ms",
                 "metadata", "provenance"]
DAEMON_FIELDS = ["v", "seq", "recorded_at_ms", "peer", "id", "op", "key_id", "signature", "bogus"]
OPS = ["append", "append_batch", "ping", "get", "query", "logs", "stats", "checkpoint", "wm_search", "call",
       "replay", "wm_digest", "prove_inclusion", "prove_consistency"]
REQUEST_FIELDS = ["action", "actions", "seq", "action_id", "plan_id", "intent_id", "session_id", "action_type",
                  "parent_action_id", "function_name", "function_prefix", "run_id", "step_id", "since_ms", "until_ms",
                  "order", "limit", "after_seq", "n", "after", "capability", "function", "text", "tags", "since",
                  "until", "from", "size1", "size2", "args"]

numbers = st.one_of(
    st.integers(), st.integers(min_value=2**53 - 2, max_value=2**64 + 2), st.integers(min_value=-2, max_value=2),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(NUMBER_TOKENS).map(Raw),
)
near_the_line_limit = st.integers(min_value=MAX_LINE_BYTES - 120, max_value=MAX_LINE_BYTES + 40).map(lambda n: "s" * n)
strings = st.integers(min_value=0, max_value=15).flatmap(
    # One string in 16 is long enough to put its line just under or over socket.max_line_bytes.
    lambda pick: near_the_line_limit if pick == 0 else st.one_of(st.text(max_size=24), st.sampled_from(EDGE_STRINGS))
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)


@st.composite
def deep(draw: st.DrawFn) -> Raw:
    """Nesting around socket.max_depth (64) and far beyond it, arrays and objects mixed."""
    depth = draw(st.one_of(st.integers(min_value=60, max_value=70), st.integers(min_value=1, max_value=3000)))
    kinds = draw(st.sampled_from(["[", "{", "mixed"]))
    opening, closing = [], []
    for level in range(depth):
        bracket = kinds if kinds != "mixed" else "[{"[level % 2]
        opening.append("[" if bracket == "[" else '{"k":')
        closing.append("]" if bracket == "[" else "}")
    return Raw("".join(opening) + "0" + "".join(reversed(closing)))


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(EDGE_STRINGS)), children, max_size=4),
    ),
    max_leaves=10,
) | deep()

good_values = {
    "action_id": st.text(min_size=1, max_size=20),
    "action_type": st.sampled_from(ACTION_TYPES),
    "cost": st.floats(min_value=0, max_value=2**53),
    "duration_ms": st.integers(min_value=0, max_value=2**53),
    "timestamp_ms": st.integers(min_value=0, max_value=2**63 - 1),
    "success": st.booleans(),
    "arguments": st.lists(scalars, max_size=3),
    "metadata": st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    "result": st.fixed_dictionaries({}, optional={"success": st.booleans(), "value": scalars,
                                                  "metadata": st.dictionaries(st.text(max_size=4), scalars)}),
}


@st.composite
def actions(draw: st.DrawFn) -> Any:
    """Mostly objects close to a valid action, with some fields wrong; sometimes anything at all."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(values)
    action: dict[str, Any] = {"action_type": draw(st.sampled_from(ACTION_TYPES))}
    for name in draw(st.lists(st.sampled_from(ACTION_FIELDS + DAEMON_FIELDS), max_size=5, unique=True)):
        good = good_values.get(name, strings)
        action[name] = draw(st.one_of(good, values) if draw(st.booleans()) else good)
    return action


@st.composite
def requests(draw: st.DrawFn) -> Any:
    shape = draw(st.sampled_from(["append", "bare", "batch", "op", "op", "anything"]))
    if shape == "anything":
        return draw(values)
    request: dict[str, Any]
    if shape == "append":
        request = {"op": "append", "action": draw(actions())}
    elif shape == "bare":
        request = draw(actions())
        if not isinstance(request, dict):
            return request
    elif shape == "batch":
        request = {"op": "append_batch", "actions": draw(st.lists(actions(), max_size=6))}
    else:
        op = draw(st.one_of(st.sampled_from(OPS), strings, scalars))
        request = {"op": op}
        for name in draw(st.lists(st.sampled_from(REQUEST_FIELDS), max_size=3, unique=True)):
            request[name] = draw(values)
    if draw(st.booleans()):
        request["id"] = draw(values)
    return request


@st.composite
def structured_lines(draw: st.DrawFn) -> bytes:
    return encode(draw(requests()), ascii_only=draw(st.booleans()))


BAD_BYTES = [
    b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf0\x9f", b"\x00", b"\r", b"\r\n", b"\n\r", b"\\", b'"', b"\\u",
    b"\\ud800", b"\\udc00\\ud800", b"\\u0000", b"\xef\xbb\xbf", b"\x1b[2J",
]
VALID_FRAMES = [
    b'{"op":"ping"}',
    b'{"id":1,"op":"append","action":{"action_type":"PlanStarted","plan_id":"p\\u00e9"}}',
    b'{"action_type":"CapabilityCall","function_name":"web.search","cost":0.5,"metadata":{"k":[1,{"a":null}]}}',
    b'{"op":"append_batch","actions":[{"action_type":"InternalStep"},{"action_type":"PlanCompleted"}]}',
    b'{"op":"query","plan_id":"p","limit":5,"order":"desc"}',
    b'{"op":"query","plan_id":"p","run_id":"r","step_id":"s","order":"time"}',
    b'{"op":"get","seq":0}',
]


@st.composite
def raw_lines(draw: st.DrawFn) -> bytes:
    frame = draw(st.one_of(st.sampled_from(VALID_FRAMES), structured_lines()))
    mutation = draw(st.sampled_from(["cut", "insert", "replace", "binary", "escape"]))
    at = draw(st.integers(min_value=0, max_value=len(frame)))
    if mutation == "cut":
        return frame[:at]
    if mutation == "binary":
        return draw(st.binary(max_size=80))
    piece = draw(st.one_of(st.sampled_from(BAD_BYTES), st.binary(min_size=1, max_size=4)))
    if mutation == "insert":
        return frame[:at] + piece + frame[at:]
    if mutation == "replace":
        return frame[:at] + piece + frame[at + len(piece):]
    escape = draw(st.sampled_from([b"\\ud800", b"\\udbff", b"\\udc00", b"\\uDFFF", b"\\ud800\\u0041",
                                   b"\\u0000", b"\\ud834\\udd1e", b"\\uFFFF", b"\\u", b"\\x41"]))
    return b'{"action_type":"PlanStarted","plan_id":"a' + escape + b'","metadata":{"' + escape + b'":1}}'


line_endings = st.sampled_from([b"\n", b"\n", b"\r\n", b"\r\r\n", b"\n\r\n", b" \n"])
blank_lines = st.sampled_from([b"", b" ", b"\t", b"\r", b"  \r", b"\x0b\x0c"])
payloads = st.lists(
    st.tuples(st.one_of(structured_lines(), raw_lines(), blank_lines), line_endings), min_size=1, max_size=4,
).map(lambda lines: b"".join(line + ending for line, ending in lines))


# --- what the daemon must answer


def answered_lines(payload: bytes) -> int:
    """How many answers the daemon owes: one per line that is over the limit or not blank."""
    lines = payload.split(b"\n")[:-1]
    return sum(1 for line in lines if len(line) > MAX_LINE_BYTES or line.rstrip(b"\r").strip())


def check_error(answer: dict[str, Any]) -> None:
    assert set(answer) <= {"id", "ok", "error"}, answer
    error = answer["error"]
    assert isinstance(error, dict) and set(error) <= {"code", "message", "field"}, answer
    assert error["code"] in ERROR_CODES, f"undocumented error code: {answer}"
    assert error["code"] != "internal", f"an input reached an internal error: {answer}"
    assert isinstance(error["message"], str) and error["message"], answer
    assert isinstance(error.get("field", ""), str), answer


def appended_by(answer: dict[str, Any]) -> int:
    """Entries an answer says it appended (0 for reads, errors and duplicates)."""
    assert isinstance(answer.get("ok"), bool), answer
    if not answer["ok"]:
        check_error(answer)
        return 0
    if "results" in answer:
        count = 0
        for result in answer["results"]:
            count += appended_by(result)
            assert "results" not in result and "result" not in result, answer
        return count
    if "leaf_hash" in answer:
        assert isinstance(answer["seq"], int) and isinstance(answer["duplicate"], bool), answer
        return 0 if answer["duplicate"] else 1
    if "result" in answer:  # the ingestor capability: its CapabilityCall and CapabilityResult
        return 2
    return 0


def exchange(ledger: Ledger, payload: bytes) -> None:
    daemon = ledger.daemon
    with RawConnection(daemon.socket_path) as connection:
        connection.send(payload)
        appended = 0
        for _ in range(answered_lines(payload)):
            line = connection.read_line()
            assert line.endswith(b"\n"), f"cut or missing answer {line!r} to {payload[:300]!r}"
            answer = json.loads(line)
            assert isinstance(answer, dict), line
            appended += appended_by(answer)
            event("answer: " + ("ok" if answer.get("ok") else answer["error"]["code"]))
        # The ping is answered next: no answer was missing or extra, and the daemon lives.
        pong = connection.request({"id": "fuzz-ping", "op": "ping"})
    assert pong == {"id": "fuzz-ping", "ok": True, "head": ledger.expected_head + appended}, (
        f"after {payload[:300]!r}: {pong}, expected head {ledger.expected_head} + {appended}"
    )
    ledger.expected_head += appended
    assert daemon.proc is not None and daemon.proc.poll() is None


@FUZZ_SETTINGS
@given(payload=payloads)
def test_any_lines_get_one_well_formed_answer_each_and_append_only_what_they_acknowledge(
    fuzzed: Ledger, payload: bytes
) -> None:
    exchange(fuzzed, payload)


@FUZZ_SETTINGS
@given(line=structured_lines(), ending=line_endings)
def test_structured_requests_with_wrong_types_and_huge_numbers(fuzzed: Ledger, line: bytes, ending: bytes) -> None:
    exchange(fuzzed, line + ending)


def test_the_fuzzed_ledger_holds_exactly_what_was_acknowledged(fuzzed: Ledger) -> None:
    """The count kept from the answers matches the daemon (and verify at the module's end)."""
    with fuzzed.daemon.client() as client:
        assert client.ping() == fuzzed.expected_head
