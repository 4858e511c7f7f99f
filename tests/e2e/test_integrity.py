"""Tampering with a stopped daemon's ledger (or an export) is caught, at the right seq.

The ledger is edited the way an intruder with file access would: with the
``sqlite3`` module, on the table DESIGN.md's store keeps (``entries``: seq,
entry, leaf_hash, chain_hash, key_id, signature, ...).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.daemon import DaemonProcess, run_cli
from tests.e2e.ledger_helpers import ledger_db

ENTRIES = 30


@pytest.fixture(scope="module")
def pristine_ledger() -> Iterator[Path]:
    """A state dir with ENTRIES entries (seq i has plan_id "plan-i"), its daemon stopped."""
    with tempfile.TemporaryDirectory(prefix="ccos-") as directory:
        state_dir = Path(directory)
        daemon = DaemonProcess(state_dir).start()
        try:
            with daemon.client() as client:
                for i in range(ENTRIES):
                    client.append({"action_type": "PlanStepStarted", "plan_id": f"plan-{i}",
                                   "step_id": f"step-{i}", "cost": 0.25})
        finally:
            assert daemon.stop() == 0
        intact = run_cli("verify", "--state-dir", str(state_dir))
        assert intact.returncode == 0, intact.stdout + intact.stderr
        yield state_dir


@pytest.fixture
def stopped_ledger(pristine_ledger: Path, state_dir: Path) -> Path:
    """A private copy of the pristine ledger, for one test to tamper with."""
    for item in pristine_ledger.iterdir():
        if item.is_file():
            shutil.copy2(item, state_dir / item.name)
    return state_dir




def first_seq_named(output: str) -> int:
    found = re.search(r"\bseq (\d+)\b", output)
    assert found, f"no 'seq N' in {output!r}"
    return int(found.group(1))


def check_reports(state_dir: Path, seq: int) -> str:
    result = run_cli("verify", "--state-dir", str(state_dir))
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1, output
    assert first_seq_named(output) == seq, output
    assert "Traceback" not in output
    return output


def flip_entry_byte(conn: sqlite3.Connection) -> None:
    (entry,) = conn.execute("SELECT entry FROM entries WHERE seq = 7").fetchone()
    entry = bytearray(entry)
    at = bytes(entry).index(b'"plan-7"') + len('"plan-')
    entry[at] = ord("8")  # "plan-7" -> "plan-8": still valid JSON, different content
    conn.execute("UPDATE entries SET entry = ? WHERE seq = 7", (bytes(entry),))


def delete_row(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM entries WHERE seq = 12")


def replace_signature(conn: sqlite3.Connection) -> None:
    # A genuine signature by the same key, over a different entry.
    (other,) = conn.execute("SELECT signature FROM entries WHERE seq = 4").fetchone()
    conn.execute("UPDATE entries SET signature = ? WHERE seq = 3", (other,))


def change_chain_hash(conn: sqlite3.Connection) -> None:
    (chain,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = 20").fetchone()
    conn.execute("UPDATE entries SET chain_hash = ? WHERE seq = 20", (bytes([chain[0] ^ 1]) + bytes(chain[1:]),))


@pytest.mark.parametrize(
    ("tamper", "bad_seq"),
    [(flip_entry_byte, 7), (delete_row, 12), (replace_signature, 3), (change_chain_hash, 20)],
    ids=["entry-byte", "deleted-row", "signature", "chain-hash"],
)
def test_verify_names_the_tampered_seq(
    stopped_ledger: Path, tamper: Callable[[sqlite3.Connection], None], bad_seq: int
) -> None:
    with ledger_db(stopped_ledger) as conn:
        tamper(conn)
    check_reports(stopped_ledger, bad_seq)


def test_rewriting_history_consistently_still_fails_on_the_signature(stopped_ledger: Path) -> None:
    """An intruder who edits seq 7 and recomputes every hash after it cannot re-sign."""
    with ledger_db(stopped_ledger) as conn:
        flip_entry_byte(conn)
        (previous,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = 6").fetchone()
        rows = conn.execute("SELECT seq, entry FROM entries WHERE seq >= 7 ORDER BY seq").fetchall()
        for seq, entry in rows:
            leaf = hashlib.sha256(b"\x00" + entry).digest()
            previous = hashlib.sha256(previous + leaf).digest()
            conn.execute("UPDATE entries SET leaf_hash = ?, chain_hash = ? WHERE seq = ?", (leaf, previous, seq))
    output = check_reports(stopped_ledger, 7)
    assert "signature" in output


def test_history_re_signed_with_another_key_fails_against_the_trusted_vkey(stopped_ledger: Path) -> None:
    """Even an intruder who re-signs with their own key (and adds it to the key ring) is caught
    by a verifier that trusts only the published key."""
    published = run_cli("keys", "--state-dir", str(stopped_ledger)).stdout.decode().split()
    assert len(published) == 1
    intruder = Ed25519PrivateKey.generate()
    public = intruder.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    name = "intruder/ccos-obsd"
    key_id = hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4].hex()
    encoded = base64.b64encode(b"\x01" + public).decode()
    vkey = f"{name}+{key_id}+{encoded}"
    with ledger_db(stopped_ledger) as conn:
        flip_entry_byte(conn)
        (previous,) = conn.execute("SELECT chain_hash FROM entries WHERE seq = 6").fetchone()
        for seq, entry in conn.execute("SELECT seq, entry FROM entries WHERE seq >= 7 ORDER BY seq").fetchall():
            leaf = hashlib.sha256(b"\x00" + entry).digest()
            previous = hashlib.sha256(previous + leaf).digest()
            signature = intruder.sign(b"ccos-obsd/entry/v1\x00" + previous)
            conn.execute("UPDATE entries SET leaf_hash = ?, chain_hash = ?, key_id = ?, signature = ? WHERE seq = ?",
                         (leaf, previous, key_id, signature, seq))
        conn.execute("UPDATE keys SET last_seq = 6")
        conn.execute("INSERT INTO keys (key_id, vkey, first_seq, last_seq, added_at_ms) VALUES (?, ?, 7, NULL, 0)",
                     (key_id, vkey))
    result = run_cli("verify", "--state-dir", str(stopped_ledger), "--vkey", published[0])
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1, output
    assert first_seq_named(output) == 7, output


def test_verify_still_passes_after_a_harmless_read(stopped_ledger: Path) -> None:
    with ledger_db(stopped_ledger) as conn:
        assert conn.execute("SELECT count(*) FROM entries").fetchone() == (ENTRIES,)
    result = run_cli("verify", "--state-dir", str(stopped_ledger))
    assert result.returncode == 0, result.stdout + result.stderr


def edit_entry_text(records: list[dict[str, object]]) -> None:
    record = records[9]
    assert isinstance(record["entry"], str)
    record["entry"] = record["entry"].replace('"plan-9"', '"plan-X"')


def drop_record(records: list[dict[str, object]]) -> None:
    del records[9]


def swap_signatures(records: list[dict[str, object]]) -> None:
    records[9]["signature"], records[10]["signature"] = records[10]["signature"], records[9]["signature"]


@pytest.mark.parametrize("tamper", [edit_entry_text, drop_record, swap_signatures],
                         ids=["entry-text", "dropped-line", "swapped-signatures"])
def test_verify_export_names_the_tampered_seq(
    stopped_ledger: Path, tmp_path: Path, tamper: Callable[[list[dict[str, object]]], None]
) -> None:
    keys = run_cli("keys", "--state-dir", str(stopped_ledger))
    assert keys.returncode == 0
    (vkey,) = keys.stdout.decode().split()
    export = tmp_path / "export.ndjson"
    assert run_cli("export", "--state-dir", str(stopped_ledger), "-o", str(export)).returncode == 0
    intact = run_cli("verify", "--export", str(export), "--vkey", vkey)
    assert intact.returncode == 0, intact.stdout + intact.stderr

    records = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    tamper(records)
    export.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = run_cli("verify", "--export", str(export), "--vkey", vkey)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 1, output
    assert first_seq_named(output) == 9, output
