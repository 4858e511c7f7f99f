"""Start-up time and memory against ledger size.

``python -m bench.startup [--sizes 10000,1000000]``

For each size: a ledger of that many entries is written with ``LedgerWriter``
(default signing mode, every entry signed) into a fresh state dir with its key
file, then a daemon on its embedded defaults starts on it twice:

- **first start**: no metrics snapshot yet, so the aggregates fold in every entry;
  it stops at once (writing the snapshot);
- **second start**: loads the snapshot and folds in nothing.

Reported: seconds from ``exec`` to answering ``ping`` for both starts (the
issue's target: a 1,000,000-entry ledger ready in under 2 s), the daemon's RSS
once ready, and the time of a ``/metrics`` scrape. Ratios are to the smallest size.
Working Memory starts catching up in its own process after each start; it does
not delay readiness, and the daemon's RSS does not include it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.integrity import build
from ccos_obsd.ledger.keys import replace_signing_key
from ccos_obsd.statedir import KEY_FILE

TARGET_READY_S = 2.0
TARGET_RSS_RATIO = 1.3


def _scrape_ms(daemon: BenchDaemon, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        daemon.metrics_text()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory:
        state = Path(directory)
        _, key, rate = build(state, size, "entry")
        replace_signing_key(state / KEY_FILE, key)
        point: dict[str, Any] = {"entries": size, "build_rate": rate}
        with BenchDaemon(state, log_level="warning") as first:
            point["first_ready_s"] = first.ready_seconds
        with BenchDaemon(state, log_level="warning") as second:
            point["ready_s"] = second.ready_seconds
            point["rss_kib"] = second.rss_kib().get("VmRSS")
            point["scrape_ms"] = _scrape_ms(second)
        return point


def run(sizes: list[int]) -> dict[str, Any]:
    points = [measure(size) for size in sizes]
    base = points[0]
    for point in points:
        point["rss_ratio"] = point["rss_kib"] / base["rss_kib"]
        point["scrape_ratio"] = point["scrape_ms"] / base["scrape_ms"]
    return {"points": points, "targets": {"ready_s": TARGET_READY_S, "rss_ratio": TARGET_RSS_RATIO}}


def table(results: dict[str, Any]) -> str:
    lines = ["| entries | first start (no snapshot) | start | RSS | RSS ratio | scrape | scrape ratio |",
             "|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        lines.append(f"| {p['entries']:,} | {p['first_ready_s']:.2f} s | {p['ready_s']:.2f} s (target < 2 s) | "
                     f"{p['rss_kib'] / 1024:.0f} MiB | {p['rss_ratio']:.2f} (target <= 1.3) | "
                     f"{p['scrape_ms']:.1f} ms | {p['scrape_ratio']:.2f} (target <= 1.2) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run([int(s) for s in args.sizes.split(",")])
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
