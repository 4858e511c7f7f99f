"""``ccos-obsd backup``: a consistent copy of a state dir, also while the daemon writes.

The copy must verify on its own, hold a prefix of the ledger as it was (never a
torn state), keep the signing key private (0600), and a daemon started on it
must come up with the same head.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess, run_cli, running_daemon
from tests.e2e.ledger_helpers import output_of, verify_ok
from tests.e2e.socket_helpers import assert_error, wait_until


@pytest.fixture
def target(state_dir: Path) -> Iterator[Path]:
    """Where a backup goes: a path that does not exist yet, beside (not inside) the state dir."""
    path = state_dir.with_name(state_dir.name + "-backup")
    yield path
    if path.exists():
        for item in path.iterdir():
            item.unlink()
        path.rmdir()


def backup(*args: str) -> dict[str, Any]:
    result = run_cli("backup", *args)
    assert result.returncode == 0, output_of(result)
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def export_lines(state_dir: Path, *args: str) -> list[bytes]:
    result = run_cli("export", "--state-dir", str(state_dir), *args)
    assert result.returncode == 0, output_of(result)
    return result.stdout.splitlines()


class Appender:
    """Appends batches from a thread until stopped; knows the highest acknowledged seq."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self.acknowledged = -1
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._daemon.client() as client:
                batch = 0
                while not self._stop.is_set():
                    results = client.append_batch([
                        {"action_type": "CapabilityCall", "function_name": "web.search", "plan_id": f"p{batch}",
                         "duration_ms": 3, "cost": 0.001, "success": True} for _ in range(100)
                    ])
                    self.acknowledged = max(r["seq"] for r in results)
                    batch += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop() in the test thread
            self.error = exc

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.acknowledged


def test_a_backup_taken_while_appending_is_a_verifiable_prefix(state_dir: Path, target: Path) -> None:
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_WM_ENABLED": "true"}).start()
    try:
        appender = Appender(daemon)
        wait_until(lambda: appender.acknowledged >= 2000, 60, "2000 entries appended")
        before = appender.acknowledged + 1
        summary = backup("--state-dir", str(state_dir), str(target))
        after_backup = appender.acknowledged + 1
        wait_until(lambda: appender.acknowledged + 1 > after_backup, 60, "appends after the backup")
        final = appender.stop() + 1
    finally:
        assert daemon.stop() == 0
    assert before <= summary["entries"] <= after_backup < final, (before, summary, after_backup, final)
    assert set(summary) == {"dest", "entries", "chain_hash", "files", "bytes", "elapsed_s"}
    assert summary["dest"] == str(target)
    assert {"ledger.db", "wm.db", "signing.key"} <= set(summary["files"]), summary
    assert "daemon.lock" not in summary["files"]
    assert summary["bytes"] == sum((target / name).stat().st_size for name in summary["files"])
    assert not [p.name for p in target.iterdir() if p.name.endswith(("-wal", "-shm"))]

    verify_ok("--state-dir", str(target))
    digest = run_cli("wm", "digest", "--state-dir", str(target))  # Working Memory's copy opens too
    assert digest.returncode == 0, output_of(digest)
    copied = export_lines(target)
    assert len(copied) == summary["entries"]
    assert copied == export_lines(state_dir, "--to", str(summary["entries"] - 1))

    restored = DaemonProcess(target).start()
    try:
        assert restored.ready["entries"] == summary["entries"]
        with restored.client() as client:
            assert client.ping() == summary["entries"]
            head = client.request({"op": "get", "seq": summary["entries"] - 1})["record"]
        assert head["chain_hash"] == summary["chain_hash"]
    finally:
        assert restored.stop() == 0


def test_the_copy_keeps_the_key_private_and_the_modes(state_dir: Path, target: Path) -> None:
    daemon = DaemonProcess(state_dir).start()
    try:
        with daemon.client() as client:
            client.append({"action_type": "PlanStarted", "plan_id": "p1"})
        summary = backup("--state-dir", str(state_dir), str(target))
    finally:
        assert daemon.stop() == 0
    assert summary["entries"] == 1
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "signing.key").stat().st_mode) == 0o600
    assert (target / "signing.key").read_bytes() == (state_dir / "signing.key").read_bytes()
    for name in summary["files"]:
        assert stat.S_IMODE((target / name).stat().st_mode) == stat.S_IMODE((state_dir / name).stat().st_mode), name
        assert (target / name).stat().st_uid == (state_dir / name).stat().st_uid, name


def test_a_key_readable_by_others_is_copied_as_0600(state_dir: Path, target: Path) -> None:
    with running_daemon(state_dir):
        pass
    os.chmod(state_dir / "signing.key", 0o644)
    backup("--state-dir", str(state_dir), str(target))
    assert stat.S_IMODE((target / "signing.key").stat().st_mode) == 0o600


def test_a_non_empty_destination_is_refused(daemon: DaemonProcess, target: Path) -> None:
    target.mkdir()
    (target / "keep-me").write_text("mine", encoding="utf-8")
    result = run_cli("backup", "--state-dir", str(daemon.state_dir), str(target))
    assert result.returncode == 2, output_of(result)
    assert "not empty" in output_of(result)
    assert [p.name for p in target.iterdir()] == ["keep-me"]
    (target / "keep-me").unlink()
    # An empty directory is fine.
    assert backup("--state-dir", str(daemon.state_dir), str(target))["entries"] == 0


def test_a_destination_that_is_a_file_is_refused(daemon: DaemonProcess, target: Path) -> None:
    target.write_text("x", encoding="utf-8")
    try:
        result = run_cli("backup", "--state-dir", str(daemon.state_dir), str(target))
        assert result.returncode == 2, output_of(result)
        assert "not a directory" in output_of(result)
        assert target.read_text(encoding="utf-8") == "x"
    finally:
        target.unlink()


def test_a_backup_inside_the_state_dir_is_not_copied_by_the_next(state_dir: Path, target: Path) -> None:
    with running_daemon(state_dir):
        pass
    first = backup("--state-dir", str(state_dir), str(state_dir / "copy"))
    second = backup("--state-dir", str(state_dir), str(target))
    assert second["files"] == first["files"]
    assert {"ledger.db", "signing.key"} <= set(first["files"]) and "copy" not in first["files"]
    verify_ok("--state-dir", str(state_dir / "copy"))


def test_a_state_dir_without_a_ledger_is_refused(state_dir: Path, target: Path) -> None:
    result = run_cli("backup", "--state-dir", str(state_dir), str(target))
    assert result.returncode == 2, output_of(result)
    assert "no ledger" in output_of(result)
    assert not target.exists()


# --- through the running daemon


def test_backup_through_the_socket(state_dir: Path, target: Path) -> None:
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_BACKUP_ALLOW_SOCKET": "true"}).start()
    try:
        with daemon.client() as client:
            client.append_batch([{"action_type": "PlanStarted", "plan_id": f"p{i}"} for i in range(50)])
            # Pipelined behind an append on the same connection: the copy holds it.
            answers = client.pipeline([
                json.dumps({"action_type": "PlanCompleted", "plan_id": "p0"}).encode(),
                json.dumps({"id": 9, "op": "backup", "dest": str(target)}).encode(),
            ])
            appended, answer = list(answers)
        assert appended["seq"] == 50
        assert answer["ok"] is True and answer["id"] == 9, answer
        assert answer["entries"] == 51
        with daemon.client() as client:
            relative = client.request({"op": "backup", "dest": "relative/dir"})
            again = client.request({"op": "backup", "dest": str(target)})
        assert_error(relative, "invalid_request", field="dest")
        assert_error(again, "invalid_request", field="dest")
        assert "not empty" in again["error"]["message"]
        assert 'ccos_ingest_requests_total{op="backup",result="ok"} 1.0' in daemon.metrics()
    finally:
        assert daemon.stop() == 0
    verify_ok("--state-dir", str(target))
    assert stat.S_IMODE((target / "signing.key").stat().st_mode) == 0o600


def test_the_cli_asks_the_daemon_with_socket(state_dir: Path, target: Path) -> None:
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_BACKUP_ALLOW_SOCKET": "true"}).start()
    try:
        with daemon.client() as client:
            client.append({"action_type": "PlanStarted", "plan_id": "p1"})
        result = subprocess.run(  # a relative DEST, from another working directory: made absolute
            [sys.executable, "-m", "ccos_obsd", "backup", "--socket", str(daemon.socket_path), target.name],
            cwd=target.parent, capture_output=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert result.returncode == 0, output_of(result)
        summary = json.loads(result.stdout)
    finally:
        assert daemon.stop() == 0
    assert summary["dest"] == str(target) and summary["entries"] == 1
    verify_ok("--state-dir", str(target))


def test_backup_through_the_socket_is_off_by_default(daemon: DaemonProcess, target: Path) -> None:
    with daemon.client() as client:
        answer = client.request({"op": "backup", "dest": str(target)})
    assert_error(answer, "forbidden")
    assert "backup.allow_socket" in answer["error"]["message"]
    result = run_cli("backup", "--socket", str(daemon.socket_path), str(target))
    assert result.returncode == 2, output_of(result)
    assert "backup.allow_socket" in output_of(result)
    assert not target.exists()
