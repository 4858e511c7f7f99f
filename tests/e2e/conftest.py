from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, running_daemon
from tests.e2e.socket_helpers import RawConnection


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: a Unix socket path must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        yield Path(directory)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(state_dir).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def shared() -> Iterator[DaemonProcess]:
    """One daemon for a whole module, for tests that only add entries."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory, running_daemon(Path(directory)) as daemon:
        yield daemon


@pytest.fixture
def raw(shared: DaemonProcess) -> Iterator[RawConnection]:
    with RawConnection(shared.socket_path) as connection:
        yield connection
