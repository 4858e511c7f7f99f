from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess


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
