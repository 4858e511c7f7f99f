"""Tampering with a stopped daemon's ledger, its checkpoints and its Merkle tiles.

One ledger of 300 entries (enough for a stored level-1 tile) is built once per
module; each case edits a private copy with the ``sqlite3`` module, as an intruder
with file access would, and ``ccos-obsd verify`` must name the right seq and kind.
Checkpoints saved along the way are the trusted state of ``--since-checkpoint``.
"""

from __future__ import annotations

import base64
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, run_cli
from tests.e2e.ledger_helpers import (
    Ed25519Key,
    append_plans,
    chain_hash,
    copy_state_dir,
    leaf_hash,
    ledger_db,
    output_of,
    parse_checkpoint,
    stored_checkpoints,
    verify_fails,
    verify_ok,
    vkeys,
    wait_for_checkpoint,
)

ENTRIES = 300
EARLY = 100
SHORT_INTERVAL = {"CCOS_OBSD_CHECKPOINT_INTERVAL": "0.2"}


@dataclass(frozen=True)
class Pristine:
    state_dir: Path
    early_checkpoint: Path
    """A checkpoint note saved when the ledger held EARLY entries."""
    final_checkpoint: Path
    """The latest stored checkpoint (written at shutdown, covering all ENTRIES)."""
    foreign_checkpoint: Path
    """The latest checkpoint of another ledger, with its own key."""
    vkey: str


def build_ledger(state_dir: Path, saved: Path) -> None:
    daemon = DaemonProcess(state_dir, env=SHORT_INTERVAL).start()
    try:
        with daemon.client() as client:
            append_plans(client, 0, EARLY)
            note = wait_for_checkpoint(client, EARLY)
            assert parse_checkpoint(note).size == EARLY
            saved.write_text(note, encoding="utf-8")
            for start in range(EARLY, ENTRIES, 50):
                append_plans(client, start, 50)
    finally:
        assert daemon.stop() == 0


@pytest.fixture(scope="module")
def pristine() -> Iterator[Pristine]:
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        root = Path(directory)
        state_dir, other, saved = root / "state", root / "other", root / "saved"
        for path in (state_dir, other, saved):
            path.mkdir(mode=0o700)
        build_ledger(state_dir, saved / "early.checkpoint")
        verify_ok("--state-dir", str(state_dir))
        size, note = stored_checkpoints(state_dir)[-1]
        assert size == ENTRIES
        (saved / "final.checkpoint").write_text(note, encoding="utf-8")

        foreign = DaemonProcess(other).start()
        try:
            with foreign.client() as client:
                append_plans(client, 0, 20)
        finally:
            assert foreign.stop() == 0
        (saved / "foreign.checkpoint").write_text(stored_checkpoints(other)[-1][1], encoding="utf-8")

        (vkey,) = vkeys(state_dir)
        yield Pristine(state_dir, saved / "early.checkpoint", saved / "final.checkpoint",
                       saved / "foreign.checkpoint", vkey)


@pytest.fixture
def copied(pristine: Pristine, state_dir: Path) -> Path:
    """A private copy of the pristine ledger, for one test to tamper with."""
    return copy_state_dir(pristine.state_dir, state_dir)


def signing_key(state_dir: Path) -> Ed25519Key:
    return Ed25519Key.from_skey((state_dir / "signing.key").read_text(encoding="ascii"))


# --- the entries


def flip_entry_byte(conn: sqlite3.Connection, seq: int = 7) -> None:
    (entry,) = conn.execute("SELECT entry FROM entries WHERE seq = ?", (seq,)).fetchone()
    altered = bytes(entry).replace(f'"plan-{seq}"'.encode(), f'"plan-{seq + 1}"'.encode())
    assert altered != bytes(entry)
    conn.execute("UPDATE entries SET entry = ? WHERE seq = ?", (altered, seq))


def delete_row(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM entries WHERE seq = 12")


def swap_rows(conn: sqlite3.Connection) -> None:
    select = "SELECT entry, leaf_hash, chain_hash, signature FROM entries WHERE seq = ?"
    first = conn.execute(select, (20,)).fetchone()
    second = conn.execute(select, (21,)).fetchone()
    update = "UPDATE entries SET entry = ?, leaf_hash = ?, chain_hash = ?, signature = ? WHERE seq = ?"
    conn.execute(update, (*second, 20))
    conn.execute(update, (*first, 21))


def truncate_tail(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM entries WHERE seq >= ?", (ENTRIES - 5,))


@pytest.mark.parametrize(
    ("tamper", "bad_seq", "kind"),
    [
        (flip_entry_byte, 7, "leaf_hash_mismatch"),
        (delete_row, 12, "missing"),
        (swap_rows, 20, "seq_mismatch"),
        (truncate_tail, ENTRIES - 5, "truncated"),
    ],
    ids=["entry-byte", "deleted-row", "swapped-rows", "truncated-tail"],
)
def test_verify_names_the_tampered_seq(
    copied: Path, tamper: Callable[[sqlite3.Connection], None], bad_seq: int, kind: str
) -> None:
    with ledger_db(copied) as conn:
        tamper(conn)
    seq, found_kind, output = verify_fails("--state-dir", str(copied))
    assert (seq, found_kind) == (bad_seq, kind), output


def extra_row(signer: Callable[[Path, bytes], tuple[str, bytes | None]]) -> Callable[[Path], None]:
    """Insert entry ENTRIES at the end: well-formed, correctly hashed, signed by ``signer``."""

    def tamper(state_dir: Path) -> None:
        with ledger_db(state_dir) as conn:
            (previous,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = ?", (ENTRIES - 1,)).fetchone()
            entry = (b'{"action_id":"intruder-1","action_type":"PlanStepStarted","plan_id":"plan-x",'
                     b'"recorded_at_ms":1,"seq":%d,"v":1}' % ENTRIES)
            leaf = leaf_hash(entry)
            chain = chain_hash(bytes(previous), leaf)
            key_id, signature = signer(state_dir, chain)
            conn.execute(
                "INSERT INTO entries (seq, action_id, entry, leaf_hash, chain_hash, key_id, signature,"
                " action_type, plan_id, time_ms) VALUES (?, 'intruder-1', ?, ?, ?, ?, ?, 'PlanStepStarted',"
                " 'plan-x', 1)",
                (ENTRIES, entry, leaf, chain, key_id, signature),
            )

    return tamper


def intruder_signature(state_dir: Path, chain: bytes) -> tuple[str, bytes | None]:
    intruder = Ed25519Key.generate(signing_key(state_dir).name)
    return intruder.key_id, intruder.sign_entry(chain)


def copied_signature(state_dir: Path, chain: bytes) -> tuple[str, bytes | None]:
    with ledger_db(state_dir) as conn:
        key_id, signature = conn.execute("SELECT key_id, signature FROM entries WHERE seq = 5").fetchone()
    return key_id, bytes(signature)


def no_signature(state_dir: Path, chain: bytes) -> tuple[str, bytes | None]:
    return signing_key(state_dir).key_id, None


@pytest.mark.parametrize(
    ("signer", "kind"),
    [(intruder_signature, "unknown_key"), (copied_signature, "bad_signature"), (no_signature, "unauthenticated")],
    ids=["intruder-key", "copied-signature", "unsigned"],
)
def test_an_extra_row_at_the_end_is_detected(
    copied: Path, signer: Callable[[Path, bytes], tuple[str, bytes | None]], kind: str
) -> None:
    extra_row(signer)(copied)
    seq, found_kind, output = verify_fails("--state-dir", str(copied))
    assert (seq, found_kind) == (ENTRIES, kind), output


# --- the checkpoints


def replace_final_checkpoint(state_dir: Path, note: str) -> None:
    with ledger_db(state_dir) as conn:
        conn.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (note, ENTRIES))


def final_note(state_dir: Path) -> str:
    size, note = stored_checkpoints(state_dir)[-1]
    assert size == ENTRIES
    return note


def signed_by_another_key(state_dir: Path) -> str:
    parsed = parse_checkpoint(final_note(state_dir))
    return Ed25519Key.generate(parsed.origin).sign_note(parsed.text)


def edited_root(state_dir: Path) -> str:
    note = final_note(state_dir)
    parsed = parse_checkpoint(note)
    root = base64.b64encode(bytes([parsed.root[0] ^ 1]) + parsed.root[1:]).decode()
    return note.replace(base64.b64encode(parsed.root).decode(), root, 1)


def wrong_root_signed_by_the_log_key(state_dir: Path) -> str:
    """What an intruder holding signing.key could do: a genuine signature over a false root."""
    parsed = parse_checkpoint(final_note(state_dir))
    root = base64.b64encode(bytes(32)).decode()
    return signing_key(state_dir).sign_note(f"{parsed.origin}\n{parsed.size}\n{root}\n")


@pytest.mark.parametrize(
    ("forge", "kind"),
    [
        (signed_by_another_key, "bad_checkpoint"),
        (edited_root, "bad_checkpoint"),
        (wrong_root_signed_by_the_log_key, "checkpoint_mismatch"),
    ],
    ids=["another-key", "edited-root", "false-root-genuine-key"],
)
def test_a_replaced_checkpoint_note_is_detected(copied: Path, forge: Callable[[Path], str], kind: str) -> None:
    replace_final_checkpoint(copied, forge(copied))
    seq, found_kind, output = verify_fails("--state-dir", str(copied))
    assert (seq, found_kind) == (ENTRIES - 1, kind), output


# --- verify --since-checkpoint


def test_since_checkpoint_passes_on_the_extended_ledger(pristine: Pristine) -> None:
    output = verify_ok("--state-dir", str(pristine.state_dir), "--since-checkpoint", str(pristine.early_checkpoint))
    assert f"latest covers {ENTRIES}" in output, output


def test_since_checkpoint_fails_once_an_early_entry_is_changed(copied: Path, pristine: Pristine) -> None:
    with ledger_db(copied) as conn:
        flip_entry_byte(conn, 7)
    seq, kind, output = verify_fails("--state-dir", str(copied), "--since-checkpoint", str(pristine.early_checkpoint))
    assert (seq, kind) == (7, "leaf_hash_mismatch"), output


def test_since_checkpoint_catches_a_rewrite_the_stored_state_hides(copied: Path, pristine: Pristine) -> None:
    """History from seq 7 rewritten, re-signed by an intruder key put into the key ring, and every
    stored checkpoint deleted: the ledger is self-consistent, but not with the saved checkpoint."""
    genuine = signing_key(copied)
    intruder = Ed25519Key.generate(genuine.name)
    with ledger_db(copied) as conn:
        flip_entry_byte(conn, 7)
        (previous,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = 6").fetchone()
        previous = bytes(previous)
        for seq, entry in conn.execute("SELECT seq, entry FROM entries WHERE seq >= 7 ORDER BY seq").fetchall():
            leaf = leaf_hash(bytes(entry))
            previous = chain_hash(previous, leaf)
            conn.execute("UPDATE entries SET leaf_hash = ?, chain_hash = ?, key_id = ?, signature = ? WHERE seq = ?",
                         (leaf, previous, intruder.key_id, intruder.sign_entry(previous), seq))
        conn.execute("UPDATE keys SET last_seq = 6")
        conn.execute("INSERT INTO keys (key_id, vkey, first_seq, last_seq, added_at_ms) VALUES (?, ?, 7, NULL, 0)",
                     (intruder.key_id, intruder.vkey))
        conn.execute("DELETE FROM checkpoints")
    seq, kind, output = verify_fails("--state-dir", str(copied), "--since-checkpoint", str(pristine.early_checkpoint))
    assert (seq, kind) == (EARLY - 1, "checkpoint_mismatch"), output


def test_since_checkpoint_catches_a_truncation_the_stored_state_hides(copied: Path, pristine: Pristine) -> None:
    with ledger_db(copied) as conn:
        truncate_tail(conn)
        conn.execute("DELETE FROM checkpoints WHERE size > ?", (ENTRIES - 5,))
    seq, kind, output = verify_fails("--state-dir", str(copied), "--since-checkpoint", str(pristine.final_checkpoint))
    assert (seq, kind) == (ENTRIES - 5, "truncated"), output


def test_a_checkpoint_from_another_ledger_fails(pristine: Pristine) -> None:
    _, kind, output = verify_fails(
        "--state-dir", str(pristine.state_dir), "--since-checkpoint", str(pristine.foreign_checkpoint)
    )
    assert kind == "bad_checkpoint", output


# --- the Merkle tiles


def delete_tile(conn: sqlite3.Connection) -> None:
    assert conn.execute("DELETE FROM tiles WHERE level = 1 AND idx = 0").rowcount == 1


def corrupt_tile(conn: sqlite3.Connection) -> None:
    (data,) = conn.execute("SELECT data FROM tiles WHERE level = 1 AND idx = 0").fetchone()
    data = bytes(data)
    assert len(data) == 32  # the level-8 hash over leaves [0, 256)
    conn.execute("UPDATE tiles SET data = ? WHERE level = 1 AND idx = 0", (bytes([data[0] ^ 1]) + data[1:],))


@pytest.mark.parametrize("tamper", [delete_tile, corrupt_tile], ids=["deleted-tile", "corrupted-tile"])
def test_a_bad_tile_never_yields_an_accepted_proof(
    copied: Path, pristine: Pristine, tamper: Callable[[sqlite3.Connection], None]
) -> None:
    """verify recomputes the tree from the leaf hashes, so the ledger still verifies; a proof
    that needs the tile's hash (leaf 280's sibling is the subtree [0, 256)) must not verify:
    ``prove`` either fails or prints a proof that ``verify --proof`` rejects."""
    with ledger_db(copied) as conn:
        tamper(conn)
    verify_ok("--state-dir", str(copied))
    proof = run_cli("prove", "--seq", "280", "--state-dir", str(copied))
    if proof.returncode == 0:
        checked = run_cli("verify", "--proof", "-", "--vkey", pristine.vkey, input=proof.stdout)
        assert checked.returncode == 1, output_of(checked)
        assert output_of(checked).startswith("FAILED: "), output_of(checked)
    # Proofs that do not touch the tile still verify.
    intact = run_cli("prove", "--seq", "10", "--state-dir", str(copied))
    assert intact.returncode == 0, output_of(intact)
    verify_ok("--proof", "-", "--vkey", pristine.vkey, input=intact.stdout)


def test_a_restarted_daemon_does_not_sign_a_root_from_a_corrupted_tile(copied: Path) -> None:
    """The daemon resumes its tree from the stored tiles. After a tile is corrupted, it must
    not go on to sign checkpoints that its own entries contradict: it rebuilds the tree, or
    refuses to start; either way the ledger it leaves still verifies."""
    with ledger_db(copied) as conn:
        corrupt_tile(conn)
    daemon = DaemonProcess(copied, env=SHORT_INTERVAL)
    try:
        daemon.start()
    except RuntimeError:
        assert daemon.proc is not None and daemon.proc.returncode == 3, daemon.stderr
        return
    try:
        with daemon.client() as client:
            append_plans(client, ENTRIES, 3)
            wait_for_checkpoint(client, ENTRIES + 3)
    finally:
        assert daemon.stop() == 0
    verify_ok("--state-dir", str(copied))


# --- signing mode "checkpoint": the checkpoints are all that authenticate the entries


@pytest.fixture(scope="module")
def checkpoint_mode_ledger() -> Iterator[Path]:
    """40 unsigned entries; checkpoints at size 10 (the first commit) and 40 (shutdown)."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        state_dir = Path(directory)
        env = {"CCOS_OBSD_SIGNING_MODE": "checkpoint", "CCOS_OBSD_CHECKPOINT_INTERVAL": "3600"}
        daemon = DaemonProcess(state_dir, env=env).start()
        try:
            with daemon.client() as client:
                append_plans(client, 0, 10)
                append_plans(client, 10, 30)
        finally:
            assert daemon.stop() == 0
        assert [size for size, _ in stored_checkpoints(state_dir)] == [10, 40]
        verify_ok("--state-dir", str(state_dir))
        yield state_dir


@pytest.fixture
def copied_checkpoint_mode(checkpoint_mode_ledger: Path, state_dir: Path) -> Path:
    return copy_state_dir(checkpoint_mode_ledger, state_dir)


def test_checkpoint_mode_rewrite_is_caught_by_the_covering_checkpoint(copied_checkpoint_mode: Path) -> None:
    with ledger_db(copied_checkpoint_mode) as conn:
        flip_entry_byte(conn, 7)
        (previous,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = 6").fetchone()
        previous = bytes(previous)
        for seq, entry in conn.execute("SELECT seq, entry FROM entries WHERE seq >= 7 ORDER BY seq").fetchall():
            leaf = leaf_hash(bytes(entry))
            previous = chain_hash(previous, leaf)
            conn.execute("UPDATE entries SET leaf_hash = ?, chain_hash = ? WHERE seq = ?", (leaf, previous, seq))
    seq, kind, output = verify_fails("--state-dir", str(copied_checkpoint_mode))
    assert (seq, kind) == (9, "checkpoint_mismatch"), output


def test_checkpoint_mode_without_checkpoints_is_unauthenticated(copied_checkpoint_mode: Path) -> None:
    with ledger_db(copied_checkpoint_mode) as conn:
        conn.execute("DELETE FROM checkpoints")
    seq, kind, output = verify_fails("--state-dir", str(copied_checkpoint_mode))
    assert (seq, kind) == (0, "unauthenticated"), output
