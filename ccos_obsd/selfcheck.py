"""The start-up self-check: is the ledger's tail what the daemon wrote?

Before the socket opens, the daemon re-checks the last ``ledger.verify_tail``
entries (seqs contiguous, leaf and chain hashes recomputed from the stored bytes,
each signature under the key the key ring gives for its seq) and the latest
checkpoint (its signature, its size against the ledger's, and its root against
the Merkle root of the stored leaf hashes). The daemon would otherwise extend,
sign and checkpoint over a tail someone altered while it was stopped.

The checks are those of ``ccos-obsd verify`` (``ledger.verify``), on a window:
a full ``verify`` still covers everything before it.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ccos_obsd.actions import SELF_CHECK_FAILED
from ccos_obsd.config import Config
from ccos_obsd.errors import StartupError, VerificationError
from ccos_obsd.ledger import store
from ccos_obsd.ledger.entry import ValidatedAction, new_action_id
from ccos_obsd.ledger.hashing import CHAIN_ROOT, Hash
from ccos_obsd.ledger.merkle import root_from_reader, root_hash
from ccos_obsd.ledger.note import Checkpoint
from ccos_obsd.ledger.verify import (
    CheckpointRecord,
    KeyRange,
    KeyRing,
    check_checkpoint_root,
    verify_checkpoint_note,
    verify_range,
)
from ccos_obsd.ledger.writer import AppendResult, LedgerWriter


@dataclass(frozen=True)
class SelfCheckReport:
    entries: int
    """Entries in the ledger."""
    checked_from: int
    """The first seq whose hashes and signature were re-checked (``entries``: none)."""
    signatures: int
    checkpoint_size: int | None
    """The size of the latest checkpoint, checked (None: there is none)."""
    seconds: float
    unsigned_after_checkpoint: int = 0
    """Checkpoint signing mode: unsigned entries in the window that no checkpoint covers yet."""

    def to_log(self) -> dict[str, Any]:
        return {"entries": self.entries, "checked_from": self.checked_from, "signatures": self.signatures,
                "checkpoint_size": self.checkpoint_size, "unsigned_after_checkpoint": self.unsigned_after_checkpoint,
                "elapsed_ms": round(self.seconds * 1000, 1)}


log = structlog.get_logger("ccos_obsd.daemon")


def check_ledger(db: Path, *, tail: int, allow_pending: bool) -> SelfCheckReport:
    """Check the ledger's last ``tail`` entries and its latest checkpoint, or raise ``VerificationError``.

    ``allow_pending``: unsigned entries after the latest checkpoint are accepted
    (checkpoint signing mode, where a crash leaves them until the next checkpoint).
    When both the tail and the checkpoint are wrong, the lowest seq is reported.
    """
    started = time.perf_counter()
    conn = store.connect(db, readonly=True)
    try:
        conn.execute("BEGIN")  # one snapshot
        head = store.read_head(conn)
        keys = KeyRing(KeyRange(key, first, last) for key, first, last in store.read_keys(conn))
        findings: list[VerificationError] = []
        checkpoint: Checkpoint | None = None
        try:
            checkpoint = _check_latest_checkpoint(conn, keys, head.size)
        except VerificationError as error:
            findings.append(error)
        start = max(0, head.size - tail)
        signatures = pending = 0
        try:
            report = verify_range(
                store.iter_entries(conn, start), keys,
                start=start, previous_chain_hash=_chain_hash_before(conn, start),
                authenticated_below=0 if checkpoint is None else checkpoint.size, allow_pending=allow_pending,
            )
            signatures, pending = report.signatures_checked, report.pending
        except VerificationError as error:
            findings.append(error)
        conn.execute("COMMIT")
    finally:
        conn.close()
    if findings:
        raise min(findings, key=lambda error: error.seq)
    return SelfCheckReport(head.size, start, signatures, None if checkpoint is None else checkpoint.size,
                           time.perf_counter() - started, pending)


def _check_latest_checkpoint(conn: sqlite3.Connection, keys: KeyRing, entries: int) -> Checkpoint | None:
    latest = store.latest_checkpoint(conn)
    if latest is None:
        return None
    checkpoint = verify_checkpoint_note(CheckpointRecord(latest.note, size=latest.size), keys)
    if checkpoint.size > entries:
        raise VerificationError(
            entries, "truncated", f"the latest checkpoint covers {checkpoint.size} entries but the ledger has {entries}"
        )
    if _tiles_root(conn, checkpoint.size) != checkpoint.root_hash:
        # The tiles are derived data (the writer rebuilds them when they disagree with
        # the checkpoint); only the leaf hashes decide. Reading them all is O(size),
        # but only when something is already wrong.
        leaves = (bytes(row[0]) for row in conn.execute(
            "SELECT leaf_hash FROM entries WHERE seq < ? ORDER BY seq", (checkpoint.size,)
        ))
        check_checkpoint_root(checkpoint, root_hash(leaves))
    return checkpoint


def _tiles_root(conn: sqlite3.Connection, size: int) -> Hash | None:
    try:
        return root_from_reader(size, store.hash_reader(conn))
    except ValueError:
        return None  # a tile is missing or malformed


def _chain_hash_before(conn: sqlite3.Connection, start: int) -> Hash:
    if start == 0:
        return CHAIN_ROOT
    entry = store.get_entry(conn, seq=start - 1)
    if entry is None:
        raise VerificationError(start - 1, "missing", f"no entry at seq {start - 1}")
    return entry.chain_hash


def damage_action(error: VerificationError, report_entries: int, tail: int) -> ValidatedAction:
    """The entry the daemon appends when it starts despite a failed self-check."""
    return ValidatedAction({
        "action_type": SELF_CHECK_FAILED,
        "action_id": new_action_id(),
        "metadata": {
            "seq": error.seq, "kind": error.kind, "detail": error.detail,
            "entries": report_entries, "verify_tail": tail,
        },
    }, False)


def check_at_startup(db: Path, config: Config, *, start_despite_damage: bool) -> VerificationError | None:
    """The start-up self-check; a finding stops the start (``StartupError``) unless ``start_despite_damage``.

    Answers the finding to record on the ledger when starting despite it, else None.
    """
    if not db.exists():
        return None
    try:
        report = check_ledger(db, tail=config.ledger.verify_tail, allow_pending=config.signing.mode == "checkpoint")
    except VerificationError as error:
        if not start_despite_damage:
            log.error("selfcheck_failed", seq=error.seq, kind=error.kind, detail=error.detail)
            raise StartupError(
                f"ledger self-check failed: {error}; `ccos-obsd verify` checks the whole ledger, "
                "`run --start-despite-damage` starts anyway and records the finding on the ledger"
            ) from None
        log.warning("selfcheck_failed_starting_anyway", seq=error.seq, kind=error.kind, detail=error.detail)
        return error
    log.info("selfcheck_passed", **report.to_log())
    return None


async def record_damage(writer: LedgerWriter, damage: VerificationError, tail: int) -> None:
    """Append the self-check's finding to the ledger (a SelfCheckFailed entry) before serving."""
    action = damage_action(damage, writer.head.size, tail)
    (outcome,) = await writer.submit([action], None)
    if not isinstance(outcome, AppendResult):
        raise StartupError(f"cannot record the self-check finding on the ledger: {outcome.message}")
    log.warning("selfcheck_finding_recorded", seq=outcome.seq, damaged_seq=damage.seq, kind=damage.kind)
