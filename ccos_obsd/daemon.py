"""The daemon's lifecycle: open the state dir, start the writer, serve, drain, close.

Start-up order: lock the state dir, load (or create) the signing key, check the
ledger's tail and latest checkpoint (``selfcheck``), open the ledger, load the
metrics snapshot and fold in the entries after it, start the writer, the sink
host process (``sinks.host``) and the renderer process (``render``), bind the
socket and the HTTP port (or take systemd's), log ``daemon_ready``. Shutdown
(SIGTERM or SIGINT) runs it backwards: stop accepting, answer every request
already read, commit, snapshot the metrics, let the sinks catch up, close.
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
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from ccos_obsd import __version__, selfcheck, wm_ops
from ccos_obsd.config import Config
from ccos_obsd.errors import ConfigError, StartupError, VerificationError
from ccos_obsd.http import build_app
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import SigningKey, load_or_create_signing_key
from ccos_obsd.ledger.writer import AppendResult, CommittedEntry, LedgerWriter
from ccos_obsd.log import LogRing, action_log, configure_logging, lifecycle_log
from ccos_obsd.metrics import SNAPSHOT_FORMAT, Aggregates, LedgerCollector, LiveGauges, SinkView, WmView
from ccos_obsd.protocol import ConnectionRegistry, Dispatcher
from ccos_obsd.reload import plan_reload
from ccos_obsd.render import Renderer
from ccos_obsd.sinks.host import SinkHost
from ccos_obsd.systemd import Notifier, PassedSockets, watchdog_interval

log = structlog.get_logger("ccos_obsd.daemon")

KEY_FILE = "signing.key"
LOCK_FILE = "daemon.lock"
DRAIN_TIMEOUT_S = 10.0
SINK_CATCH_UP_S = 5.0
STATUS_INTERVAL_S = 2.0
"""Seconds between STATUS= updates to the service manager (head and ingest rate)."""


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

    def __init__(
        self,
        config: Config,
        *,
        start_despite_damage: bool = False,
        sockets: PassedSockets | None = None,
        load_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._sockets = sockets or PassedSockets()
        self._load_config = load_config or (lambda: config)
        self._notifier = Notifier.from_environ()
        self._reload_wanted = asyncio.Event()
        self._start_despite_damage = start_despite_damage
        self.log_ring = LogRing(config.log.ring_size)
        self.aggregates = Aggregates(config.metrics.duration_buckets, config.metrics.max_label_values)
        self._snapshot_saved_at = -1
        self._size_checked_at = float("-inf")
        self._db = Path()
        self._ledger_created = 0.0
        self.gauges = LiveGauges()
        self._stop = asyncio.Event()
        self._reader_local = threading.local()
        self._reader_connections: list[Any] = []
        self._reader_lock = threading.Lock()
        self._sinks: SinkHost | None = None
        self._replay_lock = asyncio.Lock()

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload_wanted.set()

    async def run(self, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        config = self.config
        configure_logging(config.log.level, self.log_ring)
        loop = asyncio.get_running_loop()
        # Installed first and kept until the end: a SIGTERM at any moment (even right
        # after daemon_ready, or a second one during the drain) means "drain and stop".
        with _signal_handlers(loop, self.request_stop, self.request_reload), state_dir_lock(config.state_dir):
            key = self._load_key()
            db = store.ledger_path(config.state_dir)
            try:
                damage = self._self_check(db)
                writer = LedgerWriter(
                    db, key, loop,
                    max_group=config.ledger.max_group,
                    on_commit=self._on_commit,
                    signing_mode=config.signing.mode,
                    checkpoint_interval_s=config.checkpoint.interval_s,
                    key_path=key_path(config.state_dir),
                )
            except sqlite3.DatabaseError as exc:  # another format, not a ledger, unreadable
                raise StartupError(f"cannot open the ledger {db}: {exc}") from None
            self._db = db
            self._restore_aggregates(db)
            writer.start()
            if damage is not None:
                await self._record_damage(writer, damage)
            self._sinks = self._start_sinks(db, writer)
            reader_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ccos-read")
            render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccos-render")

            def read(fn: Callable[[Any], Any]) -> asyncio.Future[Any]:
                return loop.run_in_executor(reader_pool, lambda: fn(self._reader(db)))

            dispatcher = Dispatcher(config, writer, read, self.aggregates, self.log_ring)
            self._dispatcher = dispatcher
            if any(s.type == "wm" for s in config.sinks):
                dispatcher.replay_wm = lambda start: self._replay_wm(db, writer, start)
            connections = ConnectionRegistry(config, dispatcher, self.gauges)
            registry = CollectorRegistry()
            collector = LedgerCollector(
                self.aggregates, self.gauges, lambda: writer.pending_actions, self._sink_views, self._wm_view,
                writer.checkpoint_age,
                (self._ledger_created, time.time()) if config.metrics.created_series else None,
            )
            registry.register(collector)
            registry.register(ProcessCollector(registry=None))
            renderer = Renderer(collector, registry)
            renderer.start()
            runner: web.AppRunner | None = None
            server: asyncio.AbstractServer | None = None
            snapshots = asyncio.create_task(self._snapshot_metrics_periodically(db), name="metrics-snapshots")
            supervision: list[asyncio.Task[None]] = []
            try:
                server = await self._bind_socket(connections)
                http_address = None
                if config.http.enabled:
                    wm_file = next((s.path for s in config.sinks if s.type == "wm"), None)
                    app = build_app(registry, render_pool, writer, self.log_ring, read, self.aggregates, wm_file,
                                    renderer)
                    runner = web.AppRunner(app, access_log=None, handle_signals=False)
                    await runner.setup()
                    http_address = await self._bind_http(runner)
                info = {
                    "version": __version__,
                    "socket": _socket_name(server),
                    "http": http_address,
                    "state_dir": str(config.state_dir),
                    "entries": writer.head.size,
                    "key_id": key.key_id,
                    "pid": os.getpid(),
                }
                lifecycle_log().info("daemon_ready", **info)
                self._notifier.notify(READY=1, STATUS=f"ready: {writer.head.size} entries")
                supervision = self._start_supervision(writer, connections)
                if ready is not None:
                    ready(info)
                await self._stop.wait()
                lifecycle_log().info("daemon_stopping", entries=writer.head.size)
                self._notifier.notify(STOPPING=1, STATUS="stopping: answering the requests already read")
                dispatcher.accepting_writes = False
                server.close()
                connections.stop_reading()
                await connections.drain(DRAIN_TIMEOUT_S)
            finally:
                for task in supervision:
                    task.cancel()
                for task in supervision:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self._notifier.close()
                if server is not None:
                    server.close()
                    if self._sockets.ingest is None:  # systemd's socket stays for the next start
                        with contextlib.suppress(FileNotFoundError):
                            config.socket.path.unlink()
                if runner is not None:
                    await runner.cleanup()
                snapshots.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await snapshots
                await loop.run_in_executor(None, writer.close)
                await loop.run_in_executor(None, self._save_metrics_snapshot, db)
                await loop.run_in_executor(None, self._stop_sinks)
                reader_pool.shutdown()
                render_pool.shutdown()
                await loop.run_in_executor(None, renderer.close)
                for conn in self._reader_connections:
                    conn.close()
            lifecycle_log().info("daemon_stopped", entries=writer.head.size)

    # --- sinks

    def _start_sinks(self, db: Path, writer: LedgerWriter) -> SinkHost | None:
        if not self.config.sinks:
            return None
        host = SinkHost(self.config, db, lambda: writer.head.size)
        host.start()
        return host

    async def _replay_wm(self, db: Path, writer: LedgerWriter, start: int) -> dict[str, Any]:
        """Rebuild Working Memory from ``start`` while the daemon runs: pause the sinks, replay, resume."""
        async with self._replay_lock:
            loop = asyncio.get_running_loop()
            sink = next(s for s in self.config.sinks if s.type == "wm")
            host = self._sinks
            if host is not None:
                await loop.run_in_executor(None, host.stop)
            dispatcher = self._dispatcher
            total = max(0, writer.head.size - start)  # about: rebuild reads the head again
            dispatcher.replay_progress = (0, total)

            def progress(count: int) -> None:
                done = (dispatcher.replay_progress or (0, total))[0] + count
                dispatcher.replay_progress = (done, max(total, done))

            try:
                result = await loop.run_in_executor(
                    None, lambda: wm_ops.rebuild(db, sink.path, start=start, sink_name=sink.name, progress=progress)
                )
            finally:
                dispatcher.replay_progress = None
                if host is not None:
                    await loop.run_in_executor(None, host.restart, self.config)
            log.info("wm_replayed", **result)
            return result

    def _stop_sinks(self) -> None:
        if self._sinks is not None:
            self._sinks.stop(catch_up_s=SINK_CATCH_UP_S)

    def _sink_views(self) -> list[SinkView]:
        return [] if self._sinks is None else self._sinks.views()

    def _wm_view(self) -> WmView | None:
        return None if self._sinks is None else self._sinks.wm_view()

    # --- start-up

    def _self_check(self, db: Path) -> VerificationError | None:
        """The start-up self-check; a finding stops the start unless ``--start-despite-damage``."""
        if not db.exists():
            return None
        tail = self.config.ledger.verify_tail
        try:
            report = selfcheck.check_ledger(db, tail=tail, allow_pending=self.config.signing.mode == "checkpoint")
        except VerificationError as error:
            if not self._start_despite_damage:
                log.error("selfcheck_failed", seq=error.seq, kind=error.kind, detail=error.detail)
                raise StartupError(
                    f"ledger self-check failed: {error}; `ccos-obsd verify` checks the whole ledger, "
                    "`run --start-despite-damage` starts anyway and records the finding on the ledger"
                ) from None
            log.warning("selfcheck_failed_starting_anyway", seq=error.seq, kind=error.kind, detail=error.detail)
            return error
        log.info("selfcheck_passed", **report.to_log())
        return None

    async def _record_damage(self, writer: LedgerWriter, damage: VerificationError) -> None:
        """Append the self-check's finding to the ledger (a SelfCheckFailed entry) before serving."""
        action = selfcheck.damage_action(damage, writer.head.size, self.config.ledger.verify_tail)
        (outcome,) = await writer.submit([action], None)
        if not isinstance(outcome, AppendResult):
            raise StartupError(f"cannot record the self-check finding on the ledger: {outcome.message}")
        log.warning("selfcheck_finding_recorded", seq=outcome.seq, damaged_seq=damage.seq, kind=damage.kind)

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
        """Load the metrics snapshot, then fold in only the entries after it."""
        started = time.perf_counter()
        conn = store.connect(db, readonly=True)
        try:
            first = store.get_entry(conn, seq=0)
            self._ledger_created = time.time() if first is None else json.loads(first.entry)["recorded_at_ms"] / 1000
            start = self._load_metrics_snapshot(conn)
            batch: list[dict[str, Any]] = []
            for entry in store.iter_entries(conn, start=start):
                batch.append(json.loads(entry.entry))
                if len(batch) >= 4096:
                    self.aggregates.observe_entries(batch)
                    batch.clear()
            self.aggregates.observe_entries(batch)
        finally:
            conn.close()
        self._snapshot_saved_at = start
        log.info("metrics_restored", entries=self.aggregates.entries, from_snapshot=start,
                 folded_in=self.aggregates.entries - start, seconds=round(time.perf_counter() - started, 3))

    def _load_metrics_snapshot(self, conn: Any) -> int:
        """Entries the stored snapshot covers once loaded; 0 when there is none or it was discarded."""
        snapshot = store.load_metrics_snapshot(conn)
        if snapshot is None:
            return 0
        head = store.read_head(conn)
        reason = None
        if snapshot.format != SNAPSHOT_FORMAT:
            reason = f"format {snapshot.format}, expected {SNAPSHOT_FORMAT}"
        elif snapshot.entries > head.size:
            reason = f"covers {snapshot.entries} entries, the ledger has {head.size}"
        elif snapshot.entries and store.chain_hash_at(conn, snapshot.entries - 1) != snapshot.chain_hash:
            reason = f"its chain hash does not match the ledger's at seq {snapshot.entries - 1}"
        elif snapshot.params != self._snapshot_params():
            reason = "metrics.duration_buckets or metrics.max_label_values changed"
        else:
            try:
                body = json.loads(snapshot.body)
                if body.get("entries") != snapshot.entries:
                    raise ValueError("its body covers a different number of entries")
                self.aggregates.load(body)
            except (ValueError, AttributeError) as exc:
                reason = f"unreadable: {exc}"
        if reason is not None:
            # load() replaces nothing unless the whole snapshot parsed: the aggregates are still empty.
            log.warning("metrics_snapshot_discarded", reason=reason, action="rebuilding from the whole ledger")
            return 0
        return snapshot.entries

    def _save_metrics_snapshot(self, db: Path) -> None:
        """Store the aggregates with the seq they cover (writer thread or not: its own connection)."""
        body = self.aggregates.dump()
        entries = body["entries"]
        if entries == self._snapshot_saved_at:
            return
        try:
            conn = store.connect(db, readonly=False)
            try:
                chain = store.chain_hash_at(conn, entries - 1) if entries else None
                store.save_metrics_snapshot(conn, store.MetricsSnapshot(
                    SNAPSHOT_FORMAT, entries, chain, self._snapshot_params(),
                    json.dumps(body, separators=(",", ":")).encode(),
                ))
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("metrics_snapshot_failed", error=str(exc), entries=entries)
            return
        self._snapshot_saved_at = entries
        log.debug("metrics_snapshot_saved", entries=entries)

    def _snapshot_params(self) -> str:
        """The aggregates' settings as stored beside a snapshot: a snapshot of other settings is rebuilt."""
        return json.dumps(self.aggregates.params, sort_keys=True)

    async def _snapshot_metrics_periodically(self, db: Path) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.metrics.snapshot_interval_s)
            await loop.run_in_executor(None, self._save_metrics_snapshot, db)

    def _reader(self, db: Path) -> Any:
        conn = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = store.connect(db, readonly=True)
            self._reader_local.conn = conn
            with self._reader_lock:
                self._reader_connections.append(conn)
        return conn

    async def _bind_socket(self, connections: ConnectionRegistry) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        passed = self._sockets
        if passed.names:
            lifecycle_log().info(
                "sockets_from_systemd", sockets={name: _address(getattr(passed, name)) for name in passed.names}
            )
        if passed.http is not None and not self.config.http.enabled:
            log.warning("http_socket_unused", reason="http.enabled is false")
            passed.http.close()
            passed.http = None
        if passed.ingest is not None:
            # systemd made the socket file with the unit's SocketMode/SocketUser/SocketGroup and
            # keeps it across restarts: serve on it, never chmod, chown or unlink it.
            return await loop.create_unix_server(connections.protocol_factory, sock=passed.ingest, backlog=1024)
        path = self.config.socket.path
        _remove_stale_socket(path)
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
        site: web.BaseSite
        if self._sockets.http is not None:
            site = web.SockSite(runner, self._sockets.http)
        else:
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
        return _address(server.sockets[0])

    # --- under a service manager: status, watchdog, reload

    def _start_supervision(self, writer: LedgerWriter, connections: ConnectionRegistry) -> list[asyncio.Task[None]]:
        """The background tasks of a serving daemon; ``run`` cancels and awaits them."""
        tasks = [asyncio.create_task(self._reload_on_signal(connections), name="reload")]
        if self._notifier.enabled:
            tasks.append(asyncio.create_task(self._report_status(writer), name="sd-status"))
        interval = watchdog_interval()
        if interval is not None and self._notifier.enabled:
            tasks.append(asyncio.create_task(self._ping_watchdog(interval / 2), name="sd-watchdog"))
        return tasks

    async def _ping_watchdog(self, period: float) -> None:
        # On the event loop on purpose: a loop that stops turning stops the pings, and
        # systemd restarts the daemon (WatchdogSec=, Restart=on-failure).
        while True:
            self._notifier.notify(WATCHDOG=1)
            await asyncio.sleep(period)

    async def _report_status(self, writer: LedgerWriter) -> None:
        head, since = writer.head.size, time.monotonic()
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            now_head, now = writer.head.size, time.monotonic()
            rate = (now_head - head) / (now - since)
            self._notifier.notify(STATUS=f"serving: {now_head} entries, {rate:.1f} actions/s")
            head, since = now_head, now

    async def _reload_on_signal(self, connections: ConnectionRegistry) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()  # a SIGHUP during the reload is served by one more reload
            await self._reload(connections)

    async def _reload(self, connections: ConnectionRegistry) -> None:
        """Re-read the configuration, apply what can change while running, reopen files."""
        self._notifier.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._load_config)
        except ConfigError as exc:
            lifecycle_log().error("config_reload_failed", key=exc.key, error=exc.problem,
                                  note="the running configuration is kept")
            self._notifier.notify(READY=1, STATUS=f"reload failed ({exc}); running configuration kept")
            return
        plan = plan_reload(self.config, loaded)
        previous, self.config = self.config, plan.config
        if self.config.log.level != previous.log.level:
            configure_logging(self.config.log.level, self.log_ring)
        connections.reconfigure(self.config)
        if self._sinks is not None:
            # A new sink host process takes the new sink options and reopens every file
            # (after logrotate moved a JSONL file away); cursors make the switch lossless.
            await asyncio.get_running_loop().run_in_executor(None, self._sinks.restart, self.config)
        lifecycle_log().info("config_reloaded", changed=list(plan.applied),
                             restart_required=list(plan.restart_required))
        self._notifier.notify(READY=1, STATUS="serving: configuration reloaded")

    # --- the commit path (writer thread)

    def _on_commit(self, entries: Sequence[CommittedEntry], commit_seconds: float) -> None:
        self.aggregates.observe_entries(e.fields for e in entries)
        self.aggregates.observe_commit(commit_seconds, len(entries))
        now = time.monotonic()
        if now - self._size_checked_at >= 1.0:
            self._size_checked_at = now
            self.gauges.ledger_bytes = _database_bytes(self._db)
        if self._sinks is not None:
            self._sinks.notify()
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


def _database_bytes(db: Path) -> int:
    total = 0
    for path in (db, db.with_name(db.name + "-wal")):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


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
def _signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], reload: Callable[[], None]
) -> Iterator[None]:
    handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


def _address(sock: socket.socket | None) -> str:
    """A listening socket's address as logs show it: a path, or HOST:PORT."""
    if sock is None:
        return ""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode(errors="replace")
    if isinstance(name, str):
        return name
    host, port = name[:2]
    return f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


def _socket_name(server: asyncio.AbstractServer) -> str:
    sockets = getattr(server, "sockets", ())
    return _address(sockets[0]) if sockets else ""
