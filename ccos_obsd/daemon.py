"""The daemon's lifecycle: open the state dir, start the writer, serve, drain, close.

Start-up order: lock the state dir, load (or create) the signing key, open the
ledger, fold the existing entries into the metric aggregates, start the writer,
bind the socket and the HTTP port, log ``daemon_ready``. Shutdown (SIGTERM or
SIGINT) runs it backwards: stop accepting, answer every request already read,
commit, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import json
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from ccos_obsd import __version__, wm_ops
from ccos_obsd.config import Config, SinkConfig
from ccos_obsd.errors import StartupError
from ccos_obsd.http import build_app
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import SigningKey, load_or_create_signing_key
from ccos_obsd.ledger.writer import CommittedEntry, LedgerWriter
from ccos_obsd.log import LogRing, action_log, configure_logging, lifecycle_log
from ccos_obsd.metrics import Aggregates, LedgerCollector, LiveGauges, SinkView, WmView
from ccos_obsd.protocol import ConnectionRegistry, Dispatcher
from ccos_obsd.sinks.base import Sink, SinkRunner
from ccos_obsd.sinks.jsonl import JsonlSink
from ccos_obsd.sinks.wm import WmSink

log = structlog.get_logger("ccos_obsd.daemon")

KEY_FILE = "signing.key"
LOCK_FILE = "daemon.lock"
DRAIN_TIMEOUT_S = 10.0
SINK_CATCH_UP_S = 5.0


def make_sink(sink_config: SinkConfig, config: Config) -> Sink:
    """The sink a ``[[sinks]]`` table describes."""
    if sink_config.type == "wm":
        return WmSink(sink_config.name, sink_config.path,
                      max_entries=config.wm.max_entries, max_tokens=config.wm.max_tokens)
    return JsonlSink(sink_config.name, sink_config.path, max_bytes=sink_config.max_bytes, keep=sink_config.keep)


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[IO[str]]:
    """Hold an exclusive lock on the state dir for the daemon's lifetime."""
    path = state_dir / LOCK_FILE
    handle = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StartupError(f"state dir {state_dir} is locked by a running daemon (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield handle
    finally:
        handle.close()


def default_key_name() -> str:
    host = socket.gethostname().split(".")[0] or "localhost"
    name = "".join(c for c in host if not c.isspace() and c != "+")
    return f"{name or 'localhost'}/ccos-obsd"


def action_log_event(action_type: str, fields: dict[str, Any]) -> str:
    """CCOS's structured-log event name for an appended action."""
    if action_type == "CapabilityResult":
        return "capability_result_recorded"
    if action_type.startswith("Plan"):
        return "plan_event"
    if action_type.startswith("Delegation"):
        return "delegation_event"
    if "result" in fields:
        return "action_result_recorded"
    return "action_appended"


class Daemon:
    """One running ccos-obsd: owns the writer, the servers and every background task."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log_ring = LogRing(config.log.ring_size)
        self.aggregates = Aggregates(config.metrics.duration_buckets)
        self.gauges = LiveGauges()
        self._stop = asyncio.Event()
        self._reader_local = threading.local()
        self._reader_connections: list[Any] = []
        self._reader_lock = threading.Lock()
        self._runners: list[SinkRunner] = []
        self._replay_lock = asyncio.Lock()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        config = self.config
        configure_logging(config.log.level, self.log_ring)
        loop = asyncio.get_running_loop()
        # Installed first and kept until the end: a SIGTERM at any moment (even right
        # after daemon_ready, or a second one during the drain) means "drain and stop".
        with _signal_handlers(loop, self.request_stop), state_dir_lock(config.state_dir):
            key = self._load_key()
            db = store.ledger_path(config.state_dir)
            writer = LedgerWriter(
                db, key, loop,
                max_group=config.ledger.max_group,
                on_commit=self._on_commit,
                signing_mode=config.signing.mode,
                checkpoint_interval_s=config.checkpoint.interval_s,
                key_path=key_path(config.state_dir),
            )
            self._restore_aggregates(db)
            writer.start()
            self._runners = self._start_sinks(db, writer)
            reader_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ccos-read")
            render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccos-render")

            def read(fn: Callable[[Any], Any]) -> asyncio.Future[Any]:
                return loop.run_in_executor(reader_pool, lambda: fn(self._reader(db)))

            dispatcher = Dispatcher(config, writer, read, self.aggregates, self.log_ring)
            if any(isinstance(r.sink, WmSink) for r in self._runners):
                dispatcher.replay_wm = lambda start: self._replay_wm(db, writer, start)
            connections = ConnectionRegistry(config, dispatcher, self.gauges)
            registry = CollectorRegistry()
            registry.register(LedgerCollector(
                self.aggregates, self.gauges, lambda: writer.pending_actions, self._sink_views, self._wm_view
            ))
            registry.register(ProcessCollector(registry=None))
            runner: web.AppRunner | None = None
            server: asyncio.AbstractServer | None = None
            try:
                server = await self._bind_socket(connections)
                http_address = None
                if config.http.enabled:
                    wm_file = next((s.path for s in config.sinks if s.type == "wm"), None)
                    app = build_app(registry, render_pool, writer, self.log_ring, read, self.aggregates, wm_file)
                    runner = web.AppRunner(app, access_log=None, handle_signals=False)
                    await runner.setup()
                    http_address = await self._bind_http(runner)
                info = {
                    "version": __version__,
                    "socket": str(config.socket.path),
                    "http": http_address,
                    "state_dir": str(config.state_dir),
                    "entries": writer.head.size,
                    "key_id": key.key_id,
                    "pid": os.getpid(),
                }
                lifecycle_log().info("daemon_ready", **info)
                if ready is not None:
                    ready(info)
                await self._stop.wait()
                lifecycle_log().info("daemon_stopping", entries=writer.head.size)
                dispatcher.accepting_writes = False
                server.close()
                connections.stop_reading()
                await connections.drain(DRAIN_TIMEOUT_S)
            finally:
                if server is not None:
                    server.close()
                    with contextlib.suppress(FileNotFoundError):
                        config.socket.path.unlink()
                if runner is not None:
                    await runner.cleanup()
                await loop.run_in_executor(None, writer.close)
                await loop.run_in_executor(None, self._stop_sinks)
                reader_pool.shutdown()
                render_pool.shutdown()
                for conn in self._reader_connections:
                    conn.close()
            lifecycle_log().info("daemon_stopped", entries=writer.head.size)

    # --- sinks

    def _start_sinks(self, db: Path, writer: LedgerWriter) -> list[SinkRunner]:
        runners = []
        for sink_config in self.config.sinks:
            sink = make_sink(sink_config, self.config)
            runner = SinkRunner(sink, db, lambda: writer.head.size, batch_size=sink_config.batch)
            runner.start()
            runners.append(runner)
        return runners

    async def _replay_wm(self, db: Path, writer: LedgerWriter, start: int) -> dict[str, Any]:
        """Rebuild Working Memory from ``start`` while the daemon runs: pause the WM sink, replay, resume."""
        async with self._replay_lock:
            loop = asyncio.get_running_loop()
            index, runner = next((i, r) for i, r in enumerate(self._runners) if isinstance(r.sink, WmSink))
            sink = runner.sink
            assert isinstance(sink, WmSink)  # noqa: S101 - selected above
            await loop.run_in_executor(None, runner.stop)
            try:
                result = await loop.run_in_executor(
                    None, lambda: wm_ops.rebuild(db, sink.path, start=start, sink_name=sink.name)
                )
            finally:
                fresh = SinkRunner(make_sink(next(s for s in self.config.sinks if s.name == sink.name), self.config),
                                   db, lambda: writer.head.size, batch_size=runner.batch_size)
                fresh.start()
                self._runners[index] = fresh
            log.info("wm_replayed", **result)
            return result

    def _stop_sinks(self) -> None:
        for runner in self._runners:
            runner.stop(catch_up_s=SINK_CATCH_UP_S)

    def _sink_views(self) -> list[SinkView]:
        views = []
        for runner in self._runners:
            _cursor, delivered, errors, durations = runner.stats.snapshot()
            views.append(SinkView(runner.sink.name, runner.lag, delivered, errors, durations))
        return views

    def _wm_view(self) -> WmView | None:
        for runner in self._runners:
            if isinstance(runner.sink, WmSink):
                return WmView(runner.sink.size, runner.sink.ingest_durations.copy())
        return None

    # --- start-up

    def _load_key(self) -> SigningKey:
        path = key_path(self.config.state_dir)
        name = self.config.signing.key_name or default_key_name()
        key, created = load_or_create_signing_key(path, name)
        if created:
            log.info("signing_key_created", path=str(path), key_id=key.key_id, vkey=key.verifier.vkey())
        elif self.config.signing.key_name and key.verifier.name != self.config.signing.key_name:
            log.warning("signing_key_name_differs", configured=self.config.signing.key_name,
                        key_name=key.verifier.name, note="the existing key keeps its name")
        return key

    def _restore_aggregates(self, db: Path) -> None:
        conn = store.connect(db, readonly=True)
        try:
            batch: list[dict[str, Any]] = []
            for entry in store.iter_entries(conn):
                batch.append(json.loads(entry.entry))
                if len(batch) >= 4096:
                    self.aggregates.observe_entries(batch)
                    batch.clear()
            self.aggregates.observe_entries(batch)
        finally:
            conn.close()
        log.info("metrics_restored", entries=self.aggregates.entries)

    def _reader(self, db: Path) -> Any:
        conn = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = store.connect(db, readonly=True)
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_connections.append(conn)
        return conn

    async def _bind_socket(self, connections: ConnectionRegistry) -> asyncio.AbstractServer:
        path = self.config.socket.path
        _remove_stale_socket(path)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_unix_server(connections.protocol_factory, path=str(path), backlog=1024)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
        # Bound with the process umask; set the configured mode (and group) explicitly.
        os.chmod(path, self.config.socket.mode)
        if self.config.socket.group:
            try:
                gid = grp.getgrnam(self.config.socket.group).gr_gid
                os.chown(path, -1, gid)
            except (KeyError, OSError) as exc:
                server.close()
                raise StartupError(f"cannot give {path} to group {self.config.socket.group!r}: {exc}") from None
        return server

    async def _bind_http(self, runner: web.AppRunner) -> str:
        site = web.TCPSite(runner, self.config.http.host, self.config.http.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on http {self.config.http.host}:{self.config.http.port}: {exc.strerror}"
            ) from None
        server = site._server  # the bound port is only known after start (port 0 in tests)
        if not isinstance(server, asyncio.Server):
            raise StartupError("http server did not start")
        host, port = server.sockets[0].getsockname()[:2]
        return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    # --- the commit path (writer thread)

    def _on_commit(self, entries: Sequence[CommittedEntry], commit_seconds: float) -> None:
        self.aggregates.observe_entries(e.fields for e in entries)
        self.aggregates.observe_commit(commit_seconds)
        for runner in self._runners:
            runner.notify()
        actions_log = action_log()
        if not actions_log.enabled:
            return
        events = []
        for entry in entries:
            fields = entry.fields
            context = {key: fields[key] for key in _LOGGED_FIELDS if key in fields}
            context["seq"] = entry.seq
            context["timestamp"] = fields["timestamp_ms"] if "timestamp_ms" in fields else fields["recorded_at_ms"]
            events.append((action_log_event(fields["action_type"], fields), context))
        actions_log.write_group(events)


_LOGGED_FIELDS = ("action_type", "action_id", "function_name", "intent_id", "plan_id", "step_id", "session_id")


def _remove_stale_socket(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left behind by a daemon that died
    else:
        raise StartupError(f"another process is listening on {path}")
    finally:
        probe.close()


@contextlib.contextmanager
def _signal_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Iterator[None]:
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
