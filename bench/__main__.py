"""Run every benchmark, print a Markdown table, write bench/results/latest.json.

``python -m bench`` (about 3 minutes) or ``python -m bench --quick`` (under a
minute). See docs/performance.md for what each figure measures.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import ingest, integrity, latency, memory

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = ("warning", "info")
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"ingest": {"count": 20_000, "warmup": 2_000, "repeats": 3},
             "latency": {"seconds": 15.0, "floor_samples": 1_000},
             "memory": {"small": 10_000, "large": 200_000}},
    "quick": {"ingest": {"count": 10_000, "warmup": 1_000, "repeats": 1},
              "latency": {"seconds": 4.0, "floor_samples": 300},
              "memory": {"small": 10_000, "large": 50_000}},
}
BENCHMARKS = ("ingest", "latency", "memory", "integrity")


def machine() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "cryptography": metadata.version("cryptography"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "ccos_obsd_modified": bool(git("status", "--porcelain", "--", "ccos_obsd")),
        # Which uncommitted state of the daemon was measured (the code changes between runs).
        "ccos_obsd_diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", "ccos_obsd").encode()).hexdigest()[:16],
        "loadavg_start": os.getloadavg(),
    }


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _rate(run: dict[str, Any]) -> str:
    """Median rate, with the range of the repeats when there are several."""
    repeats = run.get("repeats", [])
    spread = f" ({_n(min(repeats))}-{_n(max(repeats))})" if len(repeats) > 1 else ""
    return _n(run["rate"]) + spread


def table(results: dict[str, Any]) -> str:
    rows = ["| figure | log level | daemon | floor | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    names = {"singles": "ingest: pipelined single appends (actions/s)",
             "batch500": "ingest: batches of 500 (actions/s)"}
    for kind, figure in results.get("ingest", {}).items():
        floor = figure["floor"]
        for level, run in figure["daemon"].items():
            rows.append(f"| {names[kind]} | {level} | {_rate(run)} | {_rate(floor)} | "
                        f"{run['ratio']:.2f} | >= {_n(figure['target'])} | {'yes' if run['meets_target'] else 'NO'} |")
    lat = results.get("latency")
    if lat:
        floor_ms = lat["floor"]["ms"]
        floor_text = f"{floor_ms['p50']:.2f} / {floor_ms['p99']:.2f} / {floor_ms['p99.9']:.2f}"
        for level, run in lat["daemon"].items():
            ms = run["from_send_ms"]
            rows.append(
                f"| ack latency at {_n(run['offered_rate'])}/s offered, p50 / p99 / p99.9 (ms) | {level} | "
                f"{ms['p50']:.2f} / {ms['p99']:.2f} / {ms['p99.9']:.2f} | {floor_text} | "
                f"{run['p99_ratio_to_floor']:.1f} (p99) | p99 < {lat['target_p99_ms']:g} | "
                f"{'yes' if run['meets_target'] else 'NO'} |")
    mem = results.get("memory")
    if mem:
        small, large = f"{mem['small'] // 1000}k", f"{mem['large'] // 1000}k"
        for level, run in mem["daemon"].items():
            p = run["points"]

            def mib(point: str, p: dict[str, Any] = p) -> str:
                return f"{p[point]['rss_kib'] / 1024:.1f}"

            def hwm(point: str, p: dict[str, Any] = p) -> str:
                return f"{p[point]['hwm_kib'] / 1024:.1f}"

            running = run["ratio_large_to_small"]
            started = run["ratio_restart_large_to_restart_small"]
            rows.append(
                f"| RSS (MiB), running: after {small} / after {large} entries | {level} | "
                f"{mib('after_small')} / {mib('after_large')} | (none: ratio of the two) | {running:.2f} | "
                f"~1.0 | {'yes' if running < 1.1 else 'NO'} |")
            rows.append(
                f"| RSS (MiB), just restarted on {small} / on {large} entries [peak during start-up] | {level} | "
                f"{mib('restart_on_small')} [{hwm('restart_on_small')}] / "
                f"{mib('restart_on_large')} [{hwm('restart_on_large')}] | (none: ratio of the two) | {started:.2f} | "
                f"~1.0 | {'yes' if started < 1.1 else 'NO'} |")
            rows.append(
                f"| restart: seconds to ready on {small} / on {large} | {level} | "
                f"{run['ready_seconds_small']:.2f} / {run['ready_seconds_large']:.2f} | | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs (under a minute)")
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--levels", default=",".join(LEVELS), help="daemon log levels (default: warning,info)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json", help="results file")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    levels = tuple(level.strip() for level in args.levels.split(",") if level.strip())
    chosen = args.only or list(BENCHMARKS)
    results: dict[str, Any] = {"mode": mode, "machine": machine()}
    started = time.monotonic()
    for name in BENCHMARKS:
        if name not in chosen:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if name == "integrity":
            results[name] = integrity.run(quick=args.quick)
            continue
        module = {"ingest": ingest, "latency": latency, "memory": memory}[name]
        results[name] = module.run(**sizes[name], levels=levels)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["runtime_seconds"] = time.monotonic() - started
    results["table_markdown"] = table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    info = results["machine"]
    print(f"ccos-obsd benchmarks ({mode}), {info['date']}, nproc {info['nproc']}, Python {info['python']}, "
          f"{results['runtime_seconds']:.0f} s; load average {info['loadavg_start'][0]:.2f} -> "
          f"{info['loadavg_end'][0]:.2f}")
    print(results["table_markdown"])
    if "integrity" in results:
        print()
        print(integrity.table(results["integrity"]))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
