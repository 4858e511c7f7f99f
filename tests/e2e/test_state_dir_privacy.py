"""The daemon runs only on a private state dir: exit 3 naming the path otherwise, before touching anything.

A fresh state dir is made private, under any umask, and so is ``make run``'s ``var/``.
"""

from __future__ import annotations

import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, run_cli, running_daemon

RUN_TIMEOUT_S = 20.0
REPO = Path(__file__).resolve().parents[2]


def start(state_dir: Path) -> tuple[int, str]:
    result = run_cli("run", "--state-dir", str(state_dir), "--socket", str(state_dir / "ccos-obsd.sock"),
                     "--http", "127.0.0.1:0", timeout=RUN_TIMEOUT_S)
    message = result.stderr.decode()
    assert "Traceback" not in message, message
    return result.returncode, message


def assert_private_tree(state_dir: Path) -> None:
    """The state dir is 0700 and every regular file in it has no group or other bit."""
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    files = [path for path in state_dir.iterdir() if path.is_file()]
    assert {"ledger.db", "signing.key"} <= {path.name for path in files}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_a_state_dir_others_can_read_stops_the_start_and_stays_untouched(state_dir: Path) -> None:
    state_dir.chmod(0o755)  # as `mkdir` under umask 022 makes it
    code, message = start(state_dir)
    assert code == 3, message
    assert message.strip() == (f"ccos-obsd: cannot start: {state_dir} has mode 0755: group or others can read "
                               f"or change it (chmod go-rw {state_dir})")
    assert list(state_dir.iterdir()) == []  # no lock file, no socket, no key, no ledger
    state_dir.chmod(0o700)
    with running_daemon(state_dir) as daemon, daemon.client() as client:
        assert client.append({"action_type": "PlanStarted"})["seq"] == 0


@pytest.mark.parametrize("name", ["ledger.db", "wm.db", "signing.key"])
def test_a_database_or_key_others_can_read_stops_the_start(state_dir: Path, name: str) -> None:
    with running_daemon(state_dir) as daemon, daemon.client() as client:
        client.append({"action_type": "PlanStarted"})
    path = state_dir / name
    path.chmod(0o644)
    code, message = start(state_dir)
    assert code == 3, message
    assert f"{path} has mode 0644" in message and f"chmod go-rwx {path}" in message, message
    assert not (state_dir / "ccos-obsd.sock").exists()
    path.chmod(0o600)
    with running_daemon(state_dir) as daemon, daemon.client() as client:
        assert client.ping() == 1


def test_a_fresh_state_dir_is_created_private(state_dir: Path) -> None:
    fresh = state_dir / "new" / "state"
    with running_daemon(fresh) as daemon, daemon.client() as client:
        client.append({"action_type": "PlanStarted"})
        assert_private_tree(fresh)  # while it runs: the -wal and -shm files too
    assert_private_tree(fresh)


class MakeRun(DaemonProcess):
    """The daemon as ``make run`` starts it: the shipped config, ``var/`` relative to the checkout."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ccos_obsd", "run", "--config", "config/ccos-obsd.toml", "--http", "127.0.0.1:0"]


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A directory standing for a fresh checkout: the shipped config, no ``var/`` yet."""
    with tempfile.TemporaryDirectory(prefix="ccos-co-") as directory:
        shutil.copytree(REPO / "config", Path(directory) / "config")
        yield Path(directory)


def test_make_run_on_a_fresh_checkout_makes_a_private_var_and_starts_again_on_it(checkout: Path) -> None:
    var = checkout / "var"
    for first in (True, False):
        daemon = MakeRun(var)
        daemon.popen_options = {"cwd": checkout, "umask": 0o022}  # a login shell's umask
        daemon.start()
        try:
            with daemon.client() as client:
                if first:
                    client.append({"action_type": "PlanStarted"})
                assert client.ping() == 1
            assert_private_tree(var)
        finally:
            assert daemon.stop() == 0
