"""Sinks in a process of their own, beside the daemon.

Deriving and indexing Working Memory costs more Python time per entry than
appending does; on the daemon's threads it would share one interpreter lock with
the append path and halve ingest. So the daemon starts one child process, the
sink host (``python -m ccos_obsd.sinks.host``), which runs a :class:`SinkRunner`
per configured sink exactly as before: each pulls from the ledger database from
its own durable cursor. Nothing is lost whatever either process does; at worst
a sink is behind.

The pipes between them:

- the child's stdin: first one JSON line with the setup, then
  ``{"hurry": name}`` when a caller waits for sink ``name`` (it delivers without
  lingering, :meth:`SinkHost.wait_delivered`), and
  ``{"stop": seconds}`` to catch up for at most that long and exit. End of file
  (the daemon died) means exit without catching up.
- a wake-up pipe (the child's ``CCOS_OBSD_SINK_WAKE_FD``): a byte after a
  commit (the child reads the head from the database itself), written only when
  the pipe is empty; and the child reads it only while one of its sinks waits
  for new entries. So while the sinks deliver or linger, commits cost the child
  nothing: one unread byte stands for all of them.
- a stats pipe (the child's fd 3): one JSON line per sink whenever its counters
  changed: once its sink is open, right after each delivery (an ingest call waits
  for the WM sink's cursor, :meth:`SinkHost.wait_delivered`) and each failure;
  and once more at exit. Nothing runs on a timer: an idle child sleeps in reads
  and waits until the daemon writes.
- the child's stdout and stderr are the daemon's: its log lines go where the
  daemon's go.

The daemon supervises the child: if it exits unexpectedly it is restarted with
backoff, and counters carry on from where they were (they never go backwards).
It also notes when each group was committed (:class:`CommitTimes`), for each
sink's lag in seconds.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from ccos_obsd.config import Config, NatsOptions, SinkConfig
from ccos_obsd.ledger import store
from ccos_obsd.ledger.writer import CommittedEntry
from ccos_obsd.log import LogRing, configure_logging
from ccos_obsd.metrics.aggregates import Histogram, SinkView
from ccos_obsd.metrics.snapshot import decode_histogram, encode_histogram
from ccos_obsd.sinks.base import DELIVERY_BUCKETS, Sink, SinkRunner
from ccos_obsd.sinks.jsonl import JsonlSink
from ccos_obsd.sinks.lag import CommitTimes
from ccos_obsd.sinks.wm import WmSink
from ccos_obsd.wm.store import Budgets

log = structlog.get_logger("ccos_obsd.sinks.host")

STATS_FD = 3
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
CHILD_NICENESS = 10
STOP_GRACE_S = 10.0
"""Beyond the catch-up time: how long the child may take to finish its batch and exit."""


def make_sink(sink_config: SinkConfig, wm_budgets: Budgets | None = None, db: Path | None = None) -> Sink:
    """The sink a ``[[sinks]]`` table describes (``db``: the ledger, which a ``nats`` sink reads checkpoints from)."""
    if sink_config.type == "wm":
        return WmSink(sink_config.name, sink_config.path, wm_budgets)
    if sink_config.type == "nats":
        from ccos_obsd.sinks.nats import NatsSink  # the NATS client is loaded only where a nats sink runs

        if sink_config.nats is None or db is None:
            raise ValueError("a nats sink needs its options and the ledger database")
        return NatsSink(sink_config.name, sink_config.nats, db)
    return JsonlSink(sink_config.name, sink_config.path, max_bytes=sink_config.max_bytes, keep=sink_config.keep)


# --- the daemon's side


@dataclass
class _Counters:
    """One sink's counters as the daemon shows them: the current child's plus those of children before it."""

    name: str
    is_wm: bool
    cursor: int = 0
    delivered: int = 0
    errors: int = 0
    durations: Histogram = field(default_factory=lambda: Histogram(DELIVERY_BUCKETS))
    wm_size: int = 0
    # What earlier children reported, folded in when one exits.
    base: tuple[int, int, Histogram] | None = None
    waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)
    """(cursor awaited, loop, future) of :meth:`SinkHost.wait_delivered` calls."""


class SinkHost:
    """Starts, feeds, supervises and stops the sink host process; mirrors its counters."""

    def __init__(self, config: Config, db: Path, head: Callable[[], int]) -> None:
        self._config = config
        self._db = db
        self._head = head
        self._lock = threading.Lock()
        self._counters = {s.name: _Counters(s.name, s.type == "wm") for s in config.sinks}
        self._process: subprocess.Popen[bytes] | None = None
        self._wake_fd: int | None = None
        self._control_fd: int | None = None
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._spawn_lock = threading.Lock()
        self._wake_lock = threading.Lock()
        """Held to write to, replace or close the wake-up pipe: a closed fd's number is soon reused."""
        self._restart_delay = RESTART_FIRST_S
        self.commit_times = CommitTimes()
        self._read_cursors(note_oldest=True)

    @property
    def sink_names(self) -> list[str]:
        return list(self._counters)

    def start(self) -> None:
        with self._spawn_lock:
            self._stopping.clear()
            self._spawn()

    def restart(self, config: Config) -> None:
        """Stop the child and start a new one with ``config``'s sinks (a reload: files are reopened)."""
        self.stop()
        self._config = config
        for sink in config.sinks:
            self._counters.setdefault(sink.name, _Counters(sink.name, sink.type == "wm"))
        self._read_cursors()
        self.start()

    def on_commit(self, entries: Sequence[CommittedEntry], commit_seconds: float) -> None:
        """A commit listener (writer thread): note the group's time and wake the child."""
        self.commit_times.note(entries[0].seq, entries[0].fields["recorded_at_ms"] / 1000)
        self.notify()

    def notify(self) -> None:
        """New entries were committed (writer thread): wake the child without ever blocking.

        An unread byte in the pipe already says "look at the head": no second one.
        """
        with self._wake_lock, contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            if self._wake_fd is not None and not _unread(self._wake_fd):
                os.write(self._wake_fd, b"\n")

    def stop(self, catch_up_s: float = 0.0) -> None:
        """Have the child deliver what is committed (for at most ``catch_up_s``) and exit."""
        with self._spawn_lock:  # no restart can begin after this
            self._stopping.set()
            process = self._process
        if process is None:
            return
        with self._wake_lock, contextlib.suppress(OSError):  # OSError: the child is gone already
            if self._control_fd is not None:
                _write_all(self._control_fd, json.dumps({"stop": catch_up_s}).encode() + b"\n")
        try:
            process.wait(timeout=catch_up_s + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("sink_host_killed", pid=process.pid, reason="did not exit in time")
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join()
        self._close_wake()
        self._process = None

    def views(self) -> list[SinkView]:
        head = self._head()
        with self._lock:
            return [
                SinkView(c.name, max(0, head - c.cursor), c.delivered, c.errors, c.durations.copy(),
                         lag_seconds=self.commit_times.age(c.cursor, head))
                for c in self._counters.values()
            ]

    def wm_entries(self) -> int | None:
        """Entries in Working Memory as the WM sink last reported (None: no WM sink)."""
        with self._lock:
            for counters in self._counters.values():
                if counters.is_wm:
                    return counters.wm_size
        return None

    async def wait_delivered(self, name: str, through: int, timeout_s: float) -> bool:
        """Wait until sink ``name`` has delivered every entry below seq ``through``; False after ``timeout_s``.

        Resolved from the sink host's reports (sent right after each delivery).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (through, loop, future)
        with self._lock:
            counters = self._counters[name]
            if counters.cursor >= through:
                return True
            counters.waiters.append(waiter)
        self._hurry(name)
        try:
            await asyncio.wait_for(future, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock, contextlib.suppress(ValueError):  # ValueError: released already
                counters.waiters.remove(waiter)

    def _hurry(self, name: str) -> None:
        """Have sink ``name`` deliver without lingering: somebody waits for it."""
        with self._wake_lock, contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            if self._control_fd is not None:
                os.write(self._control_fd, json.dumps({"hurry": name}).encode() + b"\n")  # short: atomic

    def _read_cursors(self, *, note_oldest: bool = False) -> None:
        """Each sink's durable cursor; ``note_oldest``: also when the oldest entry one still owes was recorded."""
        conn = store.connect(self._db, readonly=False)
        try:
            cursors = {name: store.read_sink_cursor(conn, name) for name in self._counters}
            oldest = min(cursors.values(), default=None)
            entry = None if oldest is None or not note_oldest else store.get_entry(conn, seq=oldest)
        finally:
            conn.close()
        if entry is not None:
            self.commit_times.note(entry.seq, json.loads(entry.entry)["recorded_at_ms"] / 1000)
        with self._lock:
            for name, cursor in cursors.items():
                self._counters[name].cursor = cursor
                self._release_waiters(self._counters[name])

    def _release_waiters(self, counters: _Counters) -> None:
        """Resolve the waits the cursor has reached (hold ``_lock``)."""
        reached = [waiter for waiter in counters.waiters if waiter[0] <= counters.cursor]
        for waiter in reached:
            counters.waiters.remove(waiter)
            _, loop, future = waiter
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future)

    def _spawn(self) -> None:
        stats_read, stats_write = os.pipe()
        wake_read, wake_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "ccos_obsd.sinks.host"],
                stdin=subprocess.PIPE,
                pass_fds=(stats_write, wake_read),
                env={**os.environ, "CCOS_OBSD_SINK_STATS_FD": str(stats_write),
                     "CCOS_OBSD_SINK_WAKE_FD": str(wake_read)},
            )
        except BaseException:
            for fd in (stats_read, wake_write):
                os.close(fd)
            raise
        finally:
            os.close(stats_write)
            os.close(wake_read)
        assert process.stdin is not None  # noqa: S101 - stdin=PIPE
        control_fd = process.stdin.fileno()
        _write_all(control_fd, json.dumps(self._setup()).encode() + b"\n")
        os.set_blocking(control_fd, False)
        os.set_blocking(wake_write, False)
        self._process = process
        with self._wake_lock:
            self._control_fd = control_fd
            self._wake_fd = wake_write
        self._reader = threading.Thread(
            target=self._read_stats, args=(process, os.fdopen(stats_read, "rb")), name="ccos-sink-host", daemon=True
        )
        self._reader.start()
        log.info("sink_host_started", pid=process.pid, sinks=self.sink_names)

    def _setup(self) -> dict[str, Any]:
        config = self._config
        return {
            "db": str(self._db),
            "log_level": config.log.level,
            "wm": {"max_entries": config.wm.max_entries, "max_tokens": config.wm.max_tokens,
                   "linger_ms": config.wm.linger_ms},
            "sinks": [
                {"type": s.type, "name": s.name, "batch": s.batch, "path": str(s.path),
                 "max_bytes": s.max_bytes, "keep": s.keep, "nats": None if s.nats is None else s.nats.to_json()}
                for s in config.sinks
            ],
        }

    def _read_stats(self, process: subprocess.Popen[bytes], stats: IO[bytes]) -> None:
        with stats:
            for line in stats:
                try:
                    self._update(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("sink_host_bad_stats", error=str(exc))
        code = process.wait()
        with self._lock:
            for counters in self._counters.values():
                counters.base = (counters.delivered, counters.errors, counters.durations.copy())
        if self._stopping.is_set():
            log.info("sink_host_stopped", pid=process.pid, exit_code=code)
            return
        log.error("sink_host_exited", pid=process.pid, exit_code=code, restart_in_s=self._restart_delay)
        if self._stopping.wait(self._restart_delay):
            return
        self._restart_delay = min(self._restart_delay * 2, RESTART_MAX_S)
        with self._spawn_lock:
            if self._stopping.is_set():
                return
            self._close_wake()
            self._spawn()

    def _update(self, report: dict[str, Any]) -> None:
        with self._lock:
            counters = self._counters[report["sink"]]
            base_delivered, base_errors, base_durations = counters.base or (0, 0, Histogram(DELIVERY_BUCKETS))
            counters.cursor = int(report["cursor"])
            counters.delivered = base_delivered + int(report["delivered"])
            counters.errors = base_errors + int(report["errors"])
            counters.durations = _merged(base_durations, report["durations"])
            if report.get("wm") is not None:
                counters.wm_size = int(report["wm"]["size"])
            self._release_waiters(counters)
            slowest = min(c.cursor for c in self._counters.values())
        self.commit_times.forget_below(slowest)
        if int(report["delivered"]):
            self._restart_delay = RESTART_FIRST_S  # this child works

    def _close_wake(self) -> None:
        process = self._process
        with self._wake_lock:
            wake_fd, self._wake_fd, self._control_fd = self._wake_fd, None, None
            if wake_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(wake_fd)
            if process is not None and process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a wait that timed out or was cancelled meanwhile
        future.set_result(None)


def _merged(base: Histogram, reported: Any) -> Histogram:
    """``base`` plus a histogram the sink host reported (``encode_histogram``; same buckets)."""
    other = decode_histogram(base.bounds, reported)
    return Histogram(base.bounds, [a + b for a, b in zip(base.counts, other.counts, strict=True)],
                     base.total + other.total, base.count + other.count)


def _unread(fd: int) -> int:
    """How many bytes a pipe holds that its reader has not read (asked of either end)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def _write_all(fd: int, data: bytes, within_s: float = 5.0) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + within_s
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError("the sink host does not read its input") from None
            time.sleep(0.001)  # a setup or stop line waiting for pipe space; rare and short
            continue
        view = view[written:]


# --- the child's side


class _Head:
    """The ledger head as the database says (one read connection per runner thread)."""

    def __init__(self, db: Path) -> None:
        self._db = db
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self) -> int:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = store.connect(self._db, readonly=True)
            with self._lock:
                self._connections.append(conn)
        return store.read_head(conn).size

    def close(self) -> None:
        for conn in self._connections:
            conn.close()


def _report(runner: SinkRunner) -> dict[str, Any]:
    cursor, delivered, errors, durations = runner.stats.snapshot()
    report: dict[str, Any] = {
        "sink": runner.sink.name, "cursor": cursor, "delivered": delivered, "errors": errors,
        "durations": encode_histogram(durations), "wm": None,
    }
    sink = runner.sink
    if isinstance(sink, WmSink):
        report["wm"] = {"size": sink.size}
    return report


def child_main() -> int:
    # Appends come first: on a busy machine the kernel gives the daemon's threads the CPU
    # and Working Memory the rest (it catches up from its cursor; nothing waits for it).
    os.nice(CHILD_NICENESS)
    setup = json.loads(sys.stdin.buffer.readline())
    configure_logging(setup["log_level"], LogRing(16))
    db = Path(setup["db"])
    head = _Head(db)
    stats = os.fdopen(int(os.environ["CCOS_OBSD_SINK_STATS_FD"]), "w", buffering=1)
    budgets = Budgets.from_settings(setup["wm"]["max_entries"], setup["wm"]["max_tokens"])
    wm_linger_s = int(setup["wm"].get("linger_ms", 0)) / 1000
    wake_fd = int(os.environ["CCOS_OBSD_SINK_WAKE_FD"])
    delivered = threading.Event()
    waiting = threading.Event()
    """Set by a runner that waits for new entries: only then is the wake-up pipe read."""
    runners = []
    for raw in setup["sinks"]:
        sink_config = SinkConfig(raw["type"], raw["name"], raw["batch"], Path(raw["path"]),
                                 raw["max_bytes"], raw["keep"],
                                 None if raw.get("nats") is None else NatsOptions.from_json(raw["nats"]))
        sink = make_sink(sink_config, budgets, db)
        runners.append(SinkRunner(sink, db, head, batch_size=sink_config.batch, on_delivered=delivered.set,
                                  linger_s=wm_linger_s if sink_config.type == "wm" else 0.0,
                                  on_idle=waiting.set))
    for runner in runners:
        runner.start()
    done = threading.Event()
    last: dict[str, Any] = {}

    def publish() -> None:
        for runner in runners:
            report = _report(runner)
            if last.get(runner.sink.name) != report:
                last[runner.sink.name] = report
                stats.write(json.dumps(report) + "\n")

    def reporter() -> None:
        # At once after a change (the daemon may be waiting for that cursor); no timer.
        while not done.is_set():
            delivered.wait()
            delivered.clear()
            try:
                publish()
            except (BrokenPipeError, ValueError):
                return  # the daemon is gone; stdin's end of file stops us

    def waker() -> None:
        # Cleared before the runners are told: a runner that waits again after this sets it again.
        while True:
            waiting.wait()
            try:
                if not os.read(wake_fd, 4096):
                    return  # the daemon is gone; stdin's end of file stops us
            except OSError:
                return
            waiting.clear()
            for runner in runners:
                runner.notify()

    reporting = threading.Thread(target=reporter, name="ccos-sink-stats", daemon=True)
    reporting.start()
    threading.Thread(target=waker, name="ccos-sink-wake", daemon=True).start()
    catch_up_s = 0.0
    for line in sys.stdin.buffer:
        command = json.loads(line)
        if "hurry" in command:
            for runner in runners:
                if runner.sink.name == command["hurry"]:
                    runner.hurry()
            continue
        catch_up_s = float(command.get("stop", 0.0))
        break
    for runner in runners:
        runner.stop(catch_up_s=catch_up_s)
    done.set()
    delivered.set()
    reporting.join()
    with contextlib.suppress(BrokenPipeError, ValueError):
        publish()
        stats.close()
    head.close()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
