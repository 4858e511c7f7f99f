"""The ``ccos-obsd`` command line against a real daemon and a real state dir.

Every check of hashes, key ids and signatures here is computed independently of
``ccos_obsd`` (hashlib, base64, cryptography), from the DESIGN.md contracts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.daemon import DaemonProcess, run_cli

EXPORT_FIELDS = {"seq", "entry", "leaf_hash", "chain_hash", "key_id", "signature"}
SIGNATURE_CONTEXT = b"ccos-obsd/entry/v1\x00"


# --- independent implementations of the contracts


def parse_vkey(vkey: str) -> tuple[str, str, bytes]:
    """``name+8hex+base64(0x01 || 32 bytes)`` -> (name, key id, public key); checks the key id."""
    name, key_id, encoded = vkey.split("+", 2)
    raw = base64.b64decode(encoded, validate=True)
    assert len(raw) == 33 and raw[0] == 0x01, f"not an Ed25519 vkey: {vkey}"
    assert len(key_id) == 8 and key_id == key_id.lower()
    public = raw[1:]
    expected_id = hashlib.sha256(name.encode() + b"\n" + b"\x01" + public).digest()[:4].hex()
    assert key_id == expected_id, f"key id {key_id} of {vkey} should be {expected_id}"
    return name, key_id, public


def make_vkey(name: str, public: bytes) -> str:
    key_id = hashlib.sha256(name.encode() + b"\n" + b"\x01" + public).digest()[:4].hex()
    encoded = base64.b64encode(b"\x01" + public).decode()
    return f"{name}+{key_id}+{encoded}"


def check_export(lines: list[str], public_keys: dict[str, bytes]) -> list[dict[str, Any]]:
    """Check every export record against DESIGN.md; return the parsed entries."""
    previous = bytes(32)
    entries = []
    for expected_seq, line in enumerate(lines):
        record = json.loads(line)
        assert set(record) == EXPORT_FIELDS, record
        assert record["seq"] == expected_seq
        entry_bytes = record["entry"].encode("utf-8")
        leaf = hashlib.sha256(b"\x00" + entry_bytes).digest()
        assert record["leaf_hash"] == leaf.hex(), f"leaf hash of seq {expected_seq}"
        chain = hashlib.sha256(previous + leaf).digest()
        assert record["chain_hash"] == chain.hex(), f"chain hash of seq {expected_seq}"
        previous = chain
        signature = base64.b64decode(record["signature"], validate=True)
        assert len(signature) == 64
        public = Ed25519PublicKey.from_public_bytes(public_keys[record["key_id"]])
        public.verify(signature, SIGNATURE_CONTEXT + chain)  # raises InvalidSignature
        entry = json.loads(entry_bytes)
        assert entry["seq"] == expected_seq
        assert entry["v"] == 1
        # Canonical JSON: what is stored is what a canonical encoder gives back.
        canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert canonical == entry_bytes
        entries.append(entry)
    return entries


def keys_of(state_dir: Path) -> dict[str, bytes]:
    result = run_cli("keys", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    keys = {}
    for line in result.stdout.decode().splitlines():
        _, key_id, public = parse_vkey(line)
        keys[key_id] = public
    return keys


def ndjson(*objects: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def answers(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def append_plan(daemon: DaemonProcess, plan_id: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    with daemon.client() as client:
        return [client.append({"action_type": "PlanStepStarted", "plan_id": plan_id, "step_id": f"s{i}", **extra})
                for i in range(n)]


# --- send


SEND_LINES = (
    ndjson({"id": "r1", "action_type": "PlanStarted", "plan_id": "p1", "cost": 0.5})
    + b"\n"  # blank lines get no answer
    + ndjson(
        {"op": "ping", "id": 2},
        {"op": "append", "action": {"action_type": "PlanCompleted", "plan_id": "p1"}},
    )
)


def check_good_send(result: Any, first_seq: int = 0) -> None:
    assert result.returncode == 0, result.stderr
    got = answers(result.stdout)
    assert len(got) == 3, got
    assert got[0]["id"] == "r1" and got[0]["ok"] is True and got[0]["seq"] == first_seq
    assert got[0]["duplicate"] is False
    # The ping is answered after the append before it (read-your-writes); the
    # append pipelined after it may already be committed too.
    assert got[1]["id"] == 2 and got[1]["ok"] is True
    assert got[1]["head"] in (first_seq + 1, first_seq + 2)
    assert got[2]["ok"] is True and got[2]["seq"] == first_seq + 1


def test_send_from_file_prints_one_answer_per_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    actions = tmp_path / "actions.ndjson"
    actions.write_bytes(SEND_LINES)
    result = run_cli("send", "--socket", str(daemon.socket_path), str(actions))
    check_good_send(result)


def test_send_reads_several_files_in_order(daemon: DaemonProcess, tmp_path: Path) -> None:
    first, second = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    first.write_bytes(ndjson({"action_type": "PlanStarted", "plan_id": "a"}))
    second.write_bytes(ndjson({"action_type": "PlanStarted", "plan_id": "b"}, {"op": "ping"}))
    result = run_cli("send", "--state-dir", str(daemon.state_dir), str(first), str(second))
    assert result.returncode == 0, result.stderr
    got = answers(result.stdout)
    assert [a.get("seq") for a in got] == [0, 1, None]
    assert got[2]["head"] == 2


@pytest.mark.parametrize("stdin_args", [(), ("-",)], ids=["no-file", "dash"])
def test_send_from_stdin(daemon: DaemonProcess, stdin_args: tuple[str, ...]) -> None:
    result = run_cli("send", "--socket", str(daemon.socket_path), *stdin_args, input=SEND_LINES)
    check_good_send(result)


def test_send_exits_1_when_an_answer_is_an_error(daemon: DaemonProcess) -> None:
    lines = ndjson(
        {"action_type": "PlanStarted", "plan_id": "p"},
        {"action_type": "NoSuchType", "plan_id": "p"},
        {"action_type": "PlanCompleted", "plan_id": "p"},
    ) + b"this is not json\n"
    result = run_cli("send", "--socket", str(daemon.socket_path), input=lines)
    assert result.returncode == 1, result.stderr
    got = answers(result.stdout)
    assert len(got) == 4
    assert got[0]["ok"] is True and got[0]["seq"] == 0
    assert got[1]["ok"] is False and got[1]["error"]["code"] == "invalid_action"
    assert got[2]["ok"] is True and got[2]["seq"] == 1  # later lines are still sent
    assert got[3]["ok"] is False and got[3]["error"]["code"] == "bad_json"


def test_send_exits_1_when_a_batch_result_is_an_error(daemon: DaemonProcess) -> None:
    batch = {"op": "append_batch", "actions": [{"action_type": "PlanStarted"}, {"action_type": 7}]}
    result = run_cli("send", "--socket", str(daemon.socket_path), input=ndjson(batch))
    assert result.returncode == 1
    (answer,) = answers(result.stdout)
    assert answer["ok"] is True
    assert [r["ok"] for r in answer["results"]] == [True, False]


def test_send_without_a_daemon_exits_2_with_a_clear_message(state_dir: Path) -> None:
    missing = state_dir / "ccos-obsd.sock"
    result = run_cli("send", "--socket", str(missing), input=ndjson({"action_type": "PlanStarted"}))
    assert result.returncode == 2
    assert result.stdout == b""
    message = result.stderr.decode()
    assert str(missing) in message and "daemon" in message, message
    assert "Traceback" not in message


def test_send_to_a_dead_socket_exits_2_with_a_clear_message(state_dir: Path) -> None:
    # A socket file left behind by a daemon that died: it exists, nothing listens.
    stale = state_dir / "ccos-obsd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))
    result = run_cli("send", "--socket", str(stale), input=ndjson({"action_type": "PlanStarted"}))
    assert result.returncode == 2
    message = result.stderr.decode()
    assert str(stale) in message and "daemon" in message, message
    assert "Traceback" not in message


# --- export


def test_export_records_match_the_design_contract(daemon: DaemonProcess, tmp_path: Path) -> None:
    acks = append_plan(daemon, "p-export", 5, cost=1.5)
    with daemon.client() as client:
        # Non-ASCII and characters JSON escapes must round-trip through the export.
        acks.append(client.append({"action_type": "PlanStarted", "plan_id": 'ünï"cødé\\\n✓',
                                   "metadata": {"b": 1, "a": [1.5, "x"]}}))
    keys = keys_of(daemon.state_dir)
    assert daemon.ready["key_id"] in keys

    result = run_cli("export", "--state-dir", str(daemon.state_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 6
    entries = check_export(lines, keys)
    for ack, line, entry in zip(acks, lines, entries, strict=True):
        record = json.loads(line)
        assert (record["seq"], record["leaf_hash"], record["chain_hash"]) == (
            ack["seq"], ack["leaf_hash"], ack["chain_hash"])
        assert entry["action_id"] == ack["action_id"]
        assert record["key_id"] == daemon.ready["key_id"]
    assert entries[5]["plan_id"] == 'ünï"cødé\\\n✓'
    assert entries[5]["metadata"] == {"a": [1.5, "x"], "b": 1}
    assert entries[0]["cost"] == 1.5 and entries[0]["action_type"] == "PlanStepStarted"
    # The socket's peer credentials are stamped in by the daemon.
    assert set(entries[0]["peer"]) == {"uid", "gid", "pid"}

    # -o FILE writes the same records; --from/--to select a range.
    out = tmp_path / "export.ndjson"
    assert run_cli("export", "--state-dir", str(daemon.state_dir), "-o", str(out)).returncode == 0
    assert out.read_text(encoding="utf-8").splitlines() == lines
    part = run_cli("export", "--state-dir", str(daemon.state_dir), "--from", "2", "--to", "3")
    assert part.returncode == 0
    assert part.stdout.decode().splitlines() == lines[2:4]


def test_export_while_the_daemon_appends_is_a_consistent_prefix(daemon: DaemonProcess) -> None:
    append_plan(daemon, "before", 50)
    stop = threading.Event()
    appended: list[int] = []
    failures: list[BaseException] = []

    def keep_appending() -> None:
        try:
            with daemon.client() as client:
                while not stop.is_set():
                    batch = [{"action_type": "InternalStep", "plan_id": "during"} for _ in range(20)]
                    appended.extend(r["seq"] for r in client.append_batch(batch))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        during = run_cli("export", "--state-dir", str(daemon.state_dir))
    finally:
        stop.set()
        writer.join(timeout=30)
    assert not writer.is_alive()
    assert not failures, failures
    assert during.returncode == 0, during.stderr
    keys = keys_of(daemon.state_dir)
    lines = during.stdout.decode().splitlines()
    assert len(lines) >= 50
    check_export(lines, keys)

    after = run_cli("export", "--state-dir", str(daemon.state_dir))
    assert after.returncode == 0
    after_lines = after.stdout.decode().splitlines()
    assert len(after_lines) == 50 + len(appended)
    assert after_lines[: len(lines)] == lines  # history never changes
    check_export(after_lines, keys)


# --- verify


def test_verify_state_dir_says_ok(daemon: DaemonProcess) -> None:
    append_plan(daemon, "p", 12)
    result = run_cli("verify", "--state-dir", str(daemon.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.decode().startswith("ok"), result.stdout
    assert "12 entries" in result.stdout.decode()

    daemon.stop()
    stopped = run_cli("verify", "--state-dir", str(daemon.state_dir))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.decode().startswith("ok")


def test_verify_an_export_with_the_published_vkey(daemon: DaemonProcess, tmp_path: Path) -> None:
    append_plan(daemon, "p", 20)
    keys = run_cli("keys", "--state-dir", str(daemon.state_dir)).stdout.decode().split()
    assert len(keys) == 1
    export = tmp_path / "ledger.ndjson"
    assert run_cli("export", "--state-dir", str(daemon.state_dir), "-o", str(export)).returncode == 0

    result = run_cli("verify", "--export", str(export), "--vkey", keys[0])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.decode().startswith("ok")

    from_stdin = run_cli("verify", "--export", "-", "--vkey", keys[0], input=export.read_bytes())
    assert from_stdin.returncode == 0, from_stdin.stdout + from_stdin.stderr

    # Another key with the same name does not vouch for these entries.
    name, _, _ = parse_vkey(keys[0])
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    wrong = run_cli("verify", "--export", str(export), "--vkey", make_vkey(name, stranger))
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "seq 0" in wrong.stdout.decode()


def test_verify_an_export_without_keys_is_a_usage_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    append_plan(daemon, "p", 1)
    export = tmp_path / "ledger.ndjson"
    assert run_cli("export", "--state-dir", str(daemon.state_dir), "-o", str(export)).returncode == 0
    result = run_cli("verify", "--export", str(export))
    assert result.returncode == 2
    assert "--vkey" in result.stderr.decode()


# --- keys


def test_keys_prints_signed_note_vkeys(daemon: DaemonProcess) -> None:
    append_plan(daemon, "p", 3)
    result = run_cli("keys", "--state-dir", str(daemon.state_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1
    name, key_id, public = parse_vkey(lines[0])
    assert key_id == daemon.ready["key_id"]
    assert name and " " not in name
    created = [e for e in daemon.log if isinstance(e, dict) and e.get("event") == "signing_key_created"]
    assert [e["vkey"] for e in created] == [lines[0]]
    Ed25519PublicKey.from_public_bytes(public)  # a valid point

    verbose = run_cli("keys", "--state-dir", str(daemon.state_dir), "--verbose")
    assert verbose.returncode == 0
    vkey, span = verbose.stdout.decode().strip().split("\t")
    assert vkey == lines[0]
    assert span.startswith("0..")


def test_signatures_verify_under_the_published_key(daemon: DaemonProcess) -> None:
    acks = append_plan(daemon, "p", 4)
    (vkey,) = run_cli("keys", "--state-dir", str(daemon.state_dir)).stdout.decode().split()
    _, key_id, public = parse_vkey(vkey)
    lines = run_cli("export", "--state-dir", str(daemon.state_dir)).stdout.decode().splitlines()
    record = json.loads(lines[2])
    message = SIGNATURE_CONTEXT + bytes.fromhex(acks[2]["chain_hash"])
    verifier = Ed25519PublicKey.from_public_bytes(public)
    verifier.verify(base64.b64decode(record["signature"]), message)
    with pytest.raises(InvalidSignature):  # it covers the chain hash at that seq, no other
        verifier.verify(base64.b64decode(record["signature"]), SIGNATURE_CONTEXT + bytes.fromhex(acks[3]["chain_hash"]))
    assert record["key_id"] == key_id


# --- query


def query_records(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def test_query_by_plan_id_through_the_socket_and_offline(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        for i in range(9):
            client.append({"action_type": "PlanStepStarted", "plan_id": f"plan-{i % 3}", "step_id": str(i)})
    online = run_cli("query", "--socket", str(daemon.socket_path), "--plan-id", "plan-1")
    assert online.returncode == 0, online.stderr
    records = query_records(online.stdout)
    assert [r["seq"] for r in records] == [1, 4, 7]
    assert all(r["entry"]["plan_id"] == "plan-1" for r in records)
    assert [r["entry"]["step_id"] for r in records] == ["1", "4", "7"]
    for record in records:
        assert {"seq", "entry", "leaf_hash", "chain_hash", "key_id", "signature"} <= set(record)

    offline = run_cli("query", "--offline", "--state-dir", str(daemon.state_dir), "--plan-id", "plan-1")
    assert offline.returncode == 0, offline.stderr
    assert query_records(offline.stdout) == records

    newest = run_cli("query", "--socket", str(daemon.socket_path), "--plan-id", "plan-1", "--desc", "--limit", "2")
    assert [r["seq"] for r in query_records(newest.stdout)] == [7, 4]

    none = run_cli("query", "--socket", str(daemon.socket_path), "--plan-id", "no-such-plan")
    assert none.returncode == 0 and none.stdout == b""

    daemon.stop()  # offline queries need no daemon
    after = run_cli("query", "--offline", "--state-dir", str(daemon.state_dir), "--plan-id", "plan-1")
    assert after.returncode == 0, after.stderr
    assert query_records(after.stdout) == records


def test_query_follows_the_tree_and_orders_a_trace_by_time(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append_batch([
            {"action_type": "PlanStepStarted", "plan_id": "p", "step_id": "s1", "timestamp_ms": 3000},  # 0
            {"action_type": "CapabilityCall", "plan_id": "p", "step_id": "s1", "action_id": "c1",
             "function_name": "web.search", "metadata": {"run_id": "r1"}, "timestamp_ms": 1000},  # 1
            {"action_type": "CapabilityResult", "plan_id": "p", "parent_action_id": "c1", "success": True,
             "timestamp_ms": 2000},  # 2: no run_id or step_id of its own
            {"action_type": "PlanStepCompleted", "plan_id": "p", "step_id": "s2", "timestamp_ms": 1000},  # 3
        ])
    socket_args = ("--socket", str(daemon.socket_path))
    for where in (socket_args, ("--state-dir", str(daemon.state_dir))):
        def seqs(*args: str, where: tuple[str, ...] = where) -> list[int]:
            result = run_cli("query", *where, *args)
            assert result.returncode == 0, result.stderr
            return [r["seq"] for r in query_records(result.stdout)]

        assert seqs("--run-id", "r1") == [1, 2]
        assert seqs("--step-id", "s1") == [0, 1, 2]
        assert seqs("--plan-id", "p", "--order", "time") == [1, 3, 2, 0]
        assert seqs("--plan-id", "p", "--order", "desc", "--limit", "1") == seqs("--plan-id", "p", "--desc")[:1] == [3]
        refused = run_cli("query", *where, "--order", "time", "--after-seq", "1")
        assert refused.returncode == 2
        assert b"after_seq" in refused.stderr and b"Traceback" not in refused.stderr
    both = run_cli("query", *socket_args, "--order", "time", "--desc")
    assert both.returncode == 2 and b"not allowed with" in both.stderr


# --- stats and logs


def test_stats_prints_the_stats_answer_of_the_running_daemon(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        client.append_batch([
            {"action_type": "CapabilityCall", "function_name": "web.search", "plan_id": "p1", "intent_id": "i1",
             "cost": 0.5, "duration_ms": 20, "success": True},
            {"action_type": "CapabilityCall", "function_name": "llm.complete", "plan_id": "p2", "intent_id": "i1",
             "cost": 2.0, "duration_ms": 900, "success": False},
        ])
        expected = client.stats(plan_id="p1", intent_id="i1", capability="web.search", function="llm.complete")
    expected.pop("ok")
    for where in (("--socket", str(daemon.socket_path)), ("--state-dir", str(daemon.state_dir))):
        result = run_cli("stats", *where, "--plan-id", "p1", "--intent-id", "i1", "--capability", "web.search",
                         "--function", "llm.complete")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected
    assert expected["plan_cost"] == 0.5 and expected["intent_cost"] == 2.5
    assert set(expected["capabilities"]) == {"web.search"} and set(expected["functions"]) == {"llm.complete"}
    everything = json.loads(run_cli("stats", "--socket", str(daemon.socket_path)).stdout)
    assert everything["total_cost"] == 2.5 and "plan_cost" not in everything


def test_stats_and_logs_need_the_daemon(state_dir: Path) -> None:
    for command in ("stats", "logs"):
        result = run_cli(command, "--state-dir", str(state_dir))
        assert result.returncode == 2
        assert b"is the daemon running?" in result.stderr


def test_logs_prints_the_recent_lines_one_object_per_line(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        answer = client.append({"action_type": "IntentCreated", "intent_id": "logged"})
    result = run_cli("logs", "--socket", str(daemon.socket_path), "-n", "5")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(lines) == 5
    assert lines[-1]["event"] == "action_appended" and lines[-1]["action_id"] == answer["action_id"]
    assert run_cli("logs", "--socket", str(daemon.socket_path), "-n", "0").stdout == b""
    assert run_cli("logs", "--socket", str(daemon.socket_path), "-n", "-1").returncode == 2


class Follower:
    """``ccos-obsd logs --follow`` as a process, its stdout read by a thread into a queue."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ccos_obsd", "logs", "--socket", str(daemon.socket_path), "-n", "1", "--follow"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def read_until(self, done: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Lines until ``done(lines)`` holds; fails at the deadline."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while not done(seen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"logs --follow printed only {seen}"
            with contextlib.suppress(queue.Empty):
                seen.append(json.loads(self.lines.get(timeout=remaining)))
        return seen

    def interrupt(self) -> tuple[int, bytes]:
        self.proc.send_signal(signal.SIGINT)
        _, stderr = self.proc.communicate(timeout=30)
        self._reader.join(timeout=30)
        return self.proc.returncode, stderr


def appended_ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["action_id"] for line in lines if line.get("event") == "action_appended"]


def test_logs_follow_prints_each_new_line_once_until_interrupted(daemon: DaemonProcess) -> None:
    follower = Follower(daemon)
    try:
        follower.read_until(lambda lines: len(lines) == 1)  # the newest line: it is following from here
        for round_ids in (["f-1", "f-2", "f-3"], ["f-4", "f-5"]):
            with daemon.client() as client:
                for action_id in round_ids:
                    client.append({"action_type": "IntentCreated", "action_id": action_id})
            lines = follower.read_until(lambda lines, ids=round_ids: appended_ids(lines)[-len(ids):] == ids)
            assert appended_ids(lines) == round_ids  # in order, each once
            assert all(isinstance(line, dict) for line in lines)
    finally:
        code, stderr = follower.interrupt()
    assert code == 0, stderr
    late = [json.loads(line) for line in list(follower.lines.queue)]
    assert appended_ids(late) == []  # nothing printed twice after the rounds either


# --- help


@pytest.mark.parametrize("command", [None, "run", "send", "export", "verify", "keys", "query", "stats", "logs"])
def test_help_exits_0(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("usage: ccos-obsd")
    if command is not None:
        assert f"ccos-obsd {command}" in text


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert b"usage" in result.stderr
