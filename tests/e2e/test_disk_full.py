"""A full disk, and a file size limit: appends fail cleanly and resume once there is room.

The state dir is a small tmpfs. The test fills it with a filler file and appends
until an append fails: that and every later append while the disk is full is
answered ``unavailable`` with a message that says why (never ``internal``), the
daemon keeps serving reads, nothing acknowledged is lost and the ledger verifies.
Once the filler is deleted, appends resume on the same connection and on new
ones. ``mount -t tmpfs`` needs root (CI runs the tests as root); without it the
daemon runs in its own user and mount namespace (``unshare``), where it mounts the
tmpfs itself, and the test reaches the state dir through /proc/PID/root.

An injected EFBIG (RLIMIT_FSIZE set on the running daemon) takes the same path:
CPython ignores SIGXFSZ, so the write fails instead of killing the process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.socket_helpers import RawConnection, assert_appended, assert_error, unique

TMPFS_BYTES = 8 * 2**20
MAX_APPENDS_TO_FILL = 400
"""Batches sent before the test gives up waiting for the full disk to show."""
PAD = "p" * 2000


class NamespacedDaemon(DaemonProcess):
    """The daemon in its own user + mount namespace, on a tmpfs it mounts at ``mountpoint``."""

    def __init__(self, mountpoint: Path, socket_path: Path, env: dict[str, str]) -> None:
        super().__init__(mountpoint, env=env)
        self.socket_path = socket_path

    def command(self) -> list[str]:
        mount = 'mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2" && shift 2 && exec "$@"'
        return ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", mount, "sh",
                str(TMPFS_BYTES), str(self.state_dir), *super().command()]


@dataclass
class FullDisk:
    """A running daemon whose state dir is a small tmpfs, and the acknowledged appends."""

    daemon: DaemonProcess
    state_dir: Path
    """The state dir as this process reaches it."""
    cli_state_dir: Path
    """The state dir as ``ccos-obsd`` commands run by ``cli`` reach it."""
    enter: list[str] = field(default_factory=list)
    """What runs a command in the daemon's namespaces (when it has its own)."""
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cli(self, command: str) -> subprocess.CompletedProcess[bytes]:
        """``ccos-obsd COMMAND --state-dir DIR``, where the daemon's tmpfs is mounted."""
        args = [sys.executable, "-m", "ccos_obsd", command, "--state-dir", str(self.cli_state_dir)]
        return subprocess.run([*self.enter, *args], capture_output=True, timeout=120, check=False)

    @property
    def filler(self) -> Path:
        return self.state_dir / "filler"

    def fill(self) -> None:
        """Write zeros until the file system has no room left."""
        block = bytes(64 * 1024)
        with open(self.filler, "wb") as handle:
            try:
                while True:
                    handle.write(block)
                    handle.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
            # Whatever the buffer still holds cannot be written either.
            with contextlib.suppress(OSError):
                handle.close()

    def free(self) -> None:
        self.filler.unlink()


def mount_tmpfs(mountpoint: Path) -> str | None:
    """Mount a tmpfs; None when it worked, else why not."""
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs",
                             str(mountpoint)], capture_output=True, check=False)
    if result.returncode == 0:
        return None
    return result.stderr.decode(errors="replace").strip() or f"mount exited {result.returncode}"


@pytest.fixture
def full_disk() -> Iterator[FullDisk]:
    env = {"CCOS_OBSD_LOG_LEVEL": "warning"}
    base = Path(tempfile.mkdtemp(prefix="ccos-full-"))
    mountpoint = base / "state"
    mountpoint.mkdir()
    mounted = False
    daemon: DaemonProcess | None = None
    try:
        refused = mount_tmpfs(mountpoint)
        if refused is None:
            mounted = True
            daemon = DaemonProcess(mountpoint, env=env).start()
            disk = FullDisk(daemon, mountpoint, mountpoint)
        else:
            if shutil.which("unshare") is None:
                pytest.fail(f"cannot mount a tmpfs ({refused}) and there is no unshare to do it in a namespace")
            try:
                daemon = NamespacedDaemon(mountpoint, base / "ccos-obsd.sock", env).start()
            except RuntimeError as exc:
                pytest.fail(f"cannot mount a tmpfs ({refused}), nor in a user namespace: {exc}")
            assert daemon.proc is not None
            pid = daemon.proc.pid
            enter = ["nsenter", f"--target={pid}", "--user", "--mount", "--preserve-credentials"]
            disk = FullDisk(daemon, Path(f"/proc/{pid}/root") / mountpoint.relative_to("/"), mountpoint, enter)
        yield disk
    finally:
        if daemon is not None:
            daemon.stop()
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False)
            if os.path.ismount(mountpoint):
                subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
        shutil.rmtree(base)


def action(plan: str, n: int) -> dict[str, Any]:
    return {"action_type": "PlanStepStarted", "action_id": f"{plan}-{n}", "plan_id": plan, "step_id": str(n),
            "metadata": {"pad": PAD}}


def append(disk: FullDisk, connection: RawConnection, plan: str, n: int) -> dict[str, Any]:
    answer = connection.request({"op": "append", "action": action(plan, n)})
    if answer["ok"]:
        assert_appended(answer)
        disk.acked[answer["action_id"]] = answer
    return answer


def assert_unavailable_because_of_space(answer: dict[str, Any]) -> None:
    assert_error(answer, "unavailable")
    assert "disk is full" in answer["error"]["message"], answer
    assert "not appended" in answer["error"]["message"], answer


def assert_unavailable_because_of_io(answer: dict[str, Any]) -> None:
    """SQLite reports EFBIG as a plain I/O error (Python's sqlite3 does not give the errno)."""
    assert_error(answer, "unavailable")
    assert "ledger write failed" in answer["error"]["message"], answer
    assert "not appended" in answer["error"]["message"], answer


def check_ledger(disk: FullDisk, refused: list[str]) -> None:
    """Every acknowledged append at its seq, no refused one, seqs 0..n-1; verify passes."""
    result = disk.cli("export")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["seq"] for r in records] == list(range(len(records)))
    stored = {json.loads(r["entry"])["action_id"]: r for r in records}
    for action_id, answer in disk.acked.items():
        assert stored[action_id]["seq"] == answer["seq"], action_id
        assert stored[action_id]["chain_hash"] == answer["chain_hash"], action_id
    assert not set(refused) & set(stored), "an append answered unavailable is in the ledger"
    assert len(records) == len(disk.acked)
    verified = disk.cli("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.decode().startswith(f"ok: {len(records)} entries"), verified.stdout


def test_a_full_disk_refuses_appends_cleanly_and_they_resume_once_there_is_room(full_disk: FullDisk) -> None:
    disk = full_disk
    plan = unique("full")
    refused: list[str] = []
    with RawConnection(disk.daemon.socket_path) as connection:
        for n in range(20):
            assert append(disk, connection, plan, n)["ok"] is True
        disk.fill()
        # SQLite may still have room inside its files: append until the disk shows it is full.
        n = 20
        failed: dict[str, Any] | None = None
        while failed is None and n < 20 + MAX_APPENDS_TO_FILL:
            answer = append(disk, connection, plan, n)
            if not answer["ok"]:
                failed = answer
                refused.append(f"{plan}-{n}")
            n += 1
        assert failed is not None, f"{MAX_APPENDS_TO_FILL} appends of 2 KB succeeded on a full disk"
        assert_unavailable_because_of_space(failed)
        print(f"on a full disk after {n - 20} more appends: {failed}")
        # While it stays full: every append is refused the same way; the daemon serves the rest.
        for _ in range(5):
            answer = append(disk, connection, plan, n)
            assert_unavailable_because_of_space(answer)
            refused.append(f"{plan}-{n}")
            n += 1
        batch = connection.request({"op": "append_batch", "actions": [action(plan, n), action(plan, n + 1)]})
        assert batch["ok"] is True and len(batch["results"]) == 2, batch
        for result in batch["results"]:
            assert_unavailable_because_of_space(result)
        refused += [f"{plan}-{n}", f"{plan}-{n + 1}"]
        n += 2
        head = connection.ping()
        assert head == len(disk.acked)
        assert connection.request({"op": "get", "seq": 0})["ok"] is True
        assert disk.daemon.proc is not None and disk.daemon.proc.poll() is None
        check_ledger(disk, refused)

        disk.free()
        # The same connection appends again, the refused actions too (they were never appended).
        for action_id in refused[:3]:
            answer = connection.request({"op": "append", "action": action(plan, int(action_id.rsplit("-", 1)[1]))})
            assert_appended(answer)
            disk.acked[answer["action_id"]] = answer
        refused = refused[3:]
        assert append(disk, connection, plan, n)["ok"] is True
        n += 1
    with RawConnection(disk.daemon.socket_path) as newcomer:
        assert append(disk, newcomer, plan, n)["ok"] is True
        assert newcomer.ping() == len(disk.acked)
    check_ledger(disk, refused)
    assert disk.daemon.stop() == 0


def sigxfsz_ignored(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGXFSZ - 1)))
    raise AssertionError("no SigIgn in /proc/PID/status")


def test_a_file_size_limit_refuses_appends_cleanly_and_they_resume_once_raised(state_dir: Path) -> None:
    """EFBIG instead of ENOSPC: RLIMIT_FSIZE set on the running daemon, just above its files' sizes."""
    daemon = DaemonProcess(state_dir, env={"CCOS_OBSD_LOG_LEVEL": "warning"}).start()
    disk = FullDisk(daemon, state_dir, state_dir)
    plan = unique("efbig")
    refused: list[str] = []
    try:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        assert sigxfsz_ignored(pid), "SIGXFSZ would kill the daemon instead of failing the write"
        with RawConnection(daemon.socket_path) as connection:
            for n in range(10):
                assert append(disk, connection, plan, n)["ok"] is True
            largest = max(p.stat().st_size for p in state_dir.iterdir() if p.is_file())
            unlimited = resource.prlimit(pid, resource.RLIMIT_FSIZE, (largest + 64 * 1024, resource.RLIM_INFINITY))
            n = 10
            failed = None
            while failed is None and n < 10 + MAX_APPENDS_TO_FILL:
                answer = append(disk, connection, plan, n)
                if not answer["ok"]:
                    failed = answer
                    refused.append(f"{plan}-{n}")
                n += 1
            assert failed is not None, "the file size limit never showed"
            assert_unavailable_because_of_io(failed)
            assert connection.ping() == len(disk.acked)
            assert daemon.proc.poll() is None
            resource.prlimit(pid, resource.RLIMIT_FSIZE, unlimited)
            assert append(disk, connection, plan, n)["ok"] is True
        check_ledger(disk, refused)
    finally:
        assert daemon.stop() == 0
