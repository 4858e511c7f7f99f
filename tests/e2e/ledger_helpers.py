"""Shared helpers for the Merkle proof, checkpoint and key rotation end-to-end tests.

Independent implementations of the contracts (RFC 6962 tree hash, key ids, entry
signatures) use hashlib and cryptography only; ``ccos_obsd`` is imported where the
issue names its verifier (``note.verify_checkpoint``, ``merkle.verify_consistency``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccos_obsd.client import Client
from tests.daemon import run_cli
from tests.e2e.socket_helpers import wait_until

EM_DASH = "\u2014"
SIGNATURE_CONTEXT = b"ccos-obsd/entry/v1\x00"
CHECKPOINT_TIMEOUT_S = 10.0
FAILED = re.compile(r"FAILED: seq (\d+): ([a-z_]+):")


# --- running the CLI


def output_of(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")


def verify_ok(*args: str, input: bytes | None = None) -> str:
    """``ccos-obsd verify ARGS`` must exit 0; returns its output."""
    result = run_cli("verify", *args, input=input)
    output = output_of(result)
    assert result.returncode == 0, output
    assert "Traceback" not in output, output
    return output


def verify_fails(*args: str) -> tuple[int, str, str]:
    """``ccos-obsd verify ARGS`` must exit 1 naming ``seq N: kind``; returns (N, kind, output)."""
    result = run_cli("verify", *args)
    output = output_of(result)
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    found = FAILED.search(output)
    assert found, f"no 'FAILED: seq N: kind:' in {output!r}"
    return int(found.group(1)), found.group(2), output


def proof_rejected(proof: bytes, vkey: str) -> str:
    """``verify --proof - --vkey KEY`` must exit 1 (and say why, without a traceback)."""
    result = run_cli("verify", "--proof", "-", "--vkey", vkey, input=proof)
    output = output_of(result)
    assert result.returncode == 1, output
    assert output.startswith("FAILED: "), output
    assert "Traceback" not in output, output
    return output


def vkeys(state_dir: Path) -> list[str]:
    result = run_cli("keys", "--state-dir", str(state_dir))
    assert result.returncode == 0, output_of(result)
    return result.stdout.decode().split()


# --- state dirs and their SQLite files


def copy_state_dir(source: Path, target: Path) -> Path:
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".sock"):
            shutil.copy2(item, target / item.name)
    return target


@contextlib.contextmanager
def ledger_db(state_dir: Path) -> Iterator[sqlite3.Connection]:
    """A read-write connection to a stopped daemon's ledger; commits on success."""
    conn = sqlite3.connect(state_dir / "ledger.db")
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def stored_checkpoints(state_dir: Path) -> list[tuple[int, str]]:
    """(size, note) of every stored checkpoint, smallest first."""
    with ledger_db(state_dir) as conn:
        return [(size, note) for size, note in conn.execute("SELECT size, note FROM checkpoints ORDER BY size")]


def leaf_hashes(state_dir: Path) -> list[bytes]:
    with ledger_db(state_dir) as conn:
        return [bytes(h) for (h,) in conn.execute("SELECT leaf_hash FROM entries ORDER BY seq")]


# --- independent contract implementations


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    return hashlib.sha256(previous + leaf).digest()


def tree_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash over leaf hashes (MTH), recursively."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + tree_root(leaves[:split]) + tree_root(leaves[split:])).digest()


def key_id_of(name: str, public: bytes) -> str:
    return hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4].hex()


@dataclass(frozen=True)
class Ed25519Key:
    """A signing key in the signed-note formats, built from cryptography directly."""

    name: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, name: str) -> Ed25519Key:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519Key:
        """``PRIVATE+KEY+<name>+<id>+<base64(0x01 || seed)>`` (the signing.key file)."""
        prefix, key, name, key_id, encoded = skey.strip().split("+", 4)
        assert (prefix, key) == ("PRIVATE", "KEY"), skey[:20]
        raw = base64.b64decode(encoded, validate=True)
        assert raw[0] == 0x01 and len(raw) == 33
        loaded = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        assert loaded.key_id == key_id
        return loaded

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id_of(self.name, self.public)

    @property
    def vkey(self) -> str:
        encoded = base64.b64encode(b"\x01" + self.public).decode()
        return f"{self.name}+{self.key_id}+{encoded}"

    def sign_entry(self, chain: bytes) -> bytes:
        return self.private.sign(SIGNATURE_CONTEXT + chain)

    def sign_note(self, text: str) -> str:
        """A C2SP signed note of ``text`` (ending in a newline) by this key alone."""
        signature = self.private.sign(text.encode("utf-8"))
        encoded = base64.b64encode(bytes.fromhex(self.key_id) + signature).decode()
        return f"{text}\n{EM_DASH} {self.name} {encoded}\n"


# --- checkpoints


@dataclass(frozen=True)
class ParsedCheckpoint:
    origin: str
    size: int
    root: bytes
    text: str
    signatures: list[tuple[str, bytes, bytes]]
    """(key name, 4-byte key id, signature) per signature line."""


def parse_checkpoint(note: str) -> ParsedCheckpoint:
    """Split a C2SP tlog-checkpoint note by hand, checking its shape strictly."""
    text, sep, block = note.partition("\n\n")
    assert sep, f"no blank line in {note!r}"
    lines = text.split("\n")
    assert len(lines) == 3, f"checkpoint text should be origin, size, root: {text!r}"
    origin, size, root = lines
    assert re.fullmatch(r"0|[1-9][0-9]*", size), size
    raw_root = base64.b64decode(root, validate=True)
    assert len(raw_root) == 32 and base64.b64encode(raw_root).decode() == root
    assert block.endswith("\n"), note
    signatures = []
    for line in block[:-1].split("\n"):
        found = re.fullmatch(f"{EM_DASH} (\\S+) ([A-Za-z0-9+/=]+)", line)
        assert found, f"bad signature line {line!r}"
        raw = base64.b64decode(found.group(2), validate=True)
        assert len(raw) == 4 + 64, line
        signatures.append((found.group(1), raw[:4], raw[4:]))
    return ParsedCheckpoint(origin, int(size), raw_root, text + "\n", signatures)


def checkpoint_note(client: Client) -> str | None:
    """The daemon's latest checkpoint (socket op ``checkpoint``), or None while there is none."""
    answer = client.request({"op": "checkpoint"})
    if not answer.get("ok"):
        assert answer["error"]["code"] == "not_found", answer
        return None
    assert set(answer) == {"ok", "checkpoint"}, answer
    note: str = answer["checkpoint"]
    return note


def checkpoint_size(client: Client) -> int:
    note = checkpoint_note(client)
    return 0 if note is None else parse_checkpoint(note).size


def wait_for_checkpoint(client: Client, size: int, timeout: float = CHECKPOINT_TIMEOUT_S) -> str:
    """Poll the ``checkpoint`` op until the latest checkpoint covers ``size`` entries; return it."""
    wait_until(lambda: checkpoint_size(client) >= size, timeout, f"a checkpoint covering {size} entries")
    note = checkpoint_note(client)
    assert note is not None
    return note


def append_plans(client: Client, start: int, count: int) -> list[int]:
    """Append PlanStepStarted actions with plan_id "plan-<i>" for i in [start, start+count); their seqs."""
    results = client.append_batch([
        {"action_type": "PlanStepStarted", "plan_id": f"plan-{i}", "step_id": f"step-{i}"}
        for i in range(start, start + count)
    ])
    assert all(r["ok"] for r in results), results
    return [r["seq"] for r in results]
