"""Redaction: ``[[redact]]`` rules, their checks, and what they replace in an action.

Path rules replace the whole value at a path (``*``: any one key or list index);
pattern rules replace the matched span of any string value; ``hash = true`` gives an
HMAC placeholder that is stable under one ledger key and differs under another.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from bench.redact import shipped_rules_text
from ccos_obsd.config import RedactRule, load_config
from ccos_obsd.errors import ConfigError, StartupError
from ccos_obsd.metrics.aggregates import Aggregates
from ccos_obsd.redact import KEY_BYTES, Redactor, placeholder
from ccos_obsd.reload import plan_reload
from ccos_obsd.statedir import REDACT_KEY_FILE, load_redact_key
from tests.unit.metrics_helpers import openmetrics

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "ccos-obsd.toml"
KEY = bytes(range(32))


def rules(tmp_path: Path, text: str) -> tuple[RedactRule, ...]:
    path = tmp_path / "redact.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ={}, overrides={"state_dir": str(tmp_path)}).redact


def redactor(tmp_path: Path, text: str, key: bytes | None = KEY) -> Redactor:
    return Redactor(rules(tmp_path, text), key)


def hmac_hex(secret: bytes, key: bytes = KEY) -> str:
    return hmac.new(key, secret, hashlib.sha256).hexdigest()


ACTION: dict[str, Any] = {
    "action_type": "CapabilityCall",
    "function_name": "http.get",
    "arguments": ["https://api.example.com", {"api_key": "k-1", "retries": 3, "verbose": True}],
    "metadata": {"api_key": {"id": 7, "scopes": ["read"]}, "note": "calls the API", "count": 2, "ok": None},
    "result": {"success": True, "value": {"token": 12345, "rows": [1, 2.5, "x"]}},
    "cost": 0.25,
}


# --- paths


def test_a_path_replaces_the_whole_value_whatever_its_type(tmp_path: Path) -> None:
    r = redactor(tmp_path, '[[redact]]\nname = "keys"\npaths = ["metadata.api_key", "result.value.token"]\n')
    redacted, counts = r.redact(ACTION)
    assert redacted["metadata"] == {**ACTION["metadata"], "api_key": "[redacted:keys]"}
    assert redacted["result"] == {"success": True, "value": {"token": "[redacted:keys]", "rows": [1, 2.5, "x"]}}
    assert counts == {"keys": 2}
    # Everything else is the same value of the same type, and the input is untouched.
    assert {k: v for k, v in redacted.items() if k not in ("metadata", "result")} == {
        k: v for k, v in ACTION.items() if k not in ("metadata", "result")}
    assert ACTION["metadata"]["api_key"] == {"id": 7, "scopes": ["read"]}


def test_a_star_matches_any_key_or_list_index(tmp_path: Path) -> None:
    r = redactor(tmp_path, '[[redact]]\nname = "args"\npaths = ["arguments.*"]\n')
    redacted, counts = r.redact(ACTION)
    assert redacted["arguments"] == ["[redacted:args]", "[redacted:args]"]
    assert counts == {"args": 2}
    r = redactor(tmp_path, '[[redact]]\nname = "meta"\npaths = ["metadata.*"]\n')
    assert set(r.redact(ACTION)[0]["metadata"].values()) == {"[redacted:meta]"}


def test_a_star_in_the_middle_and_a_list_index(tmp_path: Path) -> None:
    r = redactor(tmp_path, '[[redact]]\nname = "p"\npaths = ["arguments.*.api_key", "result.value.rows.1"]\n')
    redacted, counts = r.redact(ACTION)
    assert redacted["arguments"] == ["https://api.example.com", {"api_key": "[redacted:p]", "retries": 3,
                                                                  "verbose": True}]
    assert redacted["result"]["value"]["rows"] == [1, "[redacted:p]", "x"]
    assert counts == {"p": 2}


def test_a_path_that_is_not_there_changes_nothing(tmp_path: Path) -> None:
    r = redactor(tmp_path, '[[redact]]\nname = "p"\npaths = ["metadata.password", "arguments.5", "cost.x"]\n')
    redacted, counts = r.redact(ACTION)
    assert redacted is ACTION
    assert counts == {}


def test_the_first_rule_to_match_a_path_names_the_placeholder(tmp_path: Path) -> None:
    r = redactor(tmp_path, '[[redact]]\nname = "first"\npaths = ["metadata.*"]\n'
                           '[[redact]]\nname = "second"\npaths = ["metadata.note"]\n')
    redacted, counts = r.redact(ACTION)
    assert redacted["metadata"]["note"] == "[redacted:first]"
    assert counts == {"first": 4}


# --- patterns


def test_a_pattern_replaces_only_the_matched_span_anywhere(tmp_path: Path) -> None:
    r = redactor(tmp_path, "[[redact]]\nname = \"sk\"\npattern = 'sk-[A-Za-z0-9]{8,}'\n")
    action = {"action_type": "InternalStep", "error": "auth failed for sk-abcdefgh123 and sk-ZZZZZZZZZ",
              "metadata": {"deep": [{"line": "API_KEY=sk-abcdefgh123 rest"}], "sk-abcdefgh123": "key kept"}}
    redacted, counts = r.redact(action)
    assert redacted["error"] == "auth failed for [redacted:sk] and [redacted:sk]"
    assert redacted["metadata"]["deep"] == [{"line": "API_KEY=[redacted:sk] rest"}]
    assert redacted["metadata"]["sk-abcdefgh123"] == "key kept"  # object keys are not searched
    assert counts == {"sk": 3}


def test_a_value_replaced_by_a_path_is_not_searched_again(tmp_path: Path) -> None:
    r = redactor(tmp_path, "[[redact]]\nname = \"pat\"\npattern = 'secret'\n"
                           '[[redact]]\nname = "path"\npaths = ["metadata.a"]\n')
    redacted, counts = r.redact({"metadata": {"a": "secret", "b": "secret"}})
    assert redacted == {"metadata": {"a": "[redacted:path]", "b": "[redacted:pat]"}}
    assert counts == {"path": 1, "pat": 1}


def test_patterns_apply_in_order_each_to_what_the_last_left(tmp_path: Path) -> None:
    r = redactor(tmp_path, "[[redact]]\nname = \"bearer\"\npattern = 'Bearer \\S+'\n"
                           "[[redact]]\nname = \"long\"\npattern = '[a-z]{20,}'\n")
    redacted, counts = r.redact({"error": "Bearer abcdefghijklmnopqrstuvwxyz then abcdefghijklmnopqrstuvwxyz"})
    assert redacted == {"error": "[redacted:bearer] then [redacted:long]"}
    assert counts == {"bearer": 1, "long": 1}


@pytest.mark.parametrize("length", [10, 127, 128, 129, 5000])
def test_short_and_long_strings_find_every_pattern(tmp_path: Path, length: int) -> None:
    # Short strings are screened by one alternation of all patterns, long ones searched per pattern.
    r = redactor(tmp_path, "[[redact]]\nname = \"a\"\npattern = 'AAAA'\n"
                           "[[redact]]\nname = \"b\"\npattern = 'x(?<=[^a-z]x)BBBB'\n")
    text = ("." * length + "-xBBBB")[-length:] if length >= 6 else "-xBBBB"
    assert r.redact(text) == (text[:-5] + "[redacted:b]", {"b": 1})
    assert r.redact("a" * length) == ("a" * length, {})


@pytest.mark.parametrize("pattern", ["(?i)secret-[a-z]+", "(s)ecret-(?P<x>[a-z]+)", "(e)?secret-[a-z]+"])
def test_patterns_with_groups_or_global_flags_match_as_alone(tmp_path: Path, pattern: str) -> None:
    r = redactor(tmp_path, f"[[redact]]\nname = \"other\"\npattern = 'zzzz'\n"
                           f"[[redact]]\nname = \"s\"\npattern = '{pattern}'\n")
    assert r.redact("a secret-value here") == ("a [redacted:s] here", {"s": 1})


# --- the hashed form


def test_the_hashed_form_is_the_hmac_of_the_secret_under_the_ledger_key(tmp_path: Path) -> None:
    text = ("[[redact]]\nname = \"sk\"\npattern = 'sk-[a-z0-9]{8,}'\nhash = true\n"
            '[[redact]]\nname = "meta"\npaths = ["metadata.api_key"]\nhash = true\n')
    action = {"error": "used sk-aaaa1111 and sk-aaaa1111 then sk-bbbb2222", "metadata": {"api_key": {"id": 7}}}
    redacted, counts = redactor(tmp_path, text).redact(action)
    first, second = placeholder("sk", hmac_hex(b"sk-aaaa1111")), placeholder("sk", hmac_hex(b"sk-bbbb2222"))
    assert redacted["error"] == f"used {first} and {first} then {second}"
    assert first.startswith("[redacted:sk:hmac-sha256:") and len(first) == len("[redacted:sk:hmac-sha256:]") + 64
    # A non-string value: the HMAC of its canonical JSON.
    assert redacted["metadata"]["api_key"] == placeholder("meta", hmac_hex(b'{"id":7}'))
    assert counts == {"sk": 3, "meta": 1}
    # Stable under one key, different under another ledger's key.
    assert redactor(tmp_path, text).redact(action)[0] == redacted
    other = redactor(tmp_path, text, key=bytes(32)).redact(action)[0]
    assert other["error"] != redacted["error"] and other["metadata"] != redacted["metadata"]


def test_a_lone_surrogate_still_hashes(tmp_path: Path) -> None:
    r = redactor(tmp_path, '[[redact]]\nname = "m"\npaths = ["metadata.*"]\nhash = true\n')
    redacted, _ = r.redact({"metadata": {"a": "x\ud800", "b": ["x\ud800"]}})
    assert redacted["metadata"]["a"] == placeholder("m", hmac_hex("x\ud800".encode("utf-8", "surrogatepass")))
    assert redacted["metadata"]["b"] == placeholder("m", hmac_hex(b'["x\\ud800"]'))


def test_a_hashing_rule_needs_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key"):
        redactor(tmp_path, '[[redact]]\nname = "m"\npaths = ["metadata.a"]\nhash = true\n', key=None)


# --- no rules, no change


def test_without_matches_the_action_comes_back_as_the_same_object(tmp_path: Path) -> None:
    before = copy.deepcopy(ACTION)
    assert Redactor(()).redact(ACTION) == (ACTION, {})
    r = redactor(tmp_path, "[[redact]]\nname = \"sk\"\npattern = 'sk-[a-z]{30}'\n"
                           '[[redact]]\nname = "p"\npaths = ["metadata.password"]\n')
    redacted, counts = r.redact(ACTION)
    assert redacted is ACTION and counts == {}
    assert before == ACTION


def test_an_action_that_is_not_an_object_goes_through(tmp_path: Path) -> None:
    r = redactor(tmp_path, "[[redact]]\nname = \"sk\"\npattern = 'sk-[a-z]{4}'\n")
    assert r.redact("sk-abcd") == ("[redacted:sk]", {"sk": 1})
    assert r.redact([1, None, True]) == ([1, None, True], {})


# --- the checks (config.py)


@pytest.mark.parametrize(("table", "key", "message"), [
    ('name = "x"\npattern = "(unclosed"', "redact[1].pattern", "rule 'x': the pattern does not compile"),
    ('name = "x"\npattern = "a*"', "redact[1].pattern", "matches the empty string"),
    ('name = "ok"\npattern = "b"', "redact[1].name", "another rule is named 'ok'"),
    ('name = "x y"\npattern = "b"', "redact[1].name", "letters, digits"),
    ('pattern = "b"', "redact[1].name", "letters, digits"),
    ('name = "x"', "redact[1]", "either paths or pattern"),
    ('name = "x"\npattern = "b"\npaths = ["metadata.a"]', "redact[1]", "either paths or pattern"),
    ('name = "x"\npattern = "b"\nhash = "yes"', "redact[1].hash", "true or false"),
    ('name = "x"\npattern = "b"\nreplace = "y"', "redact[1].replace", "unknown option"),
    ('name = "x"\npaths = []', "redact[1].paths", "non-empty list"),
    ('name = "x"\npaths = ["metadata..a"]', "redact[1].paths", "empty segment"),
    ('name = "x"\npaths = ["metadata.**"]', "redact[1].paths", "there is no '**'"),
    ('name = "x"\npaths = ["metdata.api_key"]', "redact[1].paths", "does not start with an action field"),
    ('name = "x"\npaths = ["metadata"]', "redact[1].paths", "whole 'metadata' field"),
    ('name = "x"\npaths = ["action_id"]', "redact[1].paths", "whole 'action_id' field"),
])
def test_a_bad_rule_is_refused_naming_it(tmp_path: Path, table: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules(tmp_path, f'[[redact]]\nname = "ok"\npattern = "a"\n[[redact]]\n{table}\n')
    assert caught.value.key == key
    assert message in caught.value.problem


def test_redact_must_be_an_array_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        rules(tmp_path, '[redact]\nname = "x"\n')
    assert caught.value.key == "redact"


def test_whole_string_fields_may_be_replaced(tmp_path: Path) -> None:
    found = rules(tmp_path, '[[redact]]\nname = "e"\npaths = ["error", "session_id", "*.x"]\n')
    assert found == (RedactRule(name="e", paths=(("error",), ("session_id",), ("*", "x"))),)


def test_changed_rules_are_applied_by_a_reload(tmp_path: Path) -> None:
    running = load_config(environ={}, overrides={"state_dir": str(tmp_path)})
    (tmp_path / "c.toml").write_text("[[redact]]\nname = \"sk\"\npattern = 'sk-x'\n")
    loaded = load_config(tmp_path / "c.toml", environ={}, overrides={"state_dir": str(tmp_path)})
    plan = plan_reload(running, loaded)
    assert plan.applied == ("redact",) and plan.restart_required == ()
    assert plan.config.redact == loaded.redact
    assert plan_reload(loaded, load_config(tmp_path / "c.toml", environ={},
                                           overrides={"state_dir": str(tmp_path)})).applied == ()


# --- the shipped rules: each redacts its shape and leaves a near miss alone


def shipped_rules(tmp_path: Path) -> dict[str, Redactor]:
    """The commented-out [[redact]] block of config/ccos-obsd.toml, uncommented, one Redactor per rule."""
    found = rules(tmp_path, shipped_rules_text(SHIPPED_CONFIG))
    return {rule.name: Redactor([rule], KEY) for rule in found}


SECRETS = {
    "openai-key": ("API_KEY=sk-live-0123456789abcdefghijKLMN", "risk-assessment-for-the-quarterly-review sk-short"),
    "aws-access-key-id": ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPL is 15 long"),
    "github-token": ("token ghp_0123456789abcdefghijABCDEFGHIJ012345",
                     "ghx_0123456789abcdefghijABCDEFGHIJ012345 or ghp_short"),
    "slack-token": ("xoxb-1234567890-abcdefghij", "xoxz-1234567890-abcdefghij"),
    "jwt": ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "eyJhbGciOiJIUzI1NiJ9 alone is only a header"),
    "bearer-token": ("Authorization: Bearer abcdef0123456789ABCDEF.xyz", "the bearer of bad news, Bearer short"),
    "private-key": ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
                    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQY\n-----END PUBLIC KEY-----"),
    "url-credentials": ("postgres://app:s3cr3t@db.internal:5432/app", "https://db.internal:5432/app?a=b@c"),
}
"""For each shipped pattern rule: a string holding a secret of its shape, and a near miss."""
SECRET_PART = {
    "openai-key": "sk-live-0123456789abcdefghijKLMN", "aws-access-key-id": "AKIAIOSFODNN7EXAMPLE",
    "github-token": "ghp_0123456789abcdefghijABCDEFGHIJ012345", "slack-token": "xoxb-1234567890-abcdefghij",
    "jwt": "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "bearer-token": "abcdef0123456789ABCDEF",
    "private-key": "b3BlbnNzaC1rZXk", "url-credentials": "s3cr3t",
}


def test_every_shipped_rule_is_tested(tmp_path: Path) -> None:
    assert set(shipped_rules(tmp_path)) == {*SECRETS, "credential-fields"}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_a_shipped_pattern_redacts_its_shape_and_not_a_near_miss(tmp_path: Path, name: str) -> None:
    rule = shipped_rules(tmp_path)[name]
    sample, near_miss = SECRETS[name]
    redacted, counts = rule.redact({"metadata": {"log": f"before {sample} after"}})
    line = redacted["metadata"]["log"]
    assert SECRET_PART[name] not in line
    assert line.startswith("before ") and line.endswith(" after") and f"[redacted:{name}]" in line
    assert counts == {name: 1}
    assert rule.redact({"metadata": {"log": near_miss}}) == ({"metadata": {"log": near_miss}}, {})


def test_a_cut_short_private_key_is_redacted_to_the_end(tmp_path: Path) -> None:
    rule = shipped_rules(tmp_path)["private-key"]
    redacted, _ = rule.redact({"error": "key: -----BEGIN RSA PRIVATE KEY-----\nMIIEow truncat"})
    assert redacted == {"error": "key: [redacted:private-key]"}


def test_the_shipped_credential_fields_are_hashed(tmp_path: Path) -> None:
    rule = shipped_rules(tmp_path)["credential-fields"]
    action = {"metadata": {"api_key": 12345, "token_count": 3, "password": "hunter2"},
              "arguments": [{"token": "t-1", "tokens": 9}, "password"]}
    redacted, counts = rule.redact(action)
    assert redacted == {
        "metadata": {"api_key": placeholder("credential-fields", hmac_hex(b"12345")), "token_count": 3,
                     "password": placeholder("credential-fields", hmac_hex(b"hunter2"))},
        "arguments": [{"token": placeholder("credential-fields", hmac_hex(b"t-1")), "tokens": 9}, "password"],
    }
    assert counts == {"credential-fields": 3}


# --- the key file, and the counter


def test_the_redaction_key_is_created_private_once(tmp_path: Path) -> None:
    key = load_redact_key(tmp_path)
    path = tmp_path / REDACT_KEY_FILE
    assert len(key) == KEY_BYTES and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_redact_key(tmp_path) == key


def test_an_unsafe_or_damaged_redaction_key_is_refused(tmp_path: Path) -> None:
    load_redact_key(tmp_path)
    path = tmp_path / REDACT_KEY_FILE
    os.chmod(path, 0o640)
    with pytest.raises(StartupError, match=re.escape(f"chmod 600 {path}")):
        load_redact_key(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(StartupError, match="holds 5 bytes"):
        load_redact_key(tmp_path)


def test_redactions_are_counted_by_rule() -> None:
    aggregates = Aggregates()
    aggregates.count_redactions({"sk": 2})
    aggregates.count_redactions({"sk": 1, "jwt": 1})
    text = openmetrics(aggregates)
    assert 'ccos_redactions_total{rule="sk"} 3.0' in text
    assert 'ccos_redactions_total{rule="jwt"} 1.0' in text
    assert "# HELP ccos_redactions " in text
