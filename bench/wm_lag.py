"""Working Memory keeping pace: the sink's lag after a burst of appends.

``python -m bench.wm_lag [--count N]``

A fresh daemon on its embedded defaults (Working Memory on, in the sink host
process) takes a burst of ``N`` actions (pipelined batches of 500, as fast as it
acknowledges them). From the burst's last acknowledgement, ``/metrics`` is read
every 20 ms until ``ccos_sink_lag_entries{sink="wm"}`` is 0 and every entry is
in WM (``ccos_wm_entries``). Reported: the burst's rate, the lag when the burst
ended, and the seconds until it was 0 (the issue's target: within 2 s).

For the cost of WM to the append path, the same burst goes to a daemon with
``wm.enabled = false`` in the same run: ratio = rate with WM / rate without.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.wire import check_answers, pipeline
from bench.workload import batch_lines, make_actions

BATCH = 500
WINDOW = 4
POLL_S = 0.02
TARGET_CATCH_UP_S = 2.0


def _sample(text: str, name: str, labels: str = "") -> float | None:
    prefix = f"{name}{labels} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def burst(count: int, *, wm: bool) -> dict[str, Any]:
    lines = batch_lines(make_actions(count), BATCH)
    env = {} if wm else {"CCOS_OBSD_WM_ENABLED": "false"}
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory, \
            BenchDaemon(Path(directory), log_level="warning", env=env) as daemon:
        run = pipeline(daemon.socket_path, lines, window=WINDOW)
        ended = time.perf_counter()
        appended = check_answers(run.answers, count)
        result: dict[str, Any] = {"rate": appended / run.seconds, "seconds": run.seconds, "actions": appended}
        if not wm:
            return result
        lag_at_end = None
        while True:
            text = daemon.metrics_text()
            lag = _sample(text, "ccos_sink_lag_entries", '{sink="wm"}')
            size = _sample(text, "ccos_wm_entries")
            if lag_at_end is None:
                lag_at_end = lag
            if lag == 0 and size == appended:
                break
            if time.perf_counter() - ended > 120:
                raise TimeoutError(f"WM lag still {lag} after 120 s")
            time.sleep(POLL_S)
        result.update(lag_at_end=lag_at_end, catch_up_s=time.perf_counter() - ended)
        return result


def run(*, count: int) -> dict[str, Any]:
    without = burst(count, wm=False)
    with_wm = burst(count, wm=True)
    return {
        "count": count,
        "without_wm": without,
        "with_wm": with_wm,
        "ratio": with_wm["rate"] / without["rate"],
        "target_catch_up_s": TARGET_CATCH_UP_S,
    }


def report(results: dict[str, Any]) -> str:
    w, wo = results["with_wm"], results["without_wm"]
    return (
        f"burst of {results['count']:,} actions (batches of {BATCH}): "
        f"{w['rate']:,.0f}/s with WM, {wo['rate']:,.0f}/s without (ratio {results['ratio']:.2f}); "
        f"WM lag at the burst's end {w['lag_at_end']:,.0f} entries, 0 after {w['catch_up_s']:.2f} s "
        f"(target <= {TARGET_CATCH_UP_S:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(count=args.count)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
