"""What observing an agent costs: CPU per action at agent rates, beside the paced floor.

An agent host appends one action at a time and waits for each acknowledgement, at
tens to a few thousand actions per second. At each point a fresh daemon on its
embedded defaults (Working Memory on, log level ``info``: as a new user runs it)
takes single appends paced by absolute deadlines (``bench.wire.paced``): 100,
1,000 and 5,000 actions/s over one connection, and 2,000/s over 8 connections
(250/s each). When the daemon cannot keep the pace the achieved rate is reported.

CPU: user and system time from ``/proc/PID/stat`` (``utime``, ``stime``) of the
daemon and of every process below it (the sink host, ``python -m
ccos_obsd.sinks.host``, and the renderer, ``python -m ccos_obsd.metrics.render``;
any other is counted as ``other``), read before and after the window. Before each
read the tree is left to settle (no CPU tick for ``QUIET_S``), so the window holds
everything its actions caused, Working Memory deliveries included, and nothing of
the warm-up before it. The kernel keeps each process's runtime exactly and splits
it into user and system in proportion to sampled ticks: the totals are exact to the
clock tick (10 ms), the split is statistical. RSS: ``VmRSS`` of each process at the
end of the window.

Floor, measured in the same run right after each point: ``bench.floor``'s bare loop
(``json.loads``, canonical bytes, SHA-256 leaf and chain, Ed25519 signature, one
SQLite transaction with ``synchronous=FULL``) in process, one action per
transaction, paced at the same offered rate (one at a time also for the 8-connection
point: the loop has no connections), over as many actions as the daemon
acknowledged, or as many as it manages in ``FLOOR_TIME_FACTOR`` times the point's
seconds (one fsync per action: on a loaded disk it falls far behind the pace). Its
CPU is the benchmark thread's (``getrusage(RUSAGE_THREAD)``), pacing included.

Idle: a fresh daemon after 100 actions and the settle, ``idle_seconds`` with no
traffic, every process, as a percentage of one core.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.floor import Floor
from bench.latency import summary_ms
from bench.wire import check_answers, paced
from bench.workload import make_actions, single_lines

LOG_LEVEL = "info"
"""The embedded default (``log.level``): one log line per action, to a file."""
ROLES = ("daemon", "sink_host", "renderer", "other")
_MODULE_ROLES = {"ccos_obsd.sinks.host": "sink_host", "ccos_obsd.metrics.render": "renderer"}
TARGET_RATIO = {(100.0, 1): 2.0, (1000.0, 1): 2.0, (2000.0, 8): 1.5}
"""Issue 14: total CPU per action against the paced floor's, at these (rate, connections)."""
TARGET_SINK_HOST_RATIO = 0.3
"""Issue 14: sink host CPU against the daemon's, at each rate with a target above."""
TARGET_IDLE_PERCENT = 0.2
WARMUP_SECONDS = 1.0
FLOOR_WARMUP = 1000
FLOOR_TIME_FACTOR = 2.0
QUIET_S = 0.3
SETTLE_LIMIT_S = 10.0
IDLE_ACTIONS = 100
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    role: str
    user_ticks: int
    sys_ticks: int

    @property
    def ticks(self) -> int:
        return self.user_ticks + self.sys_ticks


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name (which may hold spaces): field 3 onwards."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def _children_files_exist() -> bool:
    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


_HAVE_CHILDREN_FILES = _children_files_exist()


def _children(pid: int) -> list[int]:
    """Direct children: from ``/proc/PID/task/*/children`` where the kernel has it, else from every
    process's parent pid. A child started by a thread is listed under that thread's task."""
    if _HAVE_CHILDREN_FILES:
        return [int(child) for task in Path(f"/proc/{pid}/task").glob("*/children")
                for child in task.read_text().split()]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # exited while we looked
    return found


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(_children(pid))
    return tree


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "daemon"
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return next((role for module, role in _MODULE_ROLES.items() if module.encode() in args), "other")


def sample_cpu(root: int) -> dict[int, ProcessCpu]:
    samples = {}
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
            samples[pid] = ProcessCpu(pid, _role(pid, root), int(fields[11]), int(fields[12]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return samples


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def settle(root: int) -> float:
    """Wait until the tree has used no CPU tick for ``QUIET_S`` (at most ``SETTLE_LIMIT_S``); the seconds waited."""
    started = time.monotonic()
    last = sum(p.ticks for p in sample_cpu(root).values())
    quiet_since = started
    while time.monotonic() - quiet_since < QUIET_S and time.monotonic() - started < SETTLE_LIMIT_S:
        time.sleep(0.05)
        now = sum(p.ticks for p in sample_cpu(root).values())
        if now != last:
            last, quiet_since = now, time.monotonic()
    return time.monotonic() - started


def cpu_by_role(before: dict[int, ProcessCpu], after: dict[int, ProcessCpu]) -> dict[str, Any]:
    """Seconds of user and system CPU per role between two samples; a process started in
    between counts from zero, one that exited in between is listed (its CPU is lost)."""
    roles: dict[str, dict[str, Any]] = {}
    for pid, end in after.items():
        start = before.get(pid, ProcessCpu(pid, end.role, 0, 0))
        role = roles.setdefault(end.role, {"user_s": 0.0, "sys_s": 0.0, "pids": []})
        role["user_s"] += (end.user_ticks - start.user_ticks) / _TICK
        role["sys_s"] += (end.sys_ticks - start.sys_ticks) / _TICK
        role["pids"].append(pid)
    exited = sorted(pid for pid in before if pid not in after)
    return {"roles": roles, "exited_pids": exited, "started_pids": sorted(pid for pid in after if pid not in before)}


def _per_action(cpu: dict[str, Any], actions: int) -> dict[str, dict[str, float]]:
    out = {}
    for role in ROLES:
        if role in cpu["roles"]:
            user, sys_ = (1e6 * cpu["roles"][role][k] / actions for k in ("user_s", "sys_s"))
            out[role] = {"user_us": user, "sys_us": sys_, "total_us": user + sys_}
    return out


def _rss_by_role(samples: dict[int, ProcessCpu]) -> dict[str, int]:
    rss: dict[str, int] = {}
    for pid, sample in samples.items():
        try:
            rss[sample.role] = rss.get(sample.role, 0) + rss_kib(pid)
        except FileNotFoundError:
            continue
    rss["total"] = sum(rss.values())
    return rss


def _thread_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def measure_floor(lines: list[bytes], warm: list[bytes], *, rate: float, seconds: float) -> dict[str, Any]:
    """The bare loop over ``lines``, one action per transaction, line i not before ``start + i / rate``;
    no line is started after ``seconds``."""
    perf_counter, sleep = time.perf_counter, time.sleep
    latencies = []
    with tempfile.TemporaryDirectory(prefix="ccos-floor-") as directory:
        floor = Floor(Path(directory))
        try:
            floor.run(warm, group=1)
            gc.collect()
            user, sys_ = _thread_cpu()
            start = perf_counter() + 0.01
            stop_at = start + seconds
            for i, line in enumerate(lines):
                if perf_counter() > stop_at:
                    break
                delay = start + i / rate - perf_counter()
                if delay > 0:
                    sleep(delay)
                sent = perf_counter()
                floor.run([line], group=1)
                latencies.append(perf_counter() - sent)
            seconds = perf_counter() - start
            user, sys_ = (end - begin for end, begin in zip(_thread_cpu(), (user, sys_), strict=True))
        finally:
            floor.close()
    n = len(latencies)
    return {
        "actions": n,
        "achieved_rate": n / seconds,
        "user_us": 1e6 * user / n,
        "sys_us": 1e6 * sys_ / n,
        "total_us": 1e6 * (user + sys_) / n,
        "latency_ms": summary_ms(latencies),
    }


def measure_point(rate: float, connections: int, seconds: float) -> dict[str, Any]:
    warm_count, count = int(rate * WARMUP_SECONDS), math.ceil(rate * seconds)
    lines = single_lines(make_actions(warm_count + count))
    warm, timed = lines[:warm_count], lines[warm_count:]
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory, \
            BenchDaemon(Path(directory), log_level=LOG_LEVEL) as daemon:
        warm_run = paced(daemon.socket_path, warm, rate=rate, connections=connections, seconds=WARMUP_SECONDS)
        check_answers(warm_run.answers, len(warm_run.answers))
        commits_before, _ = daemon.commit_counts()  # a scrape: before the settle, so outside the window
        settle(daemon.pid)
        before, wall, client = sample_cpu(daemon.pid), time.monotonic(), time.process_time()
        run = paced(daemon.socket_path, timed, rate=rate, connections=connections, seconds=seconds)
        client = time.process_time() - client
        settled = settle(daemon.pid)
        after, wall = sample_cpu(daemon.pid), time.monotonic() - wall
        rss = _rss_by_role(after)
        commits_after, _ = daemon.commit_counts()
    actions = check_answers(run.answers, len(run.answers))
    cpu = cpu_by_role(before, after)
    processes = _per_action(cpu, actions)
    total = sum(p["total_us"] for p in processes.values())
    floor = measure_floor(timed[:actions], warm[:FLOOR_WARMUP] or timed[:FLOOR_WARMUP], rate=rate,
                          seconds=FLOOR_TIME_FACTOR * seconds)
    sink_host = processes.get("sink_host", {}).get("total_us", 0.0)
    ratio = total / floor["total_us"]
    target = TARGET_RATIO.get((rate, connections))
    commits = commits_after - commits_before
    return {
        "offered_rate": rate,
        "connections": connections,
        "seconds": seconds,
        "actions": actions,
        "achieved_rate": run.achieved_rate,
        "kept_pace": run.achieved_rate >= 0.97 * rate,
        "window_seconds": wall,
        "settle_seconds": settled,
        "latency_ms": summary_ms(run.latencies),
        "processes": processes,
        "total_us": total,
        "cores_busy": total * actions / 1e6 / wall,
        "client_cpu_us_per_action": 1e6 * client / actions,
        "mean_group": actions / commits if commits else None,
        "exited_pids": cpu["exited_pids"],
        "started_pids": cpu["started_pids"],
        "rss_kib": rss,
        "floor": floor,
        "ratio_to_floor": ratio,
        "target_ratio_to_floor": target,
        "meets_target": None if target is None else ratio <= target,
        "sink_host_to_daemon": sink_host / processes["daemon"]["total_us"],
        "target_sink_host_to_daemon": TARGET_SINK_HOST_RATIO if target is not None else None,
        "meets_sink_host_target": None if target is None else sink_host / processes["daemon"]["total_us"]
        <= TARGET_SINK_HOST_RATIO,
    }


def measure_idle(seconds: float) -> dict[str, Any]:
    lines = single_lines(make_actions(IDLE_ACTIONS))
    with tempfile.TemporaryDirectory(prefix="ccos-bench-") as directory, \
            BenchDaemon(Path(directory), log_level=LOG_LEVEL) as daemon:
        check_answers(paced(daemon.socket_path, lines, rate=float(IDLE_ACTIONS)).answers, IDLE_ACTIONS)
        settle(daemon.pid)
        before, wall = sample_cpu(daemon.pid), time.monotonic()
        time.sleep(seconds)
        after, wall = sample_cpu(daemon.pid), time.monotonic() - wall
        rss = _rss_by_role(after)
    cpu = cpu_by_role(before, after)
    percent = {role: 100 * (v["user_s"] + v["sys_s"]) / wall for role, v in cpu["roles"].items()}
    total = sum(percent.values())
    return {
        "seconds": wall,
        "percent_of_core": percent,
        "total_percent_of_core": total,
        "resolution_percent": 100 / _TICK / wall,
        "rss_kib": rss,
        "target_percent": TARGET_IDLE_PERCENT,
        "meets_target": total <= TARGET_IDLE_PERCENT,
    }


def run(*, points: list[tuple[float, int, float]], idle_seconds: float) -> dict[str, Any]:
    """``points``: (offered rate, connections, seconds) each."""
    return {
        "log_level": LOG_LEVEL,
        "clock_tick_s": 1 / _TICK,
        "points": [measure_point(rate, connections, seconds) for rate, connections, seconds in points],
        "idle": measure_idle(idle_seconds),
    }


def _what(point: dict[str, Any]) -> str:
    conns = point["connections"]
    how = "1 connection" if conns == 1 else f"{conns} connections x {point['offered_rate'] / conns:,.0f}/s"
    return f"{point['offered_rate']:,.0f}/s, {how}, one at a time (achieved {point['achieved_rate']:,.0f}/s)"


def _met(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "missed")


def table_rows(cost: dict[str, Any]) -> list[str]:
    """Rows of ``python -m bench``'s main table: each figure with its issue 14 target."""
    level = cost["log_level"]
    rows = []
    for point in cost["points"]:
        target = point["target_ratio_to_floor"]
        rows.append(
            f"| CPU per action (µs, user+sys, every process): {_what(point)} | {level} | "
            f"{point['total_us']:,.0f} | {point['floor']['total_us']:,.0f} (paced floor) | "
            f"{point['ratio_to_floor']:.2f} | {f'ratio <= {target:g}' if target else ''} | "
            f"{_met(point['meets_target'])} |")
    for point in cost["points"]:
        daemon, sink = point["processes"]["daemon"]["total_us"], point["processes"].get("sink_host", {})
        target = point["target_sink_host_to_daemon"]
        rows.append(
            f"| sink host CPU / daemon CPU (µs per action): {_what(point)} | {level} | "
            f"{sink.get('total_us', 0.0):,.0f} / {daemon:,.0f} | | {point['sink_host_to_daemon']:.2f} | "
            f"{f'ratio <= {target:g}' if target else ''} | {_met(point['meets_sink_host_target'])} |")
    idle = cost["idle"]
    rows.append(
        f"| idle CPU, every process, over {idle['seconds']:.0f} s (% of a core) | {level} | "
        f"{idle['total_percent_of_core']:.2f} (±{idle['resolution_percent']:.2f}) | | | "
        f"<= {idle['target_percent']:g} | {_met(idle['meets_target'])} |")
    return rows


def _us(part: dict[str, float] | None) -> str:
    return "-" if part is None else f"{part['user_us']:,.0f} / {part['sys_us']:,.0f}"


def table(cost: dict[str, Any]) -> str:
    """Per process: user / sys µs per action, RSS, latency."""
    rows = [
        f"CPU per action by process (`bench/cost.py`; daemon on its defaults, log level {cost['log_level']}; "
        "µs user / sys per action; RSS in MiB at the end of each rate):",
        "",
        "| rate | daemon | sink host | renderer | total | floor | total / floor | sink host / daemon | "
        "RSS daemon / sink host / renderer | ack p50 / p99 ms (floor) | mean group |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point in cost["points"]:
        procs, floor, rss = point["processes"], point["floor"], point["rss_kib"]
        lat, flat = point["latency_ms"], floor["latency_ms"]
        other = f" (+ other {procs['other']['total_us']:,.0f})" if "other" in procs else ""
        group = f"{point['mean_group']:.2f}" if point["mean_group"] else "-"
        rows.append(
            f"| {_what(point)} | {_us(procs['daemon'])} | {_us(procs.get('sink_host'))} | "
            f"{_us(procs.get('renderer'))} | {point['total_us']:,.0f}{other} | {_us(floor)} "
            f"({floor['total_us']:,.0f}; {floor['achieved_rate']:,.0f}/s) | {point['ratio_to_floor']:.2f} | "
            f"{point['sink_host_to_daemon']:.2f} | {rss.get('daemon', 0) / 1024:.1f} / "
            f"{rss.get('sink_host', 0) / 1024:.1f} / {rss.get('renderer', 0) / 1024:.1f} | "
            f"{lat['p50']:.2f} / {lat['p99']:.2f} ({flat['p50']:.2f} / {flat['p99']:.2f}) | {group} |")
    idle = cost["idle"]
    parts = ", ".join(f"{role} {idle['percent_of_core'].get(role, 0.0):.2f}" for role in ROLES
                      if role in idle["percent_of_core"])
    rss = idle["rss_kib"]
    rows += ["", f"Idle over {idle['seconds']:.0f} s: {idle['total_percent_of_core']:.2f} % of a core ({parts}; "
             f"one clock tick = {idle['resolution_percent']:.2f} %); RSS {rss.get('total', 0) / 1024:.1f} MiB "
             f"(daemon {rss.get('daemon', 0) / 1024:.1f}, sink host {rss.get('sink_host', 0) / 1024:.1f}, "
             f"renderer {rss.get('renderer', 0) / 1024:.1f})."]
    return "\n".join(rows)
