"""A consistent online copy of the state dir (``ccos-obsd backup``, socket op ``backup``).

Each SQLite database is copied with SQLite's online backup API from a read-only
connection, in one step: the copy is the database as of one read transaction,
even while the daemon commits (in WAL mode a reader never blocks the writer).
The ledger is copied first, then the other databases (Working Memory), then the
remaining files (the signing key): a sink's cursor, kept in the ledger, can then
only be behind what the copied store holds (re-delivered, idempotent), and a key
rotated meanwhile is registered from the copy's head on when a daemon starts on
it, as after a crash in the middle of a rotation.

Files keep their mode (and, when run as root, their owner); files whose name
contains ``key`` are 0600 whatever the source says, the destination directory
0700. Only the state dir's regular files are copied: not sockets, the lock file,
SQLite's ``-wal``/``-shm``/``-journal`` files or subdirectories (so a backup may be
put in a subdirectory of the state dir, where a sandboxed daemon can write).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccos_obsd.errors import BackupError
from ccos_obsd.ledger import store

_SKIPPED_SUFFIXES = ("-wal", "-shm", "-journal")
_SKIPPED_NAMES = frozenset({"daemon.lock"})
_SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class BackupSummary:
    dest: Path
    entries: int
    """Entries in the copied ledger."""
    chain_hash: str
    """The copied ledger's head chain hash (hex)."""
    files: tuple[str, ...]
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"dest": str(self.dest), "entries": self.entries, "chain_hash": self.chain_hash,
                "files": list(self.files), "bytes": self.bytes, "elapsed_s": round(self.seconds, 3)}


def backup_state_dir(state_dir: Path, dest: Path) -> BackupSummary:
    """Copy ``state_dir`` into ``dest`` (absent, or an empty directory); raises ``BackupError``."""
    started = time.perf_counter()
    ledger = store.ledger_path(state_dir)
    if not ledger.is_file():
        raise BackupError(f"no ledger in {state_dir}", field="state_dir")
    _prepare_dest(state_dir, dest)
    others = sorted(p for p in state_dir.iterdir() if p != ledger and _copied(p))
    databases = [p for p in others if _is_sqlite(p)]
    files = [p for p in others if p not in databases]
    copied: list[str] = []
    total = 0
    try:
        for source in [ledger, *databases]:
            total += _copy_database(source, dest / source.name)
            copied.append(source.name)
        for source in files:
            try:
                total += _copy_file(source, dest / source.name)
            except FileNotFoundError:
                continue  # gone meanwhile (a rotated sink file, say)
            copied.append(source.name)
        _keep_metadata(state_dir, dest, private=True)
        _fsync_dir(dest)
        conn = store.connect(dest / ledger.name, readonly=True)
        try:
            head = store.read_head(conn)
        finally:
            conn.close()
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return BackupSummary(dest, head.size, head.chain_hash.hex(), tuple(copied), total, time.perf_counter() - started)


def _prepare_dest(state_dir: Path, dest: Path) -> None:
    try:
        dest.mkdir(mode=0o700)
    except FileExistsError:
        if not dest.is_dir():
            raise BackupError(f"{dest} exists and is not a directory") from None
        if any(dest.iterdir()):
            raise BackupError(f"{dest} is not empty; a backup goes into a new or empty directory") from None
    except FileNotFoundError:
        raise BackupError(f"{dest.parent} does not exist") from None
    except OSError as exc:
        raise BackupError(f"cannot create {dest}: {exc.strerror}") from None


def _copied(path: Path) -> bool:
    if path.name in _SKIPPED_NAMES or path.name.endswith(_SKIPPED_SUFFIXES):
        return False
    return stat.S_ISREG(path.lstat().st_mode)


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER
    except OSError:
        return False


def _copy_database(source: Path, target: Path) -> int:
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        dst = sqlite3.connect(_create_private(target), isolation_level=None)
        try:
            # pages=-1: one step, one read transaction on the source: a consistent copy.
            # In steps, every commit of the daemon would restart the copy.
            src.backup(dst, pages=-1)
            # A self-contained file: no -wal beside it, readable where the copy is put.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    _keep_metadata(source, target)
    return target.stat().st_size


def _copy_file(source: Path, target: Path) -> int:
    with open(source, "rb") as reader, open(_create_private(target), "wb") as writer:
        shutil.copyfileobj(reader, writer)
        writer.flush()
        os.fsync(writer.fileno())
    _keep_metadata(source, target)
    return target.stat().st_size


def _create_private(target: Path) -> Path:
    """Create ``target`` empty with mode 0600, so nothing is ever readable before its mode is set."""
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return target


def _keep_metadata(source: Path, target: Path, *, private: bool = False) -> None:
    """The source's mode (0600 for key files, 0700 for the directory) and, as root, its owner."""
    info = source.stat()
    mode = stat.S_IMODE(info.st_mode)
    if private:
        mode = 0o700
    elif "key" in source.name:
        mode = 0o600
    if os.geteuid() == 0:
        os.chown(target, info.st_uid, info.st_gid)
    os.chmod(target, mode)
    if not private:
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
