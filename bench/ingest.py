"""Throughput: pipelined single appends and batches of 500, over 1 connection, and the matrix.

Each figure gets a fresh daemon (fresh state dir) at the given log level, a
warm-up of the same kind of requests, then the timed run: every request line
encoded beforehand, at most ``window`` requests unanswered, rate = actions /
(first byte sent .. last answer received). Answers are checked afterwards. The
daemon's mean group size (actions per fsync) comes from its
``ccos_commit_duration_seconds`` histogram, read before and after.

Floor: ``bench.floor`` over the same request lines, committing every 500
actions (the batch size).

The machine is shared, so each figure is measured ``repeats`` times, the floor
and the daemon at each log level taking turns (background load then hits them
alike); the reported rate is the median of the repeats (every repeat is kept in
the results), and ratio = median daemon rate / median floor rate.

The matrix (``run_matrix``, at one log level): both signing modes (the daemon
with ``CCOS_OBSD_SIGNING_MODE=entry|checkpoint``; the floor of each mode, the
checkpoint one without per-entry signatures) x 1, 8 and 64 connections x
singles and batches. Over several connections one client thread drives every
socket from one selector (``bench.wire.pipeline_many``), lines dealt round-robin;
the total requests in flight stay about the same as over one connection (each
connection's window is the one-connection window divided by the connections,
at least 16 singles or 1 batch). Batch runs hold at least 2 batches per
connection. Targets (issue 14, Working Memory on as by default): ratio >= 1.0 in
every entry-mode cell, >= 0.8 for checkpoint-mode single appends; checkpoint-mode
batches keep issue 6's 0.6.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.floor import floor_rate
from bench.wire import check_answers, pipeline, pipeline_many
from bench.workload import batch_lines, make_actions, single_lines

BATCH = 500
FLOOR_GROUP = 500
SINGLE_WINDOW = 1024
"""Unanswered single appends the client allows (the daemon's own per-connection cap is 4096)."""
BATCH_WINDOW = 4
"""Unanswered batches (2,000 actions); the daemon answers busy beyond ledger.max_pending actions."""
TARGETS = {"singles": 8000.0, "batch500": 12000.0}
KINDS = ("singles", "batch500")
CONNECTIONS = (1, 8, 64)
SIGNING_MODES = ("entry", "checkpoint")
MATRIX_TARGET_RATIOS = {("entry", "singles"): 1.0, ("entry", "batch500"): 1.0,
                        ("checkpoint", "singles"): 0.8, ("checkpoint", "batch500"): 0.6}
"""Ratio to the floor of the cell's signing mode and kind, by (signing mode, kind)."""


def _lines(kind: str, actions: list[dict[str, Any]]) -> list[bytes]:
    return single_lines(actions) if kind == "singles" else batch_lines(actions, BATCH)


def workload(kind: str, count: int, warmup: int) -> tuple[list[bytes], list[bytes]]:
    """(warm-up lines, timed lines) of ``kind``: ``singles`` or ``batch500``."""
    actions = make_actions(warmup + count)
    return _lines(kind, actions[:warmup]), _lines(kind, actions[warmup:])


def window_for(kind: str, connections: int) -> int:
    """Unanswered requests per connection: about the one-connection total, shared out."""
    if kind == "singles":
        return max(16, SINGLE_WINDOW // connections)
    return max(1, BATCH_WINDOW // connections)


def matrix_count(kind: str, count: int, connections: int) -> int:
    """Timed actions of a matrix cell: ``count``, or 2 batches per connection when that is more."""
    return max(count, 2 * BATCH * connections) if kind == "batch500" else count


def measure_floor(kind: str, count: int, warmup: int, signing_mode: str = "entry") -> dict[str, Any]:
    warm, lines = workload(kind, count, warmup)
    run = floor_rate(lines, warm, group=FLOOR_GROUP, signing_mode=signing_mode)
    return {"rate": run.rate, "actions": run.actions, "seconds": run.seconds, "group": FLOOR_GROUP,
            "signing_mode": signing_mode}


def measure_daemon(
    kind: str, count: int, warmup: int, log_level: str, *, connections: int = 1, signing_mode: str = "entry",
) -> dict[str, Any]:
    warm, lines = workload(kind, count, warmup)
    window = window_for(kind, connections)
    env = {"CCOS_OBSD_SIGNING_MODE": signing_mode}

    def drive(request_lines: list[bytes]) -> Any:
        if connections == 1:
            return pipeline(daemon.socket_path, request_lines, window=window)
        return pipeline_many(daemon.socket_path, request_lines, connections=connections, window=window)

    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory, \
            BenchDaemon(Path(directory), log_level=log_level, env=env) as daemon:
        check_answers(drive(warm).answers, warmup)
        commits_before, commit_seconds_before = daemon.commit_counts()
        daemon_cpu, client_cpu = daemon.cpu_seconds(), time.process_time()
        run = drive(lines)
        daemon_cpu, client_cpu = daemon.cpu_seconds() - daemon_cpu, time.process_time() - client_cpu
        commits_after, commit_seconds_after = daemon.commit_counts()
        rss = daemon.rss_kib()
        appended = check_answers(run.answers, count)
    commits = commits_after - commits_before
    return {
        "rate": appended / run.seconds,
        "actions": appended,
        "requests": run.requests,
        "seconds": run.seconds,
        "window": window,
        "connections": connections,
        "signing_mode": signing_mode,
        "mean_group": appended / commits if commits else None,
        "mean_commit_ms": 1000 * (commit_seconds_after - commit_seconds_before) / commits if commits else None,
        "rss_kib": rss.get("VmRSS"),
        "daemon_cpu_us_per_action": 1e6 * daemon_cpu / appended,
        "daemon_cores_busy": daemon_cpu / run.seconds,
        "client_cpu_us_per_action": 1e6 * client_cpu / appended,
    }


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one for an even count), with every rate."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rate"] = statistics.median(r["rate"] for r in runs)
    chosen["repeats"] = [r["rate"] for r in runs]
    return chosen


def run(*, count: int, warmup: int, repeats: int, levels: tuple[str, ...]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in ("singles", "batch500"):
        floors: list[dict[str, Any]] = []
        daemons: dict[str, list[dict[str, Any]]] = {level: [] for level in levels}
        for _ in range(repeats):
            floors.append(measure_floor(kind, count, warmup))
            for level in levels:
                daemons[level].append(measure_daemon(kind, count, warmup, level))
        floor = _median_of(floors)
        figure: dict[str, Any] = {"target": TARGETS[kind], "floor": floor, "daemon": {}}
        for level in levels:
            daemon = _median_of(daemons[level])
            daemon["ratio"] = daemon["rate"] / floor["rate"]
            daemon["meets_target"] = daemon["rate"] >= TARGETS[kind]
            figure["daemon"][level] = daemon
        results[kind] = figure
    return results


def run_matrix(
    *, count: int, warmup: int, repeats: int, level: str = "warning",
    connections: tuple[int, ...] = CONNECTIONS, modes: tuple[str, ...] = SIGNING_MODES,
) -> dict[str, Any]:
    """Every signing mode x kind x connection count, each beside the floor of its mode and kind."""
    cells: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    for mode in modes:
        for kind in KINDS:
            floor_runs: list[dict[str, Any]] = []
            daemon_runs: dict[int, list[dict[str, Any]]] = {n: [] for n in connections}
            for _ in range(repeats):
                floor_runs.append(measure_floor(kind, count, warmup, mode))
                for n in connections:
                    daemon_runs[n].append(measure_daemon(kind, matrix_count(kind, count, n), warmup, level,
                                                         connections=n, signing_mode=mode))
            floor = _median_of(floor_runs)
            floor["kind"] = kind
            floors.append(floor)
            for n in connections:
                cell = _median_of(daemon_runs[n])
                target = MATRIX_TARGET_RATIOS[mode, kind]
                cell.update(kind=kind, floor_rate=floor["rate"], ratio=cell["rate"] / floor["rate"],
                            target_ratio=target)
                cell["meets_target"] = cell["ratio"] >= target
                cells.append(cell)
    return {"log_level": level, "connections": list(connections),
            "signing_modes": list(modes), "floors": floors, "cells": cells}
