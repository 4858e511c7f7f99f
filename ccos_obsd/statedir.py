"""The state dir: its lock, and the signing key kept in it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import structlog

from ccos_obsd.config import Config
from ccos_obsd.errors import StartupError
from ccos_obsd.ledger.keys import SigningKey, load_or_create_signing_key

log = structlog.get_logger("ccos_obsd.daemon")

KEY_FILE = "signing.key"
LOCK_FILE = "daemon.lock"


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock on the state dir for the daemon's lifetime."""
    path = state_dir / LOCK_FILE
    handle = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StartupError(f"state dir {state_dir} is locked by a running daemon (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield handle
    finally:
        handle.close()


def default_key_name() -> str:
    host = socket.gethostname().split(".")[0] or "localhost"
    name = "".join(c for c in host if not c.isspace() and c != "+")
    return f"{name or 'localhost'}/ccos-obsd"


def load_signing_key(config: Config) -> SigningKey:
    """The state dir's signing key, created (0600) on the first start."""
    path = key_path(config.state_dir)
    name = config.signing.key_name or default_key_name()
    key, created = load_or_create_signing_key(path, name)
    if created:
        log.info("signing_key_created", path=str(path), key_id=key.key_id, vkey=key.verifier.vkey())
    elif config.signing.key_name and key.verifier.name != config.signing.key_name:
        log.warning("signing_key_name_differs", configured=config.signing.key_name,
                    key_name=key.verifier.name, note="the existing key keeps its name")
    return key
