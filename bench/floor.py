"""The floor: the unavoidable work of an append, in one bare in-process loop.

Per action: parse the request line (``json.loads``), give the action an
``action_id`` (``uuid4``, as the daemon does for actions without one) and the
entry envelope (``v``, ``seq``, ``recorded_at_ms``, ``peer``), encode canonical
bytes (sorted keys, no whitespace, ``ensure_ascii=False``), SHA-256 leaf hash
and chain hash, Ed25519 signature (``cryptography``) over the domain-separated
chain hash. Per group: one SQLite transaction inserting the rows into a fresh
ledger opened with ``ccos_obsd.ledger.store.connect`` (same schema, indexes and
pragmas: WAL, ``synchronous=FULL``), one commit (fsync) per group.

Left out, because a minimal implementation could avoid it or it is not about the
ledger: request validation, the second canonical encoding the daemon makes for
duplicate detection, answers, the event loop, threads, metrics, logging. The
loop runs on one thread (the daemon signs large groups on two).

The rows follow whatever ``entries`` table ``store.connect`` creates (the column
list is read from the schema, so the floor tracks schema changes): columns named
like an action field take that field, the rest take the entry's bytes, hashes,
key id and signature; ``time_ms`` is ``timestamp_ms`` (else ``recorded_at_ms``).
A ``content_hash`` column, if the schema has one, gets the leaf hash (a 32-byte
value like the real one, without the second canonical encoding).

``signing_mode="checkpoint"`` is the floor of the daemon's checkpoint signing
mode: the same loop without the per-entry signature (the column stays NULL, as
the daemon stores it); the one checkpoint signature per interval is left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ccos_obsd.ledger import store

_CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode
_CONTEXT = b"ccos-obsd/entry/v1\x00"


def _no_signature(_message: bytes) -> None:
    return None


@dataclass
class FloorRun:
    actions: int
    groups: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.actions / self.seconds


class Floor:
    """A fresh ledger file and key; ``run`` appends request lines to it, as fast as one loop can."""

    def __init__(self, directory: Path, *, signing_mode: str = "entry") -> None:
        if signing_mode not in ("entry", "checkpoint"):
            raise ValueError(f"unknown signing mode {signing_mode!r}")
        self._conn = store.connect(store.ledger_path(directory), readonly=False)
        sign_entry = Ed25519PrivateKey.generate().sign
        self._sign: Callable[[bytes], bytes | None] = sign_entry if signing_mode == "entry" else _no_signature
        self._key_id = "0badc0de"
        self._peer = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}
        self._seq = 0
        self._chain = bytes(32)
        columns = [row[1] for row in self._conn.execute("PRAGMA table_info(entries)")]
        # Column names come from the schema just created, values are bound parameters.
        self._insert = f"INSERT INTO entries ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"  # noqa: S608
        self._template = dict.fromkeys(columns)
        self._template["key_id"] = self._key_id
        self._row = itemgetter(*columns)

    def close(self) -> None:
        self._conn.close()

    def run(self, lines: list[bytes], *, group: int) -> FloorRun:
        """Append every action of ``lines`` (``append`` or ``append_batch`` requests), committing
        after every ``group`` actions (a batch line is never split: batch size = group size)."""
        loads, canonical, sha256, sign, uuid4 = json.loads, _CANONICAL, hashlib.sha256, self._sign, uuid.uuid4
        peer, template, row_of = self._peer, self._template, self._row
        seq, chain = self._seq, self._chain
        rows: list[tuple[Any, ...]] = []
        groups = 0
        now_ms = int(time.time() * 1000)
        started = time.perf_counter()
        for line in lines:
            request = loads(line)
            actions = request["actions"] if "actions" in request else (request["action"],)
            for fields in actions:
                fields["action_id"] = str(uuid4())
                fields["v"] = 1
                fields["seq"] = seq
                fields["recorded_at_ms"] = now_ms
                fields["peer"] = peer
                entry = canonical(fields).encode("utf-8")
                leaf = sha256(b"\x00" + entry).digest()
                chain = sha256(chain + leaf).digest()
                values = template.copy()
                values.update(fields)
                values["entry"] = entry
                values["leaf_hash"] = values["content_hash"] = leaf
                values["chain_hash"] = chain
                values["signature"] = sign(_CONTEXT + chain)
                values["time_ms"] = fields.get("timestamp_ms", now_ms)
                rows.append(row_of(values))
                seq += 1
            if len(rows) >= group:
                self._commit(rows)
                rows = []
                groups += 1
                now_ms = int(time.time() * 1000)
        if rows:
            self._commit(rows)
            groups += 1
        seconds = time.perf_counter() - started
        actions_done = seq - self._seq
        self._seq, self._chain = seq, chain
        return FloorRun(actions_done, groups, seconds)

    def _commit(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(self._insert, rows)
        conn.execute("COMMIT")

    def single_latencies(self, lines: list[bytes]) -> list[float]:
        """Seconds to append and commit each line alone (a group of one): the least any ack can take."""
        latencies = []
        for line in lines:
            started = time.perf_counter()
            self.run([line], group=1)
            latencies.append(time.perf_counter() - started)
        return latencies


def floor_rate(lines: list[bytes], warmup: list[bytes], *, group: int, signing_mode: str = "entry") -> FloorRun:
    """The floor's rate over ``lines`` on a fresh ledger, after appending ``warmup``."""
    with tempfile.TemporaryDirectory(prefix="ccos-floor-") as directory:
        floor = Floor(Path(directory), signing_mode=signing_mode)
        try:
            floor.run(warmup, group=group)
            return floor.run(lines, group=group)
        finally:
            floor.close()


def floor_latencies(lines: list[bytes], warmup: list[bytes]) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="ccos-floor-") as directory:
        floor = Floor(Path(directory))
        try:
            floor.run(warmup, group=500)
            return floor.single_latencies(lines)
        finally:
            floor.close()
