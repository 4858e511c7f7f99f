"""Working Memory at scale: replay rate, and search latency over a million entries.

``python -m bench.wm_search [--entries N] [--batch B] [--jitter-ms J]``

Fills a fresh store (in a temporary directory) with ``N`` entries derived from
synthetic ledger entries, then times searches. Entries are built as the ledger
writer builds them (the ``bench.workload`` action mix, daemon fields, canonical
bytes, leaf and chain hashes) except the signature: every entry carries the
same 64 placeholder bytes, since derivation only base64-encodes it and signing
a million entries would dominate the setup. Action ids are random UUIDs, as
the daemon generates them. Client timestamps get up to ``J`` ms of random
skew, so entries do not arrive in exact time order.

Figures:

- derive: ``derive_wm_entry`` alone, entries/s;
- ingest: ``WmStore.ingest`` alone, batches of ``B`` (one fsync each), entries/s;
- replay: derive + ingest of all ``N`` entries, seconds and entries/s (the
  issue's targets: under 60 s for a million, and keeping up with ~10k entries/s);
- searches: the median (and worst) of ``repeats`` runs after one warm-up run,
  ms, with the number of results (the issue's target: under 50 ms).

The machine's load average is printed before and after: on a shared machine
the rates move with it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.workload import make_actions
from ccos_obsd.ledger.canonical import canonical_bytes
from ccos_obsd.ledger.hashing import CHAIN_ROOT, chain_hash, leaf_hash
from ccos_obsd.ledger.keys import KeyId
from ccos_obsd.ledger.store import StoredEntry
from ccos_obsd.wm.derive import WmEntry, derive_wm_entry
from ccos_obsd.wm.store import WmStore

CHUNK = 10_000
PLACEHOLDER_SIGNATURE = bytes(range(64))
KEY_ID = KeyId("0a1b2c3d")
PROVIDERS = ("openai", "anthropic", "local")
TARGETS = {"search_ms": 50.0, "replay_s": 60.0, "ingest_rate": 10_000.0}


def stored_entries(count: int, jitter_ms: int, seed: int = 11) -> Iterator[list[StoredEntry]]:
    """Synthetic ledger entries in chunks of ``CHUNK``, sealed with real hashes."""
    rng = random.Random(seed)
    previous = CHAIN_ROOT
    for start in range(0, count, CHUNK):
        chunk = []
        for offset, action in enumerate(make_actions(min(CHUNK, count - start), start=start)):
            seq = start + offset
            action["action_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))  # as the daemon makes them
            action["timestamp_ms"] += rng.randint(-jitter_ms, jitter_ms)
            if action["action_type"] == "CapabilityResult":
                action["metadata"]["provider"] = PROVIDERS[seq % len(PROVIDERS)]
            fields: dict[str, Any] = {
                **action, "v": 1, "seq": seq, "recorded_at_ms": 1_760_000_000_000 + seq * 3,
                "peer": {"uid": 1000, "gid": 1000, "pid": 4242},
            }
            entry = canonical_bytes(fields, keys_checked=True)
            leaf = leaf_hash(entry)
            previous = chain_hash(previous, leaf)
            chunk.append(StoredEntry(seq, entry, leaf, previous, KEY_ID, PLACEHOLDER_SIGNATURE))
        yield chunk


def fill(store: WmStore, count: int, batch: int, jitter_ms: int) -> dict[str, float]:
    """Derive and ingest one after the other, timing each."""
    derive_seconds = 0.0
    ingest_seconds = 0.0
    for chunk in stored_entries(count, jitter_ms):
        started = time.perf_counter()
        derived: list[WmEntry] = [derive_wm_entry(entry) for entry in chunk]
        derive_seconds += time.perf_counter() - started
        started = time.perf_counter()
        for at in range(0, len(derived), batch):
            store.ingest(derived[at:at + batch])
        ingest_seconds += time.perf_counter() - started
    return {
        "derive_rate": count / derive_seconds,
        "ingest_rate": count / ingest_seconds,
        "replay_s": derive_seconds + ingest_seconds,
    }


def timed(search: Callable[[], list[dict[str, Any]]], repeats: int) -> tuple[float, float, int]:
    """(median ms, worst ms, results) after one warm-up run."""
    results = search()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        search()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), len(results)


def searches(store: WmStore, count: int) -> dict[str, Callable[[], list[dict[str, Any]]]]:
    start = 1_760_000_000.0  # bench.workload's first timestamp, in seconds; entries are 3 ms apart
    end = start + count * 0.003
    middle = (start + end) / 2
    last_plan = f"plan-{(count - 1) // 40:08d}"
    middle_plan = f"plan-{count // 80:08d}"
    return {
        "text: capability name (1 in 16 entries)": lambda: store.search(text="ccos.fs.read"),
        "text: common word (every entry)": lambda: store.search(text="capabilityresult"),
        "text: rare word (one plan, 40 entries)": lambda: store.search(text=middle_plan),
        "text: two words, limit 500": lambda: store.search(text="ccos.db.query failure", limit=500),
        "text + since (last 10 minutes)": lambda: store.search(text="ccos.llm.write", since=end - 600),
        "text + until (older half)": lambda: store.search(text="ccos.llm.write", until=middle),
        "text + until (first minute, common word)": lambda: store.search(text="capabilityresult", until=start + 60),
        "tag: one tag (every entry)": lambda: store.search(tags=["causal-chain"]),
        "tag: any of two (1 in 12 entries)": lambda: store.search(tags=["anthropic", "openai"]),
        "tag: rare (1 in 4 entries)": lambda: store.search(tags=["planstepstarted"]),
        "tag + window (one minute)": lambda: store.search(tags=["capabilitycall"], since=middle, until=middle + 60),
        "plan + text": lambda: store.search(plan_id=last_plan, text="fetch"),
        "time window only (one minute)": lambda: store.search(since=middle, until=middle + 60),
    }


def run(count: int, batch: int, jitter_ms: int, repeats: int, directory: Path) -> dict[str, Any]:
    store = WmStore(directory / "wm.db")
    load_before = os.getloadavg()[0]
    try:
        fill_figures = fill(store, count, batch, jitter_ms)
        started = time.perf_counter()
        store.digest()
        digest_ms = (time.perf_counter() - started) * 1000
        search_figures = {name: timed(search, repeats) for name, search in searches(store, count).items()}
        return {"count": store.count(), **fill_figures, "digest_ms": digest_ms, "searches": search_figures,
                "file_mib": (directory / "wm.db").stat().st_size / 2**20,
                "load_before": load_before, "load_after": os.getloadavg()[0]}
    finally:
        store.close()


def report(figures: dict[str, Any], batch: int) -> None:
    print(f"load:      {figures['load_before']:.2f} before, {figures['load_after']:.2f} after (1-minute average)")
    print(f"entries:   {figures['count']:,} (store file {figures['file_mib']:.0f} MiB)")
    print(f"derive:    {figures['derive_rate']:,.0f} entries/s")
    print(f"ingest:    {figures['ingest_rate']:,.0f} entries/s (batches of {batch}, fsync each)"
          f"   target >= {TARGETS['ingest_rate']:,.0f}")
    print(f"replay:    {figures['replay_s']:.1f} s, {figures['count'] / figures['replay_s']:,.0f} entries/s"
          f" (derive + ingest)   target < {TARGETS['replay_s']:.0f} s")
    print(f"digest:    {figures['digest_ms']:.2f} ms")
    print(f"searches (median / worst ms, results; target < {TARGETS['search_ms']:.0f} ms):")
    for name, (median, worst, results) in figures["searches"].items():
        print(f"  {name:<44} {median:8.2f} {worst:8.2f}  {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1_000, help="entries per ingest transaction")
    parser.add_argument("--jitter-ms", type=int, default=2_000, help="random skew of client timestamps")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", type=Path, help="keep the store here instead of a temporary directory")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        figures = run(args.entries, args.batch, args.jitter_ms, args.repeats, args.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="ccos-wm-bench-") as directory:
            figures = run(args.entries, args.batch, args.jitter_ms, args.repeats, Path(directory))
    report(figures, args.batch)


if __name__ == "__main__":
    main()
