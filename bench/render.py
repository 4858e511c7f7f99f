"""/metrics rendering: cost per series against prometheus_client, against ledger size, and under load.

``python -m bench.render [--quick]``

Three figures:

- **per series**: the daemon's collector (``LedgerCollector`` over ``Aggregates``)
  rendered with ``prometheus_client.generate_latest``, against the floor: the
  same encoder over an equivalent registry of prometheus_client ``Counter`` and
  ``Histogram`` objects holding the same series (same names, labels, buckets),
  about 20,000 series each. Median of repeated renders; ratio = ours / theirs.
- **against ledger size**: render time of the same series set after folding in
  1,000, 100,000 and 1,000,000 entries (in-process: the aggregates are what a
  daemon holds after that many entries). Target: 1M within 1.2x of 1k.
- **under load**: a daemon with about 20,000 series takes single appends at a
  fixed rate, first alone, then while ``/metrics`` is scraped every second;
  p99 acknowledgement latency of both runs, and the scrape time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest

from bench.daemon import BenchDaemon
from bench.latency import percentile
from bench.wire import check_answers, open_loop
from bench.workload import make_actions, single_lines
from ccos_obsd.metrics.aggregates import DEFAULT_DURATION_BUCKETS, Aggregates, LiveGauges
from ccos_obsd.metrics.collector import LedgerCollector

OUTCOMES = ({"success": True}, {"success": False})
TARGETS = {"per_series_ratio": 1.0, "size_ratio": 1.2}


def entries(start: int, stop: int, names: int) -> list[dict[str, Any]]:
    """Capability calls spread over ``names`` capabilities, both outcomes, durations across the buckets."""
    out = []
    for seq in range(start, stop):
        name = f"cap.{seq % names:04d}"
        out.append({
            "action_type": "CapabilityCall", "function_name": name, "action_id": f"a-{seq}", "seq": seq,
            "recorded_at_ms": 1_760_000_000_000 + seq, "duration_ms": float((seq * 37) % 12_000),
            "cost": 0.001, **OUTCOMES[(seq // names) % 2],
        })
    return out


def aggregates(count: int, names: int) -> Aggregates:
    folded = Aggregates()
    for start in range(0, count, 50_000):
        folded.observe_entries(entries(start, min(count, start + 50_000), names))
    return folded


def ours(folded: Aggregates) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(folded, LiveGauges(), lambda: 0))
    return registry


def equivalent(folded: Aggregates) -> CollectorRegistry:
    """prometheus_client's own metric objects holding the same series as ``folded``."""
    disable_created_metrics()  # the daemon exposes no _created series either
    snap = folded.snapshot()
    registry = CollectorRegistry()
    for kind, label, stats, durations in (
        ("capability", "capability", snap.capabilities, snap.capability_durations),
        ("function", "function", snap.functions, snap.function_durations),
    ):
        calls = Counter(f"ccos_{kind}_calls", "calls", [label, "outcome"], registry=registry)
        histogram = Histogram(f"ccos_{kind}_duration_seconds", "durations", [label], registry=registry,
                              buckets=DEFAULT_DURATION_BUCKETS)
        for name, entry in stats.items():
            for outcome, n in entry.by_outcome.items():
                if n:
                    calls.labels(name, outcome).inc(n)
        for name in durations:
            child = histogram.labels(name)
            for bound in (*DEFAULT_DURATION_BUCKETS, 20.0):  # the values do not change the cost of rendering
                child.observe(bound)
        if kind == "capability":
            cost = Counter("ccos_capability_cost", "cost", [label], registry=registry)
            for name, entry in stats.items():
                cost.labels(name).inc(entry.cost)
    return registry


def series(registry: CollectorRegistry) -> int:
    return sum(len(metric.samples) for metric in registry.collect())


def median_render_s(registry: CollectorRegistry, repeats: int) -> float:
    generate_latest(registry)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_series(names: int, repeats: int) -> dict[str, Any]:
    folded = aggregates(names * 4, names)
    mine, theirs = ours(folded), equivalent(folded)
    n_mine, n_theirs = series(mine), series(theirs)
    t_mine, t_theirs = median_render_s(mine, repeats), median_render_s(theirs, repeats)
    return {
        "series": n_mine, "series_floor": n_theirs,
        "render_ms": 1000 * t_mine, "floor_render_ms": 1000 * t_theirs,
        "us_per_series": 1e6 * t_mine / n_mine, "floor_us_per_series": 1e6 * t_theirs / n_theirs,
        "ratio": (t_mine / n_mine) / (t_theirs / n_theirs),
    }


def against_size(sizes: list[int], names: int, repeats: int) -> dict[str, Any]:
    points = []
    for size in sizes:
        registry = ours(aggregates(size, names))
        points.append({"entries": size, "series": series(registry),
                       "render_ms": 1000 * median_render_s(registry, repeats)})
    return {"names": names, "points": points, "ratio": points[-1]["render_ms"] / points[0]["render_ms"]}


def under_load(names: int, rate: float, seconds: float) -> dict[str, Any]:
    seed = [{"action_type": "CapabilityCall", "function_name": f"cap.{n % names:04d}", "duration_ms": n % 900,
             **OUTCOMES[(n // names) % 2]} for n in range(names * 2)]
    actions = make_actions(int(rate * seconds) * 2)
    half = len(actions) // 2
    result: dict[str, Any] = {"offered_rate": rate, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory, \
            BenchDaemon(Path(directory), log_level="warning") as daemon:
        with daemon.client() as client:
            for start in range(0, len(seed), 500):
                client.append_batch(seed[start:start + 500])
        result["series"] = sum(1 for line in daemon.metrics_text().splitlines() if not line.startswith("#"))
        quiet = open_loop(daemon.socket_path, single_lines(actions[:half]), rate=rate)
        check_answers(quiet.answers, half)
        scrapes: list[float] = []
        done = threading.Event()

        def scrape() -> None:
            while not done.wait(1.0):
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://{daemon.http}/metrics", timeout=30) as response:
                    response.read()
                scrapes.append(time.perf_counter() - started)

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        loaded = open_loop(daemon.socket_path, single_lines(actions[half:]), rate=rate)
        done.set()
        scraper.join()
        check_answers(loaded.answers, len(actions) - half)
    for name, run in (("without_scrapes", quiet), ("with_scrapes", loaded)):
        ordered = sorted(run.latencies_from_send())
        result[name] = {"p50_ms": 1000 * percentile(ordered, 50), "p99_ms": 1000 * percentile(ordered, 99),
                        "p99_9_ms": 1000 * percentile(ordered, 99.9)}
    result["scrapes"] = len(scrapes)
    result["scrape_ms_median"] = 1000 * statistics.median(scrapes) if scrapes else None
    result["p99_ratio"] = result["with_scrapes"]["p99_ms"] / result["without_scrapes"]["p99_ms"]
    return result


def run(quick: bool = False) -> dict[str, Any]:
    names = 600  # about 20,000 series: 600 capabilities x (calls, 14 histogram samples, cost) x 2 families
    sizes = [1_000, 100_000] if quick else [1_000, 100_000, 1_000_000]
    return {
        "per_series": per_series(names, repeats=5 if quick else 15),
        "against_size": against_size(sizes, names=30, repeats=20 if quick else 50),
        "under_load": under_load(names, rate=1000.0, seconds=5.0 if quick else 15.0),
        "targets": TARGETS,
    }


def table(results: dict[str, Any]) -> str:
    p, s, u = results["per_series"], results["against_size"], results["under_load"]
    lines = [
        "| render figure | value | floor | ratio | target |",
        "|---|---|---|---|---|",
        f"| per series, {p['series']:,} series | {p['us_per_series']:.2f} µs ({p['render_ms']:.1f} ms) | "
        f"{p['floor_us_per_series']:.2f} µs (prometheus_client objects, {p['series_floor']:,} series) | "
        f"{p['ratio']:.2f} | <= 1.0 |",
    ]
    first = s["points"][0]
    for point in s["points"][1:]:
        lines.append(f"| {point['series']:,} series at {point['entries']:,} entries | {point['render_ms']:.2f} ms | "
                     f"{first['render_ms']:.2f} ms at {first['entries']:,} | "
                     f"{point['render_ms'] / first['render_ms']:.2f} | <= 1.2 |")
    lines.append(f"| ack p99 at {u['offered_rate']:.0f}/s while {u['series']:,} series are scraped every second "
                 f"(scrape {u['scrape_ms_median']:.0f} ms) | {u['with_scrapes']['p99_ms']:.1f} ms | "
                 f"{u['without_scrapes']['p99_ms']:.1f} ms without scrapes | {u['p99_ratio']:.2f} | unchanged |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
