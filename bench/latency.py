"""Acknowledgement latency, open loop: single appends sent at a fixed rate over one connection.

A fresh daemon per log level; one second at the rate as warm-up (discarded),
then ``seconds`` at the rate. Each answer's latency is measured from the time
its request was sent (``from_send``) and, to show any lag of the sending thread
itself, from the time it was due (``from_schedule``; coordinated-omission-free).

Floor: the least an acknowledgement can take, i.e. ``bench.floor`` appending and
committing one action alone (a group of one: parse .. sign, insert, fsync),
repeated; its percentiles stand beside the daemon's.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.floor import floor_latencies
from bench.wire import check_answers, open_loop
from bench.workload import make_actions, single_lines

RATE = 2000.0
TARGET_P99_MS = 20.0
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


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
        "from_schedule_ms": summary_ms(result.latencies_from_schedule()),
        "send_lag_p99_ms": 1000 * percentile(lag, 99.0),
        "mean_group": count / commits if commits else None,
        "daemon_cores_busy": daemon_cpu / elapsed,
        "client_cores_busy": client_cpu / elapsed,
    }


def measure_floor(samples: int) -> dict[str, Any]:
    actions = make_actions(2000 + samples)
    latencies = floor_latencies(single_lines(actions[2000:]), single_lines(actions[:2000]))
    return {"samples": samples, "group": 1, "ms": summary_ms(latencies)}


def run(*, seconds: float, floor_samples: int, levels: tuple[str, ...]) -> dict[str, Any]:
    floor = measure_floor(floor_samples)
    results: dict[str, Any] = {"target_p99_ms": TARGET_P99_MS, "floor": floor, "daemon": {}}
    for level in levels:
        daemon = measure_daemon(seconds, level)
        p99 = daemon["from_send_ms"]["p99"]
        daemon["p99_ratio_to_floor"] = p99 / floor["ms"]["p99"]
        daemon["meets_target"] = p99 < TARGET_P99_MS
        results["daemon"][level] = daemon
    return results
