"""The daemon's lifecycle: start up, serve, shut down (in the manner of uvicorn's ``Server``).

``run`` checks that the state dir is private (``statedir.check_private``) and
locks it; ``startup`` loads (or creates) the signing key, checks the
ledger's tail (``selfcheck``), opens the ledger writer, restores the metrics
(snapshot plus the entries after it), registers the commit listeners, and starts
the sink host process (``sinks.host``), the renderer process
(``metrics.render``), the op table (``ops``), the socket and the HTTP port
(TLS and who may read what from the web config, ``webconfig``; a reload applies a
changed one). Every resource it starts goes on one exit stack, so a failure half way closes
what was opened. ``serve`` waits for SIGTERM/SIGINT (SIGHUP reloads).
``shutdown`` stops accepting and answers every request already read; the exit
stack then runs the start-up backwards: close the servers, commit, snapshot the
metrics, let the sinks catch up, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from ccos_obsd import __version__, selfcheck
from ccos_obsd.config import Config
from ccos_obsd.errors import ConfigError, StartupError, VerificationError
from ccos_obsd.http import HttpAccess, build_app
from ccos_obsd.ledger import store
from ccos_obsd.ledger.keys import SigningKey
from ccos_obsd.ledger.writer import CommittedEntry, LedgerWriter
from ccos_obsd.listen import HttpListener, bind_ingest_socket, server_address
from ccos_obsd.log import LogRing, configure_logging, lifecycle_log, log_committed
from ccos_obsd.metrics.aggregates import Aggregates, LiveGauges, SinkView, WmView
from ccos_obsd.metrics.calls import LedgerCalls
from ccos_obsd.metrics.collector import LedgerCollector
from ccos_obsd.metrics.render import Renderer
from ccos_obsd.metrics.snapshot import MetricsSnapshots
from ccos_obsd.ops import Ops, WmDeliveredFn
from ccos_obsd.protocol import ConnectionRegistry
from ccos_obsd.redact import Redactor
from ccos_obsd.reload import plan_reload
from ccos_obsd.sinks.host import SinkHost
from ccos_obsd.statedir import check_private, key_path, load_redact_key, load_signing_key, state_dir_lock
from ccos_obsd.systemd import Notifier, PassedSockets, watchdog_interval
from ccos_obsd.webconfig import WebConfig
from ccos_obsd.wm.replay import LiveReplay
from ccos_obsd.wm.store import Budgets

log = structlog.get_logger("ccos_obsd.daemon")

DRAIN_TIMEOUT_S = 10.0
SINK_CATCH_UP_S = 5.0
STATUS_INTERVAL_S = 2.0
"""Seconds between STATUS= updates to the service manager (head and ingest rate)."""
LEDGER_SIZE_EVERY_S = 1.0
"""The ledger's size on disk is measured at a commit at most this often."""


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
        self._start_despite_damage = start_despite_damage
        self._notifier = Notifier.from_environ()
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self.log_ring = LogRing(config.log.ring_size)
        self.aggregates = Aggregates(
            config.metrics.duration_buckets, config.metrics.max_label_values, config.metrics.max_open_calls
        )
        self.gauges = LiveGauges()
        self._size_checked_at = float("-inf")
        self._redact_key: bytes | None = None
        self._sinks: SinkHost | None = None
        self._http: HttpListener | None = None
        # Set by startup():
        self._writer: LedgerWriter
        self._ops: Ops
        self._connections: ConnectionRegistry
        self._http_access: HttpAccess
        self._server: asyncio.AbstractServer

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload_wanted.set()

    async def run(self, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        configure_logging(self.config.log.level, self.log_ring)
        check_private(self.config)  # before the lock file is made: a refused start touches nothing
        loop = asyncio.get_running_loop()
        # Installed first and kept until the end: a SIGTERM at any moment (even right
        # after daemon_ready, or a second one during the drain) means "drain and stop".
        with _signal_handlers(loop, self.request_stop, self.request_reload), state_dir_lock(self.config.state_dir):
            async with contextlib.AsyncExitStack() as resources:
                info = await self.startup(resources)
                if ready is not None:
                    ready(info)
                await self.serve()
                await self.shutdown()
            lifecycle_log().info("daemon_stopped", entries=self._writer.head.size)

    # --- start-up

    async def startup(self, resources: contextlib.AsyncExitStack) -> dict[str, Any]:
        """Open and start everything; each piece's closing goes on ``resources`` (closed in reverse)."""
        config = self.config
        db = store.ledger_path(config.state_dir)
        key = load_signing_key(config)
        redactor = self._redactor(config)
        writer, damage = self._open_ledger(db, key)
        self._writer = writer
        calls = LedgerCalls(db)
        resources.callback(calls.close)
        self.aggregates.call_lookup = calls
        snapshots = MetricsSnapshots(db, self.aggregates)
        ledger_created = snapshots.restore().ledger_created
        self._sinks = SinkHost(config, db, lambda: writer.head.size) if config.sinks else None
        self._register_commit_listeners()
        resources.push_async_callback(asyncio.to_thread, snapshots.save)  # after the writer's last commit
        writer.start()
        resources.push_async_callback(asyncio.to_thread, writer.close)
        if damage is not None:
            await selfcheck.record_damage(writer, damage, config.ledger.verify_tail)
        if self._sinks is not None:
            self._sinks.start()
            resources.push_async_callback(asyncio.to_thread, self._sinks.stop, SINK_CATCH_UP_S)
        readers = store.ReaderPool(db)
        resources.callback(readers.close)
        self._ops = Ops(config, writer, readers.read, self.aggregates, self.log_ring, self._live_replay(db),
                        self._wm_delivered(), redactor)
        resources.push_async_callback(self._ops.close)
        self._connections = ConnectionRegistry(config, self._ops, self.gauges)
        registry, renderer = self._metrics_registry(ledger_created)
        renderer.start()
        resources.push_async_callback(asyncio.to_thread, renderer.close)
        self._start_task(resources, snapshots.save_periodically(config.metrics.snapshot_interval_s), "snapshots")
        http_address = await self._listen(resources, registry, renderer)
        resources.callback(self._notifier.close)
        self._start_supervision(resources)
        info = {
            "version": __version__,
            "socket": server_address(self._server),
            "http": http_address,
            "state_dir": str(config.state_dir),
            "entries": writer.head.size,
            "key_id": key.key_id,
            "pid": os.getpid(),
        }
        lifecycle_log().info("daemon_ready", **info)
        self._notifier.notify(READY=1, STATUS=f"ready: {writer.head.size} entries")
        return info

    def _open_ledger(self, db: Path, key: SigningKey) -> tuple[LedgerWriter, VerificationError | None]:
        """The self-check's finding (when starting despite it), and the writer on the checked ledger."""
        config = self.config
        try:
            damage = selfcheck.check_at_startup(db, config, start_despite_damage=self._start_despite_damage)
            writer = LedgerWriter(
                db, key, asyncio.get_running_loop(),
                max_group=config.ledger.max_group,
                signing_mode=config.signing.mode,
                checkpoint_interval_s=config.checkpoint.interval_s,
                key_path=key_path(config.state_dir),
            )
        except sqlite3.DatabaseError as exc:  # another format, not a ledger, unreadable
            raise StartupError(f"cannot open the ledger {db}: {exc}") from None
        return writer, damage

    def _register_commit_listeners(self) -> None:
        """Where commits go: each listener runs on the writer thread once a group is durable."""
        writer, sinks = self._writer, self._sinks
        writer.add_commit_listener(self.aggregates.on_commit)
        writer.add_commit_listener(self._measure_ledger)
        writer.add_commit_listener(lambda entries, seconds: log_committed(entries))
        if sinks is not None:
            writer.add_commit_listener(sinks.on_commit)  # wakes the sink host; notes the time for the lag

    async def _listen(
        self, resources: contextlib.AsyncExitStack, registry: CollectorRegistry, renderer: Renderer
    ) -> str | None:
        """Bind the ingest socket and (when on) the HTTP port; answers the HTTP address."""
        self._server = await bind_ingest_socket(self.config, self._sockets, self._connections.protocol_factory)
        resources.callback(self._close_socket)
        if not self.config.http.enabled:
            return None
        render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccos-render")
        resources.callback(render_pool.shutdown)
        self._http_access = HttpAccess(None)
        app = build_app(self._ops, registry, render_pool, renderer, self._http_access)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        resources.push_async_callback(runner.cleanup)
        self._http = HttpListener.bind(self.config, self._sockets, runner)
        resources.callback(self._http.close)
        await self._use_web_config(self.config.http.web)
        return self._http.address

    async def _use_web_config(self, web_config: WebConfig | None) -> None:
        """Who may read what over HTTP, and TLS for the connections accepted from now on."""
        if self._http is None:
            return
        self._http_access.web = web_config
        await self._http.serve(web_config.ssl_context if web_config is not None else None)
        lifecycle_log().info("http_access", **self._http_access.summary())

    def _live_replay(self, db: Path) -> LiveReplay | None:
        wm_sink, sinks = self.config.wm_sink, self._sinks
        if wm_sink is None or sinks is None:
            return None
        return LiveReplay(
            db, wm_sink.path, wm_sink.name, lambda: self._writer.head.size,
            pause_sinks=sinks.stop, resume_sinks=lambda: sinks.restart(self.config),
            budgets=Budgets.from_settings(self.config.wm.max_entries, self.config.wm.max_tokens),
        )

    def _redactor(self, config: Config) -> Redactor | None:
        """``config``'s ``[[redact]]`` rules compiled (None: no rules); a hashing rule loads the redaction key."""
        if not config.redact:
            return None
        if self._redact_key is None and any(rule.hash for rule in config.redact):
            self._redact_key = load_redact_key(self.config.state_dir)
        return Redactor(config.redact, self._redact_key)

    def _wm_delivered(self) -> WmDeliveredFn | None:
        """What an ingest call awaits: the WM sink's cursor past its entry (None: Working Memory is off)."""
        wm_sink, sinks = self.config.wm_sink, self._sinks
        if wm_sink is None or sinks is None:
            return None
        return lambda through, timeout_s: sinks.wait_delivered(wm_sink.name, through, timeout_s)

    def _metrics_registry(self, ledger_created: float) -> tuple[CollectorRegistry, Renderer]:
        writer = self._writer
        collector = LedgerCollector(
            self.aggregates, self.gauges, lambda: writer.pending_actions, self._sink_views, self._wm_view,
            writer.checkpoint_age,
            (ledger_created, time.time()) if self.config.metrics.created_series else None,
        )
        registry = CollectorRegistry()
        registry.register(collector)
        registry.register(ProcessCollector(registry=None))
        return registry, Renderer(collector, registry)

    # --- serving, and the end of it

    async def serve(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Stop accepting, answer every request already read; the exit stack closes the rest."""
        lifecycle_log().info("daemon_stopping", entries=self._writer.head.size)
        self._notifier.notify(STOPPING=1, STATUS="stopping: answering the requests already read")
        self._ops.accepting_writes = False
        self._server.close()
        self._connections.stop_reading()
        await self._connections.drain(DRAIN_TIMEOUT_S)

    def _close_socket(self) -> None:
        self._server.close()
        if self._sockets.ingest is None:  # systemd's socket stays for the next start
            with contextlib.suppress(FileNotFoundError):
                self.config.socket.path.unlink()

    @staticmethod
    def _start_task(resources: contextlib.AsyncExitStack, work: Any, name: str) -> None:
        """A background task that the exit stack cancels and awaits."""
        task = asyncio.create_task(work, name=name)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        resources.push_async_callback(stop)

    # --- the commit path (writer thread)

    def _measure_ledger(self, entries: Sequence[CommittedEntry], commit_seconds: float) -> None:
        now = time.monotonic()
        if now - self._size_checked_at >= LEDGER_SIZE_EVERY_S:
            self._size_checked_at = now
            self.gauges.ledger_bytes = store.database_bytes(self._writer.db_path)

    def _sink_views(self) -> list[SinkView]:
        return [] if self._sinks is None else self._sinks.views()

    def _wm_view(self) -> WmView | None:
        entries = None if self._sinks is None else self._sinks.wm_entries()
        return None if entries is None else WmView(entries, self._ops.ingest_durations())

    # --- under a service manager: status, watchdog, reload

    def _start_supervision(self, resources: contextlib.AsyncExitStack) -> None:
        self._start_task(resources, self._reload_on_signal(), "reload")
        if self._notifier.enabled:
            self._start_task(resources, self._report_status(), "sd-status")
        interval = watchdog_interval()
        if interval is not None and self._notifier.enabled:
            self._start_task(resources, self._ping_watchdog(interval / 2), "sd-watchdog")

    async def _ping_watchdog(self, period: float) -> None:
        # On the event loop on purpose: a loop that stops turning stops the pings, and
        # systemd restarts the daemon (WatchdogSec=, Restart=on-failure).
        while True:
            self._notifier.notify(WATCHDOG=1)
            await asyncio.sleep(period)

    async def _report_status(self) -> None:
        head, since = self._writer.head.size, time.monotonic()
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            now_head, now = self._writer.head.size, time.monotonic()
            rate = (now_head - head) / (now - since)
            self._notifier.notify(STATUS=f"serving: {now_head} entries, {rate:.1f} actions/s")
            head, since = now_head, now

    async def _reload_on_signal(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()  # a SIGHUP during the reload is served by one more reload
            await self._reload()

    def _load_reloaded(self) -> tuple[Config, Redactor | None]:
        """The configuration read again, with its redaction rules compiled (an unusable key is a ConfigError)."""
        loaded = self._load_config()
        try:
            return loaded, self._redactor(loaded)
        except StartupError as exc:
            raise ConfigError("redact", str(exc)) from None

    async def _reload(self) -> None:
        """Re-read the configuration, apply what can change while running, reopen files."""
        self._notifier.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            loaded, redactor = await asyncio.to_thread(self._load_reloaded)
        except ConfigError as exc:
            lifecycle_log().error("config_reload_failed", key=exc.key, error=exc.problem,
                                  note="the running configuration is kept")
            self._notifier.notify(READY=1, STATUS=f"reload failed ({exc}); running configuration kept")
            return
        plan = plan_reload(self.config, loaded)
        previous, self.config = self.config, plan.config
        if self.config.log.level != previous.log.level:
            configure_logging(self.config.log.level, self.log_ring)
        self._connections.reconfigure(self.config)
        if "http.web_config" in plan.applied:
            await self._use_web_config(self.config.http.web)
        self._ops.redactor = redactor  # [[redact]] is reloadable: the next action goes through the new rules
        if self._sinks is not None:
            # A new sink host process takes the new sink options and reopens every file
            # (after logrotate moved a JSONL file away); cursors make the switch lossless.
            await asyncio.to_thread(self._sinks.restart, self.config)
        lifecycle_log().info("config_reloaded", changed=list(plan.applied),
                             restart_required=list(plan.restart_required))
        self._notifier.notify(READY=1, STATUS="serving: configuration reloaded")


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
