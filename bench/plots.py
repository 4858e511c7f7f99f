"""PNG plots of a benchmark run, drawn from its results (``latest.json``).

``python -m bench.plots [RESULTS.json]`` redraws them from a saved run.

- ``<stem>-throughput.png``: ingest rate against connections (1, 8, 64), both signing
  modes, single appends and batches of 500; each mode's floor dashed, and the target
  (0.6 x floor) dotted.
- ``<stem>-latency-cdf.png``: the acknowledgement latency CDF at each offered rate of
  the latency sweep, with the floor's; the right panel shows the tail (the fraction of
  acknowledgements slower than x), where p99 and p99.9 live.
- ``<stem>-render-size.png``: ``/metrics`` render time against ledger size: in process
  (``bench.render``'s against-size points) and a full HTTP scrape of a daemon started
  on a ledger of that size (``bench.startup``); dotted, the target: 1.2 x the time at
  the smallest size.
- ``<stem>-cost.png``: CPU per action at each paced rate of ``bench.cost``, stacked by
  process (user solid, system hatched), beside the paced floor's, with the target
  (a multiple of the floor) as a red tick; right, the RSS of each process at the end
  of each rate and when idle.

matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``, which ``make bench``
does) draws with the Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

MODE_COLOURS = {"entry": "tab:blue", "checkpoint": "tab:orange"}
KIND_TITLES = {"singles": "pipelined single appends", "batch500": "batches of 500"}
DPI = 110
COST_PARTS = (("daemon", "daemon", "tab:blue"), ("sink_host", "sink host (Working Memory)", "tab:orange"),
              ("renderer", "renderer", "tab:green"), ("other", "other", "tab:grey"))
SIZE_TARGET_RATIO = 1.2
"""Render and scrape time at the largest ledger against the smallest (bench.render, bench.startup)."""


def _save(figure: Figure, path: Path, *, layout: bool = True) -> Path:
    if layout:
        figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def throughput(matrix: dict[str, Any], path: Path) -> Path:
    connections = matrix["connections"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, kind in zip(axes, KIND_TITLES, strict=True):
        for mode in matrix["signing_modes"]:
            colour = MODE_COLOURS.get(mode)
            cells = sorted((c for c in matrix["cells"] if c["kind"] == kind and c["signing_mode"] == mode),
                           key=lambda c: c["connections"])
            if not cells:
                continue
            xs = [c["connections"] for c in cells]
            rates = [c["rate"] for c in cells]
            low = [c["rate"] - min(c.get("repeats") or [c["rate"]]) for c in cells]
            high = [max(c.get("repeats") or [c["rate"]]) - c["rate"] for c in cells]
            ax.errorbar(xs, rates, yerr=[low, high], marker="o", capsize=4, color=colour,
                        label=f"daemon, {mode} signing")
            floor = next(f["rate"] for f in matrix["floors"] if f["kind"] == kind and f["signing_mode"] == mode)
            ax.axhline(floor, linestyle="--", color=colour, alpha=0.7, label=f"floor, {mode} signing")
            target = cells[0].get("target_ratio", matrix.get("target_ratio"))  # older runs: one for all
            ax.axhline(target * floor, linestyle=":", color=colour, alpha=0.7,
                       label=f"target ({target:g} x floor), {mode}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(connections, [str(n) for n in connections])
        ax.set_xlabel("connections")
        ax.set_ylabel("actions/s")
        ax.set_ylim(bottom=0)
        ax.set_title(KIND_TITLES[kind])
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize="small", frameon=False)
    figure.suptitle(f"ccos-obsd ingest throughput (log level {matrix['log_level']}; bars: range of repeats)")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(figure, path, layout=False)


def _cdf_lines(ax_cdf: Axes, ax_tail: Axes, cdf: list[list[float]], label: str, **style: Any) -> None:
    fractions = [q for q, _ in cdf]
    millis = [ms for _, ms in cdf]
    ax_cdf.plot(millis, fractions, label=label, **style)
    tail = [(ms, 1 - q) for q, ms in cdf if q < 1]
    ax_tail.plot([ms for ms, _ in tail], [above for _, above in tail], label=label, **style)


def latency_cdf(latency: dict[str, Any], path: Path) -> Path:
    sweep = latency["sweep"]
    figure, (ax_cdf, ax_tail) = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = plt.get_cmap("viridis")
    points = sweep["points"]
    for index, point in enumerate(points):
        label = f"{point['offered_rate']:,.0f}/s offered"
        if point["half_max"]:
            label += " (half max)"
        _cdf_lines(ax_cdf, ax_tail, point["cdf_ms"], label, color=colours(index / max(1, len(points) - 1) * 0.9))
    floor_cdf = latency.get("floor", {}).get("cdf_ms")
    if floor_cdf:
        _cdf_lines(ax_cdf, ax_tail, floor_cdf, "floor (one action, one commit)", color="grey", linestyle="--")
    target = sweep["target_p99_ms_at_half_max"]
    for ax in (ax_cdf, ax_tail):
        ax.set_xscale("log")
        ax.set_xlabel("acknowledgement latency from send (ms)")
        ax.axvline(target, color="red", linestyle=":", alpha=0.6, label=f"{target:g} ms (p99 target at half max)")
        ax.grid(True, which="both", alpha=0.3)
    ax_cdf.set_ylabel("fraction of acknowledgements")
    ax_cdf.set_ylim(0, 1)
    ax_tail.set_yscale("log")
    ax_tail.set_ylabel("fraction slower than x")
    ax_tail.axhline(0.01, color="black", linewidth=0.6, alpha=0.5)
    ax_tail.axhline(0.001, color="black", linewidth=0.6, alpha=0.5)
    ax_tail.text(ax_tail.get_xlim()[0], 0.01, " p99", va="bottom", fontsize="small")
    ax_tail.text(ax_tail.get_xlim()[0], 0.001, " p99.9", va="bottom", fontsize="small")
    ax_cdf.legend(fontsize="small", loc="lower right")
    figure.suptitle(f"ccos-obsd acknowledgement latency, single appends, 1 connection, open loop "
                    f"(log level {sweep['log_level']})")
    return _save(figure, path)


def render_size(render: dict[str, Any] | None, startup: dict[str, Any] | None, path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(7.5, 4.5))
    lines = []
    if render is not None:
        points = render["against_size"]["points"]
        lines.append((points, "render_ms", "o", "tab:blue", f"render in process ({points[0]['series']:,} series)"))
    if startup is not None:
        lines.append((startup["points"], "scrape_ms", "s", "tab:green",
                      "HTTP scrape of a daemon started on the ledger"))
    for points, key, marker, colour, label in lines:
        ax.plot([p["entries"] for p in points], [p[key] for p in points], marker=marker, color=colour, label=label)
        ax.axhline(SIZE_TARGET_RATIO * points[0][key], linestyle=":", color=colour, alpha=0.7,
                   label=f"target: {SIZE_TARGET_RATIO:g} x at {points[0]['entries']:,} entries")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("entries in the ledger")
    ax.set_ylabel("/metrics time (ms, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("ccos-obsd /metrics render time against ledger size")
    return _save(figure, path)


def _cost_label(point: dict[str, Any], *, achieved: bool = True) -> str:
    conns = point["connections"]
    label = f"{point['offered_rate']:,.0f}/s\n" + ("1 conn" if conns == 1 else f"{conns} conns")
    return label + f"\n(achieved {point['achieved_rate']:,.0f}/s)" if achieved else label


def cost(cost_results: dict[str, Any], path: Path) -> Path:
    points = cost_results["points"]
    idle = cost_results["idle"]
    figure, (ax_cpu, ax_rss) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": (3, 2)})
    width = 0.38
    target_labelled = False
    tallest = max(max(p["total_us"], p["floor"]["total_us"] * (p.get("target_ratio_to_floor") or 1)) for p in points)
    for x, point in enumerate(points):
        bottom = 0.0
        for role, label, colour in COST_PARTS:
            part = point["processes"].get(role)
            if part is None:
                continue
            ax_cpu.bar(x - width / 2, part["user_us"], width, bottom=bottom, color=colour,
                       label=f"{label}, user" if x == 0 else None)
            ax_cpu.bar(x - width / 2, part["sys_us"], width, bottom=bottom + part["user_us"], color=colour,
                       alpha=0.45, hatch="//", label=f"{label}, system" if x == 0 else None)
            bottom += part["total_us"]
        floor = point["floor"]
        ax_cpu.bar(x + width / 2, floor["user_us"], width, color="dimgrey",
                   label="paced floor, user" if x == 0 else None)
        ax_cpu.bar(x + width / 2, floor["sys_us"], width, bottom=floor["user_us"], color="silver", hatch="//",
                   label="paced floor, system" if x == 0 else None)
        ax_cpu.annotate(f"{point['ratio_to_floor']:.1f}x floor", (x - width / 2, bottom), ha="center",
                        va="bottom", fontsize="small")
        target = point.get("target_ratio_to_floor")
        if target:
            ax_cpu.hlines(target * floor["total_us"], x - width, x, colors="red", linestyles=":",
                          label=None if target_labelled else "target (a multiple of the floor)")
            target_labelled = True
    labels = [_cost_label(point) for point in points]
    ax_cpu.set_xticks(range(len(points)), labels, fontsize="small")
    ax_cpu.set_ylim(0, 1.45 * tallest)  # room for the legend
    ax_cpu.set_ylabel("CPU per action (µs, user + system)")
    ax_cpu.set_title("CPU per action, single appends one at a time, every process")
    ax_cpu.grid(True, axis="y", alpha=0.3)
    ax_cpu.legend(fontsize="x-small", ncol=2)
    rss_points = [point["rss_kib"] for point in points] + [idle["rss_kib"]]
    bottoms = [0.0] * len(rss_points)
    for role, label, colour in COST_PARTS:
        values = [rss.get(role, 0) / 1024 for rss in rss_points]
        if any(values):
            ax_rss.bar(range(len(values)), values, 0.6, bottom=bottoms, color=colour, label=label)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax_rss.set_xticks(range(len(rss_points)), [*(_cost_label(p, achieved=False) for p in points), "idle"],
                      fontsize="small")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_title(f"RSS at the end of each rate; idle: {idle['total_percent_of_core']:.2f} % of a core")
    ax_rss.grid(True, axis="y", alpha=0.3)
    ax_rss.set_ylim(0, 1.3 * max(bottoms))
    ax_rss.legend(fontsize="x-small")
    figure.suptitle(f"ccos-obsd cost: the daemon on its defaults (Working Memory on, log level "
                    f"{cost_results['log_level']}) against the bare durable loop at the same pacing")
    return _save(figure, path)


def write(results: dict[str, Any], directory: Path, stem: str) -> list[Path]:
    """Every plot the results hold the data for, as ``directory/<stem>-<plot>.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if "ingest_matrix" in results:
        written.append(throughput(results["ingest_matrix"], directory / f"{stem}-throughput.png"))
    if "sweep" in results.get("latency", {}):
        written.append(latency_cdf(results["latency"], directory / f"{stem}-latency-cdf.png"))
    if "cost" in results:
        written.append(cost(results["cost"], directory / f"{stem}-cost.png"))
    if "render" in results or "startup" in results:
        written.append(render_size(results.get("render"), results.get("startup"),
                                   directory / f"{stem}-render-size.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "latest.json")
    args = parser.parse_args(argv)
    for path in write(json.loads(args.results.read_text()), args.results.parent, args.results.stem):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
