"""The start-up self-check: the daemon refuses to extend a ledger whose tail was altered.

A ledger of ENTRIES entries is built once; each case tampers with a private copy
(with the ``sqlite3`` module, as an intruder with file access would) and starts
the daemon on it: exit code 3 with ``seq N`` named, or, with
``--start-despite-damage``, a start that records the finding on the ledger.
"""

from __future__ import annotations

import base64
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.ledger_helpers import (
    Ed25519Key,
    append_plans,
    chain_hash,
    copy_state_dir,
    leaf_hash,
    ledger_db,
    parse_checkpoint,
    stored_checkpoints,
    verify_fails,
    verify_ok,
)

ENTRIES = 300
NEAR_TAIL = ENTRIES - 3
EARLY = 7


@pytest.fixture(scope="module")
def pristine() -> Iterator[Path]:
    """A stopped daemon's state dir: ENTRIES entries (plan_id "plan-<seq>"), a checkpoint covering all."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        state_dir = Path(directory)
        daemon = DaemonProcess(state_dir).start()
        try:
            with daemon.client() as client:
                for start in range(0, ENTRIES, 100):
                    append_plans(client, start, 100)
        finally:
            assert daemon.stop() == 0
        assert stored_checkpoints(state_dir)[-1][0] == ENTRIES
        yield state_dir


@pytest.fixture
def copied(pristine: Path, state_dir: Path) -> Path:
    return copy_state_dir(pristine, state_dir)


def start_refused(state_dir: Path, env: dict[str, str] | None = None) -> str:
    """Starting the daemon must fail with exit code 3; its stderr."""
    daemon = DaemonProcess(state_dir, env=env)
    try:
        daemon.start()
    except RuntimeError:
        assert daemon.proc is not None and daemon.proc.returncode == 3, daemon.stderr
        stderr = daemon.stderr.decode()
        assert "Traceback" not in stderr, stderr
        return stderr
    daemon.stop()
    raise AssertionError("the daemon started on a damaged ledger")


def named_seq(stderr: str) -> tuple[int, str]:
    found = re.search(r"seq (\d+): ([a-z_]+):", stderr)
    assert found, stderr
    return int(found.group(1)), found.group(2)


def log_event(daemon: DaemonProcess, event: str) -> dict[str, Any]:
    for item in daemon.log:
        if isinstance(item, dict) and item.get("event") == event:
            return item
    raise AssertionError(f"no {event!r} line before daemon_ready: {daemon.log}")


# --- tampering


def flip_entry_byte(state_dir: Path, seq: int) -> None:
    with ledger_db(state_dir) as conn:
        (entry,) = conn.execute("SELECT entry FROM entries WHERE seq = ?", (seq,)).fetchone()
        altered = bytes(entry).replace(f'"plan-{seq}"'.encode(), f'"plan-{seq + 1}"'.encode())
        assert altered != bytes(entry)
        conn.execute("UPDATE entries SET entry = ? WHERE seq = ?", (altered, seq))


def rehash_from(conn: sqlite3.Connection, seq: int, key: Ed25519Key | None = None) -> None:
    """Recompute leaf and chain hashes from ``seq`` on (and re-sign with ``key``): an intruder's rewrite."""
    (previous,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = ?", (seq - 1,)).fetchone()
    previous = bytes(previous)
    for row_seq, entry in conn.execute("SELECT seq, entry FROM entries WHERE seq >= ? ORDER BY seq", (seq,)).fetchall():
        leaf = leaf_hash(bytes(entry))
        previous = chain_hash(previous, leaf)
        signature = None if key is None else key.sign_entry(previous)
        conn.execute("UPDATE entries SET leaf_hash = ?, chain_hash = ?, signature = ? WHERE seq = ?",
                     (leaf, previous, signature, row_seq))


def signing_key(state_dir: Path) -> Ed25519Key:
    return Ed25519Key.from_skey((state_dir / "signing.key").read_text(encoding="ascii"))


def replace_latest_checkpoint(state_dir: Path, note: str) -> None:
    with ledger_db(state_dir) as conn:
        conn.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (note, ENTRIES))


# --- healthy


def test_a_healthy_ledger_starts_and_says_what_it_checked(copied: Path) -> None:
    daemon = DaemonProcess(copied).start()
    try:
        passed = log_event(daemon, "selfcheck_passed")
        assert passed["entries"] == ENTRIES
        assert passed["checked_from"] == 0  # verify_tail (1000) covers all 300
        assert passed["signatures"] == ENTRIES
        assert passed["checkpoint_size"] == ENTRIES
        with daemon.client() as client:
            assert client.ping() == ENTRIES
    finally:
        assert daemon.stop() == 0


def test_the_window_is_the_last_verify_tail_entries(copied: Path) -> None:
    flip_entry_byte(copied, EARLY)
    daemon = DaemonProcess(copied, env={"CCOS_OBSD_LEDGER_VERIFY_TAIL": "100"}).start()
    try:
        passed = log_event(daemon, "selfcheck_passed")
        assert (passed["checked_from"], passed["signatures"]) == (ENTRIES - 100, 100)
    finally:
        assert daemon.stop() == 0
    # Outside the window the damage is still verify's to find.
    assert named_seq(start_refused(copied, {"CCOS_OBSD_LEDGER_VERIFY_TAIL": "300"})) == (EARLY, "leaf_hash_mismatch")


# --- entries


def test_an_altered_entry_near_the_tail_stops_the_start(copied: Path) -> None:
    flip_entry_byte(copied, NEAR_TAIL)
    stderr = start_refused(copied)
    assert named_seq(stderr) == (NEAR_TAIL, "leaf_hash_mismatch"), stderr
    assert "--start-despite-damage" in stderr


def test_a_rewritten_and_rehashed_tail_is_caught_by_its_signatures(copied: Path) -> None:
    flip_entry_byte(copied, NEAR_TAIL)
    with ledger_db(copied) as conn:
        rehash_from(conn, NEAR_TAIL, Ed25519Key.generate(signing_key(copied).name))
        conn.execute("UPDATE entries SET key_id = (SELECT key_id FROM entries WHERE seq = 0) WHERE seq >= ?",
                     (NEAR_TAIL,))
    assert named_seq(start_refused(copied)) == (NEAR_TAIL, "bad_signature")


def test_an_unsigned_row_appended_at_the_end_stops_the_start(copied: Path) -> None:
    with ledger_db(copied) as conn:
        (previous, key_id) = conn.execute("SELECT chain_hash, key_id FROM entries WHERE seq = ?",
                                          (ENTRIES - 1,)).fetchone()
        entry = (b'{"action_id":"intruder-1","action_type":"PlanStepStarted","plan_id":"plan-x",'
                 b'"recorded_at_ms":1,"seq":%d,"v":1}' % ENTRIES)
        leaf = leaf_hash(entry)
        conn.execute(
            "INSERT INTO entries (seq, action_id, entry, leaf_hash, chain_hash, key_id, signature, action_type,"
            " plan_id, time_ms) VALUES (?, 'intruder-1', ?, ?, ?, ?, NULL, 'PlanStepStarted', 'plan-x', 1)",
            (ENTRIES, entry, leaf, chain_hash(bytes(previous), leaf), key_id),
        )
    assert named_seq(start_refused(copied)) == (ENTRIES, "unauthenticated")


def test_a_deleted_row_in_the_window_stops_the_start(copied: Path) -> None:
    with ledger_db(copied) as conn:
        conn.execute("DELETE FROM entries WHERE seq = ?", (NEAR_TAIL,))
    assert named_seq(start_refused(copied)) == (NEAR_TAIL, "missing")


# --- the latest checkpoint


def test_a_false_root_signed_with_the_genuine_key_stops_the_start(copied: Path) -> None:
    parsed = parse_checkpoint(stored_checkpoints(copied)[-1][1])
    root = base64.b64encode(bytes(32)).decode()
    replace_latest_checkpoint(copied, signing_key(copied).sign_note(f"{parsed.origin}\n{parsed.size}\n{root}\n"))
    assert named_seq(start_refused(copied)) == (ENTRIES - 1, "checkpoint_mismatch")


def test_a_checkpoint_signed_by_another_key_stops_the_start(copied: Path) -> None:
    parsed = parse_checkpoint(stored_checkpoints(copied)[-1][1])
    replace_latest_checkpoint(copied, Ed25519Key.generate(parsed.origin).sign_note(parsed.text))
    assert named_seq(start_refused(copied)) == (ENTRIES - 1, "bad_checkpoint")


def test_a_tail_cut_below_the_checkpoint_stops_the_start(copied: Path) -> None:
    with ledger_db(copied) as conn:
        conn.execute("DELETE FROM entries WHERE seq >= ?", (ENTRIES - 5,))
    assert named_seq(start_refused(copied)) == (ENTRIES - 5, "truncated")


def test_a_corrupted_tile_is_not_damage_the_leaves_decide(copied: Path) -> None:
    """Tiles are derived from the leaf hashes (the writer rebuilds them): the start goes on."""
    with ledger_db(copied) as conn:
        (data,) = conn.execute("SELECT data FROM tiles WHERE level = 1 AND idx = 0").fetchone()
        conn.execute("UPDATE tiles SET data = ? WHERE level = 1 AND idx = 0", (bytes([data[0] ^ 1]) + data[1:],))
    daemon = DaemonProcess(copied).start()
    try:
        assert log_event(daemon, "selfcheck_passed")["checkpoint_size"] == ENTRIES
    finally:
        assert daemon.stop() == 0
    verify_ok("--state-dir", str(copied))


# --- starting anyway


def test_start_despite_damage_records_the_finding_on_the_ledger(copied: Path) -> None:
    flip_entry_byte(copied, NEAR_TAIL)
    daemon = DaemonProcess(copied, "--start-despite-damage").start()
    try:
        warning = log_event(daemon, "selfcheck_failed_starting_anyway")
        assert (warning["seq"], warning["kind"]) == (NEAR_TAIL, "leaf_hash_mismatch")
        with daemon.client() as client:
            assert client.ping() == ENTRIES + 1
            record = client.request({"op": "get", "seq": ENTRIES})["record"]
            appended = client.append({"action_type": "PlanStarted", "plan_id": "after-damage"})
    finally:
        assert daemon.stop() == 0
    entry = record["entry"]
    assert entry["action_type"] == "SelfCheckFailed"
    assert "peer" not in entry  # the daemon's own entry
    assert entry["metadata"]["seq"] == NEAR_TAIL
    assert entry["metadata"]["kind"] == "leaf_hash_mismatch"
    assert appended["seq"] == ENTRIES + 1
    # The record does not repair anything: verify still names the damage.
    assert verify_fails("--state-dir", str(copied))[:2] == (NEAR_TAIL, "leaf_hash_mismatch")


def test_clients_cannot_send_self_check_failed(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        answer = client.request({"op": "append", "action": {"action_type": "SelfCheckFailed"}})
    assert answer["ok"] is False and answer["error"]["code"] == "invalid_action", answer


# --- checkpoint signing mode


def test_checkpoint_mode_accepts_the_unsigned_entries_a_crash_leaves(state_dir: Path) -> None:
    env = {"CCOS_OBSD_SIGNING_MODE": "checkpoint", "CCOS_OBSD_CHECKPOINT_INTERVAL": "3600"}
    daemon = DaemonProcess(state_dir, env=env).start()
    with daemon.client() as client:
        append_plans(client, 0, 10)  # the first commit is checkpointed at once
        append_plans(client, 10, 30)  # the next waits for the interval
    daemon.kill()
    assert [size for size, _ in stored_checkpoints(state_dir)] == [10]
    restarted = DaemonProcess(state_dir, env=env).start()
    try:
        passed = log_event(restarted, "selfcheck_passed")
        assert (passed["entries"], passed["signatures"], passed["checkpoint_size"]) == (40, 0, 10)
        assert passed["unsigned_after_checkpoint"] == 30
    finally:
        assert restarted.stop() == 0
    # The window re-hashes unsigned entries all the same.
    flip_entry_byte(state_dir, EARLY)
    assert named_seq(start_refused(state_dir, env)) == (EARLY, "leaf_hash_mismatch")
