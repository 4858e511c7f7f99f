"""Signing key rotation: through the running daemon, and offline on a stopped state dir.

A rotation is an entry of its own: ``KeyRotated`` at seq r, signed by the old key,
naming the old and the new verifier keys in its metadata. The key ring then says the
old key signed 0..r and the new one r+1 onwards, and ``verify`` holds each signature
to that range.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ccos_obsd.ledger.keys import VerifierKey
from ccos_obsd.ledger.note import verify_checkpoint
from tests.daemon import DaemonProcess, run_cli
from tests.e2e.ledger_helpers import (
    Ed25519Key,
    append_plans,
    copy_state_dir,
    ledger_db,
    output_of,
    parse_checkpoint,
    stored_checkpoints,
    verify_fails,
    verify_ok,
    vkeys,
    wait_for_checkpoint,
)
from tests.e2e.socket_helpers import assert_error, wait_until

ROTATED = re.compile(r"^rotated at seq (\d+); new key: (\S+)$", re.MULTILINE)
SHORT_INTERVAL = {"CCOS_OBSD_CHECKPOINT_INTERVAL": "0.2"}


@dataclass
class Appender:
    """Appends one action at a time from a thread until told to stop."""

    daemon: DaemonProcess
    answers: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Appender:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self.daemon.client() as client:
                while not self.stop.is_set():
                    n = len(self.answers)
                    self.answers.append(client.request({"op": "append", "action": {
                        "action_type": "PlanStepStarted", "plan_id": f"bg-{n}"}}))
        except BaseException as exc:  # noqa: BLE001 - re-raised by join() in the test thread
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


def rotate_through_socket(daemon: DaemonProcess) -> tuple[int, str]:
    result = run_cli("keys", "rotate", "--socket", str(daemon.socket_path))
    assert result.returncode == 0, output_of(result)
    found = ROTATED.search(result.stdout.decode())
    assert found, output_of(result)
    return int(found.group(1)), found.group(2)


def key_ids_by_seq(state_dir: Path) -> list[str]:
    with ledger_db(state_dir) as conn:
        return [key_id for (key_id,) in conn.execute("SELECT key_id FROM entries ORDER BY seq")]


def key_ring(state_dir: Path) -> list[tuple[str, str]]:
    """``keys -v``: (vkey, range) per key."""
    result = run_cli("keys", "-v", "--state-dir", str(state_dir))
    assert result.returncode == 0, output_of(result)
    return [tuple(line.split("\t")) for line in result.stdout.decode().splitlines()]  # type: ignore[misc]


def check_rotation_entry(record: dict[str, Any], seq: int, old_vkey: str, new_vkey: str) -> None:
    entry = record["entry"]
    assert entry["action_type"] == "KeyRotated", entry
    assert entry["seq"] == seq
    assert entry["metadata"] == {"old_key": old_vkey, "new_key": new_vkey}, entry
    assert record["key_id"] == VerifierKey.from_vkey(old_vkey).key_id, "the old key signs the rotation"


def test_rotate_through_the_socket_while_appends_continue(state_dir: Path) -> None:
    daemon = DaemonProcess(state_dir, env=SHORT_INTERVAL).start()
    try:
        (old_vkey,) = vkeys(state_dir)
        appender = Appender(daemon).start()
        try:
            wait_until(lambda: len(appender.answers) >= 20, 10, "20 appends before the rotation")
            rotated_at, new_vkey = rotate_through_socket(daemon)
            after = len(appender.answers)
            wait_until(lambda: len(appender.answers) >= after + 20, 10, "20 appends after the rotation")
        finally:
            appender.join()
        assert all(a["ok"] for a in appender.answers), [a for a in appender.answers if not a["ok"]][:3]
        seqs = [a["seq"] for a in appender.answers]
        assert rotated_at not in seqs
        assert min(seqs) < rotated_at < max(seqs), "the rotation happened among the appends"
        with daemon.client() as client:
            head = client.ping()
            check_rotation_entry(client.get(seq=rotated_at), rotated_at, old_vkey, new_vkey)
            wait_for_checkpoint(client, head)
            note = client.request({"op": "checkpoint"})["checkpoint"]

        assert new_vkey != old_vkey
        assert key_ring(state_dir) == [(old_vkey, f"0..{rotated_at}"), (new_vkey, f"{rotated_at + 1}..")]
        old_id, new_id = VerifierKey.from_vkey(old_vkey).key_id, VerifierKey.from_vkey(new_vkey).key_id
        assert key_ids_by_seq(state_dir) == [old_id] * (rotated_at + 1) + [new_id] * (head - rotated_at - 1)
        # Checkpoints after the rotation are signed by the new key.
        verify_checkpoint(note, [VerifierKey.from_vkey(new_vkey)])
        verify_ok("--state-dir", str(state_dir))
        verify_ok("--state-dir", str(state_dir), "--vkey", old_vkey, "--vkey", new_vkey)

        # The state dir is locked: an offline rotation must not run beside the daemon.
        offline = run_cli("keys", "rotate", "--state-dir", str(state_dir))
        assert offline.returncode == 3, output_of(offline)
        assert len(vkeys(state_dir)) == 2
    finally:
        assert daemon.stop() == 0
    verify_ok("--state-dir", str(state_dir))


def test_rotate_key_op_answers_the_rotation_entry_and_the_new_key(daemon: DaemonProcess) -> None:
    (old_vkey,) = vkeys(daemon.state_dir)
    with daemon.client() as client:
        append_plans(client, 0, 3)
        answer = client.request({"id": 7, "op": "rotate_key"})
        assert answer["ok"] is True, answer
        assert answer["id"] == 7 and answer["seq"] == 3 and answer["duplicate"] is False, answer
        check_rotation_entry(client.get(seq=3), 3, old_vkey, answer["vkey"])
        assert client.append({"action_type": "PlanStarted"})["seq"] == 4
        assert client.get(seq=4)["key_id"] == VerifierKey.from_vkey(answer["vkey"]).key_id
    assert vkeys(daemon.state_dir) == [old_vkey, answer["vkey"]]


# --- a rotated, stopped ledger, copied per test


@dataclass(frozen=True)
class Rotated:
    state_dir: Path
    rotated_at: int
    size: int
    old_vkey: str
    new_vkey: str
    old_skey: str
    """The old signing.key file, saved before the rotation replaced it."""


@pytest.fixture(scope="module")
def rotated() -> Iterator[Rotated]:
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        state_dir = Path(directory)
        daemon = DaemonProcess(state_dir, env=SHORT_INTERVAL).start()
        try:
            old_skey = (state_dir / "signing.key").read_text(encoding="ascii")
            (old_vkey,) = vkeys(state_dir)
            with daemon.client() as client:
                append_plans(client, 0, 10)
                rotated_at, new_vkey = rotate_through_socket(daemon)
                append_plans(client, 10, 10)
                size = client.ping()
        finally:
            assert daemon.stop() == 0
        assert (rotated_at, size) == (10, 21)
        assert stored_checkpoints(state_dir)[-1][0] == size
        yield Rotated(state_dir, rotated_at, size, old_vkey, new_vkey, old_skey)


@pytest.fixture
def copied(rotated: Rotated, state_dir: Path) -> Path:
    return copy_state_dir(rotated.state_dir, state_dir)


def test_verify_passes_after_rotation_with_both_keys(rotated: Rotated) -> None:
    verify_ok("--state-dir", str(rotated.state_dir))
    verify_ok("--state-dir", str(rotated.state_dir), "--vkey", rotated.old_vkey, "--vkey", rotated.new_vkey)


def test_the_old_key_alone_fails_at_the_first_entry_after_the_rotation(rotated: Rotated) -> None:
    seq, kind, output = verify_fails("--state-dir", str(rotated.state_dir), "--vkey", rotated.old_vkey)
    assert (seq, kind) == (rotated.rotated_at + 1, "unknown_key"), output


def test_an_old_key_signature_after_the_rotation_is_out_of_range(rotated: Rotated, copied: Path) -> None:
    """An intruder holding a copy of the retired key re-signs an entry after the rotation."""
    old = Ed25519Key.from_skey(rotated.old_skey)
    assert old.vkey == rotated.old_vkey
    forged_seq = rotated.rotated_at + 2
    with ledger_db(copied) as conn:
        (chain,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = ?", (forged_seq,)).fetchone()
        conn.execute("UPDATE entries SET key_id = ?, signature = ? WHERE seq = ?",
                     (old.key_id, old.sign_entry(bytes(chain)), forged_seq))
    seq, kind, output = verify_fails("--state-dir", str(copied))
    assert (seq, kind) == (forged_seq, "key_out_of_range"), output


def test_offline_rotation_then_the_daemon_signs_with_the_new_key(rotated: Rotated, copied: Path) -> None:
    result = run_cli("keys", "rotate", "--state-dir", str(copied))
    assert result.returncode == 0, output_of(result)
    found = ROTATED.search(result.stdout.decode())
    assert found, output_of(result)
    offline_at, third_vkey = int(found.group(1)), found.group(2)
    assert offline_at == rotated.size
    assert third_vkey not in (rotated.old_vkey, rotated.new_vkey)
    assert key_ring(copied) == [
        (rotated.old_vkey, f"0..{rotated.rotated_at}"),
        (rotated.new_vkey, f"{rotated.rotated_at + 1}..{offline_at}"),
        (third_vkey, f"{offline_at + 1}.."),
    ]
    verify_ok("--state-dir", str(copied))

    daemon = DaemonProcess(copied, env=SHORT_INTERVAL).start()
    try:
        with daemon.client() as client:
            check_rotation_entry(client.get(seq=offline_at), offline_at, rotated.new_vkey, third_vkey)
            seq = client.append({"action_type": "PlanStarted"})["seq"]
            assert seq == offline_at + 1
            assert client.get(seq=seq)["key_id"] == VerifierKey.from_vkey(third_vkey).key_id
            note = wait_for_checkpoint(client, seq + 1)
        assert parse_checkpoint(note).signatures[0][1].hex() == VerifierKey.from_vkey(third_vkey).key_id
    finally:
        assert daemon.stop() == 0
    verify_ok("--state-dir", str(copied))


@pytest.mark.parametrize("custom_types", ["false", "true"], ids=["standard-types", "custom-types-allowed"])
def test_a_client_cannot_append_key_rotated(state_dir: Path, custom_types: str) -> None:
    action = {"action_type": "KeyRotated", "metadata": {"old_key": "a", "new_key": "b"}}
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_ACTIONS_ALLOW_CUSTOM_TYPES": custom_types}).start()
    try:
        with daemon.client() as client:
            assert_error(client.request({"op": "append", "action": action}), "invalid_action", "action_type")
            assert_error(client.request(action), "invalid_action", "action_type")
            batch = client.request({"op": "append_batch", "actions": [action]})
            assert batch["ok"] is True, batch
            assert_error(batch["results"][0], "invalid_action", "action_type")
            assert client.ping() == 0
    finally:
        assert daemon.stop() == 0
