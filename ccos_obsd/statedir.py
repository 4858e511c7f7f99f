"""The state dir: its privacy, its lock, and the keys kept in it (the signing key, the redaction key)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import structlog

from ccos_obsd.config import WM_FILE, Config
from ccos_obsd.errors import StartupError
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import SigningKey, check_private_file, create_private_file, load_or_create_signing_key
from ccos_obsd.redact import KEY_BYTES

log = structlog.get_logger("ccos_obsd.daemon")

KEY_FILE = "signing.key"
REDACT_KEY_FILE = "redact.key"
LOCK_FILE = "daemon.lock"


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


_DIR_EXPOSED = 0o066
"""Group or others may list or change the state dir. Search (x) alone is allowed: it
opens no file that is itself private, and it lets a writers' group reach a socket
kept in the state dir (``chmod 0710`` plus ``chgrp``)."""
_FILE_EXPOSED = 0o077
_SQLITE_SUFFIXES = ("", "-wal", "-shm")


def check_private(config: Config) -> None:
    """Refuse (``StartupError``, naming the path) a state dir whose secrets others could read.

    The state dir must be owned by the daemon's user (or root) and be neither
    readable nor writable by group or others; the databases (``ledger.db``,
    ``wm.db`` here or at the Working Memory sink's path, with their ``-wal`` and
    ``-shm``) and every file whose name contains ``key`` must be owned the same
    way and carry no group or other permission at all. Only what exists is
    checked: a fresh state dir is created private (mode 0700, umask 077).
    """
    state_dir = config.state_dir
    _check_owned_and_private(state_dir, _DIR_EXPOSED, "go-rw")
    databases = {store.ledger_path(state_dir), state_dir / WM_FILE}
    if config.wm_path is not None:
        databases.add(config.wm_path)
    files = [Path(f"{db}{suffix}") for db in sorted(databases) for suffix in _SQLITE_SUFFIXES]
    with os.scandir(state_dir) as entries:
        files += sorted(Path(entry.path) for entry in entries if "key" in entry.name and entry.is_file())
    for path in files:
        _check_owned_and_private(path, _FILE_EXPOSED, "go-rwx")


def _check_owned_and_private(path: Path, exposed: int, fix: str) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    if info.st_uid not in (0, os.geteuid()):
        raise StartupError(
            f"{path} is owned by uid {info.st_uid}, who can read it: it must belong to the daemon's user "
            f"(uid {os.geteuid()}) or root"
        )
    if info.st_mode & exposed:
        raise StartupError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others can "
            f"{'read or change' if stat.S_ISDIR(info.st_mode) else 'access'} it (chmod {fix} {path})"
        )


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


def load_redact_key(state_dir: Path) -> bytes:
    """The HMAC key of ``hash = true`` redaction rules: 32 random bytes, created (0600) on first use.

    Refused (``StartupError``) like the signing key when group or others can use it.
    """
    path = state_dir / REDACT_KEY_FILE
    if create_private_file(path, secrets.token_bytes(KEY_BYTES)):
        log.info("redact_key_created", path=str(path))
    check_private_file(path)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise StartupError(f"key file {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key
