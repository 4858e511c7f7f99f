"""Acknowledgement latency, open loop: single appends sent at a fixed rate over one connection.

A fresh daemon per log level; one second at the rate as warm-up (discarded),
then ``seconds`` at the rate. Each answer's latency is measured from the time
its request was sent (``from_send``) and, to show any lag of the sending thread
itself, from the time it was due (``from_schedule``; coordinated-omission-free).

Floor: the least an acknowledgement can take, i.e. ``bench.floor`` appending and
committing one action alone (a group of one: parse .. sign, insert, fsync),
repeated; its percentiles stand beside the daemon's.

The sweep (``sweep``, at ``warning``): the same measurement at fixed offered
rates (500, 1,000 and 2,000/s) and at half the maximum single-append rate over
one connection measured in the same run (``bench.ingest``; measured here when
the run has no such figure). Target: p99 <= 10 ms at half the maximum. Every
point keeps a compact CDF of its latencies (``cdf_ms``: [fraction, ms] pairs)
for the plot.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import ingest
from bench.daemon import BenchDaemon
from bench.floor import floor_latencies
from bench.wire import check_answers, open_loop
from bench.workload import make_actions, single_lines

RATE = 2000.0
TARGET_P99_MS = 5.0
"""Issue 14 (issue 6 asked for under 20 ms)."""
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
SWEEP_RATES = (500.0, 1000.0, 2000.0)
SWEEP_LEVEL = "warning"
TARGET_P99_MS_AT_HALF_MAX = 10.0
CDF_FRACTIONS = (
    *(i / 100 for i in range(1, 100)),
    *(0.99 + i / 1000 for i in range(1, 10)),
    *(0.999 + i / 10_000 for i in range(1, 10)),
    1.0,
)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summary_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    out = {f"p{pct:g}": 1000 * percentile(ordered, pct) for pct in PERCENTILES}
    out["max"] = 1000 * ordered[-1]
    out["mean"] = 1000 * sum(ordered) / len(ordered)
    return out


def cdf_ms(values: list[float]) -> list[list[float]]:
    """[fraction, latency ms] at ``CDF_FRACTIONS`` (nearest rank): enough for a plot, small in JSON."""
    ordered = sorted(values)
    return [[round(q, 4), round(1000 * percentile(ordered, 100 * q), 4)] for q in CDF_FRACTIONS]


def measure_daemon(seconds: float, log_level: str, rate: float = RATE) -> dict[str, Any]:
    warm_count, count = int(rate), int(rate * seconds)
    actions = make_actions(warm_count + count)
    warm, lines = single_lines(actions[:warm_count]), single_lines(actions[warm_count:])
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory, \
            BenchDaemon(Path(directory), log_level=log_level) as daemon:
        check_answers(open_loop(daemon.socket_path, warm, rate=rate).answers, warm_count)
        commits_before, _ = daemon.commit_counts()
        daemon_cpu, client_cpu = daemon.cpu_seconds(), time.process_time()
        result = open_loop(daemon.socket_path, lines, rate=rate)
        daemon_cpu, client_cpu = daemon.cpu_seconds() - daemon_cpu, time.process_time() - client_cpu
        commits_after, _ = daemon.commit_counts()
    check_answers(result.answers, count)
    elapsed = result.received[-1] - result.sent[0]
    commits = commits_after - commits_before
    lag = sorted(s - d for s, d in zip(result.sent, result.scheduled, strict=True))
    return {
        "offered_rate": rate,
        "achieved_rate": count / elapsed,
        "actions": count,
        "from_send_ms": summary_ms(result.latencies_from_send()),
        "cdf_ms": cdf_ms(result.latencies_from_send()),
        "from_schedule_ms": summary_ms(result.latencies_from_schedule()),
        "send_lag_p99_ms": 1000 * percentile(lag, 99.0),
        "mean_group": count / commits if commits else None,
        "daemon_cores_busy": daemon_cpu / elapsed,
        "client_cores_busy": client_cpu / elapsed,
    }


def measure_floor(samples: int) -> dict[str, Any]:
    actions = make_actions(2000 + samples)
    latencies = floor_latencies(single_lines(actions[2000:]), single_lines(actions[:2000]))
    return {"samples": samples, "group": 1, "ms": summary_ms(latencies), "cdf_ms": cdf_ms(latencies)}


def run(*, seconds: float, floor_samples: int, levels: tuple[str, ...]) -> dict[str, Any]:
    floor = measure_floor(floor_samples)
    results: dict[str, Any] = {"target_p99_ms": TARGET_P99_MS, "floor": floor, "daemon": {}}
    for level in levels:
        daemon = measure_daemon(seconds, level)
        p99 = daemon["from_send_ms"]["p99"]
        daemon["p99_ratio_to_floor"] = p99 / floor["ms"]["p99"]
        daemon["meets_target"] = p99 <= TARGET_P99_MS
        results["daemon"][level] = daemon
    return results


def max_single_rate(count: int = 10_000, warmup: int = 1_000) -> float:
    """The maximum rate of pipelined single appends over one connection, at the sweep's level."""
    return float(ingest.measure_daemon("singles", count, warmup, SWEEP_LEVEL)["rate"])


def sweep(
    *, seconds: float, max_rate: float | None, max_rate_source: str, reuse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Latency at each of ``SWEEP_RATES`` and at half of ``max_rate`` (measured first when None).

    ``reuse``: an already measured point at one of the fixed rates and the sweep's level.
    """
    if max_rate is None:
        max_rate, max_rate_source = max_single_rate(), "measured by the latency sweep"
    half = round(max_rate / 2)
    points: list[dict[str, Any]] = []
    for rate in (*SWEEP_RATES, float(half)):
        if reuse is not None and reuse["offered_rate"] == rate and rate != half:
            point = dict(reuse)
        else:
            point = measure_daemon(seconds, SWEEP_LEVEL, rate)
        point["half_max"] = rate == half
        points.append(point)
    points.sort(key=lambda point: point["offered_rate"])
    at_half = next(point for point in points if point["half_max"])
    return {
        "log_level": SWEEP_LEVEL,
        "max_rate": max_rate,
        "max_rate_source": max_rate_source,
        "half_max_rate": half,
        "target_p99_ms_at_half_max": TARGET_P99_MS_AT_HALF_MAX,
        "meets_target": at_half["from_send_ms"]["p99"] <= TARGET_P99_MS_AT_HALF_MAX,
        "points": points,
    }
