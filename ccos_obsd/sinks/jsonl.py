"""The JSONL file sink: each entry's export record, one per line, rotated by size.

Other tools can tail the file like the ledger itself (``ccos-obsd verify --export``
reads it). Rotation renames ``FILE`` to ``FILE.1`` (``FILE.1`` to ``FILE.2``, ...,
keeping ``keep`` old files) once it would grow past ``max_bytes``. Each batch is
written and fsynced before the runner advances the cursor; after a crash the
batch may appear twice in the file (at least once), each record naming its seq.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ccos_obsd.ledger.store import StoredEntry


class JsonlSink:
    """Sink type ``jsonl``."""

    def __init__(self, name: str, path: Path, *, max_bytes: int = 64 * 2**20, keep: int = 5) -> None:
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_cut_line(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open between batches

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        if self._file is None:
            raise RuntimeError("the JSONL sink is not open")
        data = b"".join(entry.export_line().encode("utf-8") + b"\n" for entry in entries)
        if self._file.tell() and self._file.tell() + len(data) > self.max_bytes:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        assert self._file is not None  # noqa: S101 - checked by deliver
        self._file.close()
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.keep > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_cut_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline: its batch is delivered again."""
    try:
        handle = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        keep = 0
        position = size
        while position > 0 and not keep:
            start = max(0, position - 65536)
            handle.seek(start)
            chunk = handle.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
            position = start
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
