"""Memory against ledger size: the daemon's RSS must not grow with the number of entries.

A fresh daemon ingests ``small`` entries (RSS; the ledger is copied aside
with SQLite's online backup, with the key), then up to ``large`` (RSS). It is
stopped and started again on that ledger (RSS after ready, and after ingesting
``small`` more, so both processes have done the same amount of appending), and
a daemon is started on the copy of the ``small`` ledger (RSS after ready), so
start-up on a small and on a large ledger can be compared. RSS is VmRSS from
/proc/PID/status; VmHWM (the peak) is recorded too. Ingest uses batches of 500
with the ingest benchmark's window. Log lines go to a file, as everywhere.

There is no floor to divide by: a daemon whose memory does not grow with the
ledger shows ratios near 1.0 between the same kind of points
(running: ``large`` / ``small``; just started: on ``large`` / on ``small``).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.ingest import BATCH, BATCH_WINDOW
from bench.wire import check_answers, pipeline
from bench.workload import batch_lines, make_actions
from ccos_obsd.ledger import store
from ccos_obsd.statedir import KEY_FILE

CHUNK = 10_000
"""Actions generated and sent at a time (keeps the benchmark process small too)."""


def _ingest(daemon: BenchDaemon, start: int, count: int) -> float:
    """Append actions ``start`` .. ``start + count``; returns the seconds spent sending."""
    seconds = 0.0
    for offset in range(start, start + count, CHUNK):
        n = min(CHUNK, start + count - offset)
        lines = batch_lines(make_actions(n, start=offset), BATCH)
        run = pipeline(daemon.socket_path, lines, window=BATCH_WINDOW)
        check_answers(run.answers, n)
        seconds += run.seconds
    return seconds


def _point(daemon: BenchDaemon, entries: int) -> dict[str, Any]:
    time.sleep(0.2)  # let the writer's listeners and the log stream settle
    rss = daemon.rss_kib()
    return {"entries": entries, "rss_kib": rss["VmRSS"], "hwm_kib": rss["VmHWM"]}


def _copy_state(source: Path, target: Path) -> None:
    """A consistent copy of a live daemon's ledger (online backup) and its key."""
    target.mkdir(mode=0o700)
    shutil.copy2(source / KEY_FILE, target / KEY_FILE)
    with sqlite3.connect(store.ledger_path(source)) as src, sqlite3.connect(store.ledger_path(target)) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def _started(state: Path, log_level: str, entries: int) -> tuple[BenchDaemon, dict[str, Any]]:
    daemon = BenchDaemon(state, log_level=log_level).start()
    point = _point(daemon, entries)
    point["ready_seconds"] = daemon.ready_seconds
    return daemon, point


def measure(small: int, large: int, log_level: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory:
        state, state_small = Path(directory) / "large", Path(directory) / "small"
        with BenchDaemon(state, log_level=log_level) as daemon:
            idle = _point(daemon, 0)
            _ingest(daemon, 0, small)
            first = _point(daemon, small)
            _copy_state(state, state_small)
            seconds = _ingest(daemon, small, large - small)
            grown = _point(daemon, large)
        restarted, after_restart = _started(state, log_level, large)
        try:
            _ingest(restarted, large, small)
            after_restart_ingest = _point(restarted, large + small)
        finally:
            restarted.stop()
        restarted_small, after_restart_small = _started(state_small, log_level, small)
        restarted_small.stop()
    base = first["rss_kib"]
    return {
        "points": {
            "idle": idle,
            "after_small": first,
            "after_large": grown,
            "restart_on_small": after_restart_small,
            "restart_on_large": after_restart,
            "restart_on_large_then_small": after_restart_ingest,
        },
        "ratio_large_to_small": grown["rss_kib"] / base,
        "ratio_restart_large_to_restart_small": after_restart["rss_kib"] / after_restart_small["rss_kib"],
        "ratio_restart_to_running_small": after_restart["rss_kib"] / base,
        "ratio_restart_then_small_to_running_small": after_restart_ingest["rss_kib"] / base,
        "ingest_rate_to_large": (large - small) / seconds,
        "ready_seconds_small": after_restart_small["ready_seconds"],
        "ready_seconds_large": after_restart["ready_seconds"],
    }


def run(*, small: int, large: int, levels: tuple[str, ...]) -> dict[str, Any]:
    return {"small": small, "large": large, "daemon": {level: measure(small, large, level) for level in levels}}
