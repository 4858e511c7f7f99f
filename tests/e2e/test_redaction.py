"""Redaction end to end: under the shipped default rules a secret leaves no trace in any byte the
daemon writes (ledger, Working Memory, the JSONL sink, every file of the state dir with its
-wal) or in any output (its log, the export, query, the HTTP reads, Working Memory search, an
error answer), whichever way it came in, while ``ccos-obsd verify`` passes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.redact import shipped_rules_text
from ccos_obsd.redact import placeholder
from tests.daemon import DaemonProcess, run_cli
from tests.e2e.socket_helpers import RawConnection, wait_until

SECRET = "sk-live-7hX2kQ9mZ4pL8vR3nT6wY1cB5"  # noqa: S105 - made up: the secret the test chases
"""An OpenAI-style key: the shipped rule "openai-key" matches it."""
FIELD_SECRET = "correct-horse-battery-staple-42"  # noqa: S105 - made up, as above
"""A password under metadata.password: the shipped rule "credential-fields" replaces it, hashed."""
TRACES = (SECRET, "7hX2kQ9mZ4pL8vR3nT6wY1cB5", FIELD_SECRET)
INGEST = "observability.ingestor:v1.ingest"


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[DaemonProcess]:
    config = state_dir / "redact.toml"
    config.write_text(shipped_rules_text() + f'[[sinks]]\ntype = "jsonl"\nname = "audit"\n'
                      f'path = "{state_dir / "audit.jsonl"}"\n', encoding="utf-8")
    process = DaemonProcess(state_dir, "--config", str(config), reader=True).start()
    try:
        yield process
    finally:
        process.stop()


def assert_no_trace(where: str, data: bytes | str) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    for trace in TRACES:
        assert trace.encode() not in raw, f"{trace!r} found in {where}"


def write_every_way(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The secret through append, append_batch, a bare line, the ingestor and rejected actions; the answers."""
    action = {"action_type": "CapabilityCall", "function_name": "http.get", "action_id": "call-1",
              "arguments": [f"curl -H 'Authorization: {SECRET}' https://api.example.com"],
              "metadata": {"password": FIELD_SECRET}, "error": f"401 for key {SECRET}"}
    with RawConnection(daemon.socket_path) as raw:
        answers = [
            raw.request({"op": "append", "action": action}),
            raw.request({"op": "append", "action": action}),  # the same, after redaction: a duplicate
            raw.request({"op": "append_batch", "actions": [
                {"action_type": "PlanStarted", "plan_id": "p-1", "metadata": {"password": FIELD_SECRET}},
                {"action_type": SECRET},
                {"action_type": "PlanStarted", "extra": SECRET},
            ]}),
            raw.request({"action_type": "InternalStep", "metadata": {"note": f"env OPENAI_API_KEY={SECRET}"}}),
            raw.request({"op": "call", "capability": INGEST,
                         "args": ["single", {"summary": "rotated the key", "content": f"old key {SECRET}"}]}),
            raw.request({"op": "append", "action": {"action_type": SECRET}}),
            raw.request({"op": "append", "action": {"action_type": "PlanStarted", "extra": SECRET}}),
        ]
    return answers


def test_a_secret_leaves_no_trace_anywhere_and_the_ledger_verifies(daemon: DaemonProcess, state_dir: Path) -> None:
    answers = write_every_way(daemon)
    single, duplicate, batch, bare, ingested, bad_type, bad_field = answers
    assert single["ok"] and duplicate["ok"] and duplicate["duplicate"] and duplicate["seq"] == single["seq"]
    assert [r["ok"] for r in batch["results"]] == [True, False, False]
    assert bare["ok"] and ingested["ok"] and ingested["result"]["ingested"] == 1
    # Rejected after redaction: the answer shows the placeholder, never the secret.
    assert bad_type["error"]["code"] == "invalid_action" and "[redacted:openai-key]" in bad_type["error"]["message"]
    assert bad_field["error"] == {"code": "invalid_action", "message": "unknown field 'extra'", "field": "extra"}
    assert_no_trace("the answers", json.dumps(answers))

    with daemon.client() as client:
        entries = client.query(limit=100)
        head = client.ping()
        wait_until(lambda: int(float(_sample(daemon, "ccos_sink_lag_entries", 'sink="audit"'))) == 0
                   and int(float(_sample(daemon, "ccos_sink_lag_entries", 'sink="wm"'))) == 0, 20, "the sinks")
        searched = client.request({"op": "wm_search", "text": "redacted"})
    assert head == 5  # call-1, PlanStarted, the bare line, the ingestor's call and result
    call = entries[0]["entry"]
    hashed = placeholder("credential-fields", _hmac(state_dir, FIELD_SECRET))
    assert call["arguments"] == ["curl -H 'Authorization: [redacted:openai-key]' https://api.example.com"]
    assert call["metadata"] == {"password": hashed} and call["error"] == "401 for key [redacted:openai-key]"
    assert entries[1]["entry"]["metadata"] == {"password": hashed}  # equal secrets, equal placeholders
    assert entries[3]["entry"]["arguments"][1][0]["content"] == "old key [redacted:openai-key]"
    assert searched["ok"] and searched["entries"]
    assert_no_trace("query and wm_search", json.dumps([entries, searched]))

    for path in ("/v1/entries/0", "/v1/query?limit=100", "/v1/logs?n=1000", "/v1/wm/search?text=key",
                 "/v1/actions/call-1", "/metrics"):
        status, _, body = daemon.get(path)
        assert status == 200, (path, body)
        assert_no_trace(path, body)
    assert _sample(daemon, "ccos_redactions_total", 'rule="openai-key"') == "10.0"
    assert _sample(daemon, "ccos_redactions_total", 'rule="credential-fields"') == "3.0"

    export = run_cli("export", "--state-dir", str(state_dir))
    assert export.returncode == 0 and len(export.stdout.splitlines()) == 5
    assert_no_trace("the export", export.stdout)
    assert_no_trace("the state dir while running", _every_file(state_dir))
    assert daemon.stop() == 0
    assert_no_trace("the daemon's output", json.dumps(_drain(daemon)) + daemon.stderr.decode("utf-8", "replace"))
    assert_no_trace("the state dir after the stop", _every_file(state_dir))
    verify = run_cli("verify", "--state-dir", str(state_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_redaction_key_is_private_and_backed_up(daemon: DaemonProcess, state_dir: Path) -> None:
    with daemon.client() as client:
        client.append({"action_type": "PlanStarted", "metadata": {"token": "t-1"}})
    key = state_dir / "redact.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    backup = run_cli("backup", "--state-dir", str(state_dir), str(state_dir / "copy"))
    assert backup.returncode == 0, backup.stderr
    copied = state_dir / "copy" / "redact.key"
    assert copied.read_bytes() == key.read_bytes() and stat.S_IMODE(copied.stat().st_mode) == 0o600


def test_a_bad_pattern_stops_the_start_naming_the_rule(state_dir: Path) -> None:
    config = state_dir / "bad.toml"
    config.write_text("[[redact]]\nname = \"ok\"\npattern = 'x'\n[[redact]]\nname = \"broken\"\npattern = '(sk-'\n")
    started = run_cli("run", "--state-dir", str(state_dir), "--config", str(config), "--http", "127.0.0.1:0")
    assert started.returncode == 2
    assert "redact[1].pattern" in started.stderr.decode() and "rule 'broken'" in started.stderr.decode()


def test_a_reload_applies_new_rules_and_keeps_the_running_ones_when_bad(state_dir: Path) -> None:
    config = state_dir / "rules.toml"
    config.write_text("[[redact]]\nname = \"first\"\npattern = 'alpha-[0-9]+'\n")
    daemon = DaemonProcess(state_dir, "--config", str(config)).start()
    try:
        config.write_text("[[redact]]\nname = \"second\"\npattern = 'beta-[0-9]+'\nhash = true\n")
        daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert daemon.wait_for_event("config_reloaded")["changed"] == ["redact"]
        config.write_text("[[redact]]\nname = \"third\"\npattern = '(unclosed'\n")
        daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert daemon.wait_for_event("config_reload_failed")["key"] == "redact[0].pattern"
        with daemon.client() as client:
            client.append({"action_type": "PlanStarted", "metadata": {"a": "alpha-1 beta-2"}})
            entry = client.get(seq=0)["entry"]
        assert entry["metadata"]["a"] == "alpha-1 " + placeholder("second", _hmac(state_dir, "beta-2"))
    finally:
        daemon.stop()


def _hmac(state_dir: Path, secret: str) -> str:
    return hmac.new((state_dir / "redact.key").read_bytes(), secret.encode(), hashlib.sha256).hexdigest()


def _sample(daemon: DaemonProcess, name: str, labels: str) -> str:
    prefix = f"{name}{{{labels}}} "
    return next((line[len(prefix):] for line in daemon.metrics().splitlines() if line.startswith(prefix)), "nan")


def _every_file(directory: Path) -> bytes:
    """Every byte of every file under ``directory`` (databases with their -wal and -shm, keys, logs, sinks)."""
    return b"".join(path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file())


def _drain(daemon: DaemonProcess) -> list[Any]:
    """Every line the daemon wrote to stdout."""
    lines = list(daemon.log)
    while not daemon.lines.empty():
        lines.append(daemon.lines.get_nowait())
    return lines
