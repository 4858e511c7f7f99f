"""The NATS JetStream sink: every committed entry and every checkpoint, into a replicated stream.

A fleet's monitor reads one stream for all hosts (DESIGN.md "Fleet: the JetStream
stream"). Entries go to ``<subject>.entries.<origin>`` (body: the export record
line, :meth:`StoredEntry.export_line`; header ``Nats-Msg-Id: <origin>/<seq>``),
checkpoints to ``<subject>.checkpoints.<origin>`` (body: the signed note; header
``Nats-Msg-Id: <origin>/cp/<size>``). ``<origin>`` is the log's origin (its key
name) with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.

Delivery: a batch is published concurrently and :meth:`NatsSink.deliver` returns
only when JetStream acknowledged every message (a duplicate ack too: the message
is in the stream already). Any failure raises and the runner retries the whole
batch later from its cursor; the message ids make the retries harmless within
the stream's duplicate window, so each entry is in the stream once.

Checkpoints follow the entries they cover: one is published only after every
entry below its size was acknowledged. Which were published is kept as a second
cursor row in the ledger, ``<sink name>:checkpoints``, holding the size of the
last one acknowledged (sink names cannot contain ``:``). Checkpoints written
while no entry arrives (the writer's interval ran out) are found by a poll every
:data:`CHECKPOINT_POLL_S` on the sink's own event loop.

The client is asyncio (nats-py); the runner's thread is not. The sink owns an
event loop on a thread of its own, started by :meth:`open` and stopped by
:meth:`close`, and the runner's thread waits on coroutines run there. Nothing
connects in :meth:`open`: a NATS that is down makes deliveries fail (and be
retried with backoff), never the sink host.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import ssl
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from ccos_obsd.config import NatsOptions
from ccos_obsd.ledger import store
from ccos_obsd.ledger.store import StoredEntry

log = structlog.get_logger("ccos_obsd.sinks.nats")

T = TypeVar("T")

DUPLICATE_WINDOW_S = 600.0
"""The stream's deduplication window when the sink creates it: far longer than a retry takes (backoff <= 30 s)."""
CONNECT_TIMEOUT_S = 2.0
"""One attempt to connect to one server."""
CONNECT_DEADLINE_S = 6.0
"""All attempts of one connect (each server twice); then the delivery fails and the runner backs off."""
PUBLISH_TIMEOUT_S = 5.0
"""How long one message may wait for its PubAck before the batch counts as failed."""
DELIVER_TIMEOUT_S = 30.0
"""Bound on one whole delivery (connect, stream check, publish), so a stuck client cannot stall the runner."""
CHECKPOINT_POLL_S = 1.0
CHECKPOINT_BATCH = 1000
_NOT_ORIGIN = re.compile(r"[^A-Za-z0-9_-]")


def subject_origin(origin: str) -> str:
    """A log origin as one subject token: every character outside ``[A-Za-z0-9_-]`` becomes ``_``."""
    return _NOT_ORIGIN.sub("_", origin)


def checkpoint_cursor_name(sink_name: str) -> str:
    """The ``sink_cursors`` row that holds the size of the last checkpoint the sink published."""
    return f"{sink_name}:checkpoints"


def wanted_stream(options: NatsOptions) -> StreamConfig:
    """The stream as the sink creates it when it is missing."""
    return StreamConfig(
        name=options.stream,
        subjects=[f"{options.subject}.>"],
        storage=StorageType.FILE,
        num_replicas=options.replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=options.max_age_s,
    )


def stream_differences(want: StreamConfig, have: StreamConfig) -> dict[str, tuple[Any, Any]]:
    """The settings in which an existing stream differs from the one the sink would create: name -> (want, have)."""
    differences: dict[str, tuple[Any, Any]] = {}
    if not set(want.subjects or ()) <= set(have.subjects or ()):
        differences["subjects"] = (want.subjects, have.subjects)
    if have.storage != want.storage:
        differences["storage"] = (str(want.storage), str(have.storage))
    if (have.num_replicas or 1) != want.num_replicas:
        differences["replicas"] = (want.num_replicas, have.num_replicas or 1)
    if have.duplicate_window != want.duplicate_window:
        differences["duplicate_window"] = (want.duplicate_window, have.duplicate_window)
    if (have.max_age or 0.0) != (want.max_age or 0.0):
        differences["max_age"] = (want.max_age or 0.0, have.max_age or 0.0)
    return differences


class NatsSink:
    """Sink type ``nats``."""

    def __init__(self, name: str, options: NatsOptions, db: Path) -> None:
        self.name = name
        self.options = options
        self._db = db
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Everything below is used on the loop's thread only.
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._conn: sqlite3.Connection | None = None
        self._origin: str | None = None
        self._through = 0
        """Every entry below this seq is acknowledged by the stream."""
        self._checkpoints_published = 0
        self._checkpoint_lock: asyncio.Lock | None = None
        self._ready_lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None

    # --- the runner's side

    def open(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"ccos-sink-{self.name}-loop", daemon=True)
        self._thread.start()
        ready.wait()
        self._call(self._start(), timeout=DELIVER_TIMEOUT_S)

    def deliver(self, entries: Sequence[StoredEntry]) -> None:
        self._call(self._deliver(entries), timeout=DELIVER_TIMEOUT_S)

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown(), timeout=DELIVER_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = None

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the NATS sink is not open")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    # --- the loop's side

    async def _start(self) -> None:
        self._conn = store.connect(self._db, readonly=False)
        self._through = store.read_sink_cursor(self._conn, self.name)
        self._checkpoints_published = store.read_sink_cursor(self._conn, checkpoint_cursor_name(self.name))
        self._checkpoint_lock = asyncio.Lock()
        self._ready_lock = asyncio.Lock()
        self._poller = asyncio.get_running_loop().create_task(self._poll_checkpoints())

    async def _shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.close(), CONNECT_TIMEOUT_S)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("nats_close_failed", sink=self.name, error=str(exc) or type(exc).__name__)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _deliver(self, entries: Sequence[StoredEntry]) -> None:
        js = await self._ready()
        origin = self._origin_token()
        subject = f"{self.options.subject}.entries.{origin}"
        await self._publish_all(js, [
            (subject, entry.export_line().encode("utf-8"), f"{origin}/{entry.seq}") for entry in entries
        ])
        self._through = max(self._through, entries[-1].seq + 1)
        await self._publish_checkpoints()

    async def _ready(self) -> JetStreamContext:
        """A connection and the stream, (re)established when needed (one at a time: deliveries and the poll)."""
        assert self._ready_lock is not None  # noqa: S101 - set by _start
        async with self._ready_lock:
            return await self._connected()

    async def _connected(self) -> JetStreamContext:
        if self._nc is None or self._nc.is_closed:
            self._nc = None
            self._js = None
            self._stream_ready = False
            self._nc = await asyncio.wait_for(self._connect(), CONNECT_DEADLINE_S)
            self._js = self._nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        assert self._js is not None  # noqa: S101 - set with the connection
        if not self._stream_ready:
            await self._ensure_stream(self._js)
            self._stream_ready = True
        return self._js

    async def _connect(self) -> NatsClient:
        options = self.options
        tls: ssl.SSLContext | None = None
        if options.tls_ca or options.tls_cert:
            tls = ssl.create_default_context(cafile=options.tls_ca)
            if options.tls_cert:
                tls.load_cert_chain(options.tls_cert, options.tls_key)

        async def on_error(exc: Exception) -> None:
            log.debug("nats_client_error", sink=self.name, error=str(exc) or type(exc).__name__)

        async def on_disconnected() -> None:
            log.info("nats_disconnected", sink=self.name)

        async def on_reconnected() -> None:
            log.info("nats_reconnected", sink=self.name)

        # Each server is tried twice, then connect() raises (the runner retries with backoff); a
        # connection lost later moves to another server, or closes and the next delivery connects anew.
        client = await nats.connect(
            servers=list(options.servers),
            name=f"ccos-obsd {self.name}",
            connect_timeout=int(CONNECT_TIMEOUT_S),
            reconnect_time_wait=1,
            max_reconnect_attempts=1,
            tls=tls,
            user_credentials=options.creds_file,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        log.info("nats_connected", sink=self.name, server=str(client.connected_url.netloc if client.connected_url
                                                               else ""))
        return client

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the stream when it is missing; otherwise use it as it is, warning about each difference."""
        want = wanted_stream(self.options)
        try:
            info = await js.stream_info(self.options.stream)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(want)
                log.info("nats_stream_created", sink=self.name, stream=want.name, subjects=want.subjects,
                         replicas=want.num_replicas, duplicate_window_s=want.duplicate_window,
                         max_age_s=want.max_age)
                return
            except nats.js.errors.BadRequestError:
                info = await js.stream_info(self.options.stream)  # another host created it meanwhile
        differences = stream_differences(want, info.config)
        if differences:
            log.warning("nats_stream_differs", sink=self.name, stream=want.name,
                        settings={key: {"configured": w, "stream": h} for key, (w, h) in differences.items()},
                        note="the existing stream is used as it is")

    def _origin_token(self) -> str:
        """The log's origin (the signing key's name: rotation keeps it) as a subject token."""
        if self._origin is None:
            assert self._conn is not None  # noqa: S101 - opened by _start
            current = [key for key, _first, last in store.read_keys(self._conn) if last is None]
            if not current:
                raise RuntimeError("the ledger names no signing key yet")
            self._origin = subject_origin(current[-1].name)
        return self._origin

    async def _publish_all(self, js: JetStreamContext, messages: Sequence[tuple[str, bytes, str]]) -> None:
        """Publish concurrently; return once JetStream acknowledged each one (a duplicate too), else raise."""
        results = await asyncio.gather(
            *(js.publish(subject, body, timeout=PUBLISH_TIMEOUT_S, stream=self.options.stream,
                         headers={"Nats-Msg-Id": msg_id})
              for subject, body, msg_id in messages),
            return_exceptions=True,
        )
        failures = [result for result in results if not isinstance(result, PubAck)]
        if failures:
            first = failures[0]
            self._stream_ready = False  # looked up again (created when it went missing) before the retry
            raise RuntimeError(f"{len(failures)} of {len(messages)} messages not acknowledged by JetStream: "
                               f"{str(first) or type(first).__name__}")

    async def _publish_checkpoints(self) -> None:
        """Publish the checkpoints not published yet whose entries are all acknowledged."""
        assert self._checkpoint_lock is not None and self._conn is not None  # noqa: S101 - set by _start
        async with self._checkpoint_lock:
            while True:
                checkpoints = store.read_checkpoints_between(
                    self._conn, self._checkpoints_published, self._through, CHECKPOINT_BATCH)
                if not checkpoints:
                    return
                js = await self._ready()
                origin = self._origin_token()
                subject = f"{self.options.subject}.checkpoints.{origin}"
                await self._publish_all(js, [
                    (subject, checkpoint.note.encode("utf-8"), f"{origin}/cp/{checkpoint.size}")
                    for checkpoint in checkpoints
                ])
                self._checkpoints_published = checkpoints[-1].size
                store.write_sink_cursor(self._conn, checkpoint_cursor_name(self.name), self._checkpoints_published)

    async def _poll_checkpoints(self) -> None:
        """Checkpoints written while no entry arrives, once a delivery has connected; backs off while failing."""
        wait = CHECKPOINT_POLL_S
        while True:
            await asyncio.sleep(wait)
            if self._js is None:
                continue  # not connected yet: the runner's deliveries connect (and retry)
            try:
                await self._publish_checkpoints()
                wait = CHECKPOINT_POLL_S
            except Exception as exc:  # noqa: BLE001 - retried at the next poll or delivery
                log.debug("nats_checkpoint_publish_failed", sink=self.name, error=str(exc) or type(exc).__name__)
                wait = min(wait * 2, 30.0)
