"""Run every benchmark, print a Markdown table, write bench/results/latest.json and PNG plots.

``python -m bench`` (about 17 minutes on 2 cores) or ``python -m bench --quick``
(about 5.5 minutes). See docs/performance.md for what each figure measures. The plots
(``latest-*.png`` beside the results file) need matplotlib (``pip install -e
'.[bench]'``; ``make bench`` installs it); without it they are skipped.
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

from bench import cost, ingest, integrity, latency, memory, render, startup, wm_lag

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = ("warning", "info")
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"ingest": {"count": 20_000, "warmup": 2_000, "repeats": 3},
             "ingest_matrix": {"count": 20_000, "warmup": 2_000, "repeats": 3},
             "latency": {"seconds": 15.0, "floor_samples": 1_000},
             "cost": {"points": [(100.0, 1, 20.0), (1000.0, 1, 15.0), (5000.0, 1, 10.0), (2000.0, 8, 15.0)],
                      "idle_seconds": 60.0},
             "memory": {"small": 10_000, "large": 200_000},
             "startup": {"sizes": [10_000, 1_000_000]},
             "wm": {"count": 100_000}},
    "quick": {"ingest": {"count": 10_000, "warmup": 1_000, "repeats": 1},
              "ingest_matrix": {"count": 10_000, "warmup": 1_000, "repeats": 1},
              "latency": {"seconds": 4.0, "floor_samples": 300},
              "cost": {"points": [(100.0, 1, 6.0), (1000.0, 1, 5.0), (5000.0, 1, 4.0), (2000.0, 8, 5.0)],
                       "idle_seconds": 15.0},
              "memory": {"small": 10_000, "large": 50_000},
              "startup": {"sizes": [10_000, 100_000]},
              "wm": {"count": 20_000}},
}
BENCHMARKS = ("ingest", "ingest_matrix", "latency", "cost", "memory", "integrity", "render", "startup", "wm")


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


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def table(results: dict[str, Any]) -> str:
    rows = ["| figure | log level | daemon | floor | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    names = {"singles": "ingest: pipelined single appends (actions/s)",
             "batch500": "ingest: batches of 500 (actions/s)"}
    for kind, figure in results.get("ingest", {}).items():
        floor = figure["floor"]
        for level, run in figure["daemon"].items():
            rows.append(f"| {names[kind]} | {level} | {_rate(run)} | {_rate(floor)} | "
                        f"{run['ratio']:.2f} | >= {_n(figure['target'])} | {_met(run['meets_target'])} |")
    matrix = results.get("ingest_matrix")
    if matrix:
        kinds = {"singles": "single appends", "batch500": "batches of 500"}
        for cell in matrix["cells"]:
            plural = "s" if cell["connections"] > 1 else ""
            rows.append(
                f"| ingest matrix: {cell['signing_mode']} signing, {kinds[cell['kind']]}, "
                f"{cell['connections']} connection{plural} (actions/s) | {matrix['log_level']} | {_rate(cell)} | "
                f"{_n(cell['floor_rate'])} | {cell['ratio']:.2f} | "
                f"ratio >= {cell.get('target_ratio', matrix.get('target_ratio')):g} | {_met(cell['meets_target'])} |")
    lat = results.get("latency")
    if lat:
        floor_ms = lat["floor"]["ms"]
        floor_text = f"{floor_ms['p50']:.2f} / {floor_ms['p99']:.2f} / {floor_ms['p99.9']:.2f}"
        for level, run in lat["daemon"].items():
            ms = run["from_send_ms"]
            rows.append(
                f"| ack latency at {_n(run['offered_rate'])}/s offered, p50 / p99 / p99.9 (ms) | {level} | "
                f"{ms['p50']:.2f} / {ms['p99']:.2f} / {ms['p99.9']:.2f} | {floor_text} | "
                f"{run['p99_ratio_to_floor']:.1f} (p99) | p99 <= {lat['target_p99_ms']:g} | "
                f"{_met(run['meets_target'])} |")
        sweep = lat.get("sweep")
        for point in sweep["points"] if sweep else ():
            ms = point["from_send_ms"]
            if point["half_max"]:
                what = f"half the max ({_n(sweep['max_rate'])}/s)"
                target = f"p99 <= {sweep['target_p99_ms_at_half_max']:g}"
                met = _met(sweep["meets_target"])
            else:
                what, target, met = "fixed rate", "", ""
            rows.append(
                f"| ack latency sweep: {_n(point['offered_rate'])}/s offered, {what}, achieved "
                f"{_n(point['achieved_rate'])}/s, p50 / p99 / p99.9 (ms) | {sweep['log_level']} | "
                f"{ms['p50']:.2f} / {ms['p99']:.2f} / {ms['p99.9']:.2f} | {floor_text} | "
                f"{ms['p99'] / floor_ms['p99']:.1f} (p99) | {target} | {met} |")
    if "cost" in results:
        rows += cost.table_rows(results["cost"])
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
                f"~1.0 | {_met(running < 1.1)} |")
            rows.append(
                f"| RSS (MiB), just restarted on {small} / on {large} entries [peak during start-up] | {level} | "
                f"{mib('restart_on_small')} [{hwm('restart_on_small')}] / "
                f"{mib('restart_on_large')} [{hwm('restart_on_large')}] | (none: ratio of the two) | {started:.2f} | "
                f"~1.0 | {_met(started < 1.1)} |")
            rows.append(
                f"| restart: seconds to ready on {small} / on {large} | {level} | "
                f"{run['ready_seconds_small']:.2f} / {run['ready_seconds_large']:.2f} | | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs (a few minutes)")
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
    timings: dict[str, float] = {}
    for name in BENCHMARKS:
        if name not in chosen:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        run_one(name, results, sizes.get(name, {}), quick=args.quick, levels=levels)
        timings[name] = round(time.monotonic() - began, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["runtime_seconds"] = time.monotonic() - started
    results["benchmark_seconds"] = timings
    results["table_markdown"] = table(results)
    results["plots"] = draw_plots(results, args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    info = results["machine"]
    print(f"ccos-obsd benchmarks ({mode}), {info['date']}, nproc {info['nproc']}, Python {info['python']}, "
          f"{results['runtime_seconds']:.0f} s; load average {info['loadavg_start'][0]:.2f} -> "
          f"{info['loadavg_end'][0]:.2f}")
    print(results["table_markdown"])
    if "cost" in results:
        print()
        print(cost.table(results["cost"]))
    if "integrity" in results:
        print()
        print(integrity.table(results["integrity"]))
    for name, module in (("render", render), ("startup", startup)):
        if name in results:
            print()
            print(module.table(results[name]))
    if "wm" in results:
        print()
        print(wm_lag.report(results["wm"]))
    for plot in results["plots"]:
        print(f"plot: {plot}")
    print(f"results: {args.output}")
    return 0


def max_single_rate(results: dict[str, Any]) -> tuple[float | None, str]:
    """The maximum single-append rate over one connection at ``warning`` measured so far in this run."""
    run = results.get("ingest", {}).get("singles", {}).get("daemon", {}).get("warning")
    if run is not None:
        return run["rate"], "ingest, singles, 1 connection, warning"
    for cell in results.get("ingest_matrix", {}).get("cells", []):
        if (cell["kind"], cell["connections"], cell["signing_mode"]) == ("singles", 1, "entry"):
            return cell["rate"], "ingest matrix, entry signing, singles, 1 connection"
    return None, ""


def draw_plots(results: dict[str, Any], output: Path) -> list[str]:
    """The PNG plots beside ``output`` (skipped, with a note, when matplotlib is missing)."""
    try:
        from bench import plots  # imported here: matplotlib is an optional dependency
    except ModuleNotFoundError as exc:
        print(f"plots skipped: {exc} (pip install -e '.[bench]', or make bench)", file=sys.stderr)
        return []
    return [str(path) for path in plots.write(results, output.parent, output.stem)]


def run_one(name: str, results: dict[str, Any], size: dict[str, Any], *, quick: bool,
            levels: tuple[str, ...]) -> None:
    if name == "ingest_matrix":
        results[name] = ingest.run_matrix(**size)
        return
    if name == "latency":
        results[name] = latency.run(**size, levels=levels)
        max_rate, source = max_single_rate(results)
        results[name]["sweep"] = latency.sweep(seconds=size["seconds"], max_rate=max_rate, max_rate_source=source,
                                               reuse=results[name]["daemon"].get(latency.SWEEP_LEVEL))
        return
    if name == "cost":
        results[name] = cost.run(**size)
    elif name == "integrity":
        results[name] = integrity.run(quick=quick)
    elif name == "render":
        results[name] = render.run(quick=quick)
    elif name == "startup":
        results[name] = startup.run(**size)
    elif name == "wm":
        results[name] = wm_lag.run(**size)
    else:
        module = {"ingest": ingest, "memory": memory}[name]
        results[name] = module.run(**size, levels=levels)


if __name__ == "__main__":
    sys.exit(main())
