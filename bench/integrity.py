"""Integrity at scale: proof latency, verification speed and tree storage.

Builds ledgers in-process through the daemon's own ``LedgerWriter`` (the same
code path as the socket, without the socket): a large one in checkpoint signing
mode (1,000,000 entries; ``--quick``: 100,000) and a smaller one in entry mode.

- inclusion and consistency proofs at the large size (``proofs.inclusion`` /
  ``proofs.consistency`` on a read-only connection; each reads O(log n) hashes),
- checkpoint-mode verification of the whole large ledger (every leaf and chain
  hash, the tree recomputed, every checkpoint checked),
- entry-mode verification rate against its floor: raw Ed25519 verifications on
  one core (``cryptography``), measured in the same run,
- tree storage: bytes in ``tiles`` against the leaf hashes' own 32 bytes each.

Run: ``python -m bench.integrity [--quick]``; ``python -m bench`` includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.workload import make_actions
from ccos_obsd.ledger import proofs, store
from ccos_obsd.ledger.entry import ValidatedAction, new_action_id
from ccos_obsd.ledger.keys import SigningKey
from ccos_obsd.ledger.verify import CheckpointRecord, KeyRange, KeyRing, verify_entries
from ccos_obsd.ledger.writer import LedgerWriter

SIZES = {"full": {"large": 1_000_000, "entry": 100_000}, "quick": {"large": 100_000, "entry": 20_000}}


def build(directory: Path, count: int, mode: str) -> tuple[Path, SigningKey, float]:
    """A ledger of ``count`` entries written by LedgerWriter; returns its path, key and rate."""
    db = directory / "ledger.db"
    key = SigningKey.generate("bench/ccos-obsd")
    template = make_actions(4096)

    async def fill() -> float:
        writer = LedgerWriter(db, key, asyncio.get_running_loop(), signing_mode=mode, checkpoint_interval_s=1.0)
        writer.start()
        started = time.perf_counter()
        written = 0
        pending = []
        while written < count:
            n = min(4096, count - written)
            actions = [ValidatedAction({**a, "action_id": new_action_id()}, False) for a in template[:n]]
            pending.append(writer.submit(actions, {"uid": 0, "gid": 0, "pid": 1}))
            written += n
            if len(pending) >= 4:
                await pending.pop(0)
        for future in pending:
            await future
        rate = count / (time.perf_counter() - started)
        await asyncio.get_running_loop().run_in_executor(None, writer.close)
        return rate

    return db, key, asyncio.run(fill())


def proof_times(db: Path, size: int, samples: int = 200) -> dict[str, Any]:
    conn = store.connect(db, readonly=True)
    rng = random.Random(1)
    inclusion, consistency = [], []
    try:
        for _ in range(samples):
            seq = rng.randrange(size)
            started = time.perf_counter()
            store.snapshot(conn, proofs.inclusion, seq=seq)
            inclusion.append(time.perf_counter() - started)
            old = rng.randrange(1, size)
            started = time.perf_counter()
            store.snapshot(conn, proofs.consistency, old, size)
            consistency.append(time.perf_counter() - started)
    finally:
        conn.close()
    return {name: {"p50_ms": statistics.median(t) * 1e3, "max_ms": max(t) * 1e3,
                   "p99_ms": sorted(t)[int(len(t) * 0.99) - 1] * 1e3}
            for name, t in (("inclusion", inclusion), ("consistency", consistency))}


def verify_time(db: Path, key: SigningKey) -> tuple[float, int]:
    conn = store.connect(db, readonly=True)
    try:
        conn.execute("BEGIN")
        ring = KeyRing([KeyRange(key.verifier)])
        checkpoints = [CheckpointRecord(c.note, size=c.size) for c in store.read_checkpoints(conn)]
        started = time.perf_counter()
        report = verify_entries(store.iter_entries(conn), ring, checkpoints=checkpoints)
        return time.perf_counter() - started, report.entries
    finally:
        conn.close()


def raw_verify_rate(seconds: float = 3.0) -> float:
    """Ed25519 verifications per second on one core: the floor of entry-mode verification."""
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    message = os.urandom(51)
    signature = private.sign(message)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(200):
            public.verify(signature, message)
        done += 200
    return done / (time.perf_counter() - started)


def storage(db: Path, size: int) -> dict[str, float]:
    conn = store.connect(db, readonly=True)
    try:
        tile_bytes = conn.execute("SELECT TOTAL(length(data)) FROM tiles").fetchone()[0]
    finally:
        conn.close()
    leaf_bytes = 32 * size
    return {"tile_bytes": tile_bytes, "leaf_hash_bytes": leaf_bytes, "ratio": (leaf_bytes + tile_bytes) / leaf_bytes}


def run(quick: bool = False) -> dict[str, Any]:
    sizes = SIZES["quick" if quick else "full"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ccos-bench-int-") as tmp:
        large_dir = Path(tmp) / "large"
        large_dir.mkdir()
        db, key, rate = build(large_dir, sizes["large"], "checkpoint")
        results["build_checkpoint_mode"] = {"entries": sizes["large"], "rate": rate}
        results["proofs"] = {"size": sizes["large"], **proof_times(db, sizes["large"])}
        seconds, entries = verify_time(db, key)
        results["verify_checkpoint_mode"] = {"entries": entries, "seconds": seconds, "rate": entries / seconds}
        results["storage"] = storage(db, sizes["large"])
        entry_dir = Path(tmp) / "entry"
        entry_dir.mkdir()
        db, key, rate = build(entry_dir, sizes["entry"], "entry")
        results["build_entry_mode"] = {"entries": sizes["entry"], "rate": rate}
        floor = raw_verify_rate()
        seconds, entries = verify_time(db, key)
        results["verify_entry_mode"] = {"entries": entries, "seconds": seconds, "rate": entries / seconds,
                                        "floor_single_core_verify_rate": floor, "ratio": entries / seconds / floor}
    return results


def table(results: dict[str, Any]) -> str:
    p, v, e, s = results["proofs"], results["verify_checkpoint_mode"], results["verify_entry_mode"], results["storage"]
    rows = [
        "| figure | measured | floor / reference | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| inclusion proof at {p['size']:,} entries (p50 / p99 / max ms) | {p['inclusion']['p50_ms']:.2f} / "
        f"{p['inclusion']['p99_ms']:.2f} / {p['inclusion']['max_ms']:.2f} | | | < 5 ms | "
        f"{'yes' if p['inclusion']['max_ms'] < 5 else 'NO'} |",
        f"| consistency proof at {p['size']:,} entries (p50 / p99 / max ms) | {p['consistency']['p50_ms']:.2f} / "
        f"{p['consistency']['p99_ms']:.2f} / {p['consistency']['max_ms']:.2f} | | | < 5 ms | "
        f"{'yes' if p['consistency']['max_ms'] < 5 else 'NO'} |",
        f"| verify, checkpoint mode, {v['entries']:,} entries (s) | {v['seconds']:.1f} | | | < 20 s at 1M | "
        f"{'yes' if v['seconds'] * 1_000_000 / v['entries'] < 20 else 'NO'} |",
        f"| verify, entry mode (entries/s) | {e['rate']:,.0f} | {e['floor_single_core_verify_rate']:,.0f} "
        f"(raw Ed25519 verify, 1 core) | {e['ratio']:.2f} | >= 1.6x | {'yes' if e['ratio'] >= 1.6 else 'NO'} |",
        f"| tree storage (leaf hashes + tiles) / leaf hashes | {s['ratio']:.4f} | | | <= 1.1 | "
        f"{'yes' if s['ratio'] <= 1.1 else 'NO'} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.integrity", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    results = run(args.quick)
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
